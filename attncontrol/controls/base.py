"""The control protocol: a config dataclass prepares a per-run object that the guidance engine drives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._lazy import torch
from ..errors import OptionError, OptionTypeError, ResolutionError
from ..store import MapKey
from ..text import TextLayout, TextSegment


@dataclass(frozen=True)
class StepInfo:
    """Where sampling is: loop ``index`` over ``scheduler.timesteps`` (0-based), its ``timestep``, ``total`` steps."""

    index: int
    timestep: float
    total: int


@dataclass
class ControlContext:
    """What a control needs to know about one run to prepare itself: the prompts' text streams, the image's latent
    grid, the schedule length, and which attention layers exist at which token grid."""

    text: TextLayout
    num_images_per_prompt: int
    latent_hw: tuple[int, int]
    num_steps: int
    # kind ("cross", "self") -> token grid (rows, cols) -> layer names, at this image size
    grids: dict[str, dict[tuple[int, int], list[str]]]
    default_resolution: tuple[int, int]
    exclude_eot_default: bool
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # whether the denoiser's batch is [unconditional; conditional] (classifier-free guidance)
    cfg_batch: bool = True
    # transformer families: each layer's block index (for ``blocks=``) and the default blocks per kind
    block_index: dict[str, int] = field(default_factory=dict)
    default_blocks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # flow-matching families: the schedule's sigmas (num_steps + 1, ending at 0) and timesteps
    flow_sigmas: list[float] | None = None
    timesteps: list[float] = field(default_factory=list)

    @classmethod
    def simple(cls, tokenizer, prompts: list[str], latent_hw, grid, num_steps: int = 50, **kwargs) -> ControlContext:
        """One CLIP-style stream and one grid of layers named "cross"/"self" (for tests and stand-ins)."""
        text = TextLayout((TextSegment(tokenizer, 0, int(tokenizer.model_max_length), tuple(prompts)),))
        grids = {"cross": {tuple(grid): ["cross"]}, "self": {tuple(grid): ["self"]}}
        kwargs.setdefault("exclude_eot_default", False)
        return cls(text, 1, tuple(latent_hw), num_steps, grids, tuple(grid), **kwargs)

    @property
    def prompts_per_input(self) -> list[str]:
        return list(self.text.segments[0].prompts)

    @property
    def prompts(self) -> list[str]:
        """One per image (each input prompt repeated ``num_images_per_prompt`` times)."""
        return [p for p in self.prompts_per_input for _ in range(self.num_images_per_prompt)]

    @property
    def seq_len(self) -> int:
        return self.text.length

    @property
    def cross_resolutions(self) -> list[tuple[int, int]]:
        return sorted(self.grids.get("cross", {}))

    @property
    def cross_layers(self) -> dict[tuple[int, int], list[str]]:
        return self.grids.get("cross", {})

    def select(self, key: MapKey) -> list[str]:
        """The layers whose maps ``key`` averages: its kind at its grid, from ``key.blocks`` (None: the family's
        default blocks; all layers at that grid for families without blocks)."""
        names = self.grids.get(key.kind, {}).get(tuple(key.grid), [])
        if not names:
            have = ", ".join(f"{r}x{c}" for r, c in sorted(self.grids.get(key.kind, {})))
            raise ResolutionError(
                f"no {key.kind}-attention layer at {key.grid[0]}x{key.grid[1]}; this model has: {have}"
            )
        blocks = key.blocks if key.blocks is not None else self.default_blocks.get(key.kind)
        if blocks is None:
            return list(names)
        if not self.block_index:
            raise OptionError(
                f"blocks={list(key.blocks)} applies to transformer families; here choose layers with attn_res"
            )
        chosen = [n for n in names if self.block_index.get(n) in set(blocks)]
        if not chosen:
            have = sorted({self.block_index[n] for n in names if n in self.block_index})
            raise OptionError(f"blocks {list(blocks)} have no {key.kind}-attention layer; this model has blocks {have}")
        return chosen

    def _per_image(self, per_input: list) -> list:
        return [x for x in per_input for _ in range(self.num_images_per_prompt)]

    def special_positions(self) -> list[list[int]]:
        """Per image, the start/end-token positions of its prompt (padding excluded)."""
        return self._per_image([self.text.special_positions(k) for k in range(self.text.n_inputs)])

    def subjects_per_image(self, subjects) -> list[list[tuple[int, ...]]]:
        """Resolve subjects (one list for all prompts, or one list per prompt) into token positions per image."""
        n_prompts = self.text.n_inputs
        nested = bool(subjects) and all(isinstance(s, (list, tuple)) for s in subjects)
        per_prompt = subjects if nested else [list(subjects)] * n_prompts
        if nested and len(subjects) != n_prompts:
            raise OptionError(
                f"subjects given per prompt must have one list per prompt: got {len(subjects)} lists for "
                f"{n_prompts} prompts"
            )
        return self._per_image([self.text.resolve(k, list(s)) for k, s in enumerate(per_prompt)])

    def subject_words(self, subjects) -> list[list[list[tuple[int, ...]]]]:
        """Per image, per subject, its words as token positions (``"red car"`` -> [(2,), (3,)]; a word split into
        pieces is one tuple). On models with several text streams a word's positions in every stream are joined."""
        out = []
        for positions in self.subjects_per_image(subjects):
            k = len(out) // self.num_images_per_prompt
            out.append([self.text.words(k, pos) for pos in positions])
        return out

    def keep_mask(self, exclude_eot: bool) -> torch.Tensor:
        """(images, seq_len) tokens kept in the softmax over tokens (see :meth:`TextLayout.keep`)."""
        return torch.stack(self._per_image([self.text.keep(k, exclude_eot) for k in range(self.text.n_inputs)]))


class Prepared:
    """What ``Control.prepare`` returns: the control bound to one run. ``name`` is the method's registry key
    (the same in the CLI, batch manifests, traces and the UI); ``first`` and ``stop`` are its window of steps."""

    name: str = "control"
    first: int = 0
    stop: int = 1 << 30

    def bind_window(self, cfg: Control, num_steps: int) -> None:
        self.name = cfg.method
        self.first, self.stop = cfg.window(num_steps)

    def in_window(self, step: int) -> bool:
        return self.first <= step < self.stop


class PreparedControl(Prepared):
    """A latent-guidance control bound to one run. The engine calls these; subclasses implement the method."""

    resolution: tuple[int, int]
    kinds: tuple[str, ...] = ("cross",)
    blocks: tuple[int, ...] | None = None
    normalise: str = "all"
    max_refinement_steps: int = 0
    update_rule: str = "latent"  # "velocity": FOCUS's rule, a deferred step of velocity_sizes[i]
    velocity_sizes: list[float] | None = None

    def text_columns(self) -> torch.Tensor | None:
        """(tokens,) bool: the token positions this control's maps need (None: all)."""
        return None

    def bind_maps(self, maps, cfg, ctx: ControlContext, columns=None) -> None:
        """Read per-subject ``maps`` (a :class:`~attncontrol.controls.common.TokenMaps`) at their grid with the
        options' blocks and normalisation, ask for ``columns`` (a callable; default: the maps' own columns),
        and bind the options' update rule."""
        self.maps = maps
        self.resolution, self.blocks, self.normalise = maps.resolution, cfg.blocks, cfg.normalise
        self.text_columns = maps.columns if columns is None else columns
        cfg.bind_update(self, ctx)

    def map_keys(self) -> list[MapKey]:
        """The maps this control reads (the engine captures the union of all controls' keys)."""
        return [MapKey(kind, tuple(self.resolution), self.blocks, self.normalise if kind == "cross" else "all")
                for kind in self.kinds]  # fmt: skip

    def updates_at(self, step: int) -> bool:
        """Whether it takes its (regular) update at this step. Default: every step of its window."""
        return self.in_window(step)

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

    noise_report: list[dict] | None = None  # what :meth:`initial_noise` did, per image (for the result)

    def initial_noise(self, noise: torch.Tensor, search) -> torch.Tensor:
        """Choose the initial noise before step 0 (InitNO); ``search`` is a :class:`~attncontrol.run.NoiseSearch`.
        Default: keep the noise drawn."""
        return noise

    def step_size(self, step: int) -> float:
        raise NotImplementedError

    def loss(self, maps: dict[tuple[str, tuple[int, int]], torch.Tensor], images: list[int], step: StepInfo):
        """Per-image losses, shape (len(images),), float32, differentiable w.r.t. the latents."""
        raise NotImplementedError


class PreparedEditor(Prepared):
    """An attention-editing control bound to one run: it rewrites attention probabilities inside chosen layers
    during the ordinary denoising forward (no gradient through the denoiser)."""

    layers: list[str]
    active: bool = False

    def begin_step(self, step: int) -> None:
        raise NotImplementedError

    def edit(self, layer: str, scores: torch.Tensor, heads: int) -> torch.Tensor:
        """``scores``: (batch * heads, queries, keys) pre-softmax, float32. Returns probabilities."""
        raise NotImplementedError

    def step_stats(self) -> dict[str, float]:
        return {}


def step_index(value: int | float, num_steps: int, at_least_one: bool = False) -> int:
    """A step given as an int (a loop index over the scheduler's timesteps) or a float in [0, 1] (a fraction of
    the schedule, rounded; with ``at_least_one`` a positive fraction is at least step 1)."""
    if isinstance(value, float):
        index = round(value * num_steps)
        return max(1, index) if at_least_one and value > 0 else index
    return int(value)


@dataclass(kw_only=True)
class Control:
    """Base of the user-facing control dataclasses: the method's registry key and when it acts.

    The same two fields mean the same thing in every method (published names such as A&E's
    ``max_iter_to_alter`` are accepted as aliases of ``stop``).

    Args:
        start, stop: the method acts at steps ``start <= i < stop``; an int is a step index (0-based loop index
            over the scheduler's timesteps), a float in [0, 1] a fraction of the schedule; ``stop=None`` runs to
            the last step.
    """

    method: ClassVar[str] = "control"
    aliases: ClassVar[dict[str, str]] = {}

    start: int | float = 0
    stop: int | float | None = None

    def validate_subjects(self) -> None:
        """``subjects`` as a list (a single word or index is accepted alone); at least one."""
        subjects = self.subjects
        self.subjects = [subjects] if isinstance(subjects, (str, int)) else list(subjects)
        if not self.subjects:
            raise OptionError(f"{type(self).__name__} needs at least one subject, got an empty list")

    def window(self, num_steps: int) -> tuple[int, int]:
        first = step_index(self.start, num_steps)
        stop = num_steps if self.stop is None else step_index(self.stop, num_steps, at_least_one=True)
        return first, stop

    def validate_window(self) -> None:
        for name in ("start", "stop"):
            value = getattr(self, name)
            if value is None and name == "stop":
                continue
            also = [alias for alias, target in self.aliases.items() if target == name]
            label = f"{name} ({', '.join(also)})" if also else name
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OptionError(
                    f"{label} must be a step index (int) or a fraction of the steps (float), got {value!r}"
                )
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                raise OptionError(f"{label} as a fraction of the steps must be between 0 and 1, got {value}")
            if value < 0:
                raise OptionError(f"{label} must be >= 0, got {value}")
        if self.stop is not None and type(self.stop) is type(self.start) and self.stop <= self.start:
            also = [alias for alias, target in self.aliases.items() if target == "stop"]
            label = f"stop ({', '.join(also)})" if also else "stop"
            raise OptionError(f"{label} must be after start: the window {self.start}..{self.stop} has no step")

    def prepare(self, ctx: ControlContext) -> Prepared:
        raise NotImplementedError


def with_aliases(cls):
    """Accept ``cls.aliases`` (published parameter names) as keyword arguments of the dataclass and as
    attributes, each standing for its canonical field (e.g. A&E's ``max_iter_to_alter`` for ``stop``)."""
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        for alias, target in cls.aliases.items():
            if alias in kwargs:
                if target in kwargs:
                    raise OptionTypeError(f"{cls.__name__}: pass {target}= or its alias {alias}=, not both")
                kwargs[target] = kwargs.pop(alias)
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    __init__.__wrapped__ = init
    cls.__init__ = __init__
    for alias, target in cls.aliases.items():
        setattr(
            cls,
            alias,
            property(
                lambda self, t=target: getattr(self, t),
                lambda self, v, t=target: setattr(self, t, v),
                doc=f"Alias of ``{target}``.",
            ),
        )
    return cls
