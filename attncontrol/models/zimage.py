"""Z-Image and Z-Image-Turbo (``ZImagePipeline`` with a ``ZImageTransformer2DModel``): a single-stream DiT. The
latents are patchified 2x2 and refined alone (``noise_refiner``), the caption embeddings (Qwen3's second-to-last
hidden states of the chat-templated prompt) are refined alone (``context_refiner``), then the main ``layers`` run on
one unified sequence per image, image first: [image tokens, image padding, caption tokens, caption padding], each
part padded to a multiple of ``SEQ_MULTI_OF`` (32) with a learned pad token that the layers attend to, a key mask
only where a batch's items differ in length, 3-axis complex RoPE, RMS q/k norms. Flow matching with a
resolution-dependent shift; the transformer predicts the negated velocity (the pipeline negates its output).

Facts this adapter rests on (diffusers 0.42.1):

- ``transformer_z_image.py:ZImageTransformer2DModel.patchify_and_embed`` / ``_pad_with_ids``: the caption and the
  image are each padded to a multiple of ``SEQ_MULTI_OF``; ``_prepare_sequence``: pad positions take
  ``x_pad_token`` / ``cap_pad_token``; ``_build_unified_sequence``: basic mode is ``[x, cap]`` (image first), the
  mask marks each item's prefix when lengths differ; ``forward``: refiners, then ``layers``, each
  ``ZImageTransformerBlock.attention`` an ``Attention`` with ``ZSingleStreamAttnProcessor`` (called with
  ``attention_mask`` and ``freqs_cis``). The model has no ``attn_processors`` of its own (no ``AttentionMixin``):
  :class:`_ProcessorView` gives the run that interface over its ``Attention`` modules.
- ``pipeline_z_image.py:ZImagePipeline._encode_prompt``: chat template (one user turn,
  ``add_generation_prompt=True, enable_thinking=True``), ``padding="max_length"`` to ``max_sequence_length``
  (512), ``hidden_states[-2]``, only attention-masked tokens kept: a list of per-prompt tensors of different
  lengths. ``encode_prompt``: the negative prompt defaults to "" per prompt.
- ``ZImagePipeline.__call__``: ``do_classifier_free_guidance`` is ``guidance_scale > 0``; one forward of
  ``[positive; negative]`` (``prompt_embeds + negative_prompt_embeds``), ``pred = pos + s * (pos - neg)``, optional
  ``cfg_normalization``, and ``cfg_truncation``: steps with ``(1000 - t) / 1000 > cfg_truncation`` run the positive
  branch alone; latents drawn in float32 as ``(B, C, 2 * (H // 16), 2 * (W // 16))``; timestep ``(1000 - t) /
  1000``; sigmas ``get_default_z_image_sigmas`` (``linspace(1, 1 / n, n)``) with ``mu = calculate_shift`` of the
  packed image length; default 1024 px, 50 steps, guidance 5.0.

Captured maps (token grid H/16 x W/16): "cross", image query -> caption-part key of each main layer's one softmax
(over every unmasked key, image and caption padding included); "self", its image->image part renormalised over
the image keys. The maps' token axis is the caption part as the transformer has it: the templated prompt's tokens
(template included), then caption pad tokens up to the next multiple of 32 (the "padding" of the token tables;
slots an item lacks have probability 0). The refiners see image or text alone and give no "cross" map.

Default blocks: the first half of the main layers. This rests on no measurement (random tiny weights cannot show
where subjects localise): by analogy with FLUX, where FOCUS reads the first third (the double-stream blocks),
the early joint layers are where text tokens still steer the image tokens before later layers refine image
detail; and the guidance forward stops after the last captured layer, so the first half costs half a forward.
Z-Image-Turbo samples in 8 to 9 steps with ``guidance_scale=0`` (no CFG).
"""

from __future__ import annotations

import contextlib
from functools import cached_property
from typing import Any

import torch

from ..errors import OptionError, UnsupportedPipelineError
from ..loading import STREAM_TEMPLATES, TOKEN_STREAMS
from ..processors.segmented import SegmentedJointAttention
from ..store import AttnLayer, EarlyExit
from ..text import TextLayout, TextSegment
from .base import Encoded, ModelAdapter, PromptBatch


class _ProcessorView(torch.nn.Module):
    """The ``attn_processors`` / ``set_attn_processor`` interface over a model's ``Attention`` modules (keys
    ``<module path>.processor``), for a model without diffusers' ``AttentionMixin``; its parameters are the model's."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _modules_with_processors(self) -> dict[str, torch.nn.Module]:
        return {f"{n}.processor": m for n, m in self.model.named_modules() if hasattr(m, "set_processor")}

    @property
    def attn_processors(self) -> dict[str, Any]:
        return {key: m.processor for key, m in self._modules_with_processors().items()}

    def set_attn_processor(self, processors: dict[str, Any]) -> None:
        for key, module in self._modules_with_processors().items():
            if key in processors:
                module.set_processor(processors.pop(key))  # type: ignore[operator]


class ZImageAdapter(ModelAdapter):
    description = "ZImagePipeline (Z-Image, Z-Image-Turbo)"
    modular_names = ("ZImageModularPipeline",)
    pipeline_names = ("ZImagePipeline",)
    token_streams = TOKEN_STREAMS["ZImagePipeline"]
    attention_kwargs_name = "joint_attention_kwargs"
    flow_matching = True

    @staticmethod
    def matches(pipe) -> bool:
        from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
        from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

        return isinstance(pipe, ZImagePipeline) and isinstance(pipe.transformer, ZImageTransformer2DModel)

    def __init__(self, pipe) -> None:
        from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

        super().__init__(pipe)
        self.form = SegmentedJointAttention(SEQ_MULTI_OF)
        self.text_dtype: torch.dtype = torch.float32

    @cached_property
    def denoiser(self) -> torch.nn.Module:
        return _ProcessorView(self.pipe.transformer)

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @cached_property
    def layers(self) -> list[AttnLayer]:
        layers = []
        for i in range(len(self.pipe.transformer.layers)):
            block, proc = f"layers.{i}", f"layers.{i}.attention.processor"
            layers.append(AttnLayer(proc, "cross", block, 1, i, self.form, proc, i))
            layers.append(AttnLayer(f"{proc}#self", "self", block, 1, i, self.form, proc, i))
        return layers

    def default_blocks(self) -> dict[str, tuple[int, ...]]:
        first_half = tuple(range((len(self.pipe.transformer.layers) + 1) // 2))
        return {"cross": first_half, "self": first_half}

    @property
    def exclude_eot_default(self) -> bool:
        # the chat template's tokens (role markers, newlines, the opened assistant turn) and the caption pad tokens
        # would otherwise share every token softmax with the prompt's words
        return True

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2  # ZImagePipeline.__call__: height and width divisible by vae_scale * 2

    def default_size(self) -> tuple[int, int]:
        return 1024, 1024  # ZImagePipeline.__call__: height = height or 1024

    def latent_shape(self, n: int, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        return (n, int(self.pipe.transformer.in_channels), *latent_hw)

    def latent_dtype(self, text_dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # ZImagePipeline.prepare_latents is called with torch.float32

    def initial_latents(self, n: int, latent_hw, generator, device, dtype) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        # ZImagePipeline.prepare_latents is called with torch.float32 whatever the model's dtype
        return randn_tensor(self.latent_shape(n, latent_hw), generator=generator, device=device, dtype=torch.float32)

    def uses_cfg(self, guidance_scale: float, negative_prompt=None, extra=None) -> bool:
        return float(guidance_scale) > 0  # ZImagePipeline.do_classifier_free_guidance

    @classmethod
    def from_guider_scale(cls, scale: float) -> float:
        # ZImagePipeline guides with pos + scale * (pos - neg) (0: none); a guider's scale s is neg + s * (pos - neg)
        return scale - 1.0

    def cfg_batched(self, do_cfg: bool) -> bool:
        # one forward of [positive; negative]; the form shows it to the capture as [negative; positive] (pairs)
        return do_cfg

    def regions_unsupported(self) -> str | None:
        """Refused: Z-Image's unified sequence cannot be laid out as the regional attention's ``[image; text
        segments]`` (``processors/regional.py:RegionLayout``). (1) ``ZImageTransformer2DModel.patchify_and_embed``
        pads the image tokens to a multiple of ``SEQ_MULTI_OF`` with ``x_pad_token`` *between* the image and the
        caption, and pads the caption once, at its end, so the caption pads would fall into the last sub-prompt's
        segment; the layout has no place for either. (2) ``ZImagePipeline.__call__`` batches CFG as [positive;
        negative], while the regional attention takes a batch's leading half as the plain (negative) branch.
        (3) The captions are a list of per-image lengths with a key-padding mask, and the negative keeps its own
        length, so one segment table cannot hold every row. (4) The image's RoPE t-positions start after the
        padded caption, so appending sub-prompts moves them and beta = 1 would not be the plain model."""
        return (
            "Z-Image is not supported yet: its unified [image; image pads; caption; caption pads] sequence "
            "(ZImageTransformer2DModel.patchify_and_embed) and its [positive; negative] CFG batch do not fit the "
            "regional attention's [image; text segments] layout with the negative first, and appended sub-prompts "
            "would move the image's rotary positions"
        )

    @property
    def tokenizer(self):
        return STREAM_TEMPLATES["ZImagePipeline"]["tokenizer"].wrap(self.pipe.tokenizer)

    def text_lengths(self, prompts: list[str], extra: dict[str, Any]) -> list[int]:
        """Each prompt's caption length as the encoder hands it on (templated, truncated to the limit)."""
        limit, tok = self.max_sequence_length(extra), self.tokenizer
        return [min(len(tok(p).input_ids), limit) for p in prompts]

    def text_layout(self, prompts: list[str], pipe_kwargs: dict[str, Any]) -> TextLayout:
        limit = self.max_sequence_length(pipe_kwargs)
        longest = max(self.text_lengths(prompts, pipe_kwargs))
        length = self.form.padded(longest)  # the caption part, padded as the transformer pads it
        if length > limit and longest == limit:
            raise OptionError(
                f"a prompt fills max_sequence_length={limit}, which is not a multiple of {self.form.multiple}: the "
                f"transformer pads the caption to {length} positions; pass a multiple of {self.form.multiple}"
            )
        return TextLayout((TextSegment(self.tokenizer, 0, length, tuple(prompts), "Qwen3"),))

    def schedule(self, num_inference_steps, device, timesteps=None, sigmas=None, latent_hw=None, extra=None):
        from diffusers.pipelines.z_image.pipeline_z_image import (
            calculate_shift,
            get_default_z_image_sigmas,
            retrieve_timesteps,
        )

        config = self.pipe.scheduler.config
        seq = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        mu = calculate_shift(
            seq,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if sigmas is None:
            sigmas = get_default_z_image_sigmas(num_inference_steps)
        return retrieve_timesteps(self.pipe.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)

    def encode(self, batch: PromptBatch, device) -> Encoded:
        """The pipeline's own ``encode_prompt``; ``cond`` holds the captions padded to the layout's length (in
        float32, so the run's latents are the pipeline's float32) and each one's length."""
        k, limit = batch.num_images_per_prompt, self.max_sequence_length(batch.extra)
        negative = batch.negative_prompt
        if isinstance(negative, str):
            negative = [negative] * len(batch.prompts)
        pe, npe = self.pipe.encode_prompt(
            prompt=list(batch.prompts),  # _encode_prompt writes the templated text into the list it is given
            device=device,
            do_classifier_free_guidance=batch.do_cfg,
            negative_prompt=None if negative is None else list(negative),
            max_sequence_length=limit,
        )
        pe = [p for p in pe for _ in range(k)]
        npe = [p for p in npe for _ in range(k)]
        expected = [n for n in self.text_lengths(batch.prompts, batch.extra) for _ in range(k)]
        if [len(p) for p in pe] != expected:
            raise UnsupportedPipelineError(
                f"the text encoder kept {[len(p) for p in pe]} tokens, the templated tokenizer gives {expected}; "
                "token positions would not line up with the attention maps"
            )
        self.text_dtype = pe[0].dtype
        self.form.pairs = len(pe) if self.batches_cfg(batch.do_cfg) else None
        width = self.form.padded(max(expected))
        padded = torch.zeros(len(pe), width, pe[0].shape[-1], dtype=torch.float32, device=pe[0].device)
        for i, p in enumerate(pe):
            padded[i, : len(p)] = p.float()
        lengths = torch.tensor(expected, device=pe[0].device)
        to_pipe = {"prompt_embeds": pe, "negative_prompt_embeds": npe}
        return Encoded({"encoder_hidden_states": padded, "text_lengths": lengths}, to_pipe)

    def guidance_forward(self, model_input: torch.Tensor, t, cond: dict[str, torch.Tensor], attention_kwargs=None):
        """The positive branch as ``ZImagePipeline.__call__`` forwards it: a list of (C, 1, h, w) latents in the
        model's dtype, the captions cut to their lengths, timestep ``(1000 - t) / 1000``."""
        transformer = self.pipe.transformer
        b = model_input.shape[0]
        x = list(model_input.to(transformer.dtype).unsqueeze(2).unbind(dim=0))
        lengths = cond["text_lengths"].tolist()
        caps = [cond["encoder_hidden_states"][i, : lengths[i]].to(self.text_dtype) for i in range(b)]
        timestep = torch.as_tensor(t, device=model_input.device).expand(b)
        timestep = (1000 - timestep) / 1000
        pairs, self.form.pairs = self.form.pairs, None  # a cond-only forward: no branch order to show
        try:
            with contextlib.suppress(EarlyExit):
                transformer(x, timestep, caps, joint_attention_kwargs=attention_kwargs, return_dict=False)
        finally:
            self.form.pairs = pairs

    def checkpoint_modules(self, last_layer: str) -> list[torch.nn.Module]:
        """The refiners and the main layers before the one holding ``last_layer``."""
        t = self.pipe.transformer
        return [*t.noise_refiner, *t.context_refiner, *self.blocks_before(t.layers, last_layer)]
