"""attncontrol: make text-to-image diffusion models obey their prompts, on stock diffusers pipelines.

import attncontrol
out = attncontrol.generate(pipe, "a cat and a dog", controls=[attncontrol.AttendExcite(subjects=["cat", "dog"])])
"""

from .controls import AStar, AttendExcite, Control, Refocus, Regulate, StepInfo
from .errors import (
    AmbiguousSubjectError,
    AttnControlError,
    ModelLoadError,
    ResolutionError,
    SubjectError,
    SubjectNotInPromptError,
    SubjectTruncatedError,
    UnsupportedPipelineError,
)
from .guidance import StepRecord
from .pipeline import GenerationResult, generate, prepare_run
from .run import Run
from .tokens import TokenTable, resolve_subjects, tokenize

__version__ = "0.1.0"

__all__ = [
    "AStar",
    "AmbiguousSubjectError",
    "AttendExcite",
    "AttnControlError",
    "Control",
    "GenerationResult",
    "ModelLoadError",
    "Refocus",
    "Regulate",
    "ResolutionError",
    "Run",
    "StepInfo",
    "StepRecord",
    "SubjectError",
    "SubjectNotInPromptError",
    "SubjectTruncatedError",
    "TokenTable",
    "UnsupportedPipelineError",
    "generate",
    "prepare_run",
    "resolve_subjects",
    "tokenize",
]
