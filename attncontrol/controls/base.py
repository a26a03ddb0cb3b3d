"""The control protocol: a config dataclass prepares a per-run object that the guidance engine drives."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SubjectError
from ..tokens import resolve_subjects, tokenize


@dataclass(frozen=True)
class StepInfo:
    """Where sampling is: loop ``index`` over ``scheduler.timesteps`` (0-based), its ``timestep``, ``total`` steps."""

    index: int
    timestep: float
    total: int


@dataclass
class ControlContext:
    """What a control needs to know about one run to prepare itself."""

    tokenizer: object
    prompts: list[str]  # one per image (prompts repeated num_images_per_prompt times)
    prompts_per_input: list[str]  # the prompts as the user passed them
    num_images_per_prompt: int
    latent_hw: tuple[int, int]
    num_steps: int
    cross_resolutions: list[tuple[int, int]]  # resolutions that have cross-attention layers, for this size
    default_resolution: tuple[int, int]
    exclude_eot_default: bool
    seq_len: int = 77
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # other (tokenizer, prompts per input) whose token positions must agree (SDXL's second text encoder)
    secondary: list[tuple[object, list[str]]] = field(default_factory=list)
    # whether the denoiser's batch is [unconditional; conditional] (classifier-free guidance)
    cfg_batch: bool = True
    # cross-attention layers by resolution (rows, cols) -> layer names, for attention-editing controls
    cross_layers: dict[tuple[int, int], list[str]] = field(default_factory=dict)

    def eot_indices(self) -> list[int]:
        """Position of each image's end-of-text token."""
        return [len(self.tokenizer(p, truncation=True, max_length=self.seq_len).input_ids) - 1 for p in self.prompts]

    def subjects_per_image(self, subjects) -> list[list[tuple[int, ...]]]:
        """Resolve subjects (one list for all prompts, or one list per prompt) into token positions per image."""
        per_prompt = subjects
        n_prompts = len(self.prompts_per_input)
        nested = bool(subjects) and all(isinstance(s, (list, tuple)) for s in subjects)
        if not nested:
            per_prompt = [list(subjects)] * n_prompts
        elif len(subjects) != n_prompts:
            raise ValueError(
                f"subjects given per prompt must have one list per prompt: got {len(subjects)} lists for "
                f"{n_prompts} prompts"
            )
        resolved = [resolve_subjects(self.tokenizer, p, list(s)) for p, s in zip(self.prompts_per_input, per_prompt)]
        for tokenizer, prompts in self.secondary:
            for k, (prompt, subs) in enumerate(zip(prompts, per_prompt)):
                other = resolve_subjects(tokenizer, prompt, list(subs))
                for subject, mine, theirs in zip(subs, resolved[k], other):
                    if mine != theirs:
                        raise SubjectError(
                            f"subject {subject!r} is at tokens {list(mine)} of {self.prompts_per_input[k]!r} for the "
                            f"first text encoder but at {list(theirs)} of {prompt!r} for the second; both encoders "
                            "attend through the same token positions, so they must agree"
                            f"\n{tokenize(self.tokenizer, self.prompts_per_input[k]).format()}"
                            f"\n{tokenize(tokenizer, prompt).format()}"
                        )
        return [r for r in resolved for _ in range(self.num_images_per_prompt)]

    def keep_mask(self, exclude_eot: bool) -> torch.Tensor:
        """(images, seq_len) tokens kept in the softmax over tokens.

        ``exclude_eot=False``: diffusers' slice ``[1:-1]`` (drops start-of-text and the last slot, keeps
        end-of-text and padding). ``True``: the official SD 2.1 behaviour, only the prompt's own tokens.
        """
        keep = torch.zeros(len(self.prompts), self.seq_len, dtype=torch.bool)
        if not exclude_eot:
            keep[:, 1 : self.seq_len - 1] = True
            return keep
        for b, prompt in enumerate(self.prompts):
            n = len(self.tokenizer(prompt, truncation=True, max_length=self.seq_len).input_ids)
            keep[b, 1 : n - 1] = True
        return keep


class PreparedControl:
    """One control bound to one run. The engine calls these; subclasses implement the method."""

    name: str = "control"
    resolution: tuple[int, int]
    kinds: tuple[str, ...] = ("cross",)
    max_refinement_steps: int = 0

    def updates_at(self, step: int) -> bool:
        raise NotImplementedError

    def refine_target(self, step: int) -> float | None:
        """Loss above which the latents are refined at this step, or None."""
        return None

    def refines_at(self, step: int) -> bool:
        return self.refine_target(step) is not None

    def wants_refinement(self, step: int, image: int, loss: float) -> bool:
        """Whether image ``image`` needs another iteration, given its loss at the latest evaluation."""
        target = self.refine_target(step)
        return target is not None and loss > target

    def max_refinement(self, step: int) -> int:
        """Most refinement iterations at this step (before the step's final update)."""
        return self.max_refinement_steps

    def final_update(self, step: int, image: int, refined: bool, loss: float) -> bool:
        """Whether this control takes one more update of ``image`` after refinement ends (or, with no refinement,
        its one update of the step). ``refined``: it took refinement iterations of this image at this step;
        ``loss``: its loss at the evaluation that drove the last update. Default: whenever it updates at this
        step (Attend-and-Excite: its reference recomputes the loss and updates once more after refinement)."""
        return self.updates_at(step)

    def step_size(self, step: int) -> float:
        raise NotImplementedError

    def loss(self, maps: dict[tuple[str, tuple[int, int]], torch.Tensor], images: list[int], step: StepInfo):
        """Per-image losses, shape (len(images),), float32, differentiable w.r.t. the latents."""
        raise NotImplementedError


class PreparedEditor:
    """An attention-editing control bound to one run: it rewrites attention probabilities inside chosen layers
    during the ordinary denoising forward (no gradient through the UNet)."""

    name: str = "editor"
    layers: list[str]
    active: bool = False

    def begin_step(self, step: int) -> None:
        raise NotImplementedError

    def edit(self, layer: str, scores: torch.Tensor, heads: int) -> torch.Tensor:
        """``scores``: (batch * heads, queries, keys) pre-softmax, float32. Returns probabilities."""
        raise NotImplementedError

    def step_stats(self) -> dict[str, float]:
        return {}


class Control:
    """Base of the user-facing control dataclasses."""

    def prepare(self, ctx: ControlContext) -> PreparedControl:
        raise NotImplementedError
