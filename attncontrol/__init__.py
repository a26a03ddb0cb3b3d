"""attncontrol: make text-to-image diffusion models obey their prompts, on stock diffusers pipelines.

import attncontrol
out = attncontrol.generate(pipe, "a cat and a dog", controls=[attncontrol.AttendExcite(subjects=["cat", "dog"])])

The public names are imported on first use (PEP 562), so that the command line starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_WHERE = {
    "AStar": "controls",
    "AttendExcite": "controls",
    "BoxDiff": "controls",
    "Conform": "controls",
    "Control": "controls",
    "DivideBind": "controls",
    "InitNO": "controls",
    "SynGen": "controls",
    "Refocus": "controls",
    "Regulate": "controls",
    "StepInfo": "controls",
    "METHODS": "controls",
    "AmbiguousSubjectError": "errors",
    "AttnControlError": "errors",
    "ModelLoadError": "errors",
    "NonFiniteError": "errors",
    "OptionError": "errors",
    "ResolutionError": "errors",
    "SubjectError": "errors",
    "SubjectNotInPromptError": "errors",
    "SubjectTruncatedError": "errors",
    "UnsupportedPipelineError": "errors",
    "StepRecord": "guidance",
    "GenerationResult": "pipeline",
    "generate": "pipeline",
    "prepare_run": "pipeline",
    "Run": "run",
    "ControlRequest": "request",
    "build_request": "request",
    "TokenTable": "tokens",
    "resolve_subjects": "tokens",
    "tokenize": "tokens",
}

__all__ = [
    "AStar",
    "AmbiguousSubjectError",
    "AttendExcite",
    "AttnControlError",
    "BoxDiff",
    "Conform",
    "Control",
    "ControlRequest",
    "DivideBind",
    "GenerationResult",
    "InitNO",
    "METHODS",
    "ModelLoadError",
    "NonFiniteError",
    "OptionError",
    "Refocus",
    "Regulate",
    "ResolutionError",
    "Run",
    "SynGen",
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
    "__version__",
    "build_request",
]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    if name[:1].isupper():  # a method added since this list was written: found in the registry by class name
        for cls in importlib.import_module(".controls", __name__).METHODS.values():
            if cls.__name__ == name:
                globals()[name] = cls
                return cls
    raise AttributeError(f"module 'attncontrol' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WHERE])


if TYPE_CHECKING:  # for type checkers and IDEs
    from .controls import METHODS, Control, StepInfo

    # the package sets its methods' classes at run time (from its registry): a type checker reads their modules
    from .controls.astar import AStar
    from .controls.attend_excite import AttendExcite
    from .controls.boxdiff import BoxDiff
    from .controls.conform import Conform
    from .controls.divide_bind import DivideBind
    from .controls.initno import InitNO
    from .controls.refocus import Refocus
    from .controls.regulate import Regulate
    from .controls.syngen import SynGen
    from .errors import (
        AmbiguousSubjectError,
        AttnControlError,
        ModelLoadError,
        OptionError,
        ResolutionError,
        SubjectError,
        SubjectNotInPromptError,
        SubjectTruncatedError,
        UnsupportedPipelineError,
    )
    from .guidance import StepRecord
    from .pipeline import GenerationResult, generate, prepare_run
    from .request import ControlRequest, build_request
    from .run import Run
    from .tokens import TokenTable, resolve_subjects, tokenize
