"""Benchmark scores for ``attncontrol eval``: the rules (pure functions on boxes), statistics, and the models that
feed them (a BLIP VQA model, an open-vocabulary detector). Models load only when a scorer is made."""

from .rules import (
    DetectionRules,
    box_iou,
    geneval_correct,
    geneval_relations,
    hrs_spatial_correct,
    nms,
    subject_box_iou,
    t2i_spatial_position,
    t2i_spatial_score,
)
from .stats import bootstrap_ci, paired_comparison, sign_flip_p

__all__ = [
    "DetectionRules",
    "bootstrap_ci",
    "box_iou",
    "geneval_correct",
    "geneval_relations",
    "hrs_spatial_correct",
    "nms",
    "paired_comparison",
    "sign_flip_p",
    "subject_box_iou",
    "t2i_spatial_position",
    "t2i_spatial_score",
]
