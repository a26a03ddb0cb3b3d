"""SANA (``SanaPipeline`` with a ``SanaTransformer2DModel``): a DiT whose blocks each run a linear self-attention
over the image tokens, a softmax cross-attention from the image tokens to the text, and a convolutional GLU
feed-forward; a Gemma-2 text encoder fed an instruction before the prompt; a DC-AE (32x) latent space; flow
matching sampled by DPM-Solver++ on flow sigmas.

What the adapter rests on (diffusers' ``models/transformers/sana_transformer.py`` and
``pipelines/sana/pipeline_sana.py``):

- ``SanaTransformerBlock.__init__``: ``attn1`` runs ``SanaLinearAttnProcessor2_0``, ReLU feature maps and
  a normalised ``K^T V`` product: no image->image softmax and no attention matrix exists, so this family has no
  "self" maps and the methods that read them (Refocus's self-attention term, InitNO's self-attention conflict) are
  refused with a :class:`~attncontrol.errors.ResolutionError` that says so. ``attn2`` (``SanaAttnProcessor2_0``):
  separate q/k/v, ``norm_q``/``norm_k`` over the whole projection (SANA 1.5's ``rms_norm_across_heads``), one
  softmax over the text keys at the default scale, the key mask added as a bias; the classic form
  (:data:`~attncontrol.processors.classic.CLASSIC`) computes exactly that.
- ``SanaTransformer2DModel.forward``: the caption projection and its RMS norm run before the blocks; the 0/1
  ``encoder_attention_mask`` becomes a bias of -10000 on masked keys, whose probability is then exactly 0 in
  float32 and float64 (exp(-10000) underflows); the image tokens are the latent grid patchified by ``patch_size``.
- ``SanaPipeline.encode_prompt`` / ``_get_gemma_prompt_embeds``: the prompt is lowercased and stripped, the
  complex human instruction (``__call__``'s default) put before it, the ids padded to the instruction's token
  count + ``max_sequence_length`` - 2, and ``select_index = [0] + last (max_sequence_length - 1)`` kept: the maps'
  text positions are BOS then the tail of [instruction; prompt; padding], which
  :func:`attncontrol.loading.instruction_template` reproduces for the token tables. The negative prompt has no
  instruction.
- ``SanaPipeline.__call__``: CFG when ``guidance_scale > 1`` batched as [negative; positive], the timestep passed
  as ``t * timestep_scale``, latents drawn by ``prepare_latents`` (``randn_tensor`` in float32 at the binned
  size) and resolution binning: with ``use_resolution_binning`` (the default) the size is first mapped to the
  nearest bin of the transformer's ``sample_size``, the latents drawn there and the image resized back, so
  :meth:`SanaAdapter.latent_hw` bins the same way.

Flow matching: DPM-Solver++ with ``use_flow_sigmas`` (``x_t = (1 - s) x_0 + s e``, sigmas from 1 to 0) takes
the model's velocity (``flow_prediction``); its first-order update is the Euler step exactly, so the velocity rule
(``update="velocity"``) is FOCUS's correction at first-order steps (the first and, with ``lower_order_final``,
the last) and its Euler-equivalent latent step at the second-order ones.

Default blocks ("cross"): every block. Each SANA block has one cross-attention at the same (patch) grid and no
published per-block study of which of them localise subjects exists that this adapter could cite; with random
weights it cannot be measured here. Averaging all blocks is the choice the library makes for SD3 (FOCUS averages
every joint block); ``blocks=`` narrows it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from functools import cached_property
from typing import Any

import torch

from ..errors import OptionError, ResolutionError
from ..loading import TOKEN_STREAMS, instruction_template
from ..processors.classic import CLASSIC
from ..store import AttnLayer, EarlyExit
from ..text import TextLayout, TextSegment
from .base import MASKED_TEXT_KEYS, Encoded, ModelAdapter, PromptBatch

_NO_SELF = (
    "SANA's self-attention is linear attention (ReLU feature maps, no softmax, diffusers' "
    "SanaLinearAttnProcessor2_0): it computes no image->image attention map, so a method that reads self-attention "
    "maps cannot run on it; use a method that reads the cross-attention only (AttendExcite, AStar, DivideBind, "
    "Conform, SynGen, BoxDiff)"
)


def _bins(sample_size: int) -> dict:
    """The pipeline's resolution bins for the transformer's ``sample_size`` (``SanaPipeline.__call__``)."""
    from diffusers.pipelines.sana import pipeline_sana as ps

    table = {
        128: ps.ASPECT_RATIO_4096_BIN,
        64: ps.ASPECT_RATIO_2048_BIN,
        32: ps.ASPECT_RATIO_1024_BIN,
        16: ps.ASPECT_RATIO_512_BIN,
    }
    if sample_size not in table:
        raise ResolutionError(
            f"resolution binning has no bins for a transformer sample_size of {sample_size} (16, 32, 64, 128); "
            "pass use_resolution_binning=False"
        )
    return table[sample_size]


class SanaAdapter(ModelAdapter):
    description = "SanaPipeline (SANA 600M / 1.6B, SANA 1.5)"
    pipeline_names = ("SanaPipeline",)
    token_streams = TOKEN_STREAMS["SanaPipeline"]
    # regional prompting appends each sub-prompt's Gemma tokens and its mask (``SanaPipeline.encode_prompt`` returns
    # both; ``SanaTransformer2DModel.forward`` turns the mask into the bias of ``attn2``, whose
    # ``SanaAttnProcessor2_0`` calls ``F.scaled_dot_product_attention``); the batched negative's mask is zero-padded
    text_keys = MASKED_TEXT_KEYS
    consumed_kwargs = ("complex_human_instruction", "clean_caption")
    attention_kwargs_name = "attention_kwargs"
    flow_matching = True

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        self.binning = True  # the pipeline's default; check_pipe_kwargs reads the run's choice

    @staticmethod
    def matches(pipe) -> bool:
        from diffusers import SanaTransformer2DModel
        from diffusers.pipelines.sana.pipeline_sana import (
            SanaPipeline,  # its module: diffusers' top level is typed as a dummy
        )

        return isinstance(pipe, SanaPipeline) and isinstance(pipe.transformer, SanaTransformer2DModel)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.patch_size)

    @cached_property
    def layers(self) -> list[AttnLayer]:
        """Each block's cross-attention (``attn2``), classic form, at the patch grid; no "self" layers (linear)."""
        level = int(math.log2(self.patch_size))
        layers = []
        for i, block in enumerate(self.pipe.transformer.transformer_blocks):
            if getattr(block, "attn2", None) is not None:
                name = f"transformer_blocks.{i}.attn2.processor"
                layers.append(AttnLayer(name, "cross", f"transformer_blocks.{i}", level, i, CLASSIC, name, i))
        return layers

    def grid(self, layer: AttnLayer, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] // self.patch_size, latent_hw[1] // self.patch_size

    def missing_kinds(self) -> dict[str, str]:
        return {"self": _NO_SELF}

    def default_blocks(self) -> dict[str, tuple[int, ...]]:
        return {"cross": tuple(la.block_index for la in self.layers if la.block_index is not None)}

    def checkpoint_modules(self, last_layer: str) -> list[torch.nn.Module]:
        """The blocks before the one holding ``last_layer``."""
        return self.blocks_before(self.pipe.transformer.transformer_blocks, last_layer)

    # ---------------------------------------------------------------- sizes and latents

    @property
    def size_multiple(self) -> int:
        return math.lcm(self.vae_scale_factor * self.patch_size, 32)  # check_inputs: multiples of 32

    def default_size(self) -> tuple[int, int]:
        params = inspect.signature(self.pipe.__call__).parameters
        return int(params["height"].default), int(params["width"].default)

    def check_pipe_kwargs(self, pipe_kwargs: dict[str, Any]) -> None:
        """``use_resolution_binning`` (kept for :meth:`latent_hw`); ``clean_caption=True`` is refused."""
        if pipe_kwargs.get("clean_caption"):
            raise OptionError(
                "clean_caption=True rewrites the prompt (URLs, HTML, punctuation) before Gemma tokenises it, so the "
                "token positions of subjects cannot be known in advance; leave clean_caption off"
            )
        self.binning = bool(pipe_kwargs.get("use_resolution_binning", True))

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """The latent grid the pipeline samples on: with resolution binning, that of the bin nearest in aspect
        ratio (``PixArtImageProcessor.classify_height_width_bin``); the image is resized back after decoding."""
        super().latent_hw(height, width)  # the size checks
        if self.binning:
            bins = _bins(int(self.pipe.transformer.config.sample_size))
            height, width = self.pipe.image_processor.classify_height_width_bin(height, width, ratios=bins)
        return int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor

    def latent_dtype(self, text_dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # SanaPipeline.__call__ prepares its latents in torch.float32 whatever the model's dtype

    def latent_shape(self, n: int, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        return (n, int(self.pipe.transformer.config.in_channels), *latent_hw)

    # ---------------------------------------------------------------- schedule, guidance rule, prompts

    def schedule(self, num_inference_steps, device, timesteps=None, sigmas=None, latent_hw=None, extra=None):
        from diffusers.pipelines.sana.pipeline_sana import retrieve_timesteps

        return retrieve_timesteps(self.pipe.scheduler, num_inference_steps, device, timesteps, sigmas)

    def uses_cfg(self, guidance_scale: float, negative_prompt=None, extra=None) -> bool:
        return guidance_scale > 1.0

    @property
    def exclude_eot_default(self) -> bool:
        # no end token; hundreds of masked <pad> positions and BOS would only dilute a token softmax: left out
        return True

    def instruction(self, extra: dict[str, Any]) -> list[str] | None:
        """The complex human instruction of this run: the pipeline's default unless given."""
        if "complex_human_instruction" in extra:
            return extra["complex_human_instruction"]
        return inspect.signature(self.pipe.__call__).parameters["complex_human_instruction"].default

    def text_layout(self, prompts: list[str], pipe_kwargs: dict[str, Any]) -> TextLayout:
        length = self.max_sequence_length(pipe_kwargs)
        template = instruction_template(self.instruction(pipe_kwargs), length)
        return TextLayout((TextSegment(template.wrap(self.pipe.tokenizer), 0, length, tuple(prompts), "Gemma"),))

    @property
    def tokenizer(self):
        return self.text_layout(["a"], {}).segments[0].tokenizer

    def encode(self, batch: PromptBatch, device) -> Encoded:
        pe, pm, npe, npm = self.pipe.encode_prompt(
            batch.prompts,
            batch.do_cfg,
            negative_prompt="" if batch.negative_prompt is None else batch.negative_prompt,
            num_images_per_prompt=batch.num_images_per_prompt,
            device=device,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length(batch.extra),
            complex_human_instruction=self.instruction(batch.extra),
            lora_scale=batch.lora_scale,
        )
        to_pipe = {  # negative_prompt: the pipeline's default "" would clash with its embeddings (check_inputs)
            "negative_prompt": None,
            "prompt_embeds": pe,
            "prompt_attention_mask": pm,
            "negative_prompt_embeds": npe,
            "negative_prompt_attention_mask": npm,
        }
        return Encoded({"encoder_hidden_states": pe, "encoder_attention_mask": pm}, to_pipe)

    def guidance_forward(self, model_input: torch.Tensor, t, cond: dict[str, torch.Tensor], attention_kwargs=None):
        transformer = self.pipe.transformer
        timestep = torch.as_tensor(t, device=model_input.device).expand(model_input.shape[0])
        with contextlib.suppress(EarlyExit):
            transformer(
                model_input.to(transformer.dtype),
                encoder_hidden_states=cond["encoder_hidden_states"].to(transformer.dtype),
                encoder_attention_mask=cond["encoder_attention_mask"],
                timestep=timestep * transformer.config.timestep_scale,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )
