"""benchmarks/regions_quality.py end to end at toy size: one spatial prompt, one seed, 4 steps, every method of the
table (plain, Regions, Regions stop=1, Refocus, BoxDiff, Regions + Refocus) on the shipped shapes model, scored by
`attncontrol eval`. What it checks is the machinery (each row present, every score a share or an IoU in [0, 1], every
paired difference in [-1, 1], a rerun making nothing), not the numbers: 4 steps draw no real shapes."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "regions_quality.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ first, for shapes_quality
    spec = importlib.util.spec_from_file_location("regions_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> dict[str, dict[str, str]]:
    """The Markdown table's rows by method, each a {column: cell} dict."""
    lines = [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines() if ln.startswith("| ")]
    return {cells[0]: dict(zip(lines[0], cells)) for cells in lines[1:]}


@pytest.mark.slow
def test_regions_table_at_toy_size(bench, tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--sets", "shapes-spatial", "--limit", "1", "--seeds", "0", "--steps", "4"]
    bench.main([*argv, "--bootstrap", "100"])
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == list(bench.METHODS)
    for method, row in rows.items():
        assert row["images"] == "1", (method, row)
        for col in ("present", "bound", "spatial", "box IoU"):
            mean, lo, hi = map(float, re.match(r"([\d.]+) \[([\d.]+), ([\d.]+)\]$", row[col]).groups())
            assert 0 <= lo <= hi <= 1 and 0 <= mean <= 1, (method, col, row[col])  # mean .3f, interval .2f
        deltas = [c for k, c in row.items() if " vs " in k and c != "-"]
        assert len(deltas) == {"none": 4, "refocus": 5, "boxdiff": 5}.get(method, 7), (method, row)  # not vs itself
        for cell in deltas:
            delta, p = map(float, re.match(r"([+-][\d.]+) \(p=([\d.]+)\)$", cell).groups())
            assert -1 <= delta <= 1 and 0 <= p <= 1, (method, cell)
    records = [json.loads(ln) for ln in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == sorted(bench.METHODS)
    assert [r["regions"] for r in records if r["method"] == "regions"] == [
        [["a red circle", [0.08, 0.3, 0.46, 0.7]], ["a green square", [0.54, 0.3, 0.92, 0.7]]]
    ]
    bench.main([*argv, "--bootstrap", "100"])  # resumes: nothing left to make
    n = len(bench.METHODS)
    assert f"{n} of {n} images already made; making 0" in capsys.readouterr().err
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == n
