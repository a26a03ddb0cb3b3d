"""Pure loss functions, one module per method: functions of attention maps and targets."""

from .attend_excite import attend_excite_loss, subject_max_attention

__all__ = ["attend_excite_loss", "subject_max_attention"]
