"""The model seam: every fact about a model family lives behind :class:`ModelAdapter`.

The rest of the library (the run, the guidance engine, the capture processors, the store, the controls and the
losses) asks the adapter; it never names a family's modules, its latent layout, its scheduler quirks or its
tokenizers. Adding a family is one module implementing this class plus its entry in ``models.ADAPTERS`` and, for
the checks made before torch is imported, in ``attncontrol.loading`` (``TOKEN_STREAMS``, and ``STREAM_TEMPLATES``
and ``PATCH_SIZE`` where it has them); its tiny test pipeline is one line of ``attncontrol.testing.BUILDERS``.
``tests/test_families.py`` checks that the tables agree with the adapter.

Members, and what each answers:

- ``denoiser``: the module whose attention processors are swapped and whose parameters are frozen in a run.
- ``layers``: the capturable attention layers (:class:`~attncontrol.store.AttnLayer`: name, kind, block,
  level, execution order, and the ops that compute its attention: the attention form, an
  :class:`~attncontrol.processors.form.AttentionForm`, that the family picks for each layer here and the capture
  processor only asks); ``grid(layer, latent_hw)`` their token grid.
- ``latent_hw`` / ``default_size`` / ``default_attn_res``: image size -> latent grid; the map level methods use.
- ``initial_latents`` / ``start_noise_sigma``: how the pipeline draws its initial noise (shape, packing) and the
  scale it applies to it; ``input_scale``: the factor the scheduler applies to latents before the denoiser.
- ``schedule``: the pipeline's own timestep schedule; ``uses_cfg`` / ``cfg_batched``: the pipeline's
  classifier-free-guidance rule and whether it batches the two branches.
- ``encode`` / ``guidance_forward``: prompt encoding (once per run) and the cond-only guidance forward.
- ``with_step_callback``: how the run's per-step callback reaches the pipeline.
- ``text_layout``: which key positions of the maps are text, from which tokenizer; ``exclude_eot_default``.
- ``missing_kinds``: the kinds of map the family has no layer for, and why (e.g. no softmax to read).
- ``checkpoint_modules``: which modules gradient checkpointing wraps in a guidance pass.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import OptionError, ResolutionError
from ..store import AttnLayer, grid_after
from ..text import TextLayout


def joint_layers(blocks: list[str], form) -> list[AttnLayer]:
    """The layers of joint-attention blocks (each ``{block}.attn``, one softmax over image and text tokens, block
    index = position in ``blocks``): a "cross" layer (its image->text part) and a "self" layer (its image->image
    part, renormalised over the image keys) per block, both at the token grid, both with ``form``."""
    layers = []
    for i, label in enumerate(blocks):
        proc = f"{label}.attn.processor"
        layers.append(AttnLayer(proc, "cross", label, 1, i, form, proc, i))
        layers.append(AttnLayer(f"{proc}#self", "self", label, 1, i, form, proc, i))
    return layers


@dataclass
class PromptBatch:
    """What ``encode`` needs: the prompts and the pipeline arguments that shape their embeddings."""

    prompts: list[str]
    num_images_per_prompt: int
    do_cfg: bool
    negative_prompt: str | list[str] | None = None
    clip_skip: int | None = None
    lora_scale: float | None = None
    height: int = 512
    width: int = 512
    extra: dict[str, Any] = field(default_factory=dict)  # the family's own prompt arguments (prompt_2, ...)
    guidance_scale: float | None = None


@dataclass
class Encoded:
    """``cond``: the cond-branch inputs of a guidance forward (one tensor per key, batch first); ``to_pipe``: the
    embeddings handed to the pipeline instead of the prompt."""

    cond: dict[str, torch.Tensor]
    to_pipe: dict[str, Any]


# the text keys of a family whose pipeline passes a caption mask beside its embeddings (``prompt_attention_mask``
# for the pipeline, ``encoder_attention_mask`` for the denoiser): regional prompting appends both
MASKED_TEXT_KEYS = (
    "encoder_hidden_states",
    "encoder_attention_mask",
    "prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_embeds",
    "negative_prompt_attention_mask",
)


class ModelAdapter(ABC):
    """One model family's facts. Subclasses set ``description`` and implement the abstract members."""

    description: ClassVar[str]
    # pipeline arguments that describe the prompt: the adapter encodes them itself and does not pass them on
    consumed_kwargs: ClassVar[tuple[str, ...]] = ()
    # the pipeline's name for the attention processors' keyword arguments
    attention_kwargs_name: ClassVar[str] = "cross_attention_kwargs"
    # flow-matching schedule (sigmas from 1 to 0): the velocity update rule applies
    flow_matching: ClassVar[bool] = False
    # the pipeline classes (by name, as model_index.json records them) this adapter serves
    pipeline_names: ClassVar[tuple[str, ...]] = ()
    # the text streams a user picks subjects in: (tokenizer subfolder, label, first position in the maps), as
    # attncontrol.loading.TOKEN_STREAMS has them for the pipeline class
    token_streams: ClassVar[tuple[tuple[str, str, int], ...]] = (("tokenizer", "CLIP", 0),)
    # the encoded tensors (``Encoded.cond`` and ``Encoded.to_pipe`` keys) that run along the text sequence, dim 1:
    # regional prompting appends each sub-prompt's to them (``append_text``)
    text_keys: ClassVar[tuple[str, ...]] = ("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds")
    # Modular Diffusers (attncontrol.modular): the modular pipeline classes of the family, and the stock pipeline
    # argument its guider's scale stands for (None: the modular loop has no classifier-free-guidance guider)
    modular_names: ClassVar[tuple[str, ...]] = ()
    modular_guidance: ClassVar[str | None] = "guidance_scale"
    # its modular input step refuses a negative text of another length than the positive one
    modular_equal_lengths: ClassVar[bool] = False

    def __init__(self, pipe):
        self.pipe = pipe
        # set by a caller that runs the branches of classifier-free guidance as separate forwards, positive first,
        # whatever the stock pipeline does (a Modular Diffusers guider)
        self.sequential_cfg = False

    @staticmethod
    @abstractmethod
    def matches(pipe) -> bool: ...

    # ---------------------------------------------------------------- the denoiser and its layers

    @property
    @abstractmethod
    def denoiser(self) -> torch.nn.Module: ...

    @property
    @abstractmethod
    def layers(self) -> list[AttnLayer]: ...

    @property
    def family(self) -> str:
        return type(self).__name__.removesuffix("Adapter").lower()

    @property
    def dtype(self) -> torch.dtype:
        dtype = self.denoiser.dtype  # diffusers' ModelMixin property (torch's Module types it as a submodule)
        assert isinstance(dtype, torch.dtype)
        return dtype

    def grid(self, layer: AttnLayer, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The token grid (rows, cols) of ``layer`` when the latents are ``latent_hw``."""
        return grid_after(latent_hw, layer.level)

    def grids(self, latent_hw: tuple[int, int], kind: str = "cross") -> dict[str, tuple[int, int]]:
        """Layer name -> token grid, for the layers of ``kind``."""
        return {la.name: self.grid(la, latent_hw) for la in self.layers if la.kind == kind}

    def layers_by_grid(self, latent_hw: tuple[int, int]) -> dict[str, dict[tuple[int, int], list[str]]]:
        """kind -> token grid -> layer names (execution order)."""
        out: dict[str, dict[tuple[int, int], list[str]]] = {}
        for la in self.layers:
            out.setdefault(la.kind, {}).setdefault(self.grid(la, latent_hw), []).append(la.name)
        return out

    def default_attn_res(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The map level 4x below the latents or, where that level has no cross-attention, the nearest one."""
        levels = sorted({la.level for la in self.layers if la.kind == "cross"})
        if not levels:
            raise ResolutionError(f"{type(self.denoiser).__name__} has no cross-attention layers")
        level = min(levels, key=lambda lv: (abs(lv - 2), lv))
        return grid_after(latent_hw, level)

    @abstractmethod
    def checkpoint_modules(self, last_layer: str) -> list[torch.nn.Module]: ...

    # ---------------------------------------------------------------- sizes and latents

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this (the VAE's factor and the pipeline's own check)."""
        return math.lcm(self.vae_scale_factor, 8)

    @abstractmethod
    def default_size(self) -> tuple[int, int]: ...

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        step = self.size_multiple
        for label, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % step:
                raise ResolutionError(f"{label} must be a positive multiple of {step} for this model, got {value!r}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    @abstractmethod
    def latent_shape(self, n: int, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        """The shape of the pipeline's latents for ``n`` images (packed, for families that pack them)."""

    def latent_dtype(self, text_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the pipeline's latents: its text embeddings' by default (SD, SDXL, SD3, FLUX); a pipeline
        that samples in float32 whatever the model's dtype says so here (a user's ``latents`` are cast to it)."""
        return text_dtype

    def initial_latents(self, n: int, latent_hw, generator, device, dtype) -> torch.Tensor:
        """The initial noise exactly as the pipeline draws it (the same generator calls)."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(self.latent_shape(n, latent_hw), generator=generator, device=device, dtype=dtype)

    def start_noise_sigma(self) -> float:
        """The factor the pipeline multiplies its initial noise by (1 for flow-matching schedulers)."""
        return float(getattr(self.pipe.scheduler, "init_noise_sigma", 1.0))

    def input_scale(self, t) -> float:
        """The factor c with ``scheduler.scale_model_input(x, t) == c * x``: 1 for DDIM, PNDM, DPM-Solver and
        flow matching, ``1 / sqrt(sigma^2 + 1)`` for Euler, LMS, Heun, KDPM2 and the like.

        Guidance steps in the model's input space ``z = c * x`` and maps back (``x = z / c``), so the same model
        input gets the same update whatever the scheduler (a step on x with x's own gradient would move z by
        only c^2 of it: ~1/200 at SDXL's first sigma)."""
        scheduler = self.pipe.scheduler
        if not hasattr(scheduler, "scale_model_input"):
            return 1.0
        one = torch.ones((), dtype=torch.float64)
        scaled = scheduler.scale_model_input(one, t)
        return 1.0 if scaled is one else float(scaled)

    # ---------------------------------------------------------------- schedule, guidance rule, prompts

    def bind_size(self, latent_hw: tuple[int, int]) -> None:
        """Called once per run with the latent grid (for families whose guidance forward needs it)."""
        return None

    def schedule(self, num_inference_steps, device, timesteps=None, sigmas=None, latent_hw=None, extra=None):
        """The pipeline's own schedule: (timesteps, number of steps)."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        return retrieve_timesteps(self.pipe.scheduler, num_inference_steps, device, timesteps, sigmas)

    def with_step_callback(self, call_kwargs: dict[str, Any], on_step_end) -> dict[str, Any]:
        """The pipeline's arguments with ``on_step_end`` (``(pipe, i, t, {"latents": ...}) -> dict``) as its
        per-step callback (default: ``callback_on_step_end``; a pipeline with another callback adapts it here)."""
        return {**call_kwargs, "callback_on_step_end": on_step_end}

    def check_pipe_kwargs(self, pipe_kwargs: dict[str, Any]) -> None:
        """The family's own pipeline arguments, checked before any model work (default: nothing to check)."""
        return None

    def call_default(self, name: str, extra: dict[str, Any] | None = None) -> Any:
        """A pipeline argument: the value the caller gave (in ``extra``), else the default of ``__call__``."""
        if extra and extra.get(name) is not None:
            return extra[name]
        return inspect.signature(self.pipe.__call__).parameters[name].default

    def max_sequence_length(self, extra: dict[str, Any]) -> int:
        """The text encoder's length: the caller's ``max_sequence_length``, else the pipeline's default."""
        return int(self.call_default("max_sequence_length", extra) or self.call_default("max_sequence_length"))

    def blocks_before(self, blocks, last_layer: str) -> list[torch.nn.Module]:
        """The entries of ``blocks`` (in execution order, numbered as the layers' ``block_index``) before the one
        holding ``last_layer``: what gradient checkpointing wraps in a guidance pass."""
        index = next(la.block_index for la in self.layers if la.name == last_layer)
        return list(blocks[:index])

    def default_guidance_scale(self) -> float:
        return float(inspect.signature(self.pipe.__call__).parameters["guidance_scale"].default)

    @abstractmethod
    def uses_cfg(self, guidance_scale: float, negative_prompt=None, extra: dict | None = None) -> bool:
        """Whether the pipeline runs classifier-free guidance (at this scale, with these arguments)."""

    def cfg_batched(self, do_cfg: bool) -> bool:
        """Whether its denoiser batch is then [negative; positive] (else one forward per branch, positive first)."""
        return do_cfg

    @classmethod
    def from_guider_scale(cls, scale: float) -> float:
        """The value of the stock argument :attr:`modular_guidance` that means what a Modular Diffusers CFG guider's
        ``guidance_scale`` means (``pred_uncond + scale * (pred_cond - pred_uncond)``; 1: no guidance)."""
        return scale

    def batches_cfg(self, do_cfg: bool) -> bool:
        """:meth:`cfg_batched` for this run: False when the caller runs the branches one after the other."""
        return not self.sequential_cfg and self.cfg_batched(do_cfg)

    def missing_kinds(self) -> dict[str, str]:
        """Kinds of map ("self", "cross") the family cannot give, each with why (the error a method that reads
        them meets)."""
        return {}

    def default_blocks(self) -> dict[str, tuple[int, ...]]:
        """Transformer families: per kind, the blocks the maps average by default (see ``blocks=``)."""
        return {}

    @property
    @abstractmethod
    def exclude_eot_default(self) -> bool:
        """Whether A&E-style token softmaxes drop EOT/padding by default."""

    @abstractmethod
    def text_layout(self, prompts: list[str], pipe_kwargs: dict[str, Any]) -> TextLayout: ...

    @property
    def tokenizer(self):
        """The tokenizer of the first text stream (token tables shown to users)."""
        return self.text_layout(["a"], {}).segments[0].tokenizer

    @abstractmethod
    def encode(self, batch: PromptBatch, device) -> Encoded: ...

    def regions_unsupported(self) -> str | None:
        """Why regional prompting cannot run on this family (None: it can)."""
        return None

    def append_text(self, base: Encoded, parts: list[Encoded], do_cfg: bool) -> Encoded:
        """``base`` with each of ``parts`` (the sub-prompts, each encoded as a prompt by :meth:`encode`) appended
        along the text sequence of every ``text_keys`` tensor. The negative branch keeps its own tokens: where the
        pipeline batches it with the positive one it is zero-padded to the same length (masks padded with 0, and
        the regional attention lets the negative rows see only its own tokens); a negative run as its own forward
        is left as it is."""
        extra = sum(int(p.cond["encoder_hidden_states"].shape[1]) for p in parts)

        def joined(source: dict, key: str, pieces: list[dict]):
            value = source[key]
            if not torch.is_tensor(value):
                return value
            if key.startswith("negative_"):
                if not self.batches_cfg(do_cfg):
                    return value
                pad = value.new_zeros(value.shape[0], extra, *value.shape[2:])
                return torch.cat([value, pad], dim=1)
            return torch.cat([value, *(piece[key].to(value.dtype) for piece in pieces)], dim=1)

        cond = {
            k: joined(base.cond, k, [p.cond for p in parts]) if k in self.text_keys else v for k, v in base.cond.items()
        }
        to_pipe = {
            k: joined(base.to_pipe, k, [p.to_pipe for p in parts]) if k in self.text_keys else v
            for k, v in base.to_pipe.items()
        }
        return Encoded(cond, to_pipe)

    @abstractmethod
    def guidance_forward(self, model_input: torch.Tensor, t, cond: dict[str, torch.Tensor], attention_kwargs=None):
        """Cond-only forward of the model input up to the last captured layer."""


class PackedLatents(ModelAdapter):
    """A family whose latents reach the transformer packed 2x2 into a sequence (FLUX, FLUX.2, Qwen-Image): the
    run's token grid, bound once per run, is what a guidance forward unpacks its sequence by."""

    token_grid: tuple[int, int] | None = None

    def bind_size(self, latent_hw: tuple[int, int]) -> None:
        self.token_grid = (latent_hw[0] // 2, latent_hw[1] // 2)

    def grid_of(self, seq: int) -> tuple[int, int]:
        """The bound token grid, checked against a packed sequence of ``seq`` tokens."""
        if self.token_grid is None or self.token_grid[0] * self.token_grid[1] != seq:
            raise OptionError(f"packed latents have {seq} tokens, the image size gives {self.token_grid}")
        return self.token_grid
