"""The words the engine and the methods share: which maps a control reads (:class:`MapKey`), where sampling is
(:class:`StepInfo`), what a control plans for a step (:class:`StepPlan`) and what its evaluation returns
(:class:`Evaluation`, read per image as a :class:`Row`). Torch-free to import."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MapKey:
    """Which maps a control reads: ``kind`` at token ``grid`` from the layers of ``blocks`` (None: the family's
    default layers at that grid), ``normalise`` "all" (the layer's own softmax over all its keys) or "text"
    (joint layers: renormalised over the text keys)."""

    kind: str
    grid: tuple[int, int]
    blocks: tuple[int, ...] | None = None
    normalise: str = "all"


@dataclass(frozen=True)
class StepInfo:
    """Where sampling is: loop ``index`` over ``scheduler.timesteps`` (0-based), its ``timestep``, ``total`` steps."""

    index: int
    timestep: float
    total: int


@dataclass(frozen=True)
class Row:
    """One image's latest evaluation, as the step plan's tests read it: its loss and the statistics the method's
    evaluation reported for it (e.g. Refocus's weakest box peak)."""

    loss: float
    stats: dict[str, float] = field(default_factory=dict)


def loss_above(target: float) -> Callable[[Row], bool]:
    """The usual refinement test: refine while the image's loss is above ``target``."""

    def test(row: Row) -> bool:
        return row.loss > target

    return test


@dataclass(frozen=True)
class StepPlan:
    """What a latent-guidance control does at one step, decided before the step from the options alone.

    ``update``: it takes its regular update; ``step_size``: its alpha at this step (the velocity rule's when it
    moves the latents that way); ``refine``: its refinement test on an image's latest evaluation (None: no
    refinement at this step); ``max_refinement``: most refinement iterations before the final update;
    ``final``: ``final(row, refined)`` whether it takes one more update of an image after refinement ends (or,
    with no refinement, its one update), on the evaluation that drove the last update (None: ``update``)."""

    update: bool = False
    step_size: float = 0.0
    refine: Callable[[Row], bool] | None = None
    max_refinement: int = 0
    final: Callable[[Row, bool], bool] | None = None

    @property
    def acts(self) -> bool:
        """Whether the control needs a guidance pass at this step."""
        return self.update or self.refine is not None

    def takes_final(self, row: Row, refined: bool) -> bool:
        return self.update if self.final is None else self.final(row, refined)


@dataclass
class Evaluation:
    """What a control's evaluation of some images returns: per image its loss (differentiable w.r.t. the
    latents), the statistics its step plan's tests read, and the state it carries to its next evaluation of that
    image (the engine keeps and hands it back; None: it carries nothing)."""

    loss: torch.Tensor
    stats: list[dict[str, float]] | None = None
    carry: list | None = None

    def row(self, k: int) -> Row:
        return Row(float(self.loss[k]), self.stats[k] if self.stats else {})
