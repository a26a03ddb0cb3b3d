"""``attncontrol batch``: prompts x seeds x methods, resumable, crash-safe, split across processes.

Inputs: a ``.txt`` (``PROMPT`` or ``PROMPT | subject, subject``), ``.jsonl`` (prompt, subjects, boxes, regions,
seeds, methods, options per line) or ``.csv`` (columns prompt, subjects, boxes, regions, seeds, methods) file, or
a built-in prompt set (the Attend-and-Excite paper's 276 prompts). Regions are ``[["a red car", [x0, y0, x1,
y1]], ...]`` in a jsonl line, ``a red car@x0,y0,x1,y1|a dog@...`` in a csv column. Output folder: one PNG per
item (parameters in its text chunk) and ``manifest.jsonl`` (one line per finished item). A rerun of the same
command skips finished items and redoes the rest. Under ``accelerate launch`` each process takes its share of
the items and writes its own manifest part; parts are merged at the end, and by any later run.
"""

from __future__ import annotations

from .inputs import (
    ENTRY_KEYS,
    PROMPT_SETS,
    BatchInputError,
    Entry,
    auto_subjects,
    parse_seeds,
    prompt_set,
    read_entries,
)
from .items import Item, expand
from .runner import BatchRun, Settings, group_items, run
from .state import finished_keys, finished_records, merge

__all__ = [
    "ENTRY_KEYS",
    "PROMPT_SETS",
    "BatchInputError",
    "BatchRun",
    "Entry",
    "Item",
    "Settings",
    "auto_subjects",
    "expand",
    "finished_keys",
    "finished_records",
    "group_items",
    "merge",
    "parse_seeds",
    "prompt_set",
    "read_entries",
    "run",
]
