"""The benchmarks' rules on detected boxes, as pure functions (boxes are ``(x0, y0, x1, y1)`` in pixels, y down).

- GenEval (``evaluation/evaluate_images.py``): :func:`geneval_relations` (``relative_position``) and
  :func:`geneval_correct` (``evaluate``: include clauses with counts, colours and positions, exclude clauses).
- T2I-CompBench 2D spatial (``UniDet_eval/2D_spatial_eval.py``): :func:`t2i_spatial_position`
  (``determine_position``) and :func:`t2i_spatial_score` (the per-image score).
- HRS-Bench spatial (``codes/eval_metrics/compositions/calc_spatial_relation_acc.py``): :func:`hrs_spatial_correct`.
- Attention Refocusing's layouts: :func:`subject_box_iou`, the IoU of each given box with the subject's best
  detection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Box = Sequence[float]
Detection = tuple[float, Box]  # (score, box)


@dataclass(frozen=True)
class DetectionRules:
    """Thresholds on detector scores. GenEval's values (0.3, and 0.9 for counting) were set for its Mask2Former;
    T2I-CompBench's UniDet used 0.5. An open-vocabulary detector scores differently: see docs/evaluation.md."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16  # GenEval's MAX_OBJECTS per class
    position_threshold: float = 0.1  # GenEval's POSITION_THRESHOLD
    nms_iou: float = 0.5  # duplicate boxes of one object (open-vocabulary detectors give several per object)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when they do not overlap)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(detections: Sequence[Detection], iou: float) -> list[Detection]:
    """Greedy non-maximum suppression: by score, drop a box that overlaps a kept one by more than ``iou``."""
    kept: list[Detection] = []
    for det in sorted(detections, key=lambda d: -d[0]):
        if all(box_iou(det[1], k[1]) <= iou for k in kept):
            kept.append(det)
    return kept


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def geneval_relations(box_a: Box, box_b: Box, threshold: float = 0.1) -> set[str]:
    """Where ``box_a`` is relative to ``box_b`` by GenEval's rule: the centre offset, shrunk on each axis by
    ``threshold`` times the boxes' summed size, divided by the unshrunk offset's length; a component below -0.5
    or above 0.5 gives "left of"/"right of" (x) and "above"/"below" (y, pointing down)."""
    (ax, ay), (bx, by) = _centre(box_a), _centre(box_b)
    offset = (ax - bx, ay - by)
    dims = (box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1])
    revised = [max(abs(o) - threshold * d, 0.0) * math.copysign(1.0, o) for o, d in zip(offset, dims)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def geneval_correct(
    metadata: dict,
    objects: dict[str, list[Detection]],
    rules: DetectionRules = DetectionRules(),
    colour_of: Callable[[Box, str], str] | None = None,
) -> tuple[bool | None, str]:
    """Whether an image passes its GenEval record: every ``include`` clause holds (enough objects above the
    threshold, the counting threshold for the counting task; their colours; their position relative to every
    object of the target clause) and no ``exclude`` clause fires. ``objects`` maps a class to its detections (any
    order). Returns (correct, reason); correct is None when a colour clause needs ``colour_of`` and has none."""
    threshold = rules.counting_threshold if metadata.get("tag") == "counting" else rules.threshold
    kept = {
        cls: sorted((d for d in dets if d[0] > threshold), key=lambda d: -d[0])[: rules.max_objects]
        for cls, dets in objects.items()
    }
    correct, reasons = True, []
    groups: list[list[Detection] | None] = []  # per include clause: its detections, None when it failed
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        found = kept.get(cls, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        elif "color" in req:
            if colour_of is None:
                return None, f"the colour of {cls} needs a CLIP model (--clip)"
            colours = [colour_of(box, cls) for _, box in found]
            if colours.count(req["color"]) < count:
                matched = False
                reasons.append(f"expected {req['color']} {cls}, found {' '.join(colours)}")
        if matched and "position" in req:
            relation, target = req["position"]
            if groups[target] is None:
                matched = False
                reasons.append(f"no target for {cls} to be {relation}")
            else:
                for _, box in found:
                    for _, target_box in groups[target]:
                        if relation not in geneval_relations(box, target_box, rules.position_threshold):
                            matched = False
                    if not matched:
                        reasons.append(f"expected {cls} {relation} target")
                        break
        correct = correct and matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(kept.get(req["class"], [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(kept[req['class']])}")
    return correct, "; ".join(reasons)


T2I_RELATIONS = (
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
)


def t2i_spatial_position(
    relation: str, box1: Box, box2: Box, iou_threshold: float = 0.1, distance_threshold: float = 150.0
) -> float:
    """T2I-CompBench's ``determine_position``: how well ``box1`` stands in ``relation`` to ``box2`` (0..1).
    "next to"/"near"/"on side of": 1 when the centres are within ``distance_threshold`` on either axis, else that
    threshold over the larger offset. Left/right/top/bottom: the offset must point that way and dominate the other
    axis; then 1 if the boxes' IoU is below ``iou_threshold``, else ``iou_threshold / IoU``."""
    (c1x, c1y), (c2x, c2y) = _centre(box1), _centre(box2)
    dx, dy = c2x - c1x, c2y - c1y
    if relation in ("next to", "on side of", "near"):
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    facing = {
        "on the right of": dx < 0 and abs(dx) > abs(dy),
        "on the left of": dx > 0 and abs(dx) > abs(dy),
        "on the bottom of": dy < 0 and abs(dy) > abs(dx),
        "on the top of": dy > 0 and abs(dy) > abs(dx),
    }
    if not facing.get(relation, False):
        return 0.0
    iou = box_iou(box1, box2)
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def t2i_spatial_score(relation: str, det1: Detection | None, det2: Detection | None, scale: float = 1.0) -> float:
    """T2I-CompBench's 2D-spatial score of one image: 0.25 per object found times its detection score, plus half
    the position term when both are found; a total under 0.5 counts as 0. ``scale`` maps the image's pixels to the
    detector input T2I-CompBench used (its 150-pixel threshold is in an image resized to 479 pixels on the short
    side)."""
    found = [d for d in (det1, det2) if d is not None]
    score = sum(0.25 * d[0] for d in found)
    if det1 is not None and det2 is not None:
        b1 = [v * scale for v in det1[1]]
        b2 = [v * scale for v in det2[1]]
        score += t2i_spatial_position(relation, b1, b2) / 2
    return score if score >= 0.5 else 0.0


def subject_box_iou(
    boxes: dict[str, list[Box]], detections: dict[str, list[Detection]], width: int, height: int
) -> dict[str, float]:
    """Per subject: the mean over its layout boxes (normalised ``[x0, y0, x1, y1]``) of the best IoU with any of the
    subject's detections above threshold (0 when none was found)."""
    out = {}
    for subject, layout in boxes.items():
        dets = detections.get(str(subject), [])
        values = []
        for x0, y0, x1, y1 in layout:
            pixel = (x0 * width, y0 * height, x1 * width, y1 * height)
            values.append(max((box_iou(pixel, box) for _, box in dets), default=0.0))
        out[str(subject)] = sum(values) / len(values)
    return out


# HRS-Bench's box predicates (object 1 relative to object 2; no margin, no centres)
def _right(a: Box, b: Box) -> bool:
    return a[2] > b[2]


def _left(a: Box, b: Box) -> bool:
    return a[0] < b[0]


def _above(a: Box, b: Box) -> bool:
    return a[1] < b[1] or a[3] < b[3]


def _below(a: Box, b: Box) -> bool:
    return a[3] > b[3] or a[1] > b[1]


def _between(a: Box, b: Box, c: Box) -> bool:
    return (
        (_right(a, b) and _left(a, c))
        or (_left(a, b) and _right(a, c))
        or (_below(a, b) and _above(a, c))
        or (_above(a, b) and _below(a, c))
    )


HRS_RELATIONS = {
    "on the left of": _left,
    "left of": _left,
    "on the right of": _right,
    "right of": _right,
    "on": _above,
    "above": _above,
    "over": _above,
    "below": _below,
    "beneath": _below,
    "under": _below,
}
HRS_BETWEEN = ("among", "in the middle of", "between")


def hrs_spatial_correct(
    objects: list[str], rel1: str, rel2: str, detections: dict[str, list[Detection]]
) -> bool | None:
    """HRS-Bench's spatial check of one image: every object must be detected (when a class is detected more than
    once, its last detection counts, as in ``_sort_pred_obj``; detections are best first here); then
    easy (2 objects) ``rel1(o1, o2)``; medium (3) ``rel1(o1, o2) and rel2(o1, o3)``, or ``between(o1, o2, o3)``
    for a single between/among/in-the-middle-of; hard (4) ``between(o1, o3, o4) and between(o2, o3, o4)``, or with
    two relations ``rel1(o, o3) and rel2(o, o4)`` for o in (o1, o2) -- our reading of the official code, which
    indexes a fifth object there and raises. None when a relation is not one HRS-Bench names."""
    found = [detections.get(o) or [] for o in objects]
    if not all(found):  # an object not detected
        return False
    b = [dets[-1][1] for dets in found]
    if rel1 in HRS_BETWEEN:
        if len(b) == 3:
            return _between(b[0], b[1], b[2])
        if len(b) == 4:
            return _between(b[0], b[2], b[3]) and _between(b[1], b[2], b[3])
        return None
    r1, r2 = HRS_RELATIONS.get(rel1), HRS_RELATIONS.get(rel2) if rel2 else None
    if r1 is None or (rel2 and r2 is None):
        return None
    if len(b) == 2:
        return r1(b[0], b[1])
    if len(b) == 3:
        return r1(b[0], b[1]) and (r2(b[0], b[2]) if r2 else True)
    if r2 is None:
        return None
    return all(r1(o, b[2]) and r2(o, b[3]) for o in b[:2])
