"""``attncontrol batch``, ``eval`` and ``ui``."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import OptionError
from . import preflight
from .options import method_names, options_from_args

# what a long command has done so far, for the Ctrl-C message
STATUS: dict[str, int] = {}


def progress_note() -> str:
    if "done" in STATUS:
        return f" after {STATUS['done']} done ({STATUS.get('failed', 0)} failed); rerun the same command to resume"
    return ""


def _batch_items(args):
    from ..batch import Settings, expand, parse_seeds, prompt_set, read_entries
    from ..request import check_pipeline
    from .commands import PIPELINE_FLAGS

    try:
        seeds = parse_seeds(args.seeds)  # in range, and at most MAX_SEEDS (counted before a range is expanded)
    except ValueError as err:
        raise OptionError(f"--seeds: {err}") from None
    entries = prompt_set(args.prompt_set) if args.prompt_set else read_entries(args.prompts, args.auto_subjects)
    entries = entries[: args.limit] if getattr(args, "limit", None) else entries
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        method_names(args.methods, "--methods")  # names none: the shared parser's message
    runs = ["+".join(method_names(m, "--methods")) or "none" for m in methods]  # each run checked
    repeated = sorted({r for r in runs if runs.count(r) > 1})
    if repeated:
        raise OptionError(
            f"--methods {args.methods}: each run may be given once, got {', '.join(repeated)} more than once"
        )
    combined = [n for m in methods for n in method_names(m, "--methods")]
    options, _ = options_from_args(args, sorted(set(combined)))
    sampling = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
    check_pipeline({**sampling, "height": args.height, "width": args.width}, PIPELINE_FLAGS)
    settings = Settings(
        args.model, args.steps, args.guidance_scale, args.height, args.width, args.batch_size, args.checkpointing
    )
    items = expand(entries, seeds, methods, options=options, settings=settings.identity())  # every line checked
    return items, settings


def _list_prompt_sets() -> int:
    from ..batch import PROMPT_SETS, prompt_set

    width = max(len(name) for name in PROMPT_SETS)
    print(f"{'prompt set':<{width}} prompts  example (subjects)")
    for name in PROMPT_SETS:
        entries = prompt_set(name)
        example = f"{entries[0].prompt} ({', '.join(map(str, entries[0].subjects or []))})"
        print(f"{name:<{width}} {len(entries):>7}  {example}")
    print("sources, licences and how the subjects are chosen: attncontrol/data/README.md")
    return 0


def cmd_batch(args) -> int:
    from ..batch import finished_keys, run
    from ..batch.state import remove_stale_temporaries
    from ..batch.workers import Workers
    from ..loading import load_pipeline

    if args.prompt_set == "list":
        return _list_prompt_sets()
    if not args.out:
        raise OptionError("batch needs --out FOLDER (where the PNGs and manifest.jsonl go)")
    out = preflight.check_writable_dir(args.out, "--out")
    items, settings = _batch_items(args)
    preflight.check_device(args.device)
    preflight.check_model(args.model)
    preflight.check_steps(args.model, args.steps)
    preflight.check_size(args.model, args.height, args.width)
    workers = Workers.from_env()
    if workers.first:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # of a run that was killed (recent ones may be another worker's)
        _merge(out)
    workers.barrier()
    done_keys = finished_keys(out)  # read by every process before any process writes
    workers.barrier()
    device = workers.device(args.device)
    pipe = load_pipeline(args.model, device=device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    STATUS.update(done=0, failed=0)
    done, skipped, failed, seconds = run(
        items, out, pipe, settings, workers.rank, workers.world, done_keys=done_keys, status=STATUS
    )
    done, failed = workers.total([done, failed], pipe._execution_device)
    if workers.first:
        _merge(out)
        rate = 60 * done / seconds if seconds > 0 else 0.0
        print(
            f"done {done}, skipped {skipped}, failed {failed} of {len(items)} items; {rate:.1f} images/min"
            + (f"; see {out / 'failures.jsonl'}" if failed else "")
        )
    return 1 if failed else 0


def _merge(out: Path) -> None:
    """Fold the per-process parts into manifest.jsonl and failures.jsonl; a write that fails (a full disk) keeps
    the parts, which the next run folds in."""
    from ..batch import merge
    from ..batch.runner import BatchWriteError

    try:
        merge(out)
    except OSError as err:
        raise BatchWriteError(
            f"cannot update {out / 'manifest.jsonl'}: {err.strerror or err}; the images and the per-process "
            "manifest parts are kept: free space (or fix the folder) and rerun the same command to merge them"
        ) from None


def cmd_eval(args) -> int:
    from ..eval import evaluate

    preflight.check_device(args.device)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from ..scores import DetectionRules

    rules = DetectionRules(threshold=args.detection_threshold, counting_threshold=args.counting_threshold)
    report = evaluate(
        args.out,
        args.clip,
        args.captioner,
        args.grid,
        device,
        args.batch_size,
        args.allow_pickle,
        progress=True,
        vqa=args.vqa,
        detector=args.detector,
        rules=rules,
        compare_with=args.compare,
        bootstrap=args.bootstrap,
    )
    print(report.markdown(), end="")
    tables = [f for f in report.files if f.parent.name != "grids"]
    grids = len(report.files) - len(tables)
    print(
        f"{len(report.rows)} images; wrote {', '.join(str(f) for f in tables)}"
        + (f" and {grids} grids" if grids else ""),
        file=sys.stderr,
    )
    return 0


def _port_free(host: str, port: int) -> None:
    import socket

    if not 0 < port < 65536:
        raise OptionError(f"--port must be between 1 and 65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise OptionError(
                f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); choose another"
            ) from None


def cmd_export(args) -> int:
    from ..scores.export import export

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    preflight.check_writable_dir(args.to, "--to")
    try:
        counts = export(args.out, args.to, methods)
    except OSError as err:  # a file where a folder goes, a read-only place, a full disk, a batch image gone
        name = str(getattr(err, "filename", None) or "")
        verb = "read" if name and Path(name).resolve().is_relative_to(Path(args.out).resolve()) else "write"
        raise OptionError(f"--to {args.to!r}: cannot {verb} {name or 'there'}: {err.strerror or err}") from None
    if not any(counts.values()):
        print(f"no image in {args.out} comes from GenEval or T2I-CompBench; nothing written", file=sys.stderr)
        return 1
    print(f"wrote {counts['geneval']} GenEval and {counts['t2i-compbench']} T2I-CompBench images under {args.to}")
    return 0


def cmd_ui(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise OptionError("the UI needs gradio: pip install 'attncontrol[ui]'") from None
    from ..loading import load_pipeline
    from ..ui import launch
    from ..ui.logic import Limits, Runner

    preflight.check_device(args.device)
    _port_free(args.host, args.port)
    from ..shapes import resolve_model

    if Path(resolve_model(args.model)).expanduser().exists():
        from ..loading import check_pipeline_folder

        check_pipeline_folder(resolve_model(args.model))
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    limits = Limits(max_steps=args.max_steps, max_side=args.max_side, time_limit=args.time_limit)
    launch(Runner(pipe, args.model, limits), host=args.host, port=args.port, concurrency=args.concurrency)
    return 0
