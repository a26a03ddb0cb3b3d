"""Running a batch: this process's share of the unfinished items, in groups of compatible items (one pipeline
call each, batched guidance), each image written atomically and recorded once it is in place."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..io import append_json_line, atomic_save_png
from .items import Item, checked_controls
from .state import finished_keys


@dataclass
class Settings:
    model: str
    steps: int = 50
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 1
    checkpointing: bool = False

    def identity(self) -> dict:
        """What changes the image (batch size and checkpointing do not)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("batch_size", "checkpointing")}


def _loss_summary(result) -> dict:
    summary: dict[str, dict] = {}
    guided = result.guided_steps
    for name in guided[0].losses if guided else []:
        values = [r.losses[name] for r in guided if name in r.losses]
        summary[name] = {"first": values[0], "last": values[-1], "steps": len(values)}
    return summary


def _observable(pipe, item: Item) -> bool:
    """Whether the item's subjects can be found in its prompt (a baseline is made even where they cannot; its
    attention metrics are then left out, and the controlled items of that line fail with the reason)."""
    from ..models import get_adapter

    try:
        get_adapter(pipe).text_layout([item.prompt], {}).resolve(0, list(item.observe))
    except (ValueError, TypeError):
        return False
    return True


def group_items(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Consecutive items of the same method, boxes and options, at most ``batch_size`` per group."""
    groups: list[list[Item]] = []
    for it in items:
        last = groups[-1] if groups else None
        if last and len(last) < batch_size and (last[0].method, last[0].boxes, last[0].options) == (
            it.method, it.boxes, it.options
        ):  # fmt: skip
            last.append(it)
        else:
            groups.append([it])
    return groups


class BatchRun:
    """One process's share of a batch: counts, manifest and failure parts, progress bar."""

    def __init__(self, out: Path, pipe, settings: Settings, rank: int, total: int, progress: bool):
        from tqdm.auto import tqdm

        self.out, self.pipe, self.settings, self.rank = out, pipe, settings, rank
        self.manifest = out / f"manifest.part-{rank}.jsonl"
        self.failures = out / f"failures.part-{rank}.jsonl"
        device = pipe._execution_device
        self.gen_device = "cpu" if device.type == "mps" else device
        self.done = self.failed = 0
        self.bar = tqdm(total=total, desc="items", unit="img", disable=not progress or rank != 0, file=sys.stderr)

    def generate(self, group: list[Item]):
        import torch

        from ..pipeline import generate

        first = group[0]
        names = [] if first.method == "none" else first.method.split("+")
        subjects = [list(it.subjects or []) for it in group] if names and first.subjects else None
        boxes = json.loads(first.boxes) if first.boxes else None
        controls = checked_controls(names, subjects, boxes, json.loads(first.options), first.source)
        observe = all(it.observe and _observable(self.pipe, it) for it in group)
        negative = [it.negative_prompt or "" for it in group] if any(it.negative_prompt for it in group) else None
        s = self.settings
        return generate(
            self.pipe, [it.prompt for it in group], controls, negative_prompt=negative, num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale, height=s.height, width=s.width,
            generator=[torch.Generator(self.gen_device).manual_seed(it.seed) for it in group],
            attention=[list(it.observe) for it in group] if observe else False, checkpointing=s.checkpointing,
        )  # fmt: skip

    def record(self, it: Item, k: int, result, seconds: float, group_size: int) -> dict:
        metrics = result.attention.metrics(k) if result.attention is not None else None
        metrics = {m: None if v != v else round(v, 6) for m, v in metrics.items()} if metrics else None
        return {
            "key": it.key,
            "file": it.filename,
            "prompt": it.prompt,
            "subjects": list(it.subjects) if it.subjects else None,
            "boxes": json.loads(it.boxes) if it.boxes else None,
            "method": it.method,
            "seed": it.seed,
            "options": json.loads(it.options),
            "settings": {**dataclasses.asdict(self.settings), "batch_size": group_size},
            "losses": _loss_summary(result),
            "noise_search": {name: found[k] for name, found in result.noise_search.items()} or None,
            "attention": {"subjects": list(it.observe), **metrics} if metrics else None,
            "seconds": round(seconds, 3),
            "source": it.source,
            "rank": self.rank,
            "attncontrol": __version__,
        }

    def make(self, group: list[Item]) -> None:
        t0 = time.perf_counter()
        result = self.generate(group)
        seconds = (time.perf_counter() - t0) / len(group)
        for k, (it, image) in enumerate(zip(group, result.images)):
            record = self.record(it, k, result, seconds, len(group))
            atomic_save_png(image, self.out / it.filename, {"parameters": json.dumps(record)})
            append_json_line(self.manifest, record)  # only once the image is in place
            self.done += 1
            self.bar.update(1)

    def fail(self, it: Item, err: BaseException) -> None:
        append_json_line(
            self.failures,
            {"key": it.key, "prompt": it.prompt, "method": it.method, "seed": it.seed, "source": it.source,
             "error": f"{type(err).__name__}: {err}"},
        )  # fmt: skip
        self.failed += 1
        self.bar.update(1)

    def run_group(self, group: list[Item]) -> None:
        """Make the group; if it fails, make its items one by one so only the failing ones are recorded as such."""
        try:
            self.make(group)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:
            if len(group) == 1:
                self.fail(group[0], err)
                return
            for it in group:  # isolate the failing item(s)
                try:
                    self.make([it])
                except Exception as err_one:
                    self.fail(it, err_one)


def run(
    items: list[Item], out: Path, pipe, settings: Settings, rank: int = 0, world: int = 1, progress=True, done_keys=None
):
    """Generate this process's share of the unfinished items. Returns (done, skipped, failed, seconds).
    ``done_keys``: the items finished before the run (read by every process before any of them starts)."""
    out.mkdir(parents=True, exist_ok=True)
    done_keys = finished_keys(out) if done_keys is None else done_keys
    # An item's process follows from its key alone, never from what is finished (another process may already be
    # writing): no item twice, none left out, whatever the timing.
    mine = [it for it in items if int(it.key, 16) % world == rank and it.key not in done_keys]
    skipped = sum(it.key in done_keys for it in items)
    start = time.perf_counter()
    batch = BatchRun(out, pipe, settings, rank, len(mine), progress)
    for group in group_items(mine, settings.batch_size):
        batch.run_group(group)
    batch.bar.close()
    return batch.done, skipped, batch.failed, time.perf_counter() - start
