"""Typed errors. Each inherits :class:`AttnControlError` and ``ValueError`` (or ``RuntimeError``), so callers
can catch either the library's base class or the builtin one."""

from __future__ import annotations


class AttnControlError(Exception):
    """Base class of every error attncontrol raises on purpose."""


class SubjectError(AttnControlError, ValueError):
    """A subject could not be mapped to prompt tokens (the message shows the tokenised prompt)."""


class SubjectNotInPromptError(SubjectError):
    """The subject's tokens do not occur in the prompt."""


class AmbiguousSubjectError(SubjectError):
    """The subject occurs more than once; pick one occurrence with ``word#N``."""


class SubjectTruncatedError(SubjectError):
    """The subject lies beyond the text encoder's token limit and is cut off."""


class UnsupportedPipelineError(AttnControlError, ValueError):
    """The pipeline's family is not supported."""


class ResolutionError(AttnControlError, ValueError):
    """An image size or attention resolution the model cannot produce."""


class ModelLoadError(AttnControlError, RuntimeError):
    """A model id or folder could not be loaded (offline, missing, or unsafe weights)."""


class OptionError(AttnControlError, ValueError):
    """A method option, a pipeline argument or a front-end field with a bad value; the message names the value
    and where it came from (a flag, ``file:line`` and field, or the app's field)."""


class OptionTypeError(OptionError, TypeError):
    """An option of the wrong type (a string where a number belongs, an unknown keyword)."""


class NonFiniteError(AttnControlError, ArithmeticError):
    """The latents became NaN or infinite (a step size far too large, a broken model in half precision): the run
    stops there instead of returning a black image as a success."""
