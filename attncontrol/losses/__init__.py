"""Pure loss functions, one module per method: functions of attention maps and targets."""

from .astar import binarize, retention_loss, segregation_loss, soft_iou
from .attend_excite import attend_excite_loss, subject_maps, subject_max_attention
from .refocus import CARWeights, box_mask, car_loss, sar_loss

__all__ = [
    "CARWeights",
    "attend_excite_loss",
    "binarize",
    "box_mask",
    "car_loss",
    "retention_loss",
    "sar_loss",
    "segregation_loss",
    "soft_iou",
    "subject_maps",
    "subject_max_attention",
]
