"""The shapes world's detector and scores: no learned weights, numpy only.

Detection: a pixel belongs to an object when it is saturated (``(max - min) / max`` of its RGB >= 0.35, the light
near-neutral background is below 0.1); it takes the palette colour nearest in hue. The pixels of one colour split
into 8-connected components; a component of at least :data:`MIN_AREA` pixels (at 64x64) whose mean saturation
is at least :data:`MIN_MEAN_SATURATION` is an object (a generated image's faint smudges are not). Its shape
is the nearest prototype over four measures of its pixels inside its bounding box, where pixels of other colours
(an object drawn over it) count as unknown rather than empty:

- ``fill``: its pixels over the box's known pixels (square 1, circle pi/4, triangle 1/2);
- ``top``: the share of its pixels in the box's upper half (triangles, pointing up, ~1/4; the others 1/2);
- ``top_corners``, ``bottom_corners``: how full the box's two upper / two lower corner patches are (square 1 and
  1; circle 0 and 0; triangle 0 and 1).

Scores of one image against its prompt (:func:`score`): every subject's shape found (``present``), found in its
colour (``bound``), the count right (count prompts), the relation right by GenEval's rule on box centres
(``spatial``), and each subject's IoU with the box it was given (``box_iou``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import world

MIN_AREA = 40  # pixels at 64x64 (the smallest drawn object, a 16-px triangle, has ~128)
SATURATION = 0.35
MIN_MEAN_SATURATION = 0.5  # an object's pixels are saturated on average (drawn ones ~0.75); faint smudges are not
MIN_VALUE = 120  # the palette's brightest channels are 220-240; shadows and dark smudges are not objects
PROTOTYPES = {  # (fill, top, top_corners, bottom_corners)
    "square": (1.0, 0.5, 1.0, 1.0),
    "circle": (0.785, 0.5, 0.0, 0.0),
    "triangle": (0.5, 0.25, 0.0, 1.0),
}
SPREAD = (0.1, 0.08, 0.35, 0.35)  # how far each measure may stray: the distance is in these units
_HUES: dict[str, float] = {}  # palette colour -> hue, filled on first use


@dataclass(frozen=True)
class Found:
    """A detected object: colour, shape, pixel box (x0, y0, x1, y1, exclusive ends) and pixel count."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]
    area: int

    def norm_box(self, width: int, height: int | None = None) -> tuple[float, float, float, float]:
        """The box in [0, 1] of an image ``width`` x ``height`` (square if no height)."""
        height = width if height is None else height
        x0, y0, x1, y1 = self.box
        return (x0 / width, y0 / height, x1 / width, y1 / height)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of (..., 3) float RGB."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.where(mx > mn, mx - mn, 1.0)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h * 60.0


def palette_hues() -> dict[str, float]:
    if not _HUES:
        for name, rgb in world.COLOURS.items():
            _HUES[name] = float(_hue(np.asarray(rgb, float)))
    return _HUES


def as_rgb(image) -> np.ndarray:
    """An HxWx3 float array in 0..255 from a PIL image (any mode) or an array: HxW (grey), HxWx3 or HxWx4 (alpha
    dropped), uint8 or floats in [0, 1]."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), dtype=float)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an image (HxW, HxWx3 or HxWx4), got an array of shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype.kind == "f" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return arr.astype(float)


def colour_labels(image) -> np.ndarray:
    """Per pixel: the index into ``world.COLOURS`` of its colour, or -1 for background (and for dark pixels: no
    object of the world is darker than :data:`MIN_VALUE` in its brightest channel)."""
    return _labels(as_rgb(image))[0]


def _labels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(colour labels, saturation) of an HxWx3 float image."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    hue = _hue(rgb)
    hues = np.array(list(palette_hues().values()))
    diff = np.abs(hue[..., None] - hues)
    diff = np.minimum(diff, 360 - diff)
    labels = diff.argmin(-1)
    return np.where((sat >= SATURATION) & (mx >= MIN_VALUE), labels, -1), sat


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as arrays of (row, col), in raster order of their first pixel."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, pixels = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        out.append(np.array(pixels))
    return out


def measures(own: np.ndarray, unknown: np.ndarray) -> tuple[float, float, float | None, float | None]:
    """(fill, top, top_corners, bottom_corners) of the boolean patch ``own`` (the component's bounding box) where
    ``unknown`` marks pixels hidden by other objects; a corner patch more than 40% hidden is left out, and a pair
    of corners both left out is ``None``."""
    h, w = own.shape
    known = ~unknown | own
    fill = own.sum() / max(known.sum(), 1)
    top = own[: h // 2].sum() + (own[h // 2].sum() / 2 if h % 2 else 0)
    top /= max(own.sum(), 1)
    ch, cw = max(1, round(h * 0.2)), max(1, round(w * 0.2))

    def corner(rows: slice, cols: slice) -> float | None:  # None: mostly hidden, says nothing
        if unknown[rows, cols].mean() > 0.4:
            return None
        return float(own[rows, cols][known[rows, cols]].mean())

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    top_corners = mean([corner(slice(0, ch), slice(0, cw)), corner(slice(0, ch), slice(w - cw, w))])
    bottom_corners = mean([corner(slice(h - ch, h), slice(0, cw)), corner(slice(h - ch, h), slice(w - cw, w))])
    return float(fill), float(top), top_corners, bottom_corners


def classify(m: tuple[float | None, ...]) -> str:
    """The prototype nearest to the measures ``m`` (a measure that is ``None`` is left out)."""

    def dist(proto):
        return sum(((a - b) / s) ** 2 for a, b, s in zip(m, proto, SPREAD) if a is not None)

    return min(PROTOTYPES, key=lambda name: dist(PROTOTYPES[name]))


def detect(image, min_area: int | None = None) -> list[Found]:
    """Every object in ``image`` (PIL image or HxWx3 array, any size; areas scale from 64x64)."""
    labels, sat = _labels(as_rgb(image))
    if labels.size == 0:
        return []
    min_area = MIN_AREA * labels.shape[0] * labels.shape[1] / world.SIZE**2 if min_area is None else min_area
    names = list(world.COLOURS)
    found = []
    for ci, name in enumerate(names):
        for pix in components(labels == ci):
            if len(pix) < min_area or sat[pix[:, 0], pix[:, 1]].mean() < MIN_MEAN_SATURATION:
                continue
            r0, c0 = pix.min(0)
            r1, c1 = pix.max(0) + 1
            own = np.zeros((r1 - r0, c1 - c0), bool)
            own[pix[:, 0] - r0, pix[:, 1] - c0] = True
            patch = labels[r0:r1, c0:c1]
            unknown = (patch >= 0) & (patch != ci)
            found.append(Found(name, classify(measures(own, unknown)), (int(c0), int(r0), int(c1), int(r1)), len(pix)))
    return found


# ---------------------------------------------------------------------------------------------------- scores


def best(found: list[Found], shape: str, colour: str | None = None) -> Found | None:
    """The largest detection of ``shape`` (in ``colour`` if given)."""
    hits = [f for f in found if f.shape == shape and (colour is None or f.colour == colour)]
    return max(hits, key=lambda f: f.area) if hits else None


def score(found: list[Found], spec: dict, size: int | tuple[int, int] = world.SIZE) -> dict:
    """Scores of one image's detections against its prompt ``spec``: ``objects`` (list of {colour, shape}),
    optional ``count``, ``relation`` (objects[0] is ``relation`` objects[1]) and ``boxes`` (one [0, 1] box per
    object). Keys: present, bound (0/1), found_fraction (subjects found), count_correct, spatial, box_iou (where
    the prompt has them). ``size``: the image's side, or (width, height).

    Two touching objects of one colour are one component, so one detection: counting (and presence) read that
    merge as the failure it is."""
    width, height = (size, size) if isinstance(size, int) else size
    objs = spec["objects"]
    out: dict[str, float] = {}
    if spec.get("count"):
        colour, shape = objs[0]["colour"], objs[0]["shape"]
        n = sum(1 for f in found if f.shape == shape and f.colour == colour)
        out["present"] = float(any(f.shape == shape for f in found))
        out["bound"] = float(n > 0)
        out["found_fraction"] = out["present"]
        out["count_correct"] = float(n == spec["count"])
        return out
    shapes_found = [best(found, o["shape"]) is not None for o in objs]
    bound = [best(found, o["shape"], o["colour"]) is not None for o in objs]
    out["present"] = float(all(shapes_found))
    out["bound"] = float(all(bound))
    out["found_fraction"] = float(np.mean(shapes_found))
    if spec.get("relation"):
        a, b = (best(found, o["shape"], o["colour"]) for o in objs[:2])
        ok = a is not None and b is not None and world.relation_holds(a.box, b.box, spec["relation"])
        out["spatial"] = float(ok)
    if spec.get("boxes"):
        from ..scores.rules import box_iou

        ious = []
        for o, box in zip(objs, spec["boxes"]):
            f = best(found, o["shape"], o["colour"]) or best(found, o["shape"])
            ious.append(box_iou(f.norm_box(width, height), tuple(box)) if f else 0.0)
        out["box_iou"] = float(np.mean(ious))
    return out
