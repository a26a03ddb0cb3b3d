"""The shapes world's built-in prompt set (``attncontrol batch --prompt-set shapes``), 240 prompts in three tasks:

- ``two`` (72): "a red circle and a blue square", every ordered pair of objects that differ in colour and in shape;
  scored for both shapes present and both colours bound;
- ``spatial`` (144): "a red circle to the left of a blue square" (left of, right of, above, below) for every
  unordered such pair, first object first in the order of ``world.all_objects()``; scored for the relation
  (GenEval's rule on box centres) as well;
- ``count`` (24): "two red circles", "three blue triangles"; scored for the count.

Every prompt carries a layout for the box methods (one box per subject: side by side, or one over the
other; a count prompt's noun one box around the row its objects should fill); two-object and spatial prompts carry
``held_out``: whether the pair was never shown together in training
(:func:`~attncontrol.shapes.world.held_out_pairs`).
"""

from __future__ import annotations

from itertools import combinations, permutations

from . import world

TASKS = ("two", "spatial", "count")
# boxes (x0, y0, x1, y1 in [0, 1]) for the first and second object of a prompt
LAYOUTS = {
    "left of": ((0.08, 0.3, 0.46, 0.7), (0.54, 0.3, 0.92, 0.7)),
    "right of": ((0.54, 0.3, 0.92, 0.7), (0.08, 0.3, 0.46, 0.7)),
    "above": ((0.3, 0.08, 0.7, 0.46), (0.3, 0.54, 0.7, 0.92)),
    "below": ((0.3, 0.54, 0.7, 0.92), (0.3, 0.08, 0.7, 0.46)),
}
COUNT_LAYOUTS = {2: (0.08, 0.3, 0.92, 0.7), 3: (0.02, 0.34, 0.98, 0.66)}  # count prompts: one box for the row


def _distinct(a: world.Obj, b: world.Obj) -> bool:
    return a[0] != b[0] and a[1] != b[1]


def prompt_specs(task: str | None = None) -> list[dict]:
    """Each prompt: ``prompt``, ``subjects``, ``boxes`` ({subject: [box]} or None), ``task``, ``metadata`` (the
    scorer's spec: objects, relation, count, boxes, held_out) and ``bindings`` (each noun's colour, for SynGen)."""
    held = world.held_out_pairs()
    out = []
    if task in (None, "two"):
        for a, b in permutations(world.all_objects(), 2):
            if _distinct(a, b):
                out.append(_spec("two", [a, b], "left of", world.pair_key(a, b) in held))
    if task in (None, "spatial"):
        for a, b in combinations(world.all_objects(), 2):
            if _distinct(a, b):
                for rel in world.RELATIONS:
                    out.append(_spec("spatial", [a, b], rel, world.pair_key(a, b) in held))
    if task in (None, "count"):
        for obj in world.all_objects():
            for n in world.NUMBERS:
                prompt = world.caption_for("count", [obj] * n)
                meta = {"objects": [{"colour": obj[0], "shape": obj[1]}], "count": n}
                noun = world.PLURALS[obj[1]]
                boxes = {noun: [COUNT_LAYOUTS[n]]}  # BoxDiff takes one box per subject: one for the whole row
                out.append(
                    {
                        "prompt": prompt,
                        "subjects": [noun],
                        "boxes": boxes,
                        "task": "count",
                        "metadata": meta,
                        "bindings": {noun: [obj[0]]},
                    }
                )
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return out


def _spec(task: str, objs: list[world.Obj], relation: str, held_out: bool) -> dict:
    prompt = world.caption_for(task, objs, relation if task == "spatial" else None)
    boxes = [list(b) for b in LAYOUTS[relation]]
    subjects = [o[1] for o in objs]
    meta = {
        "objects": [{"colour": c, "shape": s} for c, s in objs],
        "relation": relation if task == "spatial" else None,
        "boxes": boxes,
        "held_out": held_out,
    }
    return {
        "prompt": prompt,
        "subjects": subjects,
        "boxes": {s: [tuple(b)] for s, b in zip(subjects, boxes)},
        "task": task,
        "metadata": meta,
        "bindings": {s: [c] for (c, s) in objs},
    }
