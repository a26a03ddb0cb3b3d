"""Per-task tables in the benchmarks' own formats (the layout of the papers' tables), from eval's per-image rows.

- T2I-CompBench: one column per category; colour, shape and texture are the mean BLIP-VQA score, spatial the
  mean 2D-spatial score, non-spatial the mean CLIPScore; 4 decimals.
- GenEval: the share of correct images per task and "overall", the unweighted mean of the six task scores (shown
  only when all six are there); 2 decimals.
- HRS-Bench spatial: accuracy in percent per level (easy, medium, hard) and their mean; 2 decimals.
- DrawBench: mean CLIPScore per category (the benchmark itself is rated by people; later papers use CLIPScore).
- Shapes (this project's world, attncontrol.shapes): per task the share of images with both shapes present, both
  colours bound, the relation right, the count right, and the layout IoU; held-out pairs (never together in
  training) apart; 3 decimals.
"""

from __future__ import annotations

import math

T2I_COLUMNS = {  # category -> the per-image metric that scores it
    "color": "vqa_binding",
    "shape": "vqa_binding",
    "texture": "vqa_binding",
    "spatial": "t2i_spatial",
    "non_spatial": "clip_score",
}
GENEVAL_COLUMNS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HRS_COLUMNS = ("easy", "medium", "hard")
SHAPES_COLUMNS = (  # (column, task, held-out only, metric)
    ("two: present", "two", False, "shapes_present"),
    ("two: bound", "two", False, "shapes_bound"),
    ("two, held-out pairs: present", "two", True, "shapes_present"),
    ("two, held-out pairs: bound", "two", True, "shapes_bound"),
    ("spatial: present", "spatial", False, "shapes_present"),
    ("spatial: relation", "spatial", False, "shapes_spatial"),
    ("spatial: box IoU", "spatial", False, "shapes_box_iou"),
    ("count: right", "count", False, "shapes_count"),
)
METRIC_OF = {"geneval": "geneval_correct", "hrs": "hrs_spatial", "drawbench": "clip_score"}


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def task_scores(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """benchmark -> method -> task -> score, for the rows made from a built-in set that have the task's metric."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    groups: dict[tuple[str, str, str], list] = {}
    for r in rows:
        if not r.get("task"):
            continue
        bench, task = r["task"].split(":", 1)
        metric = T2I_COLUMNS.get(task) if bench == "t2i-compbench" else METRIC_OF.get(bench)
        groups.setdefault((bench, r["method"], task), []).append(r.get(metric) if metric else None)
    for (bench, method, task), values in groups.items():
        mean = _mean(values)
        if mean is not None:
            out.setdefault(bench, {}).setdefault(method, {})[task] = mean
    return out


def _table(title: str, head: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def _present(table: dict, columns) -> list[str]:
    return [c for c in columns if any(c in t for t in table.values())]


def _cell(t: dict, c: str, fmt: str, scale: float = 1.0) -> str:
    return format(scale * t[c], fmt) if c in t else ""


def benchmark_tables(rows: list[dict]) -> str:
    scores = task_scores(rows)
    parts = []
    if "t2i-compbench" in scores:
        table = scores["t2i-compbench"]
        cols = _present(table, T2I_COLUMNS)
        body = [[m] + [_cell(t, c, ".4f") for c in cols] for m, t in table.items()]
        parts.append(_table("T2I-CompBench", ["method"] + [c.replace("_", "-") for c in cols], body))
    if "geneval" in scores:
        table = scores["geneval"]
        cols = _present(table, GENEVAL_COLUMNS)
        body = []
        for method, t in table.items():
            overall = f"{sum(t[c] for c in GENEVAL_COLUMNS) / 6:.2f}" if all(c in t for c in GENEVAL_COLUMNS) else ""
            body.append([method, overall] + [_cell(t, c, ".2f") for c in cols])
        parts.append(_table("GenEval", ["method", "overall"] + [c.replace("_", " ") for c in cols], body))
    if "hrs" in scores:
        table = scores["hrs"]
        cols = _present(table, HRS_COLUMNS)
        body = []
        for method, t in table.items():
            levels = [t[c] for c in cols if c in t]
            body.append([method] + [_cell(t, c, ".2f", 100) for c in cols] + [f"{100 * sum(levels) / len(levels):.2f}"])
        parts.append(_table("HRS-Bench spatial (accuracy, %)", ["method", *cols, "average"], body))
    if "drawbench" in scores:
        table = scores["drawbench"]
        cols = list(dict.fromkeys(c for t in table.values() for c in t))
        body = [[m] + [_cell(t, c, ".4f") for c in cols] for m, t in table.items()]
        parts.append(_table("DrawBench (CLIPScore)", ["method", *cols], body))
    shapes = shapes_scores(rows)
    if shapes:
        cols = _present(shapes, [c[0] for c in SHAPES_COLUMNS])
        body = [[m] + [_cell(t, c, ".3f") for c in cols] for m, t in shapes.items()]
        parts.append(_table("Shapes world", ["method", *cols], body))
    return "\n".join(parts)


def shapes_scores(rows: list[dict]) -> dict[str, dict[str, float]]:
    """method -> column of :data:`SHAPES_COLUMNS` -> mean, for rows of the shapes sets."""
    groups: dict[tuple[str, str], list] = {}
    for r in rows:
        entry = r.get("_entry")
        if entry is None or entry.benchmark != "shapes":
            continue
        for column, task, held_only, metric in SHAPES_COLUMNS:
            if entry.task == task and (not held_only or entry.metadata.get("held_out")):
                groups.setdefault((r["method"], column), []).append(r.get(metric))
    out: dict[str, dict[str, float]] = {}
    for (method, column), values in groups.items():
        mean = _mean(values)
        if mean is not None:
            out.setdefault(method, {})[column] = mean
    return out
