"""One image's model scores for ``attncontrol eval``: which questions to ask and which names to detect follow
from the image's record (its prompt, subjects, boxes) and, for a built-in set, the set's metadata."""

from __future__ import annotations

import re

from .rules import DetectionRules, geneval_correct, hrs_spatial_correct, subject_box_iou, t2i_spatial_score

# GenEval's colour classifier (``evaluate_images.py:color_classification``): three templates per colour
GENEVAL_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_COLOUR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
T2I_SHORT_SIDE = 479  # T2I-CompBench resizes to 479 pixels on the short side before detecting


def subject_names(row: dict) -> list[str]:
    """The row's subjects as detector queries: words and phrases, without an occurrence mark; token indices drop."""
    names = []
    for s in (row.get("subjects") or "").split(";"):
        s = re.sub(r"#\d+$", "", s.strip())
        if s and not s.isdigit():
            names.append(s)
    return list(dict.fromkeys(names))


def question_phrases(row: dict, entry) -> list[str]:
    """The noun phrases T2I-CompBench asks about: the set's own (its metadata) or those of the phrase rule."""
    if entry is not None and "phrases" in entry.metadata:
        return list(entry.metadata["phrases"])
    from ..phrases import noun_phrases

    return [p.text for p in noun_phrases(row["prompt"])]


def score_image(row: dict, record: dict, image, scorers: dict, rules: DetectionRules) -> None:
    from ..batch.inputs import benchmark_entry

    entry = row["_entry"] if "_entry" in row else benchmark_entry(row.get("source"))
    if "vqa" in scorers:
        phrases = question_phrases(row, entry)
        if phrases:
            row["vqa_binding"], probs = scorers["vqa"].score(image, phrases)
            row["vqa_answers"] = ";".join(f"{p}={q:.4f}" for p, q in zip(phrases, probs))
    if "detector" in scorers:
        _detections(row, record, image, entry, scorers, rules)


def _detections(row: dict, record: dict, image, entry, scorers: dict, rules: DetectionRules) -> None:
    meta = entry.metadata if entry is not None else {}
    geneval = entry is not None and "include" in meta
    spatial = entry is not None and "obj1" in meta  # T2I-CompBench's spatial set (the shapes set has no obj1)
    hrs = entry is not None and entry.benchmark == "hrs"
    if geneval:
        names = [c["class"] for c in meta["include"] + meta.get("exclude", [])]
    elif spatial:
        names = [meta["obj1"], meta["obj2"]]
    elif hrs:
        names = list(meta["objects"])
    else:
        names = subject_names(row)
    boxes = record.get("boxes") or {}
    box_names = {str(k): re.sub(r"#\d+$", "", str(k)) for k in boxes}  # "cat#2" is queried as "cat"
    queries = list(dict.fromkeys(names + list(box_names.values())))
    if not queries:
        return
    floor = min(rules.threshold, rules.counting_threshold)
    found = scorers["detector"].detect(image, queries, floor)
    found = {n: _nms(dets, rules) for n, dets in found.items()}
    above = {n: [d for d in dets if d[0] > rules.threshold] for n, dets in found.items()}
    if names:
        row["objects_found"] = sum(1 for n in dict.fromkeys(names) if above[n]) / len(dict.fromkeys(names))
    if boxes:
        per_subject = subject_box_iou(boxes, {k: above[n] for k, n in box_names.items()}, *image.size)
        row["box_iou"] = sum(per_subject.values()) / len(per_subject)
    if geneval:
        colour_of = _colour_classifier(image, scorers["clip"]) if "clip" in scorers else None
        correct, reason = geneval_correct(meta, found, rules, colour_of)
        row["geneval_correct"] = None if correct is None else float(correct)
        row["geneval_reason"] = reason
    if hrs:
        correct = hrs_spatial_correct(meta["objects"], meta.get("rel1", ""), meta.get("rel2", ""), above)
        row["hrs_spatial"] = None if correct is None else float(correct)
    if spatial:
        top = {n: (above[n][0] if above[n] else None) for n in names}
        scale = T2I_SHORT_SIDE / min(image.size)
        row["t2i_spatial"] = t2i_spatial_score(meta["relation"], top[meta["obj1"]], top[meta["obj2"]], scale)


def _nms(dets, rules: DetectionRules):
    from .rules import nms

    return nms(dets, rules.nms_iou) if rules.nms_iou < 1 else dets


def _colour_classifier(image, clip):
    """GenEval's zero-shot colour of a detected object: the box's crop against the ten colours, each the mean
    embedding of three templates. (GenEval first paints everything outside the object's mask grey; a detector
    without masks gives the plain box crop.)"""
    import torch

    def colour_of(box, cls: str) -> str:
        crop = image.crop(tuple(int(round(v)) for v in box))
        if crop.width < 1 or crop.height < 1:
            return ""
        feats = clip.images([crop])[0]
        return GENEVAL_COLOURS[int(torch.argmax(colour_classes(clip, cls) @ feats))]

    return colour_of


def colour_classes(clip, cls: str):
    """The ten colour embeddings for objects of class ``cls`` (each the normalised mean of three templates), once
    per CLIP model and class."""
    import torch

    cache = clip.__dict__.setdefault("_colour_classes", {})
    if cls not in cache:
        classes = []
        for c in GENEVAL_COLOURS:
            embeds = clip._texts([t.format(c=c, cls=cls) for t in GENEVAL_COLOUR_TEMPLATES])
            classes.append(torch.nn.functional.normalize(embeds.mean(0), dim=-1))
        cache[cls] = torch.stack(classes)
    return cache[cls]
