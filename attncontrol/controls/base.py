"""The control protocol: a config dataclass prepares a per-run object that the guidance engine drives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from .._lazy import torch
from ..errors import OptionError, OptionTypeError, ResolutionError
from ..text import TextLayout, TextSegment
from .fields import aliases_of, label, option
from .vocabulary import Evaluation, MapKey, Row, StepInfo, StepPlan


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
    # kinds of map this model cannot give, each with why (the adapter's ``missing_kinds``)
    missing_kinds: dict[str, str] = field(default_factory=dict)

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
        names = self.grids.get(key.kind, {}).get(key.grid, [])
        if not names and key.kind in self.missing_kinds:
            raise ResolutionError(f"this model has no {key.kind}-attention maps: {self.missing_kinds[key.kind]}")
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
                f"blocks={list(blocks)} applies to transformer families; here choose layers with attn_res"
            )
        chosen = [n for n in names if self.block_index.get(n) in set(blocks)]
        if not chosen:
            found = sorted({self.block_index[n] for n in names if n in self.block_index})
            raise OptionError(
                f"blocks {list(blocks)} have no {key.kind}-attention layer; this model has blocks {found}"
            )
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
        out: list[list[list[tuple[int, ...]]]] = []
        for positions in self.subjects_per_image(subjects):
            k = len(out) // self.num_images_per_prompt
            out.append([self.text.words(k, pos) for pos in positions])
        return out

    def keep_mask(self, exclude_eot: bool) -> torch.Tensor:
        """(images, seq_len) tokens kept in the softmax over tokens (see :meth:`TextLayout.keep`)."""
        return torch.stack(self._per_image([self.text.keep(k, exclude_eot) for k in range(self.text.n_inputs)]))


class Prepared:
    """What ``Control.prepare`` returns: the control bound to one run. ``name`` is the method's registry key
    (the same in the CLI, batch manifests, traces and the UI); ``first`` and ``stop`` are its window of steps.
    Everything here is fixed when the run is prepared."""

    name: str = "control"
    first: int = 0
    stop: int = 1 << 30

    def bind_window(self, cfg: Control, num_steps: int) -> None:
        cfg.check_window(num_steps)
        self.name = cfg.method
        self.first, self.stop = cfg.window(num_steps)

    def in_window(self, step: int) -> bool:
        return self.first <= step < self.stop


class PreparedControl(Prepared):
    """A latent-guidance control bound to one run. The engine asks it for its :class:`StepPlan` at each step and
    calls :meth:`evaluate`; the engine owns every piece of state (the carried state included) and commits it.
    Subclasses implement :meth:`plan` (usually through :meth:`make_plan`) and :meth:`evaluate`."""

    resolution: tuple[int, int]
    kinds: tuple[str, ...] = ("cross",)
    blocks: tuple[int, ...] | None = None
    normalise: str = "all"
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
        self.resolution, self.blocks, self.normalise = maps.resolution, maps.key.blocks, cfg.normalise
        self.text_columns = maps.columns if columns is None else columns  # type: ignore[method-assign]
        cfg.bind_update(self, ctx)

    def map_keys(self) -> list[MapKey]:
        """The maps this control reads (the engine captures the union of all controls' keys)."""
        return [
            MapKey(kind, self.resolution, self.blocks, self.normalise if kind == "cross" else "all")
            for kind in self.kinds
        ]

    def initial_noise(self, noise: torch.Tensor, search) -> tuple[torch.Tensor, list[dict] | None]:
        """Choose the initial noise before step 0 (InitNO); ``search`` is a :class:`~attncontrol.run.NoiseSearch`.
        Returns the noise and a report per image (None: nothing to report). Default: keep the noise drawn."""
        return noise, None

    def plan(self, step: int) -> StepPlan:
        raise NotImplementedError

    def make_plan(
        self,
        step: int,
        step_size: float,
        update: bool | None = None,
        refine: Callable[[Row], bool] | None = None,
        max_refinement: int = 0,
        final: Callable[[Row, bool], bool] | None = None,
    ) -> StepPlan:
        """A plan with this control's update rule applied: ``update`` defaults to "inside the window"; under the
        velocity rule the step size is the rule's alpha_i (the engine takes one update per step under that rule and
        never refines)."""
        update = self.in_window(step) if update is None else update
        if self.update_rule == "velocity":
            assert self.velocity_sizes is not None
            step_size = self.velocity_sizes[step]
        return StepPlan(update, float(step_size), refine, max_refinement, final)

    def evaluate(self, maps: dict, images: list[int], step: StepInfo, carry: list) -> Evaluation:
        """The loss of ``images`` (rows of ``maps``) at ``step``, given what this control carried for each of them
        from its previous evaluation (``carry[row]``, None at first). Must not write ``self``."""
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


def _step_value(value, where: str):
    """A step option: an int step index >= 0 or a float fraction of the schedule in [0, 1] (None: see the field)."""
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{where} must be a step index (int) or a fraction of the steps (float), got {value!r}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise OptionError(f"{where} as a fraction of the steps must be between 0 and 1, got {value}")
    if value < 0:
        raise OptionError(f"{where} must be >= 0, got {value}")
    return value


def _subject_list(value, where: str) -> list:
    """``subjects`` as a list (a single word or index is accepted alone); at least one."""
    subjects = [value] if isinstance(value, (str, int)) else list(value)
    if not subjects:
        raise OptionError(f"{where} must name at least one subject, got an empty list")
    return subjects


def subjects_field(
    help: str = 'words, phrases (``"red car"``), occurrences (``"cat#2"``) or token indices; one '
    "list for every prompt, or one list per prompt.",
):
    """The ``subjects`` field of a method driven by subjects (given by ``--subjects``, not as an option)."""
    return option(factory=list, help=help, check=_subject_list, user_option=False)


def window_stop(default: int | float | None, help: str, aliases: tuple[str, ...] = ("max_iter_to_alter",)):
    """A method's ``stop`` with its own default, help and published alias."""
    return option(default, help, unit="steps", aliases=aliases, check=_step_value, kw_only=True)


@dataclass(kw_only=True)
class Control:
    """Base of the user-facing control dataclasses: the method's registry key and when it acts.

    Every field is an :func:`~attncontrol.controls.fields.option` that carries its help and range; constructing
    the dataclass checks them all (:func:`~attncontrol.controls.options.check_fields`), then :meth:`check` the
    rules that join several fields. A method defines no ``__post_init__``.
    """

    method: ClassVar[str] = "control"
    aliases: ClassVar[dict[str, str]] = {}

    start: int | float = option(
        0,
        "the method acts from this step on: a step index (0-based loop index over the "
        "scheduler's timesteps) or a fraction of the schedule in [0, 1].",
        unit="steps",
        check=_step_value,
    )
    stop: int | float | None = option(
        None,
        "the method acts before this step (an index or a fraction, as start); None = to the last step.",
        unit="steps",
        check=_step_value,
    )

    def __post_init__(self) -> None:
        from .options import check_fields

        check_fields(self)
        self.check()

    def check(self) -> None:
        """Rules across fields (after each field passed its own). Default: the window has a step."""
        if self.stop is not None and type(self.stop) is type(self.start) and self.stop <= self.start:
            raise OptionError(
                f"{label(type(self), 'stop')} must be after start: the window {self.start}..{self.stop} has no step"
            )

    def window(self, num_steps: int) -> tuple[int, int]:
        first = step_index(self.start, num_steps)
        stop = num_steps if self.stop is None else step_index(self.stop, num_steps, at_least_one=True)
        return first, stop

    def check_window(self, num_steps: int) -> None:
        """Refuse a window with no step in this schedule (a start past a few-step model's last step): the method
        would never act, and a run that silently does nothing is worse than an error."""
        first, stop = self.window(num_steps)
        if first >= min(stop, num_steps):
            raise OptionError(
                f"{label(type(self), 'start')} is step {first} (start={self.start!r}), but this schedule has "
                f"{num_steps} steps (0..{num_steps - 1}): the method would never act; give an earlier start, or "
                "a fraction of the schedule (start=0.0, stop=0.5: the first half at any length)"
            )

    def extra_text(self) -> tuple[str, ...]:
        """Texts the pipeline encodes after the prompt, as prompts of their own (regional prompting's
        sub-prompts); most methods have none."""
        return ()

    def prepare(self, ctx: ControlContext) -> Prepared:
        raise NotImplementedError


# The registry: each method has one name (its class's ``method``) in the CLI, batch manifests, traces and the UI.
METHODS: dict[str, type[Control]] = {}
_ORDER: dict[str, float] = {}


def register(name: str, order: float):
    """The one registry line of a method: ``@register("attend-excite", order=1)`` above its dataclass. It takes
    the key ``name`` everywhere, is listed by ``order`` (the CLI's ``methods``, the app), and accepts the
    published aliases its fields declare as keyword arguments and attributes."""

    def decorate(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"two methods named {name!r}: {METHODS[name].__name__} and {cls.__name__}")
        cls.method = name
        cls.aliases = aliases_of(cls)
        _with_aliases(cls)
        _ORDER[name] = order
        METHODS[name] = cls
        ordered = sorted(METHODS.items(), key=lambda item: (_ORDER[item[0]], item[0]))
        METHODS.clear()
        METHODS.update(ordered)
        return cls

    return decorate


def _with_aliases(cls) -> None:
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
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    cls.__init__ = __init__
    for alias, target in cls.aliases.items():
        setattr(cls, alias, _alias_property(target))


def _alias_property(target: str) -> property:
    def get(self):
        return getattr(self, target)

    def put(self, value) -> None:
        setattr(self, target, value)

    return property(get, put, doc=f"Alias of ``{target}``.")
