"""Running a batch: this process's share of the unfinished items, in groups of compatible items (one pipeline
call each, batched guidance), each image written atomically and recorded once it is in place."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import AttnControlError
from ..io import append_json_line, atomic_save_png, finite
from ..metadata import run_metadata
from .items import Item, checked_controls
from .state import Claims, PartFile, finished_keys


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


def _observable(pipe, prompt: str, subjects: tuple) -> bool:
    """Whether an item's subjects can be found in its prompt (a baseline is made even where they cannot; its
    attention metrics are then left out, and the controlled items of that line fail with the reason)."""
    from ..models import get_adapter

    try:
        get_adapter(pipe).text_layout([prompt], {}).resolve(0, list(subjects))
    except (ValueError, TypeError):
        return False
    return True


def _observed(pipe, group: list[Item]) -> list[list] | None:
    """The subjects whose attention each item of ``group`` records, or None unless every item has subjects that
    its prompt resolves."""
    observed = []
    for it in group:
        if not it.observe or not _observable(pipe, it.prompt, it.observe):
            return None
        observed.append(list(it.observe))
    return observed


def _group_key(it: Item) -> tuple:
    return (it.method, it.boxes, it.regions, it.options)


def group_items(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Items of the same method, boxes, regions and options (whatever their prompts and seeds), at most
    ``batch_size`` per group, in the order of each group's first item."""
    groups: list[list[Item]] = []
    open_group: dict[tuple, list[Item]] = {}
    for it in items:
        group = open_group.get(_group_key(it))
        if group is None or len(group) >= batch_size:
            group = open_group[_group_key(it)] = []
            groups.append(group)
        group.append(it)
    return groups


class BatchWriteError(AttnControlError, RuntimeError):
    """An image or record could not be written (full disk, permissions)."""


class BatchStopped(AttnControlError, RuntimeError):
    """The batch stopped itself (repeated write errors)."""


class BatchRun:
    """One process's share of a batch: counts, manifest and failure parts, item claims, progress bar."""

    max_write_errors = 3  # in a row: then the batch stops (a full disk fails every item alike)

    def __init__(self, out: Path, pipe, settings: Settings, rank: int, total: int, progress: bool, status=None):
        from tqdm.auto import tqdm

        from ..models import get_adapter

        self.out, self.pipe, self.settings, self.rank = out, pipe, settings, rank
        self.manifest = PartFile(out, "manifest", rank)
        self.failures = PartFile(out, "failures", rank)
        self.claims = Claims(out)
        device = pipe._execution_device
        self.gen_device = "cpu" if device.type == "mps" else device
        gs = settings.guidance_scale
        self.guidance_scale = float(gs) if gs is not None else get_adapter(pipe).default_guidance_scale()
        self.metadata = run_metadata(pipe, settings.model)  # once: the model fingerprint walks its folder
        self.done = self.failed = self.elsewhere = self.write_errors = 0
        self.status = status if status is not None else {}
        self.bar = tqdm(total=total, desc="items", unit="img", disable=not progress or rank != 0, file=sys.stderr)

    def close(self) -> None:
        self.claims.release_all()
        self.manifest.close()
        self.failures.close()
        self.bar.close()

    def generate(self, group: list[Item]):
        import torch

        from ..pipeline import generate

        first = group[0]
        names = [] if first.method == "none" else first.method.split("+")
        subjects = [list(it.subjects or []) for it in group] if names and first.subjects else None
        boxes = json.loads(first.boxes) if first.boxes else None
        regions = json.loads(first.regions) if first.regions else None
        controls = checked_controls(names, subjects, boxes, json.loads(first.options), first.source, regions)
        observed = _observed(self.pipe, group)
        negative = [it.negative_prompt or "" for it in group] if any(it.negative_prompt for it in group) else None
        s = self.settings
        return generate(
            self.pipe,
            [it.prompt for it in group],
            controls,
            negative_prompt=negative,
            num_inference_steps=s.steps,
            guidance_scale=self.guidance_scale,
            height=s.height,
            width=s.width,
            generator=[torch.Generator(self.gen_device).manual_seed(it.seed) for it in group],
            attention=observed if observed is not None else False,
            checkpointing=s.checkpointing,
        )

    def record(self, it: Item, k: int, result, seconds: float, group_size: int) -> dict:
        metrics = result.attention.metrics(k) if result.attention is not None else None
        metrics = {m: None if v != v else round(v, 6) for m, v in metrics.items()} if metrics else None
        settings = {**dataclasses.asdict(self.settings), "guidance_scale": self.guidance_scale}
        return {
            "key": it.key,
            "file": it.filename,
            "prompt": it.prompt,
            "subjects": list(it.subjects) if it.subjects else None,
            "boxes": json.loads(it.boxes) if it.boxes else None,
            "regions": json.loads(it.regions) if it.regions else None,
            "method": it.method,
            "seed": it.seed,
            "options": json.loads(it.options),
            "settings": {**settings, "batch_size": group_size},
            "losses": _loss_summary(result),
            "noise_search": {name: found[k] for name, found in result.noise_search.items()} or None,
            "attention": {"subjects": list(it.observe), **metrics} if metrics and it.observe else None,
            "seconds": round(seconds, 3),
            "source": it.source,
            "benchmark": json.loads(it.benchmark) if it.benchmark else None,
            "rank": self.rank,
            "attncontrol": __version__,
            **self.metadata,
        }

    def make(self, group: list[Item]) -> None:
        t0 = time.perf_counter()
        result = self.generate(group)
        seconds = (time.perf_counter() - t0) / len(group)
        for k, (it, image) in enumerate(zip(group, result.images)):
            record = finite(self.record(it, k, result, seconds, len(group)))
            path = self.out / it.filename
            try:
                atomic_save_png(image, path, {"parameters": json.dumps(record, allow_nan=False)})
                append_json_line(self.manifest.path, record)  # only once the image is in place
            except OSError as err:
                raise BatchWriteError(f"cannot write {err.filename or path}: {err.strerror or err}") from err
            self.claims.finish(it.key)
            self.done += 1
            self.write_errors = 0
            self.status["done"] = self.status.get("done", 0) + 1
            self.bar.update(1)

    def fail(self, it: Item, err: BaseException) -> None:
        message = str(err) if isinstance(err, BatchWriteError) else f"{type(err).__name__}: {err}"
        # the disk that refused an image may refuse the failure record too; the count still says it
        with contextlib.suppress(OSError):
            append_json_line(
                self.failures.path,
                {
                    "key": it.key,
                    "prompt": it.prompt,
                    "method": it.method,
                    "seed": it.seed,
                    "source": it.source,
                    "error": message,
                },
            )
        self.claims.release(it.key)
        self.failed += 1
        self.status["failed"] = self.status.get("failed", 0) + 1
        self.bar.update(1)
        if isinstance(err, BatchWriteError):
            self.write_errors += 1
            if self.write_errors >= self.max_write_errors:
                raise BatchStopped(
                    f"stopped after {self.write_errors} write errors in a row ({err}); {self.done} done, "
                    f"{self.failed} failed; free space or fix the folder, then rerun the same command to resume"
                )

    def run_group(self, group: list[Item]) -> None:
        """Make the group; if it fails, make its items one by one so only the failing ones are recorded as such
        (a write error is not the items' fault: they fail as they are)."""
        try:
            self.make(group)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BatchWriteError as err:
            for it in group:
                if it.key in self.claims.held:
                    self.fail(it, err)
        except Exception as err:
            pending = [it for it in group if it.key in self.claims.held]
            if len(pending) == 1:
                self.fail(pending[0], err)
                return
            for it in pending:  # isolate the failing item(s)
                try:
                    self.make([it])
                except Exception as err_one:
                    self.fail(it, err_one)

    def next_group(self, pending: list[Item]) -> list[Item]:
        """Claim up to ``batch_size`` pending items of the first claimable item's method and options; items another
        worker holds or has finished are dropped from ``pending``."""
        group: list[Item] = []
        rest: list[Item] = []
        for it in pending:
            if len(group) >= self.settings.batch_size or (group and _group_key(it) != _group_key(group[0])):
                rest.append(it)
            elif self.claims.take(it.key, self.out / it.filename):
                group.append(it)
            else:
                self.elsewhere += 1
                self.bar.update(1)
        pending[:] = rest
        return group


def run(
    items: list[Item],
    out: Path,
    pipe,
    settings: Settings,
    rank: int = 0,
    world: int = 1,
    progress=True,
    done_keys=None,
    status: dict | None = None,
):
    """Generate this process's share of the unfinished items. Returns (done, skipped, failed, seconds): skipped
    counts the items finished before the run and those another worker on the same folder took.
    ``done_keys``: the items finished before the run (read by every process before any of them starts);
    ``status``: updated with the ``done`` and ``failed`` counts as they change (for an interrupted run's message)."""
    out.mkdir(parents=True, exist_ok=True)
    done_keys = finished_keys(out) if done_keys is None else done_keys
    # An item's process follows from its key alone, never from what is finished (another process may already be
    # writing): no item twice, none left out, whatever the timing. Claims share the rest with other workers.
    mine = [it for it in items if int(it.key, 16) % world == rank and it.key not in done_keys]
    skipped = sum(it.key in done_keys for it in items)
    start = time.perf_counter()
    batch = BatchRun(out, pipe, settings, rank, len(mine), progress, status)
    try:
        pending = list(mine)
        while pending:
            group = batch.next_group(pending)
            if group:
                batch.run_group(group)
    finally:
        batch.close()
    return batch.done, skipped + batch.elsewhere, batch.failed, time.perf_counter() - start
