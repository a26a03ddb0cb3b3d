"""``attncontrol eval OUT_DIR``: score a batch folder per image and per method.

Metrics (the Attend-and-Excite paper's protocol, Sec. 5; DESIGN.md section 3):

- attention metrics recorded during generation (no extra weights; in ``manifest.jsonl``):
  ``min_subject_attention`` (the weakest subject's peak attention, mean over steps) and ``subject_overlap``
  (the most overlapping pair of subjects' maps, histogram intersection, mean over steps);
- ``clip_full``: CLIP image-text cosine similarity to the full prompt, ``clip_min_half``: the minimum over the
  prompt's halves (split on " and " / " with "); text embeddings are the mean of the 80 ImageNet prompt templates
  (as CLIP's zero-shot recipe and the A&E evaluation do), re-normalised. Needs ``--clip PATH`` (e.g. a local copy
  of openai/clip-vit-base-patch16, the paper's ViT-B/16);
- ``caption_similarity``: a captioner's caption of the image (``--captioner PATH``, e.g. BLIP) compared with the
  prompt as CLIP text-text cosine similarity (single sentences, no templates). Needs ``--clip`` too.
- ``clip_score``: the plain image-prompt cosine (no templates): T2I-CompBench's non-spatial CLIPScore. ``--clip``.

The benchmarks' metrics (``attncontrol.scores``; docs/evaluation.md):

- ``vqa_binding`` (``--vqa PATH``, a BLIP VQA model): T2I-CompBench's BLIP-VQA score, one question per noun phrase;
- with ``--detector PATH`` (OWLv2 / OWL-ViT): ``objects_found`` (share of the subjects detected), ``box_iou``
  (Refocus layouts: each box against its subject's detections), ``geneval_correct`` (GenEval's rule, for images of
  the ``geneval`` sets; colours through ``--clip``), ``t2i_spatial`` (T2I-CompBench's 2D-spatial score, for the
  ``t2i-compbench-spatial`` set) and ``hrs_spatial`` (HRS-Bench's spatial accuracy, for its CSV).

Images made from a built-in set (their ``source`` is ``SET:N``) are also tallied per task in ``benchmarks.md``, in
the benchmark's own table format. ``--compare none`` adds ``compare.md``/``.csv``: each method's gain over the
baseline on the same prompts and seeds, with a bootstrap interval and a sign-flip p-value.

Output, in ``OUT_DIR/eval/``: ``per_image.csv``, ``summary.csv`` and ``summary.md`` (one row per method: images
and the mean +- standard deviation and 95% bootstrap interval of each metric), and with ``--grid`` one PNG per
prompt in ``grids/`` (rows: seeds, columns: methods). All files are written atomically; the batch folder itself
is only read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TypeGuard

from .errors import AttnControlError
from .io import atomic_save_png, atomic_write_bytes
from .scores.pretrained import load_pretrained as _load

METRICS = (
    "min_subject_attention",
    "subject_overlap",
    "clip_full",
    "clip_min_half",
    "caption_similarity",
    "clip_score",
    "vqa_binding",
    "objects_found",
    "box_iou",
    "geneval_correct",
    "t2i_spatial",
    "hrs_spatial",
    "shapes_present",
    "shapes_bound",
    "shapes_spatial",
    "shapes_count",
    "shapes_box_iou",
)
SHAPES_METRICS = {
    "present": "shapes_present",
    "bound": "shapes_bound",
    "spatial": "shapes_spatial",
    "count_correct": "shapes_count",
    "box_iou": "shapes_box_iou",
}


def imagenet_templates() -> list[str]:
    """The 80 ImageNet prompt templates of CLIP's zero-shot evaluation (``"a bad photo of a {}."``, ...)."""
    return json.loads(resources.files("attncontrol").joinpath("data/imagenet_templates.json").read_text())


def prompt_halves(prompt: str) -> list[str]:
    """The prompt's two halves, split on the first of " and " / " with " it contains (A&E's convention);
    the whole prompt when it has neither."""
    for sep in (" and ", " with "):
        if sep in prompt:
            return [half.strip() for half in prompt.split(sep, 1)]
    return [prompt]


def load_records(out: str | Path) -> list[dict]:
    """Finished items of a batch folder (merged manifest and any unmerged parts), one per key, whose PNG exists."""
    from .batch import finished_records

    out = Path(out)
    if not (out / "manifest.jsonl").is_file() and not any(out.glob("manifest.part-*.jsonl")):
        raise AttnControlError(f"{str(out)!r} has no manifest.jsonl: is it an `attncontrol batch` output folder?")
    records = list(finished_records(out).values())
    for rec in records:
        missing = [k for k, kind in REQUIRED.items() if not isinstance(rec.get(k), kind)]
        if missing:
            raise AttnControlError(
                f"{out}: the manifest record of {rec.get('file')!r} (key {rec['key']}) lacks "
                f"{', '.join(missing)}; eval reads records that `attncontrol batch` wrote (was it edited?)"
            )
    return records


# what every record needs for eval, with its type
REQUIRED = {"file": str, "prompt": str, "method": str, "seed": int}


class ClipScorer:
    """CLIP image and text embeddings (transformers' ``CLIPModel`` + ``CLIPProcessor``), L2-normalised."""

    def __init__(self, path: str, device="cpu", allow_pickle: bool = False):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        safe = None if allow_pickle else True  # safetensors only unless the user trusts the folder
        self.model = _load(CLIPModel, path, "CLIP model", use_safetensors=safe).to(self.device).eval()
        self.processor = _load(CLIPProcessor, path, "CLIP processor")
        self.templates = imagenet_templates()
        self._cache: dict[tuple[str, bool], object] = {}

    def _texts(self, texts: list[str]):
        import torch

        tok = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.no_grad():
            feats = self._features(self.model.get_text_features(**tok))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @staticmethod
    def _features(out):
        # transformers 5 may return a model output whose pooled projection is the features
        return out if hasattr(out, "norm") else out.pooler_output

    def text(self, text: str, templates: bool = True):
        """One normalised embedding: the mean over the templates (re-normalised), or of the text alone."""
        import torch

        key = (text, templates)
        if key not in self._cache:
            if templates:
                mean = self._texts([t.format(text) for t in self.templates]).mean(0)
                self._cache[key] = torch.nn.functional.normalize(mean, dim=-1)
            else:
                self._cache[key] = self._texts([text])[0]
        return self._cache[key]

    def images(self, images: list):
        import torch

        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            feats = self._features(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1)


class Captioner:
    """Image captions from a BLIP-style ``*ForConditionalGeneration`` model with its processor."""

    def __init__(self, path: str, device="cpu", allow_pickle: bool = False, max_new_tokens: int = 30):
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device = torch.device(device)
        safe = None if allow_pickle else True
        self.model = _load(BlipForConditionalGeneration, path, "captioner", use_safetensors=safe)
        self.model = self.model.to(self.device).eval()
        self.processor = _load(BlipProcessor, path, "captioner processor")
        self.max_new_tokens = max_new_tokens

    def __call__(self, images: list) -> list[str]:
        import torch

        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]


@dataclass
class EvalReport:
    rows: list[dict] = field(default_factory=list)  # one per image
    summary: list[dict] = field(default_factory=list)  # one per method
    benchmarks: str = ""  # the per-task tables in the benchmarks' formats (Markdown), when any image is from a set
    comparison: list[dict] = field(default_factory=list)  # with --compare: one per (method, metric)
    files: list[Path] = field(default_factory=list)

    def markdown(self) -> str:
        text = summary_markdown(self.summary)
        if self.comparison:
            text += "\n" + comparison_markdown(self.comparison)
        return text + ("\n" + self.benchmarks if self.benchmarks else "")


def _values(group: list[dict], metric: str) -> list[float]:
    return [r[metric] for r in group if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]


def summarise(rows: list[dict], reps: int = 2000) -> list[dict]:
    """Per method (in order of first appearance): images, and the mean, standard deviation and 95% percentile
    bootstrap interval (``reps`` resamples, seed 0) of each metric over the images that have it."""
    from .scores.stats import bootstrap_ci, mean_std

    methods: dict[str, list[dict]] = {}
    for row in rows:
        methods.setdefault(row["method"], []).append(row)
    out = []
    for method, group in methods.items():
        entry: dict = {"method": method, "images": len(group)}
        for metric in METRICS:
            values = _values(group, metric)
            if values:
                entry[metric], entry[f"{metric}_std"] = mean_std(values)
                entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"] = bootstrap_ci(values, reps=reps)
        out.append(entry)
    return out


def summary_markdown(summary: list[dict]) -> str:
    present = [m for m in METRICS if any(m in s for s in summary)]
    head = "| method | images | " + " | ".join(present) + " |"
    lines = [head, "|---|---|" + "---|" * len(present)]
    for s in summary:
        cells = [
            f"{_num(s[m])} ± {_num(s[f'{m}_std'])} [{_num(s[f'{m}_ci_low'])}, {_num(s[f'{m}_ci_high'])}]"
            if m in s
            else ""
            for m in present
        ]
        lines.append(f"| {s['method']} | {s['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(rows: list[dict], baseline: str = "none", reps: int = 2000) -> list[dict]:
    """Each method against ``baseline`` on the images both made (same prompt and seed): per metric, the number of
    pairs, the mean difference (method - baseline), its 95% bootstrap interval and a two-sided sign-flip p-value."""
    from .scores.stats import paired_comparison

    base = {(r["prompt"], r["seed"]): r for r in rows if r["method"] == baseline}
    if not base:
        methods = ", ".join(dict.fromkeys(r["method"] for r in rows))
        raise AttnControlError(f"--compare {baseline}: no image of method {baseline!r} here (methods: {methods})")
    out = []
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != baseline):
        group = [r for r in rows if r["method"] == method and (r["prompt"], r["seed"]) in base]
        for metric in METRICS:
            pairs = [(r.get(metric), base[(r["prompt"], r["seed"])].get(metric)) for r in group]
            finite = [(a, b) for a, b in pairs if _finite(a) and _finite(b)]
            if finite:
                out.append(
                    {"method": method, "baseline": baseline, "metric": metric, **paired_comparison(finite, reps=reps)}
                )
    return out


def _finite(v) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _num(value: float, spec: str = ".4f") -> str:
    """``value`` formatted, never as a negative zero (a difference of -1e-9 is 0.0000, not -0.0000)."""
    text = format(value, spec)
    return format(0.0, spec) if float(text) == 0 else text


def comparison_markdown(comparison: list[dict]) -> str:
    base = comparison[0]["baseline"]
    head = f"| method | metric | pairs | gain over {base} | 95% interval | p (sign-flip) |"
    lines = [head, "|---|---|---|---|---|---|"]
    for c in comparison:
        lines.append(
            f"| {c['method']} | {c['metric']} | {c['n']} | {_num(c['delta'], '+.4f')} | "
            f"[{_num(c['ci_low'], '+.4f')}, {_num(c['ci_high'], '+.4f')}] | {c['p']:.4g} |"
        )
    return "\n".join(lines) + "\n"


def _csv_bytes(rows: list[dict], columns: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue().encode("utf-8")


def evaluate(
    out: str | Path,
    clip: str | None = None,
    captioner: str | None = None,
    grid: bool = False,
    device: str = "cpu",
    batch_size: int = 16,
    allow_pickle: bool = False,
    progress: bool = True,
    vqa: str | None = None,
    detector: str | None = None,
    rules=None,
    compare_with: str | None = None,
    bootstrap: int = 2000,
) -> EvalReport:
    """Score every finished image of the batch folder ``out``; write the tables (and grids) to ``out/eval``.
    ``rules`` (a :class:`attncontrol.scores.DetectionRules`) sets the detector thresholds."""
    from .scores import DetectionRules

    out = Path(out)
    if captioner and not clip:
        raise AttnControlError("--captioner compares captions with prompts through CLIP's text encoder: add --clip")
    if batch_size < 1:
        raise AttnControlError(f"--batch-size must be >= 1, got {batch_size}")
    if bootstrap < 100:
        raise AttnControlError(f"--bootstrap must be >= 100 resamples, got {bootstrap}")
    rules = rules or DetectionRules()
    for name, value in (("--detection-threshold", rules.threshold), ("--counting-threshold", rules.counting_threshold)):
        if not 0 <= value < 1:
            raise AttnControlError(f"{name} must be in [0, 1), got {value}")
    records = load_records(out)
    rows = [_row(rec) for rec in records]
    if compare_with is not None and not any(r["method"] == compare_with for r in rows):
        compare(rows, compare_with)  # raises, naming the methods there are, before any model loads
    scorers: dict[str, object] = {}  # "clip", "caption", "vqa", "detector": the scorer models asked for
    if clip:
        scorers["clip"] = ClipScorer(clip, device, allow_pickle)
    if captioner:
        scorers["caption"] = Captioner(captioner, device, allow_pickle)
    if vqa:
        from .scores.models import VqaScorer

        scorers["vqa"] = VqaScorer(vqa, device, allow_pickle)
    if detector:
        from .scores.models import Detector

        scorers["detector"] = Detector(detector, device, allow_pickle)
    if scorers:
        _score(rows, records, out, scorers, rules, batch_size, progress)
    _score_shapes(rows, out, progress)
    report = EvalReport(rows=rows, summary=summarise(rows, bootstrap))
    if compare_with is not None:
        report.comparison = compare(rows, compare_with, bootstrap)
    from .scores.tables import benchmark_tables

    report.benchmarks = benchmark_tables(rows)
    _write_tables(report, out / "eval")
    if grid:
        report.files += write_grids(out, records, out / "eval" / "grids")
    return report


def _row(rec: dict) -> dict:
    """The per-image row of a manifest record (the attention metrics that ``batch`` recorded)."""
    from .batch.inputs import record_entry

    att = rec.get("attention") or {}
    entry = record_entry(rec)
    return {
        "_entry": entry,
        "file": rec["file"],
        "prompt": rec["prompt"],
        "method": rec["method"],
        "seed": rec["seed"],
        "source": rec.get("source"),
        "task": f"{entry.benchmark}:{entry.task}" if entry is not None else None,
        "subjects": ";".join(str(s) for s in att.get("subjects") or rec.get("subjects") or []),
        "min_subject_attention": att.get("min_subject_attention"),
        "subject_overlap": att.get("subject_overlap"),
    }


def _score(
    rows: list[dict], records: list[dict], out: Path, scorers: dict, rules, batch_size: int, progress: bool
) -> None:
    """Every model score, into ``rows``; images are read once per chunk."""
    from PIL import Image
    from tqdm.auto import tqdm

    from .scores.images import score_image

    bar = tqdm(total=len(rows), desc="scoring", unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(rows), batch_size):
        chunk = list(zip(rows[start : start + batch_size], records[start : start + batch_size]))
        images = [Image.open(out / r["file"]).convert("RGB") for r, _ in chunk]
        if "clip" in scorers:
            _score_clip([r for r, _ in chunk], images, scorers["clip"], scorers.get("caption"))
        for (row, rec), image in zip(chunk, images):
            score_image(row, rec, image, scorers, rules)
        bar.update(len(chunk))
    bar.close()


def _score_shapes(rows: list[dict], out: Path, progress: bool) -> None:
    """The shapes world's scores (no model weights) for every image of a ``shapes`` prompt set. The layout's IoU is
    measured for every image of a prompt with a layout, given to its method or not (plain sampling's IoU is the
    baseline a box method is compared with)."""
    todo = [r for r in rows if r["_entry"] is not None and r["_entry"].benchmark == "shapes"]
    if not todo:
        return
    from PIL import Image
    from tqdm.auto import tqdm

    from .shapes.score import detect, score

    for row in tqdm(todo, desc="shapes scores", unit="img", disable=not progress, file=sys.stderr):
        meta = row["_entry"].metadata
        with Image.open(out / row["file"]) as file:
            image = file.convert("RGB")
            scores = score(detect(image), meta, size=image.size)
        for key, value in scores.items():
            if key in SHAPES_METRICS:
                row[SHAPES_METRICS[key]] = value


def _score_clip(rows: list[dict], images: list, scorer, caption) -> None:
    """CLIP image-text similarities (full prompt, weakest half, plain CLIPScore) and caption similarity."""
    feats = scorer.images(images)
    captions = caption(images) if caption is not None else None
    for k, r in enumerate(rows):
        r["clip_full"] = float(feats[k] @ scorer.text(r["prompt"]))
        r["clip_min_half"] = min(float(feats[k] @ scorer.text(h)) for h in prompt_halves(r["prompt"]))
        r["clip_score"] = float(feats[k] @ scorer.text(r["prompt"], templates=False))
        if captions is not None:
            r["caption"] = captions[k]
            sim = scorer.text(captions[k], templates=False) @ scorer.text(r["prompt"], templates=False)
            r["caption_similarity"] = float(sim)


def _write_tables(report: EvalReport, dest: Path) -> None:
    dest.mkdir(exist_ok=True)
    columns = [
        "file",
        "prompt",
        "method",
        "seed",
        "source",
        "task",
        "subjects",
        *METRICS,
        "caption",
        "vqa_answers",
        "geneval_reason",
    ]
    stats = ("", "_std", "_ci_low", "_ci_high")
    summary_columns = ["method", "images"] + [f"{m}{s}" for m in METRICS for s in stats]
    files = [
        ("per_image.csv", _csv_bytes(report.rows, columns)),
        ("summary.csv", _csv_bytes(report.summary, summary_columns)),
        ("summary.md", summary_markdown(report.summary).encode("utf-8")),
    ]
    if report.comparison:
        compare_columns = ["method", "baseline", "metric", "n", "delta", "ci_low", "ci_high", "p"]
        files.append(("compare.csv", _csv_bytes(report.comparison, compare_columns)))
        files.append(("compare.md", comparison_markdown(report.comparison).encode("utf-8")))
    if report.benchmarks:
        files.append(("benchmarks.md", report.benchmarks.encode("utf-8")))
    for name, data in files:
        atomic_write_bytes(dest / name, lambda fh, data=data: fh.write(data))
        report.files.append(dest / name)


def write_grids(out: Path, records: list[dict], dest: Path, cell: int = 256) -> list[Path]:
    """One PNG per prompt: rows are seeds, columns methods (in order of first appearance), labelled."""
    from PIL import Image, ImageDraw

    dest.mkdir(parents=True, exist_ok=True)
    by_prompt: dict[str, list[dict]] = {}
    for rec in records:
        by_prompt.setdefault(rec["prompt"], []).append(rec)
    written = []
    for prompt, recs in by_prompt.items():
        methods = list(dict.fromkeys(r["method"] for r in recs))
        seeds = sorted({r["seed"] for r in recs})
        label_h = 20
        sheet = Image.new("RGB", (cell * len(methods), label_h + cell * len(seeds)), "white")
        draw = ImageDraw.Draw(sheet)
        for c, method in enumerate(methods):
            draw.text((c * cell + 4, 4), method, fill="black")
        for rec in recs:
            r, c = seeds.index(rec["seed"]), methods.index(rec["method"])
            with Image.open(out / rec["file"]) as im:
                sheet.paste(im.convert("RGB").resize((cell, cell)), (c * cell, label_h + r * cell))
            draw.text((c * cell + 4, label_h + r * cell + 4), f"seed {rec['seed']}", fill="white")
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
        path = dest / f"{slug}__{hashlib.sha1(prompt.encode()).hexdigest()[:6]}.png"  # distinct prompts, distinct files
        atomic_save_png(sheet, path)
        written.append(path)
    return written
