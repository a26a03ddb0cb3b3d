"""Pieces shared by the controls that work on per-subject cross-attention maps (A&E, A-STAR, Refocus)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from .._lazy import np, torch
from ..errors import OptionError, ResolutionError
from ..ops import gaussian_smooth, token_softmax
from .base import Control, ControlContext
from .fields import COUNT, Range, option
from .vocabulary import MapKey


def normalise_attn_res(value, where: str = "attn_res") -> tuple[int, int] | None:
    """``None``, ``N`` or ``(rows, cols)`` -> ``None`` or ``(rows, cols)``; raises naming a bad value."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        rows, cols = (int(x) for x in value)
    except (TypeError, ValueError):
        raise OptionError(f"{where} must be N or (rows, cols) of positive ints, got {value!r}") from None
    if min(rows, cols) < 1:
        raise OptionError(f"{where} must be (rows, cols) of positive ints, got {value}")
    return rows, cols


def _odd(value: int, where: str) -> int:
    if value % 2 == 0:
        raise OptionError(f"{where} must be a positive odd integer, got {value}")
    return value


def _blocks(value, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    blocks = [value] if isinstance(value, int) else list(value)
    if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
        raise OptionError(f"{where} must be block indices >= 0, got {value!r}")
    return tuple(blocks)


def attn_res_field(help: str):
    return option(None, help, check=normalise_attn_res)


@dataclass(kw_only=True)
class MapOptions(Control):
    """How a map-reading control builds its per-subject maps (Attend-and-Excite's recipe, which A-STAR and
    Attention Refocusing share): cross-attention at ``attn_res`` averaged over heads and layers, times
    ``softmax_scale``, softmax over the kept tokens, each subject's tokens summed, Gaussian-smoothed."""

    attn_res: tuple[int, int] | int | None = attn_res_field(
        "(rows, cols) of the attention maps; None = the level 4x below the latents (16x16 at 512 px for SD 1.x/2.x), "
        "or the nearest level with cross-attention."
    )
    kernel_size: int = option(
        3, "the Gaussian smoothing's kernel (the reference's 3x3).", low=1, app=(1, 9), check=_odd, unit="cells"
    )
    sigma: float = option(0.5, "the Gaussian smoothing's sigma (reference: 0.5).", low=0, open_low=True)
    smooth_attentions: bool = option(True, "smooth each subject's map (reference: on).")
    exclude_eot: bool | None = option(
        None,
        "drop end-of-text and padding from the softmax over tokens (the official SD 2.1 behaviour); None = the "
        "model family's default (True for SD 2.x-style tokenizers, padding with '!'; False otherwise, diffusers').",
    )
    softmax_scale: float = option(
        100.0,
        "the maps are multiplied by this before the softmax over tokens (reference: 100).",
        low=0,
        open_low=True,
        app=(0.1, 1000),
    )
    blocks: tuple[int, ...] | int | None = option(
        None,
        "transformer families (SD3, FLUX): the blocks whose attention is averaged (None: the family's default, see "
        "the README); convolutional (SD 1.x/2.x/XL) families choose layers by attn_res.",
        check=_blocks,
    )
    normalise: str = option(
        "all",
        "'all': image->text probabilities of the layer's own softmax (for joint layers, over image and text keys); "
        "'text': renormalised over the text keys. The same on cross-attention layers.",
        choices=("all", "text"),
    )
    recipe: str = option(
        "attend-excite",
        "'attend-excite' (the above); 'focus': FOCUS's subject maps on SD3/FLUX (the subjects' tokens blurred 3x3 "
        "with sigma 1, renormalised over the subjects' tokens at each pixel, a subject's tokens averaged; "
        "softmax_scale, kernel_size, sigma, exclude_eot do not apply).",
        choices=("attend-excite", "focus"),
    )

    @property
    def block_tuple(self) -> tuple[int, ...] | None:
        """``blocks`` as its check left it (a tuple; an int given alone became a one-block tuple)."""
        return cast("tuple[int, ...] | None", self.blocks)


@dataclass(kw_only=True)
class GuidanceOptions(MapOptions):
    """How a latent-guidance control moves the latents (on top of the maps it reads)."""

    update: str = option(
        "latent",
        "'latent': the method's own rule, z <- z - alpha_i * grad L at the current step, with its step sizes, "
        "thresholds and refinement (the default on every family). 'velocity' (flow-matching families, SD3 / FLUX): "
        "FOCUS's velocity correction v <- v + lambda * 2(s+1e-3)/(1-s+1e-3) * s * grad L (s = t / 1000), which the "
        "Euler step turns into a latent step alpha_i = lambda * c_i * (sigma_i - sigma_{i+1}) after the step; one "
        "update per step, no refinement.",
        choices=("latent", "velocity"),
    )
    velocity_scale: float = option(
        4.0,
        "lambda of the velocity rule (FOCUS's README example: 4; its code's default: 1).",
        low=0,
        open_low=True,
        app=(0, 1000),
    )

    def bind_update(self, prepared, ctx: ControlContext) -> None:
        """Give the prepared control its update rule (and the velocity rule's steps)."""
        prepared.update_rule = self.update
        if self.update == "velocity":
            if ctx.flow_sigmas is None:
                raise OptionError("update='velocity' needs a flow-matching model (SD3, FLUX); use update='latent'")
            prepared.velocity_sizes = velocity_steps(self.velocity_scale, ctx.timesteps, ctx.flow_sigmas)


def velocity_steps(scale: float, timesteps: list[float], sigmas: list[float]) -> list[float]:
    """alpha_i = lambda * 2(s_i + 1e-3) / (1 - s_i + 1e-3) * s_i * (sigma_i - sigma_{i+1}), s_i = t_i / 1000: the
    latent step equal to FOCUS's velocity correction at step i under the Euler step ``x += (sigma_{i+1} -
    sigma_i) v``."""
    sig = torch.tensor(sigmas, dtype=torch.float32)  # the scheduler's sigmas, differenced as its step does
    out = []
    for i, t in enumerate(timesteps):
        s = float(t) / 1000.0
        out.append(scale * 2 * (s + 1e-3) / (1 - s + 1e-3) * s * -float(sig[i + 1] - sig[i]))
    return out


def scale_factor_field(
    help: str = "the step size's factor: alpha_i = scale_factor * sqrt(linspace(*scale_range, steps)[i]) (A&E: 20).",
):
    return option(20.0, help, low=0, open_low=True, app=(0, 2000))


def scale_range_field(help: str = "the step size's schedule from its first to its last step (A&E: (1, 0.5))."):
    return option((1.0, 0.5), help, items=Range(0, open_low=True))


def thresholds_field(default: Callable[[], dict[int, float]], help: str, high: float | None = 1.0):
    """``{step: T}``: a refinement target per step index."""
    return option(factory=default, help=help, keys=Range(0), items=Range(0, high))


def count_field(default: int, help: str, low: int = 0, app: tuple[float, float] | None = None):
    """A count of iterations (at most :data:`~attncontrol.limits.MAX_ITERATIONS`)."""
    return option(default, help, low=low, high=COUNT.high, unit="iterations", app=app)


def ae_step_sizes(cfg, num_steps: int) -> np.ndarray:
    """A&E's step sizes: ``scale_factor * sqrt(linspace(scale_range[0], scale_range[1], num_steps))``."""
    return cfg.scale_factor * np.sqrt(np.linspace(cfg.scale_range[0], cfg.scale_range[1], num_steps))


def resolve_attn_res(attn_res, ctx: ControlContext) -> tuple[int, int]:
    if attn_res is None:
        return ctx.default_resolution
    if tuple(attn_res) not in ctx.cross_resolutions:
        have = ", ".join(f"{r}x{c}" for r, c in ctx.cross_resolutions)
        raise ResolutionError(
            f"attn_res {attn_res[0]}x{attn_res[1]} has no cross-attention layer at this image size "
            f"(latents {ctx.latent_hw[0]}x{ctx.latent_hw[1]}); this model has: {have}"
        )
    return tuple(attn_res)


class TokenMaps:
    """Per-image subject maps: cross-attention at ``resolution``, x softmax_scale, softmax over the kept
    tokens, each subject's tokens summed, Gaussian-smoothed (the A&E recipe that the other methods share)."""

    def __init__(self, cfg, ctx: ControlContext, subjects, positions=None):
        self.cfg = cfg
        self.resolution = resolve_attn_res(cfg.attn_res, ctx)
        self.key = MapKey("cross", self.resolution, cfg.block_tuple, cfg.normalise)
        ctx.select(self.key)  # fails now, naming the bad blocks, not in the first guidance pass
        self.subjects = positions if positions is not None else ctx.subjects_per_image(subjects)
        exclude = ctx.exclude_eot_default if cfg.exclude_eot is None else cfg.exclude_eot
        self.keep = ctx.keep_mask(exclude).to(ctx.device)

    def columns(self) -> torch.Tensor:
        """The token positions the maps need: those any image keeps in its softmax (what joint layers must give);
        with the FOCUS recipe, the subjects' own tokens."""
        if self.cfg.recipe == "focus":
            cols = torch.zeros_like(self.keep[0])
            cols[[p for subs in self.subjects for pos in subs for p in pos]] = True
            return cols
        return self.keep.any(0)

    def per_image(self, maps, images: list[int]) -> list[torch.Tensor]:
        """Each image's (subjects, rows, cols) maps from the averaged attention ``maps[self.key]``."""
        if self.cfg.recipe == "focus":
            return [focus_subject_maps(maps[self.key][row], self.subjects[b]) for row, b in enumerate(images)]
        probs = token_softmax(maps[self.key], self.keep[images], self.cfg.softmax_scale)
        cfg = self.cfg
        return [
            subject_maps(probs[row], self.subjects[b], cfg.kernel_size, cfg.sigma, cfg.smooth_attentions)
            for row, b in enumerate(images)
        ]


def subject_maps(
    probs: torch.Tensor,
    subjects: list[tuple[int, ...]],
    kernel_size: int = 3,
    sigma: float = 0.5,
    smooth: bool = True,
) -> torch.Tensor:
    """Each subject's (smoothed) map from token-softmaxed ``probs`` (rows, cols, tokens) of one image:
    (num_subjects, rows, cols). A subject of several tokens (a split word, a phrase) sums its tokens' maps
    (Attend-and-Excite's recipe, Sec. 3)."""
    maps = torch.stack([probs[..., list(pos)].sum(-1) for pos in subjects])
    return gaussian_smooth(maps, kernel_size, sigma) if smooth else maps


def focus_subject_maps(maps: torch.Tensor, subjects: list[tuple[int, ...]]) -> torch.Tensor:
    """FOCUS's subject maps (ericbill21/FOCUS, ``Controller``) from one image's averaged attention (rows, cols,
    tokens): the subjects' token maps blurred (3x3, sigma 1, torchvision's kernel, reflect padding), renormalised
    at each pixel over all the subjects' tokens, and each subject's tokens averaged: (subjects, rows, cols)."""
    rows = [p for pos in subjects for p in pos]
    blurred = gaussian_smooth(maps[..., rows].permute(2, 0, 1), 3, 1.0, formula="gaussian")
    shares = blurred / blurred.sum(0, keepdim=True)
    out, start = [], 0
    for pos in subjects:
        out.append(shares[start : start + len(pos)].mean(0))
        start += len(pos)
    return torch.stack(out)


def bindings_field(help: str):
    """``{noun: [modifier, ...]}``: more modifiers per noun than the phrase subjects give."""
    return option(factory=dict, help=help)


def binding_groups(ctx: ControlContext, subjects, bindings: dict) -> list[list[tuple[list, tuple]]]:
    """Per image, the (modifier words, noun word) groups: a phrase subject binds its leading words to its last
    word (``"red car"``: red -> car); ``bindings={"car": ["red", "shiny"]}`` adds modifiers to a noun (a subject or
    a word of the prompt). Words are tuples of token positions."""
    words = ctx.subject_words(subjects)
    extra = []
    if bindings:
        nouns = list(bindings)
        noun_words = ctx.subject_words(nouns)
        mod_words = [ctx.subject_words(list(bindings[n])) for n in nouns]
        for b in range(len(words)):
            extra.append([(sum(mod_words[j][b], []), noun_words[b][j][-1]) for j in range(len(nouns))])
    out = []
    for b, subs in enumerate(words):
        groups = [(list(w[:-1]), w[-1]) for w in subs]
        for mods, noun in extra[b] if extra else []:
            match = next((g for g in groups if g[1] == noun), None)
            if match is None:
                groups.append((list(mods), noun))
            else:
                match[0].extend(m for m in mods if m not in match[0])
        out.append(groups)
    return out
