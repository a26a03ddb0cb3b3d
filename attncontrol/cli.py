"""Command line: ``attncontrol generate`` and ``attncontrol tokens``."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .controls import METHODS, AttendExcite, make_controls, parse_boxes, parse_methods
from .errors import AttnControlError
from .io import atomic_save_png, jsonable
from .loading import DEFAULT_MODEL

_AE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AttendExcite) if f.default is not dataclasses.MISSING}


_CHECKPOINTING_HELP = (
    "recompute the UNet layers before the captured ones in each guidance backward: less memory, ~1.3x slower "
    "guidance passes, same images"
)


def _parse_subject(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attncontrol", description="Make diffusion models obey their prompts.")
    parser.add_argument("--version", action="version", version=f"attncontrol {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one image with attention controls (or the plain baseline)")
    gen.add_argument("prompt")
    gen.add_argument(
        "--subjects",
        nargs="+",
        type=_parse_subject,
        default=None,
        help="words, phrases ('red car'), occurrences ('cat#2') or token indices (see `tokens`)",
    )
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default: {DEFAULT_MODEL})")
    gen.add_argument("--out", default="out.png", help="output PNG (parameters stored in its text chunk)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=_positive_int, default=50)
    gen.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's (7.5 SD, 5.0 SDXL)")
    gen.add_argument("--height", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--no-control", action="store_true", help="the plain pipeline, same seed (baseline)")
    gen.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    gen.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda, fp32 elsewhere"
    )
    gen.add_argument("--allow-pickle", action="store_true", help="also read pickled .bin weights (trusted models only)")
    gen.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated, combined in one run: {', '.join(METHODS)} "
        "(default: attend-excite for --subjects, refocus for --boxes, both when both are given)",
    )
    gen.add_argument(
        "--boxes",
        default=None,
        help="Refocus boxes, normalised x0,y0,x1,y1: 'cat=0.05,0.2,0.5,0.9;dog=0.55,0.2,0.95,0.9'",
    )
    ae = gen.add_argument_group("Attend-and-Excite")
    ae.add_argument("--max-iter-to-alter", type=int, default=_AE_DEFAULTS["stop"])
    ae.add_argument("--scale-factor", type=float, default=_AE_DEFAULTS["scale_factor"])
    ae.add_argument("--max-refinement-steps", type=int, default=_AE_DEFAULTS["max_refinement_steps"])
    ae.add_argument("--no-refinement", action="store_true", help="skip the iterative refinement steps")
    ae.add_argument("--attn-res", type=int, nargs="+", default=None, help="map resolution: N or ROWS COLS")
    gen.add_argument("--trace", default=None, help="also write the per-step trace as JSON to this file")
    gen.add_argument(
        "--checkpointing",
        action="store_true",
        help=_CHECKPOINTING_HELP,
    )
    gen.add_argument(
        "--save-attention",
        default=None,
        metavar="DIR",
        help="write each subject's attention heatmap (PNG, mean over steps), its GIF over the steps and the maps",
    )

    bat = sub.add_parser(
        "batch",
        help="prompts x seeds x methods into a folder; resumable; `accelerate launch -m attncontrol batch` splits",
    )
    src = bat.add_mutually_exclusive_group(required=True)
    src.add_argument("prompts", nargs="?", help=".txt ('PROMPT' or 'PROMPT | cat, dog'), .jsonl or .csv file")
    src.add_argument("--prompt-set", choices=["ae-animals", "ae-animal-objects", "ae-objects", "ae-all"])
    bat.add_argument("--out", required=True, help="output folder (PNGs, manifest.jsonl, failures.jsonl)")
    bat.add_argument("--seeds", default="0", help="e.g. 0-63 or 0,1,5 (default 0)")
    bat.add_argument("--methods", default="attend-excite", help="e.g. none,attend-excite,astar (a+b combines)")
    bat.add_argument(
        "--auto-subjects", action="store_true", help="pick subjects: last word of each ' and '/' with ' half"
    )
    bat.add_argument("--model", default=DEFAULT_MODEL)
    bat.add_argument("--steps", type=_positive_int, default=50)
    bat.add_argument("--guidance-scale", type=float, default=None)
    bat.add_argument("--height", type=int, default=None)
    bat.add_argument("--width", type=int, default=None)
    bat.add_argument("--batch-size", type=_positive_int, default=1, help="images per pipeline call (batched guidance)")
    bat.add_argument("--device", default=None)
    bat.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    bat.add_argument("--allow-pickle", action="store_true")
    bat.add_argument(
        "--checkpointing",
        action="store_true",
        help=_CHECKPOINTING_HELP,
    )

    ev = sub.add_parser("eval", help="score a batch folder per image and per method (Markdown/CSV tables, grids)")
    ev.add_argument("out", help="an `attncontrol batch` output folder")
    ev.add_argument("--clip", default=None, metavar="PATH", help="CLIP model folder (e.g. clip-vit-base-patch16)")
    ev.add_argument("--captioner", default=None, metavar="PATH", help="BLIP captioning model folder (needs --clip)")
    ev.add_argument("--grid", action="store_true", help="also write one image grid per prompt (methods side by side)")
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--batch-size", type=_positive_int, default=16)
    ev.add_argument("--allow-pickle", action="store_true", help="also read pickled .bin weights (trusted models only)")

    ui = sub.add_parser("ui", help="the Gradio app: pick subjects, draw boxes, compare with the baseline, see the maps")
    ui.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default: {DEFAULT_MODEL})")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--concurrency", type=_positive_int, default=1, help="requests handled at once (default 1)")
    ui.add_argument("--max-steps", type=_positive_int, default=100)
    ui.add_argument("--max-side", type=_positive_int, default=1024, help="largest height/width a user may ask for")
    ui.add_argument("--device", default=None)
    ui.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    ui.add_argument("--allow-pickle", action="store_true")

    tok = sub.add_parser("tokens", help="print the token table of a prompt (indices to pass as --subjects)")
    tok.add_argument("prompt")
    tok.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder whose tokenizer to use")
    return parser


def build_controls(args) -> list:
    """The controls that --methods, --subjects, --boxes and the method options ask for."""
    default = ",".join(name for name, given in (("attend-excite", args.subjects), ("refocus", args.boxes)) if given)
    try:
        names = parse_methods(args.methods or default or "attend-excite")
    except ValueError as err:
        raise AttnControlError(str(err)) from None
    if args.methods and "none" in args.methods.split(","):
        raise AttnControlError("use --no-control for the baseline")
    attn_res = None
    if args.attn_res:
        if len(args.attn_res) not in (1, 2):
            raise AttnControlError(f"--attn-res takes N or ROWS COLS, got {args.attn_res}")
        attn_res = tuple(args.attn_res) if len(args.attn_res) == 2 else args.attn_res[0]
    ae = dict(
        max_iter_to_alter=args.max_iter_to_alter,
        scale_factor=args.scale_factor,
        max_refinement_steps=args.max_refinement_steps,
    )
    if args.no_refinement:
        ae["thresholds"] = {}  # else the dataclass default
    options = {name: {"attn_res": attn_res} for name in names}
    options.setdefault("attend-excite", {}).update(ae)
    if args.boxes and "refocus" not in names:
        raise AttnControlError(f"--boxes is for refocus, which is not among --methods {','.join(names)}")
    if "refocus" in names and not args.boxes:
        raise AttnControlError("refocus needs --boxes 'cat=x0,y0,x1,y1;dog=...'")
    if any(m != "refocus" for m in names) and not args.subjects:
        raise AttnControlError("--subjects is required (or pass --no-control for the baseline)")
    try:
        boxes = parse_boxes(args.boxes) if args.boxes else None
        return make_controls(names, args.subjects, boxes, options)
    except ValueError as err:
        raise AttnControlError(f"--boxes: {err}") from None


def cmd_generate(args) -> int:
    import torch

    from .loading import load_pipeline
    from .models import get_adapter
    from .pipeline import generate

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise AttnControlError(f"--out must end in .png, got {args.out!r}")
    controls = [] if args.no_control else build_controls(args)
    attention = False
    if args.save_attention:
        if not args.subjects and not args.boxes:
            raise AttnControlError("--save-attention needs --subjects (the words whose attention to show)")
        attention = list(args.subjects) if args.subjects else True
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    pipe.set_progress_bar_config(desc="sampling", leave=True)
    device = pipe._execution_device
    gen_device = "cpu" if device.type == "mps" else device
    generator = torch.Generator(gen_device).manual_seed(args.seed)
    if args.guidance_scale is None:
        args.guidance_scale = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
    start = time.perf_counter()
    result = generate(
        pipe,
        args.prompt,
        controls,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=generator,
        attention=attention,
        checkpointing=args.checkpointing,
    )
    seconds = time.perf_counter() - start
    params = {
        "attncontrol": __version__,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": result.images[0].height,
        "width": result.images[0].width,
        "dtype": str(get_adapter(pipe).dtype).removeprefix("torch."),
        "controls": [{"method": c.method, **jsonable(dataclasses.asdict(c))} for c in controls],
        "seconds": round(seconds, 3),
    }
    atomic_save_png(result.images[0], out, {"parameters": json.dumps(params)})
    guided = result.guided_steps
    if guided:
        print(f"guided {len(guided)} steps; loss {guided[0].loss[0]:.3f} -> {guided[-1].loss[0]:.3f}", file=sys.stderr)
    if args.trace:
        Path(args.trace).write_text(json.dumps([dataclasses.asdict(r) for r in result.trace], indent=1))
    if result.attention is not None:
        written = result.attention.save(args.save_attention)
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in result.attention.metrics().items())
        print(f"wrote {len(written)} attention files to {args.save_attention} ({metrics})", file=sys.stderr)
    print(f"wrote {out} in {seconds:.1f}s")
    return 0


def _init_distributed(world: int):
    """torch.distributed for the processes that ``accelerate launch`` / ``torchrun`` started (gloo on CPU)."""
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist


def cmd_batch(args) -> int:
    from .batch import Settings, expand, finished_keys, merge, parse_seeds, prompt_set, read_entries, run
    from .loading import load_pipeline

    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        raise AttnControlError(f"--seeds: {err}") from None
    entries = prompt_set(args.prompt_set) if args.prompt_set else read_entries(args.prompts, args.auto_subjects)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        for m in methods:
            parse_methods(m)
    except ValueError as err:
        raise AttnControlError(f"--methods: {err}") from None
    settings = Settings(
        args.model, args.steps, args.guidance_scale, args.height, args.width, args.batch_size, args.checkpointing
    )
    items = expand(entries, seeds, methods, settings=settings.identity())  # every line checked before model work
    out = Path(args.out)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    dist = _init_distributed(world)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # temporary files of a run that was killed
            stale.unlink(missing_ok=True)
        merge(out)
    if dist is not None:
        dist.barrier()
    done_keys = finished_keys(out)  # read by every process before any process writes
    if dist is not None:
        dist.barrier()
    device = args.device
    if device is None and world > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    pipe = load_pipeline(args.model, device=device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    done, skipped, failed, seconds = run(items, out, pipe, settings, rank, world, done_keys=done_keys)
    if dist is not None:
        import torch

        counts = torch.tensor([done, failed], dtype=torch.int64, device=pipe._execution_device)
        dist.all_reduce(counts)
        done, failed = (int(x) for x in counts.tolist())
        dist.barrier()
    if rank == 0:
        merge(out)
        rate = 60 * done / seconds if seconds > 0 else 0.0
        print(f"done {done}, skipped {skipped}, failed {failed} of {len(items)} items; {rate:.1f} images/min"
              + (f"; see {out / 'failures.jsonl'}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


def cmd_eval(args) -> int:
    from .eval import evaluate

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    report = evaluate(
        args.out, args.clip, args.captioner, args.grid, device, args.batch_size, args.allow_pickle, progress=True
    )
    print(report.markdown(), end="")
    print(f"{len(report.rows)} images; wrote {', '.join(str(f) for f in report.files[:3])}"
          + (f" and {len(report.files) - 3} grids" if len(report.files) > 3 else ""), file=sys.stderr)  # fmt: skip
    return 0


def cmd_ui(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise AttnControlError("the UI needs gradio: pip install 'attncontrol[ui]'") from None
    from .demo import Limits, Runner
    from .loading import load_pipeline
    from .ui import launch

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    runner = Runner(pipe, args.model, Limits(max_steps=args.max_steps, max_side=args.max_side))
    launch(runner, host=args.host, port=args.port, concurrency=args.concurrency)
    return 0


def cmd_tokens(args) -> int:
    from .loading import load_token_streams
    from .tokens import tokenize

    streams = load_token_streams(args.model)
    for label, offset, tokenizer in streams:
        if len(streams) > 1:
            where = f"map positions {offset} + index" if offset else "map positions = index"
            print(f"{label} tokens ({where}):")
        print(tokenize(tokenizer, args.prompt).format())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "batch":
            return cmd_batch(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "ui":
            return cmd_ui(args)
        return cmd_tokens(args)
    except AttnControlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
