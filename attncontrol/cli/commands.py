"""``attncontrol generate``, ``tokens`` and ``methods``."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from ..errors import OptionError
from ..tokens import check_text
from . import preflight
from .options import method_names, options_from_args
from .parser import AE_SHORTCUTS

# what the command line calls each pipeline argument, for the request's errors
PIPELINE_FLAGS = {
    "prompt": "the prompt",
    "negative_prompt": "--negative-prompt",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "height": "--height",
    "width": "--width",
    "seed": "--seed",
}


def request_from_args(args):
    """The request that the prompt, --methods, --subjects, --boxes, --region, --set, the shortcut flags and the
    sampling flags make (no model needed): one :class:`~attncontrol.request.ControlRequest`, every error naming
    its flag. Without --methods, --subjects select attend-excite, --boxes refocus and --region regions."""
    from ..request import build_request

    names, options, sources = [], {}, {}
    regions = getattr(args, "region", None)
    if not getattr(args, "no_control", False):
        selected = (("attend-excite", args.subjects), ("refocus", args.boxes), ("regions", regions))
        default = ",".join(n for n, given in selected if given)
        if args.methods and "none" in [m.strip() for m in args.methods.replace("+", ",").split(",")]:
            raise OptionError("--methods: use --no-control for the baseline")
        names = method_names(args.methods or default or "attend-excite")
        options, sources = options_from_args(args, names)
    pipeline = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
    }
    return build_request(
        names,
        args.subjects if names else None,
        args.boxes if names else None,
        options,
        sources=sources,
        methods_from="--methods",
        subjects_from="--subjects",
        boxes_from="--boxes",
        pipeline=pipeline,
        pipeline_from=PIPELINE_FLAGS,
        regions=regions if names else None,
        regions_from="--region",
    )


def controls_from_args(args) -> list:
    """The controls that --methods, --subjects, --boxes, --region, --set and the shortcut flags ask for (no model
    needed)."""
    return request_from_args(args).controls


def _check(args):
    """Everything that can be checked before the model loads; returns (output path, controls, attention)."""
    out = preflight.check_png(args.out, "--out", args.overwrite)
    paths = {"--out": out.resolve()}
    side = getattr(args, "side_by_side", None)
    if side:
        if args.no_control:
            raise OptionError("--side-by-side compares the plain pipeline with the controlled one: drop --no-control")
        paths["--side-by-side"] = preflight.check_png(side, "--side-by-side", args.overwrite).resolve()
        if paths["--side-by-side"] == paths["--out"]:
            raise OptionError(f"--side-by-side {side} is the same path as --out: one would overwrite the other")
    for flag, value in (("--trace", args.trace), ("--save-attention", args.save_attention)):
        if value:
            here = Path(value).expanduser().resolve()
            same = [f for f, p in paths.items() if p == here]
            if same:
                raise OptionError(f"{flag} {value} is the same path as {same[0]}: one would overwrite the other")
            paths[flag] = here
    if args.no_control:
        shortcuts = [(f"--{a.replace('_', '-')}", getattr(args, a) is not None) for a in AE_SHORTCUTS]
        flags = [("--methods", args.methods), ("--set", args.set), *shortcuts, ("--no-refinement", args.no_refinement)]
        flags.append(("--region", getattr(args, "region", None)))
        given = [flag for flag, on in flags if on]
        if given:
            raise OptionError(f"--no-control runs the plain pipeline; drop {', '.join(given)}")
    if args.trace:
        preflight.check_writable_file(Path(args.trace), "--trace")
    if args.save_attention:
        preflight.check_writable_dir(args.save_attention, "--save-attention")
        if not args.subjects and not args.boxes:
            raise OptionError("--save-attention needs --subjects (the words whose attention to show)")
    controls = request_from_args(args).controls  # the prompt, the methods and options, the sampling flags
    preflight.check_device(args.device)
    preflight.check_steps(args.model, args.steps)
    preflight.check_size(args.model, args.height, args.width)
    preflight.check_regions(args.model, controls)
    subjects = args.subjects or ([] if not args.boxes else [s for c in controls for s in getattr(c, "boxes", {})])
    if subjects:
        preflight.check_subjects(args.model, [args.prompt], subjects)  # reads the model index, then its tokenizers
    else:
        preflight.check_model(args.model)  # the index alone: an offline hub id or a broken folder, before the imports
    attention = (list(args.subjects) if args.subjects else True) if args.save_attention else False
    return out, controls, attention


def _params(args, pipe, result, controls, seconds) -> dict:
    from .. import __version__
    from ..io import jsonable
    from ..metadata import run_metadata

    return {
        "attncontrol": __version__,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": result.images[0].height,
        "width": result.images[0].width,
        "controls": [{"method": c.method, **jsonable(dataclasses.asdict(c))} for c in controls],
        "seconds": round(seconds, 3),
        **({"noise_search": result.noise_search} if result.noise_search else {}),
        **run_metadata(pipe, args.model),
    }


def cmd_generate(args) -> int:
    out, controls, attention = _check(args)
    import torch

    from ..io import StagedOutputs, png_writer
    from ..loading import load_pipeline
    from ..metadata import strict_json
    from ..models import get_adapter

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    pipe.set_progress_bar_config(desc="sampling", leave=True)
    device = pipe._execution_device
    generator = torch.Generator("cpu" if device.type == "mps" else device).manual_seed(args.seed)
    if args.guidance_scale is None:
        args.guidance_scale = get_adapter(pipe).default_guidance_scale()
    start = time.perf_counter()
    result = _sample(pipe, args, controls, generator, attention)
    seconds = time.perf_counter() - start
    parameters = strict_json(_params(args, pipe, result, controls, seconds))
    pair = None
    if args.side_by_side:
        plain = _sample(pipe, args, [], torch.Generator(generator.device).manual_seed(args.seed))
        label = "+".join(c.method for c in controls)
        pair = side_by_side([(plain.images[0], "plain"), (result.images[0], label)])
    # every output goes to a temporary first and all are renamed together: a write that fails (a full disk) leaves
    # none of them, not an image without its trace
    with StagedOutputs() as staged:
        staged.file(out, png_writer(result.images[0], {"parameters": parameters}))
        if pair is not None:
            staged.file(Path(args.side_by_side), png_writer(pair, {"parameters": parameters}))
        if args.trace:
            data = strict_json([dataclasses.asdict(r) for r in result.trace]).encode()
            staged.file(Path(args.trace), lambda fh: fh.write(data))
        written = staged.folder(args.save_attention, result.attention.save) if result.attention is not None else []
    guided = result.guided_steps
    if guided:
        first, last = guided[0].loss, guided[-1].loss
        assert first is not None and last is not None  # guided_steps are the steps with a loss
        print(f"guided {len(guided)} steps; loss {first[0]:.3f} -> {last[0]:.3f}", file=sys.stderr)
    if result.attention is not None:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in result.attention.metrics().items())
        print(f"wrote {len(written)} attention files to {args.save_attention} ({metrics})", file=sys.stderr)
    print(f"wrote {out} in {seconds:.1f}s" + (f" and {args.side_by_side}" if pair is not None else ""))
    return 0


def _sample(pipe, args, controls: list, generator, attention=None):
    """One generation with the command line's prompt and settings (the side-by-side's plain run: no controls)."""
    from ..pipeline import generate

    return generate(
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


def side_by_side(images: list, cell: int = 256):
    """Images in a row, each scaled to ``cell`` pixels high (nearest-neighbour when enlarged, so small images stay
    crisp), each labelled below."""
    from PIL import Image, ImageDraw

    scaled = []
    for img, _ in images:
        w = max(1, round(img.width * cell / img.height))
        resample = Image.Resampling.NEAREST if cell >= img.height else Image.Resampling.LANCZOS
        scaled.append(img.convert("RGB").resize((w, cell), resample))
    pad = 18
    canvas = Image.new("RGB", (sum(s.width for s in scaled) + 4 * (len(scaled) - 1), cell + pad), "white")
    pen = ImageDraw.Draw(canvas)
    x = 0
    for s, (_, label) in zip(scaled, images):
        canvas.paste(s, (x, 0))
        pen.text((x + 4, cell + 3), label, fill="black")
        x += s.width + 4
    return canvas


def cmd_tokens(args) -> int:
    from ..loading import load_token_streams
    from ..tokens import tokenize

    check_text(args.prompt, "the prompt")
    streams = load_token_streams(args.model)
    for label, offset, tokenizer in streams:
        if len(streams) > 1:
            where = f"map positions {offset} + index" if offset else "map positions = index"
            print(f"{label} tokens ({where}):")
        print(tokenize(tokenizer, args.prompt).format())
    if len(streams) > 1:
        print(
            f"A subject given as an index is an index into the {streams[0][0]} table; in the other tables it means "
            "the same word."
        )
    return 0


def _print_steps(methods: dict, num_steps: int, markdown: bool) -> int:
    """``attncontrol methods --steps N``: each method's window and step options on an N-step schedule."""
    from ..controls.steps import default_control, step_rules, steps_markdown, window_text

    if num_steps < 1:
        raise OptionError(f"--steps must be >= 1, got {num_steps}")
    if markdown:
        print(steps_markdown(methods))
        return 0
    print(f"On a {num_steps}-step schedule (the methods' step indices were chosen for 50 steps):")
    for name, cls in methods.items():
        cfg = default_control(cls)
        if cfg is None:
            continue
        rules = "".join(f"; {r.text()}" for r in step_rules(cfg, num_steps))
        print(f"  {name}: {window_text(cfg, num_steps)}{rules}")
    print("start/stop also take a fraction of the schedule: --set METHOD.stop=0.5 is the first half at any length.")
    return 0


def cmd_methods(args) -> int:
    """Every method, every option: name, type, default, range, meaning (from the fields' metadata); with
    ``--markdown`` the README's option tables."""
    from ..controls import METHODS
    from ..controls.options import method_fields, options_markdown, show_value
    from ..request import method_list

    names = method_list(args.method, "attncontrol methods") if args.method else list(METHODS)
    if getattr(args, "steps", None) is not None:
        return _print_steps({name: METHODS[name] for name in names}, args.steps, getattr(args, "markdown", False))
    if getattr(args, "markdown", False):
        from ..controls.common import GuidanceOptions

        print(options_markdown({name: METHODS[name] for name in names}, GuidanceOptions))
        return 0
    for name in names:
        cls = METHODS[name]
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # the whole first paragraph
        # the class name once: "SynGen: ...", not "SynGen: SynGen: ..."
        label = doc if doc.lower().startswith(cls.__name__.lower()) else f"{cls.__name__}: {doc}"
        print(f"{name}  ({label})")
        for spec in method_fields(cls):
            alias = f" (alias {', '.join(spec.aliases)})" if spec.aliases else ""
            text = spec.range_text()
            bounds = f"  [{text}]" if text else ""
            print(f"  {spec.name}{alias}: {spec.type_text} = {json.dumps(show_value(spec.default))}{bounds}")
            print(f"      {spec.help}")
        print()
    print('Set any option with --set METHOD.FIELD=VALUE (generate, batch), a batch line\'s "options", or the app.')
    return 0
