"""Per-task tables in the benchmarks' own formats (the layout of the papers' tables), from eval's per-image rows.

- T2I-CompBench: one column per category; colour, shape and texture are the mean BLIP-VQA score, spatial the
  mean 2D-spatial score, non-spatial the mean CLIPScore; 4 decimals.
- GenEval: the share of correct images per task and "overall", the unweighted mean of the six task scores (shown
  only when all six are there); 2 decimals.
- HRS-Bench spatial: accuracy in percent per level (easy, medium, hard) and their mean; 2 decimals.
- DrawBench: mean CLIPScore per category (the benchmark itself is rated by people; later papers use CLIPScore).
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


def benchmark_tables(rows: list[dict]) -> str:
    scores = task_scores(rows)
    parts = []
    if "t2i-compbench" in scores:
        table = scores["t2i-compbench"]
        cols = [c for c in T2I_COLUMNS if any(c in t for t in table.values())]
        lines = ["### T2I-CompBench", "", "| method | " + " | ".join(c.replace("_", "-") for c in cols) + " |",
                 "|---|" + "---|" * len(cols)]  # fmt: skip
        for method, t in table.items():
            lines.append(f"| {method} | " + " | ".join(f"{t[c]:.4f}" if c in t else "" for c in cols) + " |")
        parts.append("\n".join(lines) + "\n")
    if "geneval" in scores:
        table = scores["geneval"]
        cols = [c for c in GENEVAL_COLUMNS if any(c in t for t in table.values())]
        lines = ["### GenEval", "", "| method | overall | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
                 "|---|---|" + "---|" * len(cols)]  # fmt: skip
        for method, t in table.items():
            overall = f"{sum(t[c] for c in GENEVAL_COLUMNS) / 6:.2f}" if all(c in t for c in GENEVAL_COLUMNS) else ""
            cells = " | ".join(f"{t[c]:.2f}" if c in t else "" for c in cols)
            lines.append(f"| {method} | {overall} | {cells} |")
        parts.append("\n".join(lines) + "\n")
    if "hrs" in scores:
        table = scores["hrs"]
        cols = [c for c in HRS_COLUMNS if any(c in t for t in table.values())]
        lines = ["### HRS-Bench spatial (accuracy, %)", "", "| method | " + " | ".join(cols) + " | average |",
                 "|---|" + "---|" * (len(cols) + 1)]  # fmt: skip
        for method, t in table.items():
            levels = [t[c] for c in cols if c in t]
            cells = " | ".join(f"{100 * t[c]:.2f}" if c in t else "" for c in cols)
            lines.append(f"| {method} | {cells} | {100 * sum(levels) / len(levels):.2f} |")
        parts.append("\n".join(lines) + "\n")
    if "drawbench" in scores:
        table = scores["drawbench"]
        cols = list(dict.fromkeys(c for t in table.values() for c in t))
        lines = ["### DrawBench (CLIPScore)", "", "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for method, t in table.items():
            lines.append(f"| {method} | " + " | ".join(f"{t[c]:.4f}" if c in t else "" for c in cols) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
