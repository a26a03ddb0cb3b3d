"""The methods' pure loss terms: functions of attention maps and targets, each defined in its method's module
(:mod:`attncontrol.controls`) and gathered here for use on their own."""

from ..controls.astar import binarize, retention_loss, segregation_loss, soft_iou
from ..controls.attend_excite import attend_excite_loss, subject_max_attention
from ..controls.boxdiff import boxdiff_loss, boxdiff_terms, grid_box
from ..controls.common import subject_maps
from ..controls.conform import nt_xent
from ..controls.divide_bind import binding_divergence, divide_bind_loss, jensen_shannon, total_variation
from ..controls.initno import clean_term, cross_response, gaussian_kl, otsu_level, peak_self_maps, self_conflict
from ..controls.refocus import CARWeights, box_mask, car_loss, sar_loss
from ..controls.regulate import gaussian_bumps, regulation_objective
from ..controls.syngen import symmetric_kl, syngen_group_loss

__all__ = [
    "CARWeights",
    "attend_excite_loss",
    "binarize",
    "binding_divergence",
    "box_mask",
    "boxdiff_loss",
    "boxdiff_terms",
    "car_loss",
    "clean_term",
    "cross_response",
    "divide_bind_loss",
    "gaussian_bumps",
    "gaussian_kl",
    "grid_box",
    "jensen_shannon",
    "nt_xent",
    "otsu_level",
    "peak_self_maps",
    "regulation_objective",
    "retention_loss",
    "sar_loss",
    "segregation_loss",
    "self_conflict",
    "soft_iou",
    "subject_maps",
    "subject_max_attention",
    "symmetric_kl",
    "syngen_group_loss",
    "total_variation",
]
