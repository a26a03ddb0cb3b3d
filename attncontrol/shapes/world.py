"""The shapes world: seeded scenes of 1 to 3 coloured shapes on a plain light background, drawn at 64x64, with
captions in the benchmarks' grammar and the ground truth (objects, colours, boxes, relation) beside each image.

Everything here is numpy + Pillow: no torch, so the scorer and the prompt sets load in a blink.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

SIZE = 64  # pixels a side
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS = {s: s + "s" for s in SHAPES}
NUMBERS = {2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
MIN_SIDE, MAX_SIDE = 16, 26  # an object's box side in pixels (every shape fills a square box)
GAP = 2  # pixels kept free between objects in ordinary scenes
# The training mix: mostly single objects, so that (as SD) the model is good at one object and weaker at two.
TRAINING_MIX = {"one": 0.55, "two": 0.25, "spatial": 0.15, "count": 0.05}

Obj = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class Thing:
    """One drawn object: its colour and shape, and its box (x0, y0, x1, y1) in pixels."""

    colour: str
    shape: str
    box: tuple[float, float, float, float]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """A caption, the objects that make it true, and the background colour."""

    caption: str
    kind: str  # one | two | spatial | count
    things: list[Thing]
    background: tuple[int, int, int]
    relation: str | None = None  # spatial scenes: things[0] is `relation` things[1]
    subjects: list[str] = field(default_factory=list)  # the nouns a method is given, in caption order

    def truth(self) -> dict:
        """The ground truth as plain JSON: objects with boxes normalised to [0, 1]."""
        return {
            "caption": self.caption,
            "kind": self.kind,
            "relation": self.relation,
            "subjects": list(self.subjects),
            "objects": [
                {"colour": t.colour, "shape": t.shape, "box": [round(v / SIZE, 5) for v in t.box]} for t in self.things
            ],
            "background": list(self.background),
        }


def object_name(obj: Obj) -> str:
    return f"{obj[0]} {obj[1]}"


def all_objects() -> list[Obj]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def pair_key(a: Obj, b: Obj) -> frozenset:
    return frozenset((a, b))


def held_out_pairs() -> set[frozenset]:
    """Object pairs never shown together in training (in two-object or spatial captions): every pair whose
    colour indices plus shape indices sum to a multiple of 4 (and that differ in colour and shape). A fixed,
    documented rule: about a quarter of the pairs; every single object is still seen, alone and in other pairs."""
    cols, shapes = list(COLOURS), list(SHAPES)
    out = set()
    for a, b in combinations(all_objects(), 2):
        if a[0] == b[0] or a[1] == b[1]:
            continue
        total = cols.index(a[0]) + cols.index(b[0]) + shapes.index(a[1]) + shapes.index(b[1])
        if total % 4 == 0:
            out.add(pair_key(a, b))
    return out


def caption_for(kind: str, objs: list[Obj], relation: str | None = None) -> str:
    if kind == "one":
        return f"a {object_name(objs[0])}"
    if kind == "two":
        return f"a {object_name(objs[0])} and a {object_name(objs[1])}"
    if kind == "spatial":
        if relation is None:
            raise ValueError("a spatial caption needs a relation")
        return f"a {object_name(objs[0])} {RELATION_WORDS[relation]} a {object_name(objs[1])}"
    if kind == "count":
        return f"{NUMBERS[len(objs)]} {objs[0][0]} {PLURALS[objs[0][1]]}"
    raise ValueError(f"kind must be one, two, spatial or count, got {kind!r}")


def relation_holds(a, b, relation: str, margin: float = 0.0) -> bool:
    """GenEval's rule on box centres (attncontrol.scores.rules.geneval_relations), optionally with a margin in
    pixels on the centre offset so that drawn scenes are unambiguous."""
    from ..scores.rules import geneval_relations

    if relation not in geneval_relations(a, b):
        return False
    if margin:
        (ax, ay), (bx, by) = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2), ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
        dx, dy = ax - bx, ay - by
        main = dx if relation in ("left of", "right of") else dy
        return abs(main) >= margin
    return True


def _box(rng: np.random.Generator, side: float) -> tuple[float, float, float, float]:
    x0 = rng.uniform(1, SIZE - 1 - side)
    y0 = rng.uniform(1, SIZE - 1 - side)
    return (x0, y0, x0 + side, y0 + side)


def _apart(a, b, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def overlap_fraction(a, b) -> float:
    """The intersection of two boxes over the smaller one's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def place(
    rng: np.random.Generator, n: int, relation: str | None = None, contact: str = "apart", tries: int = 1000
) -> list[tuple[float, float, float, float]]:
    """``n`` boxes. ``contact``: ``apart`` (GAP pixels between boxes), ``touching`` (the boxes of the first two
    objects share an edge) or ``overlap`` (the first two boxes overlap by 5-20% of the smaller box's area; the
    second is drawn over the first). With ``relation``, box 0 is ``relation`` box 1 with a 6-pixel margin."""
    for _ in range(tries):
        boxes: list[tuple[float, float, float, float]] = []
        for i in range(n):
            side = rng.uniform(MIN_SIDE, MAX_SIDE)
            if i == 1 and contact != "apart":
                box = _contact_box(rng, boxes[0], side, contact)
                if box is None:
                    break
            else:
                box = _box(rng, side)
                if any(not _apart(box, other, GAP) for other in boxes):
                    break
            boxes.append(box)
        if len(boxes) != n:
            continue
        if relation and not relation_holds(boxes[0], boxes[1], relation, margin=6.0):
            continue
        return boxes
    raise RuntimeError(f"could not place {n} objects ({contact}, {relation}) in {tries} tries")


def _contact_box(rng, first, side, contact):
    x0, y0, x1, y1 = first
    edge = rng.integers(4)
    if contact == "touching":
        along = rng.uniform(-side * 0.6, (x1 - x0) - side * 0.4)
        if edge == 0:
            box = (x1, y0 + along, x1 + side, y0 + along + side)
        elif edge == 1:
            box = (x0 - side, y0 + along, x0, y0 + along + side)
        elif edge == 2:
            box = (x0 + along, y1, x0 + along + side, y1 + side)
        else:
            box = (x0 + along, y0 - side, x0 + along + side, y0)
    else:
        depth = rng.uniform(0.15, 0.3) * side
        along = rng.uniform(-side * 0.2, (x1 - x0) - side * 0.8)
        if edge == 0:
            box = (x1 - depth, y0 + along, x1 - depth + side, y0 + along + side)
        elif edge == 1:
            box = (x0 - side + depth, y0 + along, x0 + depth, y0 + along + side)
        elif edge == 2:
            box = (x0 + along, y1 - depth, x0 + along + side, y1 - depth + side)
        else:
            box = (x0 + along, y0 - side + depth, x0 + along + side, y0 + depth)
        if not 0.05 <= overlap_fraction(box, first) <= 0.2:
            return None
    if box[0] < 1 or box[1] < 1 or box[2] > SIZE - 1 or box[3] > SIZE - 1:
        return None
    return box


def background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, nearly neutral colour: grey level 200-240, each channel tinted by at most 8."""
    level = rng.uniform(200, 240)
    r, g, b = (int(round(level + rng.uniform(-8, 8))) for _ in range(3))
    return r, g, b


def draw(scene: Scene, size: int = SIZE, supersample: int = 4):
    """The scene as an RGB PIL image, anti-aliased by drawing at ``supersample`` times the size."""
    from PIL import Image, ImageDraw

    s = size * supersample / SIZE
    img = Image.new("RGB", (size * supersample,) * 2, scene.background)
    pen = ImageDraw.Draw(img)
    for t in scene.things:
        x0, y0, x1, y1 = (v * s for v in t.box)
        fill = COLOURS[t.colour]
        if t.shape == "circle":
            pen.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif t.shape == "square":
            pen.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif t.shape == "triangle":
            pen.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {t.shape!r}")
    return img.resize((size, size), Image.Resampling.BOX) if supersample > 1 else img


def make_scene(
    rng: np.random.Generator,
    kind: str,
    objs: list[Obj] | None = None,
    relation: str | None = None,
    contact: str = "apart",
    exclude: set[frozenset] | None = None,
) -> Scene:
    """A random scene of ``kind`` (one, two, spatial, count); ``objs``/``relation`` fix its content, ``exclude``
    (pairs) keeps given object pairs out of two-object and spatial scenes."""
    everything = all_objects()
    if objs is None:
        if kind == "one":
            objs = [everything[rng.integers(len(everything))]]
        elif kind in ("two", "spatial"):
            while True:
                a, b = (everything[i] for i in rng.choice(len(everything), 2, replace=False))
                if a[0] != b[0] and a[1] != b[1] and not (exclude and pair_key(a, b) in exclude):
                    objs = [a, b]
                    break
        elif kind == "count":
            obj = everything[rng.integers(len(everything))]
            objs = [obj] * int(rng.integers(2, 4))
        else:
            raise ValueError(f"kind must be one, two, spatial or count, got {kind!r}")
    if kind == "spatial" and relation is None:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
    boxes = place(rng, len(objs), relation if kind == "spatial" else None, contact)
    things = [Thing(c, s, b) for (c, s), b in zip(objs, boxes)]
    subjects = [PLURALS[objs[0][1]]] if kind == "count" else [o[1] for o in objs]
    return Scene(caption_for(kind, objs, relation), kind, things, background(rng), relation, subjects)


def training_scene(rng: np.random.Generator, exclude: set[frozenset] | None = None) -> Scene:
    kinds = list(TRAINING_MIX)
    kind = kinds[rng.choice(len(kinds), p=np.array(list(TRAINING_MIX.values())))]
    return make_scene(rng, kind, exclude=held_out_pairs() if exclude is None else exclude)


def vocabulary() -> list[str]:
    """Every word a caption of this world uses (the tokenizer makes each one token)."""
    words = {"a", "and", "to", "the", "of", *COLOURS, *SHAPES, *PLURALS.values(), *NUMBERS.values()}
    for rel in RELATION_WORDS.values():
        words.update(rel.split())
    return sorted(words)
