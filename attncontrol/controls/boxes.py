"""Subject boxes as every front end gives them: ``{"cat": (x0, y0, x1, y1), ...}`` normalised to [0, 1], x to the
right, y down; the command line's ``cat=x0,y0,x1,y1;dog=...``. Read by the box-driven methods (Refocus, BoxDiff).
And regions (regional prompting): ``[("a red car", (x0, y0, x1, y1)), ...]``, the command line's
``a red car@x0,y0,x1,y1``. Torch-free: the command line checks both before it loads a model."""

from __future__ import annotations

from ..errors import OptionError, OptionTypeError
from ..limits import MAX_BOXES
from ..tokens import check_text

Box = tuple[float, float, float, float]
REGION_EXAMPLE = "'a red car@0.1,0.1,0.5,0.9'"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_box_list(subject, value) -> list[tuple[float, float, float, float]]:
    """One box ``(x0, y0, x1, y1)`` or a list of them, each four numbers; an OptionError naming the box otherwise."""
    if not isinstance(value, (list, tuple)):
        raise OptionError(f"box for {subject!r} must be (x0, y0, x1, y1) or a list of such boxes, got {value!r}")
    boxes = [value] if any(_is_number(v) for v in value) else list(value)
    out = []
    for box in boxes:
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            shown = value if box is value else box
            raise OptionError(f"box for {subject!r} must be four numbers (x0, y0, x1, y1), got {shown!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            raise OptionError(f"box for {subject!r} must lie inside [0, 1] (normalised x0, y0, x1, y1), got {box!r}")
        if not (x0 < x1 and y0 < y1):
            raise OptionError(f"box for {subject!r} needs x0 < x1 and y0 < y1, got {box!r}")
        out.append((x0, y0, x1, y1))
    if not out:
        raise OptionError(f"no box given for {subject!r}")
    return out


def parse_boxes(text: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """``"cat=0.05,0.2,0.5,0.9;dog=0.55,0.2,0.95,0.9"`` -> ``{"cat": [(0.05, 0.2, 0.5, 0.9)], "dog": [...]}``.
    A subject named twice gets both boxes. Values are checked by the box-driven methods."""
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        subject, sep, values = part.partition("=")
        if not sep or not subject.strip():
            raise OptionError(f"a box must look like 'cat=x0,y0,x1,y1', got {part!r}")
        try:
            numbers = tuple(float(v) for v in values.replace(" ", ",").split(",") if v)
        except ValueError:
            raise OptionError(f"box {part!r}: coordinates must be numbers") from None
        if len(numbers) != 4:
            raise OptionError(f"box {part!r}: expected 4 numbers x0,y0,x1,y1, got {len(numbers)}")
        boxes.setdefault(subject.strip(), []).append(numbers)
    if not boxes:
        raise OptionError(f"no boxes in {text!r}; expected 'cat=x0,y0,x1,y1;dog=...'")
    return boxes


def _region_text(part: str, where: str) -> tuple[str, list[Box]]:
    """One region in the text form, ``"a red car@0.1,0.1,0.5,0.9"``: split at the last ``@`` (a sub-prompt may hold
    one); several boxes of one region are joined by ``;``. Errors name ``where`` and the region as written."""
    text, sep, values = part.rpartition("@")
    named = f"{where} {part!r}"
    if not sep:
        raise OptionError(f"{named}: a region is a sub-prompt, '@' and its box, e.g. {REGION_EXAMPLE}; no '@' found")
    text = text.strip()
    if not text:
        raise OptionError(f"{named}: the sub-prompt before '@' is empty")
    check_text(text, named)
    boxes = []
    for chunk in values.split(";"):
        try:
            numbers = tuple(float(v) for v in chunk.replace(" ", ",").split(",") if v)
        except ValueError:
            raise OptionError(
                f"{named}: the box after '@' must be numbers x0,y0,x1,y1, got {values.strip()!r}"
            ) from None
        if len(numbers) != 4:
            raise OptionError(f"{named}: expected 4 numbers x0,y0,x1,y1 after '@', got {len(numbers)}")
        boxes.append(numbers)
    try:
        return text, _as_box_list(text, boxes)
    except OptionError as err:
        raise OptionError(f"{named}: {err}") from None


def parse_regions(text: str, where: str = "regions") -> list[tuple[str, list[Box]]]:
    """``"a red car@0.1,0.1,0.5,0.9|a dog@0.55,0.1,0.95,0.9"`` -> ``[("a red car", [(0.1, 0.1, 0.5, 0.9)]),
    ("a dog", [...])]``: regions joined by ``|``, each a sub-prompt, ``@`` (the last one) and its box, normalised
    x0,y0,x1,y1, checked (inside [0, 1], x0 < x1, y0 < y1); at most :data:`~attncontrol.limits.MAX_BOXES`
    regions. Every error names ``where`` (``--region``, ``prompts.csv:3: regions``) and the bad region."""
    if not isinstance(text, str):
        raise OptionTypeError(f"{where} must be text like {REGION_EXAMPLE}, got {text!r}")
    regions = [_region_text(part.strip(), where) for part in text.split("|") if part.strip()]
    if not regions:
        raise OptionError(f"{where}: no region in {text!r}; expected {REGION_EXAMPLE} (several joined by '|')")
    if len(regions) > MAX_BOXES:
        raise OptionError(f"{where}: at most {MAX_BOXES} regions, got {len(regions)}")
    return regions


def region_list(value, where: str = "regions") -> list[tuple[str, list[Box]]]:
    """Regions as any front end gives them, checked: the text form (:func:`parse_regions`), or a list whose items
    are ``(sub-prompt, box or boxes)`` pairs (a batch line's JSON, Python) or texts (``--region``, repeatable), in
    order; 1 to :data:`~attncontrol.limits.MAX_BOXES` regions in all. Errors name ``where`` and the bad region."""
    if isinstance(value, str):
        return parse_regions(value, where)
    if not isinstance(value, (list, tuple)) or not value:
        raise OptionTypeError(
            f"{where} must be a list of (sub-prompt, (x0, y0, x1, y1)) pairs or text like {REGION_EXAMPLE}, "
            f"got {value!r}"
        )
    out: list[tuple[str, list[Box]]] = []
    for k, item in enumerate(value):
        if isinstance(item, str):
            out += parse_regions(item, where)
            continue
        named = f"{where}[{k}]"
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str):
            raise OptionTypeError(f"{named}: a region is (sub-prompt, (x0, y0, x1, y1)), got {item!r}")
        text = item[0].strip()
        if not text:
            raise OptionError(f"{named}: the sub-prompt is empty, got {item!r}")
        check_text(text, f"{named} sub-prompt")
        try:
            out.append((text, _as_box_list(text, item[1])))
        except OptionError as err:
            raise OptionError(f"{named}: {err}") from None
    if len(out) > MAX_BOXES:
        raise OptionError(f"{where}: at most {MAX_BOXES} regions, got {len(out)}")
    return out


def box_maps(cfg, ctx, method: str):
    """The per-subject maps of a box-driven method: the boxes' subjects resolved in the prompt (an error names
    the method's boxes)."""
    from ..errors import SubjectError
    from .common import TokenMaps

    try:
        return TokenMaps(cfg, ctx, cfg.subjects)
    except SubjectError as err:
        raise SubjectError(f"{method} boxes: {err}") from None


def box_field_check(one_per_subject: bool, method: str):
    """The ``boxes`` field's check: a non-empty ``{subject: box or boxes}``, each box four numbers in [0, 1] with
    x0 < x1 and y0 < y1; with ``one_per_subject`` each subject has one box (returned as the box itself)."""

    def check(value, where: str):
        if not isinstance(value, dict) or not value:
            raise OptionError(f"{method} needs boxes as {{subject: (x0, y0, x1, y1)}}, got {value!r}")
        out = {}
        for subject, boxes in value.items():
            found = _as_box_list(subject, boxes)
            if one_per_subject and len(found) != 1:
                raise OptionError(f"{method} takes one box per subject; {subject!r} has {len(found)}: {found}")
            out[subject] = found[0] if one_per_subject else found
        return out

    return check
