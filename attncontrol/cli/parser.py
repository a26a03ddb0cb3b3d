"""The argument parser of ``attncontrol`` (no torch here: ``--help`` and ``methods`` start in well under a second)."""

from __future__ import annotations

import argparse

from .. import __version__
from ..loading import DEFAULT_MODEL

CHECKPOINTING_HELP = (
    "recompute the denoiser layers before the captured ones in each guidance backward: less memory, ~1.3x slower "
    "guidance passes, same images"
)
# Attend-and-Excite's shortcut flags: (flag, field of attend-excite); given without attend-excite, an error
AE_SHORTCUTS = {
    "max_iter_to_alter": "stop",
    "scale_factor": "scale_factor",
    "max_refinement_steps": "max_refinement_steps",
}


def _parse_subject(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id, local folder, or `shapes` (the shipped shapes-world model, offline; default: {DEFAULT_MODEL})",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda, fp32")
    p.add_argument("--allow-pickle", action="store_true", help="also read pickled .bin weights (trusted models only)")


def add_method_args(p: argparse.ArgumentParser, methods_default: str | None) -> None:
    p.add_argument(
        "--methods",
        default=methods_default,
        help="comma-separated, combined in one run (`attncontrol methods` lists them)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="any option of any method, e.g. --set astar.scale_factor=5 --set refocus.tiered=false "
        "(repeatable; `attncontrol methods` lists the fields)",
    )
    ae = p.add_argument_group("Attend-and-Excite shortcuts (attend-excite only; --set for other methods)")
    ae.add_argument("--max-iter-to-alter", type=_int, default=None, help="= --set attend-excite.stop=N")
    ae.add_argument("--scale-factor", type=_finite_float, default=None)
    ae.add_argument("--max-refinement-steps", type=_int, default=None)
    ae.add_argument("--no-refinement", action="store_true", help="attend-excite without its refinement steps")
    p.add_argument(
        "--attn-res", type=_int, nargs="+", default=None, help="map resolution of every method: N or ROWS COLS"
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_positive_int, default=50)
    p.add_argument("--guidance-scale", type=_finite_float, default=None, help="default: the pipeline's own")
    p.add_argument("--height", type=_int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=_int, default=None)
    p.add_argument("--checkpointing", action="store_true", help=CHECKPOINTING_HELP)


def _generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate one image with attention controls (or the plain baseline)")
    gen.add_argument("prompt")
    subjects_help = "words, phrases ('red car'), occurrences ('cat#2') or token indices (see `tokens`)"
    gen.add_argument("--subjects", nargs="+", type=_parse_subject, default=None, help=subjects_help)
    boxes_help = "Refocus boxes, normalised x0,y0,x1,y1: 'cat=0.05,0.2,0.5,0.9;dog=0.55,0.2,0.95,0.9'"
    gen.add_argument("--boxes", default=None, help=boxes_help)
    region_help = (
        "regional prompting: a sub-prompt for a box, 'a red car@0.1,0.1,0.5,0.9' (normalised x0,y0,x1,y1; split at "
        "the last '@'); repeatable, in order, at most 8; selects the regions method "
        "(--set regions.base_prompt_weight=0.2 and its other options)"
    )
    gen.add_argument("--region", action="append", default=None, metavar="TEXT@X0,Y0,X1,Y1", help=region_help)
    add_model_args(gen)
    gen.add_argument("--out", default="out.png", help="output PNG (parameters stored in its text chunk)")
    clobber = gen.add_mutually_exclusive_group()
    clobber.add_argument(
        "--overwrite",
        dest="overwrite",
        action="store_true",
        default=True,
        help="replace an existing --out (the default)",
    )
    clobber.add_argument("--no-clobber", dest="overwrite", action="store_false", help="refuse an existing --out")
    gen.add_argument("--seed", type=_int, default=0)
    add_sampling_args(gen)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--no-control", action="store_true", help="the plain pipeline, same seed (baseline)")
    add_method_args(gen, None)
    gen.add_argument("--trace", default=None, help="also write the per-step trace as JSON to this file")
    pair_help = "also run the plain pipeline (same seed) and write plain | controlled, labelled, to this PNG"
    gen.add_argument("--side-by-side", default=None, metavar="PNG", help=pair_help)
    attention_help = "write each subject's heatmap (mean over steps), its GIF over the steps and the maps"
    gen.add_argument("--save-attention", default=None, metavar="DIR", help=attention_help)


def _batch(sub) -> None:
    bat = sub.add_parser(
        "batch",
        help="prompts x seeds x methods into a folder; resumable; `accelerate launch -m attncontrol batch` splits it",
    )
    src = bat.add_mutually_exclusive_group(required=True)
    src.add_argument("prompts", nargs="?", help=".txt ('PROMPT' or 'PROMPT | cat, dog'), .jsonl or .csv file")
    src.add_argument("--prompt-set", help="a built-in prompt set (`attncontrol batch --prompt-set list` lists them)")
    bat.add_argument("--out", help="output folder (PNGs, manifest.jsonl, failures.jsonl); required to run")
    bat.add_argument("--seeds", default="0", help="e.g. 0-63 or 0,1,5 (default 0)")
    bat.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="only the first N prompts")
    bat.add_argument(
        "--auto-subjects", action="store_true", help="pick subjects: last word of each ' and '/' with ' half"
    )
    add_model_args(bat)
    add_sampling_args(bat)
    bat.add_argument("--batch-size", type=_positive_int, default=1, help="images per pipeline call (batched guidance)")
    add_method_args(bat, "attend-excite")


def _eval(sub) -> None:
    ev = sub.add_parser("eval", help="score a batch folder per image and per method (Markdown/CSV tables, grids)")
    ev.add_argument("out", help="an `attncontrol batch` output folder")
    ev.add_argument("--clip", default=None, metavar="PATH", help="CLIP model folder or hub id (clip-vit-base-patch16)")
    ev.add_argument("--captioner", default=None, metavar="PATH", help="BLIP captioning model (needs --clip)")
    ev.add_argument(
        "--vqa",
        default=None,
        metavar="PATH",
        help="BLIP VQA model (blip-vqa-capfilt-large): T2I-CompBench's attribute-binding score",
    )
    ev.add_argument(
        "--detector",
        default=None,
        metavar="PATH",
        help="OWLv2/OWL-ViT detector: objects found, box IoU, GenEval, T2I-CompBench and HRS-Bench spatial",
    )
    ev.add_argument(
        "--detection-threshold",
        type=float,
        default=0.3,
        metavar="S",
        help="detector score an object needs (default 0.3, GenEval's)",
    )
    ev.add_argument(
        "--counting-threshold",
        type=float,
        default=0.9,
        metavar="S",
        help="the score GenEval's counting task needs (default 0.9, GenEval's)",
    )
    ev.add_argument(
        "--compare",
        default=None,
        metavar="METHOD",
        help="each method's gain over METHOD (e.g. none) on the same prompts and seeds, with a paired test",
    )
    ev.add_argument(
        "--bootstrap",
        type=_positive_int,
        default=2000,
        metavar="N",
        help="bootstrap resamples for the 95%% intervals (default 2000)",
    )
    ev.add_argument("--grid", action="store_true", help="also write one image grid per prompt (methods side by side)")
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--batch-size", type=_positive_int, default=16)
    ev.add_argument("--allow-pickle", action="store_true", help="also read pickled .bin weights (trusted models only)")


def _export(sub) -> None:
    ex = sub.add_parser("export", help="a batch folder's benchmark images in GenEval's / T2I-CompBench's own layouts")
    ex.add_argument("out", help="an `attncontrol batch` output folder")
    ex.add_argument("--to", required=True, metavar="DIR", help="where to write DIR/METHOD/geneval|t2i-compbench/...")
    ex.add_argument("--methods", default=None, help="only these methods (comma-separated; default: all)")


def _ui(sub) -> None:
    ui = sub.add_parser("ui", help="the Gradio app: pick subjects, draw boxes, compare with the baseline, see the maps")
    add_model_args(ui)
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    ui.add_argument("--port", type=_int, default=7860)
    ui.add_argument("--concurrency", type=_positive_int, default=1, help="requests handled at once (default 1)")
    ui.add_argument("--max-steps", type=_positive_int, default=100)
    ui.add_argument("--max-side", type=_positive_int, default=1024, help="largest height/width a user may ask for")
    ui.add_argument("--time-limit", type=_positive_int, default=600, help="seconds one request may run (default 600)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attncontrol", description="Make diffusion models obey their prompts.")
    parser.add_argument("--version", action="version", version=f"attncontrol {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate(sub)
    _batch(sub)
    _eval(sub)
    _export(sub)
    _ui(sub)
    tok = sub.add_parser("tokens", help="print the token table of a prompt (indices to pass as --subjects)")
    tok.add_argument("prompt")
    tok.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder or `shapes` whose tokenizer to use")
    met = sub.add_parser("methods", help="list every method, its options, their types, defaults and meaning")
    met.add_argument("method", nargs="?", help="only this method")
    met.add_argument("--markdown", action="store_true", help="the options as the README's Markdown tables")
    met.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="what each method's step options do on an N-step schedule (few-step models: 4, 8); with --markdown, "
        "the README's table at 50, 8 and 4 steps",
    )
    return parser
