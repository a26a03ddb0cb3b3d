"""FLUX.2 [dev] (``Flux2Pipeline``, a Mistral-3 text encoder) and FLUX.2 [klein] (``Flux2KleinPipeline``, a Qwen3
text encoder), both on a ``Flux2Transformer2DModel``.

The transformer (diffusers ``transformer_flux2.py``): double-stream blocks (``Flux2TransformerBlock``: image and
text projected separately, one softmax over [text; image], ``Flux2AttnProcessor``) then single-stream "parallel"
blocks (``Flux2SingleTransformerBlock``: one sequence [text; image], q/k/v fused with the MLP input in
``to_qkv_mlp_proj``, one output projection for [attention; MLP], ``Flux2ParallelSelfAttnProcessor``); per-head RMS
q/k norms; RoPE over 4 axes (T, H, W, L) from ``txt_ids`` and ``img_ids`` (``Flux2Transformer2DModel.forward``).
Latents: the VAE's latents patchified 2x2 onto channels (``Flux2Pipeline.prepare_latents`` draws
``(B, in_channels, H/16, W/16)`` and packs it into a sequence with ``_pack_latents``; position ids from
``_prepare_latent_ids``). Schedule: flow matching, sigmas ``linspace(1, 1/n, n)`` shifted by
``compute_empirical_mu(image_seq_len, num_steps)``. Text: the prompt rendered into a chat template, padded to
``max_sequence_length`` (512) and encoded; three hidden layers stacked on channels (dev: 10, 20, 30; Klein: 9, 18,
27; ``text_encoder_out_layers``). The transformer attends to the whole padded templated sequence, so token
positions are the templated positions (dev: ``<s>``, the system prompt, ``[INST]`` prompt ``[/INST]``; Klein:
``<|im_start|>user\\n`` prompt ``<|im_end|>`` and the opened assistant turn with an empty thinking block).

Guidance rule: dev has a guidance embedding (``guidance_scale``) and no classifier-free guidance. Klein has no
guidance embedding; its base models run CFG when ``guidance_scale > 1`` (``Flux2KleinPipeline.
do_classifier_free_guidance``: ``guidance_scale > 1 and not config.is_distilled``) as a second forward after the
positive one, with the empty prompt as negative (or ``negative_prompt_embeds``, which a ``negative_prompt`` given
here becomes); the step-distilled models (``is_distilled``) run none.

Captured maps (at the packed token grid, H/16 x W/16): "cross", the image->text part of each block's joint softmax;
"self", its image->image part renormalised over the image keys. ``blocks=`` numbers the double-stream blocks first
(dev: 0-7) then the single-stream blocks (dev: 8-55). The default is the double-stream blocks. What that rests on:
FOCUS and the FLUX.1 adapter use FLUX.1's double-stream blocks, whose image->text attention localises subjects, and
FLUX.2 keeps that design (text in its own stream with its own projections there); it was not measured on FLUX.2's
trained weights here (only random weights were at hand), and FLUX.2 has far fewer double-stream blocks (dev 8 of
56, Klein 4B 5 of 25), so ``blocks=`` is the knob to reach into the single-stream blocks.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from functools import cached_property
from typing import Any, ClassVar

import torch

from ..errors import OptionError, UnsupportedPipelineError
from ..loading import STREAM_TEMPLATES, TOKEN_STREAMS, system_then_user
from ..processors.parallel import PARALLEL_ROTARY_JOINT
from ..store import AttnLayer, EarlyExit
from ..text import TextLayout, TextSegment
from ..tokens import PromptTemplate, TemplatedTokenizer
from .base import Encoded, PackedLatents, PromptBatch, joint_layers

# pipeline arguments that would change the token sequence or the image tokens behind the maps' back
_REFUSED = {
    "image": "reference images add their tokens to the image sequence, which the maps do not cover",
    "caption_upsample_temperature": "the text encoder would rewrite the prompt, so subjects lose their positions",
}


class Flux2Adapter(PackedLatents):
    description = "Flux2Pipeline (FLUX.2 [dev])"
    modular_names: ClassVar[tuple[str, ...]] = ("Flux2ModularPipeline",)
    modular_guidance: ClassVar[str | None] = (
        None  # no guider: guidance_scale is the distilled guidance embedding, an input
    )
    pipeline_names = ("Flux2Pipeline",)
    token_streams = TOKEN_STREAMS["Flux2Pipeline"]
    attention_kwargs_name = "attention_kwargs"
    flow_matching = True

    @staticmethod
    def matches(pipe) -> bool:
        from diffusers import Flux2Transformer2DModel
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

        return isinstance(pipe, Flux2Pipeline) and isinstance(pipe.transformer, Flux2Transformer2DModel)

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        self.guidance_scale: float | None = None
        self.text_ids: torch.Tensor | None = None

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @cached_property
    def layers(self) -> list[AttnLayer]:
        t = self.pipe.transformer
        blocks = [f"transformer_blocks.{i}" for i in range(len(t.transformer_blocks))]
        blocks += [f"single_transformer_blocks.{j}" for j in range(len(t.single_transformer_blocks))]
        return joint_layers(blocks, PARALLEL_ROTARY_JOINT)  # one form for both kinds of block: it tells them apart

    def default_blocks(self) -> dict[str, tuple[int, ...]]:
        double = tuple(range(len(self.pipe.transformer.transformer_blocks)))
        return {"cross": double, "self": double}

    @property
    def exclude_eot_default(self) -> bool:
        # the system prompt, the chat markers and hundreds of padding positions would dilute every token softmax
        return True

    # ---------------------------------------------------------------- sizes, latents, schedule

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2  # the 2x2 patchify (the pipeline's image processor uses the same)

    def default_size(self) -> tuple[int, int]:
        size = int(self.pipe.default_sample_size) * self.vae_scale_factor
        return size, size

    def latent_shape(self, n: int, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        """``Flux2Pipeline.prepare_latents``' noise, patchified and not yet packed: the shape its ``latents=`` takes
        (the pipeline packs it); the callbacks then see the packed (B, tokens, channels)."""
        return (n, int(self.pipe.transformer.config.in_channels), latent_hw[0] // 2, latent_hw[1] // 2)

    def schedule(self, num_inference_steps, device, timesteps=None, sigmas=None, latent_hw=None, extra=None):
        """``__call__``'s step 6: sigmas ``linspace(1, 1/n, n)`` (unless given; none with ``use_flow_sigmas``),
        ``mu = compute_empirical_mu(image tokens, num_inference_steps)``. With ``sigmas`` given the pipeline is called
        without ``num_inference_steps``, so its ``mu`` uses that argument's default."""
        import numpy as np

        module = sys.modules[type(self.pipe).__module__]
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        else:
            num_inference_steps = inspect.signature(self.pipe.__call__).parameters["num_inference_steps"].default
        if getattr(self.pipe.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        seq = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        mu = module.compute_empirical_mu(image_seq_len=seq, num_steps=num_inference_steps)
        return module.retrieve_timesteps(self.pipe.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)

    # ---------------------------------------------------------------- guidance rule, prompts

    def check_pipe_kwargs(self, pipe_kwargs: dict[str, Any]) -> None:
        for key, why in _REFUSED.items():
            if pipe_kwargs.get(key) is not None:
                raise OptionError(f"{type(self.pipe).__name__}: {key}= is not supported with attention control: {why}")

    def uses_cfg(self, guidance_scale: float, negative_prompt=None, extra=None) -> bool:
        """None: FLUX.2 [dev]'s guidance is an embedding of ``guidance_scale``; it takes no negative prompt."""
        if negative_prompt is not None:
            raise OptionError(
                "Flux2Pipeline takes no negative prompt (its guidance_scale is an embedding, not classifier-free "
                "guidance); drop negative_prompt"
            )
        return False

    def cfg_batched(self, do_cfg: bool) -> bool:
        return False  # a negative branch (Klein) is a second forward, after the positive one

    def template(self) -> PromptTemplate:
        """The chat template the pipeline renders the prompt into, with the pipeline's own system message."""
        base = STREAM_TEMPLATES["Flux2Pipeline"]["tokenizer"]
        system = getattr(self.pipe, "system_message", None)
        return PromptTemplate(messages=functools.partial(system_then_user, system_message=system), special=base.special)

    def text_layout(self, prompts: list[str], pipe_kwargs: dict[str, Any]) -> TextLayout:
        side = getattr(getattr(self.pipe.tokenizer, "tokenizer", self.pipe.tokenizer), "padding_side", "right")
        if side != "right":  # positions count from the template's start: left padding would shift every one
            raise UnsupportedPipelineError(
                f"the pipeline's tokenizer pads on the {side}; attncontrol needs right padding (the published "
                "tokenizers' setting) to place subjects; set pipe.tokenizer.padding_side = 'right'"
            )
        tokenizer = TemplatedTokenizer(self.pipe.tokenizer, self.template())
        label = self.token_streams[0][1]
        segment = TextSegment(tokenizer, 0, self.max_sequence_length(pipe_kwargs), tuple(prompts), label)
        return TextLayout((segment,))

    def _encode(self, prompts, batch: PromptBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_prompt`` as ``__call__`` calls it (its own hidden layers, unless ``text_encoder_out_layers``)."""
        kwargs = {}
        if batch.extra.get("text_encoder_out_layers") is not None:
            kwargs["text_encoder_out_layers"] = batch.extra["text_encoder_out_layers"]
        return self.pipe.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=batch.num_images_per_prompt,
            max_sequence_length=self.max_sequence_length(batch.extra),
            **kwargs,
        )

    def encode(self, batch: PromptBatch, device) -> Encoded:
        pe, self.text_ids = self._encode(batch.prompts, batch, device)
        self.guidance_scale = batch.guidance_scale
        return Encoded({"encoder_hidden_states": pe}, {"prompt_embeds": pe})

    def append_text(self, base: Encoded, parts: list[Encoded], do_cfg: bool) -> Encoded:
        """The sub-prompts' templated tokens after the base's. ``encode_prompt`` derives the text ids from the
        embeddings' length (``Flux2Pipeline._prepare_text_ids``: L-axis ``arange(L)``), so the pipeline gives the
        longer sequence ids that continue after the base's; the guidance forward takes the same. Encoding the
        sub-prompts replaced ``text_ids`` with a sub-prompt's: they are rebuilt here. A negative (Klein's CFG) is
        a second forward with its own embeddings and ids: untouched."""
        joined = super().append_text(base, parts, do_cfg)
        pe = joined.cond["encoder_hidden_states"]
        self.text_ids = self.pipe._prepare_text_ids(pe).to(pe.device)
        return joined

    def guidance(self, b: int, device) -> torch.Tensor | None:
        """``__call__``'s guidance embedding input: the scale, float32, one per image."""
        scale = self.guidance_scale
        assert scale is not None  # encode() keeps the run's scale (prepare_run fills in the pipeline's default)
        return torch.full([1], float(scale), device=device, dtype=torch.float32).expand(b)

    def guidance_forward(self, model_input: torch.Tensor, t, cond: dict[str, torch.Tensor], attention_kwargs=None):
        """The transformer as ``__call__`` calls it, on the cond branch; ``model_input`` packed (B, tokens, C) or,
        at the first step, as drawn (B, C, H/16, W/16)."""
        transformer, b = self.pipe.transformer, model_input.shape[0]
        if model_input.ndim == 4:
            img_ids = self.pipe._prepare_latent_ids(model_input)
            model_input = self.pipe._pack_latents(model_input)
        else:
            rows, cols = self.grid_of(model_input.shape[1])
            img_ids = self.pipe._prepare_latent_ids(model_input.new_empty((b, 0, rows, cols)))
        timestep = torch.as_tensor(t, device=model_input.device).expand(b).to(model_input.dtype)
        with contextlib.suppress(EarlyExit):
            transformer(
                hidden_states=model_input.to(transformer.dtype),
                timestep=timestep / 1000,
                guidance=self.guidance(b, model_input.device),
                encoder_hidden_states=cond["encoder_hidden_states"],
                txt_ids=self.text_ids,
                img_ids=img_ids.to(model_input.device),
                joint_attention_kwargs=attention_kwargs,
                return_dict=False,
            )

    def checkpoint_modules(self, last_layer: str) -> list[torch.nn.Module]:
        """The blocks (double- then single-stream) before the one holding ``last_layer``."""
        t = self.pipe.transformer
        return self.blocks_before([*t.transformer_blocks, *t.single_transformer_blocks], last_layer)


class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2 [klein]: the same transformer without a guidance embedding, a Qwen3 encoder, CFG on base models."""

    description = "Flux2KleinPipeline (FLUX.2 [klein], base and distilled)"
    modular_names: ClassVar[tuple[str, ...]] = ("Flux2KleinModularPipeline", "Flux2KleinBaseModularPipeline")
    modular_guidance: ClassVar[str | None] = "guidance_scale"  # the base model's guider; the distilled one has none
    pipeline_names = ("Flux2KleinPipeline",)
    token_streams = TOKEN_STREAMS["Flux2KleinPipeline"]

    @staticmethod
    def matches(pipe) -> bool:
        from diffusers import Flux2Transformer2DModel
        from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

        return isinstance(pipe, Flux2KleinPipeline) and isinstance(pipe.transformer, Flux2Transformer2DModel)

    @property
    def distilled(self) -> bool:
        return bool(getattr(self.pipe.config, "is_distilled", False))

    def uses_cfg(self, guidance_scale: float, negative_prompt=None, extra=None) -> bool:
        """``do_classifier_free_guidance``: ``guidance_scale > 1`` on a base (not step-distilled) model."""
        do_cfg = guidance_scale > 1 and not self.distilled
        if negative_prompt is not None and not do_cfg:
            why = "a step-distilled model" if self.distilled else f"guidance_scale {guidance_scale} (<= 1)"
            raise OptionError(f"Flux2KleinPipeline runs no classifier-free guidance with {why}; drop negative_prompt")
        return do_cfg

    def template(self) -> PromptTemplate:
        return STREAM_TEMPLATES["Flux2KleinPipeline"]["tokenizer"]

    def encode(self, batch: PromptBatch, device) -> Encoded:
        encoded = super().encode(batch, device)
        if batch.do_cfg:  # __call__ encodes "" per prompt; a negative prompt given here replaces it
            negative = batch.negative_prompt if batch.negative_prompt is not None else ""
            negative = [negative] * len(batch.prompts) if isinstance(negative, str) else list(negative)
            encoded.to_pipe["negative_prompt_embeds"] = self._encode(negative, batch, device)[0]
        return encoded

    def guidance(self, b: int, device) -> torch.Tensor | None:
        return None  # no guidance embedding: __call__ passes guidance=None
