"""PixArt-Sigma (``PixArtSigmaPipeline`` with a ``PixArtTransformer2DModel``): a plain DiT whose blocks are
diffusers' ``BasicTransformerBlock`` (``models/attention.py:BasicTransformerBlock``): self-attention ``attn1`` over
the patch tokens, then cross-attention ``attn2`` from the patch tokens to the caption projection of T5's output
(``max_sequence_length`` positions, 300 by default), each an ``Attention`` with the classic processor
(``AttnProcessor2_0``); adaLN-single timestep conditioning; 4 latent channels; learned sigma (the transformer
gives 8 channels, the pipeline keeps the first 4); DPM-Solver++ (an epsilon model, not flow matching).

Captured maps (all at the patch grid, H/(8p) x W/(8p), p = 2): "cross", each block's ``attn2`` (its keys are the
T5 positions only); "self", each block's ``attn1``. Both have the classic form: separate q/k/v and one softmax
over the keys. The caption mask reaches ``attn2`` as a bias of -10000 on the padding keys
(``models/transformers/pixart_transformer_2d.py:PixArtTransformer2DModel.forward``), which the classic form adds
before its softmax: padding keys get probability exp(-10000) = 0 exactly, in float32 and float64 alike.

Default blocks (``blocks=``): the middle half, blocks n//4 to 3n//4 - 1 (7-20 of PixArt-Sigma's 28), for both
kinds. This is an assumption, not a measurement: with random weights nothing here can show which blocks localise
subjects, and no published layer-wise analysis of PixArt's cross-attention was checked for this choice. It rests
on (a) the UNet practice this library follows (Attend-and-Excite reads the middle, 16x16 level, not the first
or last layers), (b) layer-wise analyses of other DiTs (FLUX, SD3.5) that find object tokens' maps sharp in the
early-to-middle blocks and attribute/detail tokens later, and (c) cost: a guidance pass stops after block 20.
Pass ``blocks=range(28)`` for the DAAM-style average over every block.

Pipeline facts this adapter follows (``pipelines/pixart_alpha/pipeline_pixart_sigma.py``):

- ``PixArtSigmaPipeline.__call__``: resolution binning (``use_resolution_binning=True`` by default) moves the size
  to the nearest bin of the transformer's ``sample_size`` (32/64/128/256 -> the 256/512/1024/2048 bins) before the
  latents are drawn, and resizes the decoded image back: the adapter's latent grid is the binned one (a sample size
  without bins is refused unless binning is off). CFG is ``guidance_scale > 1``, batched [negative; positive],
  with the masks concatenated likewise; the timestep is ``t`` expanded over the batch; ``added_cond_kwargs`` is
  ``{"resolution": None, "aspect_ratio": None}``; no ``cross_attention_kwargs`` reach the transformer.
- It has no ``callback_on_step_end``: its per-step ``callback(step, t, latents)`` runs after each scheduler step
  (with ``callback_steps=1`` and a first-order scheduler: every step); the adapter writes the guided latents into
  that tensor, which the next step reads.
- ``PixArtSigmaPipeline.encode_prompt``: the prompt lower-cased and stripped (or cleaned, with ``clean_caption``
  and bs4/ftfy installed), T5 padded to ``max_sequence_length``, the attention mask returned with the embeddings.
- ``PixArtSigmaPipeline.prepare_latents``: ``randn_tensor`` of (n, 4, H/8, W/8) times ``init_noise_sigma``.
"""

from __future__ import annotations

import contextlib
import inspect
from functools import cached_property
from typing import Any

import torch

from ..errors import OptionError, ResolutionError
from ..loading import STREAM_TEMPLATES, TOKEN_STREAMS
from ..processors import CLASSIC
from ..store import AttnLayer, EarlyExit
from ..text import TextLayout, TextSegment
from .base import MASKED_TEXT_KEYS, Encoded, ModelAdapter, PromptBatch

# the pipeline's sample size -> the name of its aspect-ratio bins (PixArtSigmaPipeline.__call__)
_BINS = {
    256: "ASPECT_RATIO_2048_BIN",
    128: "ASPECT_RATIO_1024_BIN",
    64: "ASPECT_RATIO_512_BIN",
    32: "ASPECT_RATIO_256_BIN",
}


class PixArtAdapter(ModelAdapter):
    description = "PixArtSigmaPipeline (PixArt-Sigma)"
    pipeline_names = ("PixArtSigmaPipeline",)
    token_streams = TOKEN_STREAMS["PixArtSigmaPipeline"]
    # regional prompting appends each sub-prompt's T5 tokens and its caption mask (``encode_prompt`` returns both;
    # ``PixArtTransformer2DModel.forward`` turns the mask into the -10000 bias of ``attn2``); the batched negative's
    # mask is zero-padded, so its extra keys are hidden as its own padding is
    text_keys = MASKED_TEXT_KEYS

    @staticmethod
    def matches(pipe) -> bool:
        from diffusers import PixArtTransformer2DModel
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import (
            PixArtSigmaPipeline,  # its module: diffusers' top level is typed as a dummy
        )

        return isinstance(pipe, PixArtSigmaPipeline) and isinstance(pipe.transformer, PixArtTransformer2DModel)

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        self.binning = True  # the pipeline's default; check_pipe_kwargs reads the run's choice

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @cached_property
    def layers(self) -> list[AttnLayer]:
        """Each block's self-attention then cross-attention (its execution order), all with the classic form."""
        layers = []
        level = max(self.patch_size.bit_length() - 1, 0)  # the grid itself comes from ``grid``
        for i, _ in enumerate(self.pipe.transformer.transformer_blocks):
            label = f"transformer_blocks.{i}"
            layers.append(AttnLayer(f"{label}.attn1.processor", "self", label, level, 2 * i, CLASSIC, "", i))
            layers.append(AttnLayer(f"{label}.attn2.processor", "cross", label, level, 2 * i + 1, CLASSIC, "", i))
        return layers

    def default_blocks(self) -> dict[str, tuple[int, ...]]:
        n = len(self.pipe.transformer.transformer_blocks)
        middle = tuple(range(n // 4, max(3 * n // 4, n // 4 + 1)))
        return {"cross": middle, "self": middle}

    @property
    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.patch_size)

    def grid(self, layer: AttnLayer, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] // self.patch_size, latent_hw[1] // self.patch_size

    def default_attn_res(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Every layer is at the patch grid: the maps are there."""
        return latent_hw[0] // self.patch_size, latent_hw[1] // self.patch_size

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def exclude_eot_default(self) -> bool:
        # T5's "</s>" and padding are left out of the token softmax; the padding keys have probability 0 anyway
        # (the caption mask), but "</s>" would take its share
        return True

    # ---------------------------------------------------------------- sizes and latents

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def default_size(self) -> tuple[int, int]:
        size = int(self.pipe.transformer.config.sample_size) * self.vae_scale_factor
        return size, size

    def check_pipe_kwargs(self, pipe_kwargs: dict[str, Any]) -> None:
        """Resolution binning (on by default) and a first-order scheduler (the per-step callback runs every step
        only then)."""
        self.binning = bool(pipe_kwargs.get("use_resolution_binning", True))
        sample = int(self.pipe.transformer.config.sample_size)
        if self.binning and sample not in _BINS:
            raise ResolutionError(
                f"PixArtSigmaPipeline has resolution bins for sample sizes {sorted(_BINS)}, not this transformer's "
                f"{sample}; pass use_resolution_binning=False"
            )
        order = int(getattr(self.pipe.scheduler, "order", 1))
        if order != 1:
            raise OptionError(
                f"{type(self.pipe.scheduler).__name__} takes {order} model calls per step; PixArtSigmaPipeline "
                "reports only whole steps to its callback, so the run could not guide each one: use a first-order "
                "scheduler (DPMSolverMultistepScheduler, the default, DDIM, Euler, UniPC, ...)"
            )

    def binned_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the pipeline samples at for a requested one (``PixArtSigmaPipeline.__call__``'s binning)."""
        if not self.binning:
            return height, width
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as module

        for label, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ResolutionError(f"{label} must be a positive int, got {value!r}")
        bins = getattr(module, _BINS[int(self.pipe.transformer.config.sample_size)])
        h, w = self.pipe.image_processor.classify_height_width_bin(height, width, ratios=bins)
        return int(h), int(w)

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """The latent grid the pipeline samples (after its resolution binning; the image is resized back)."""
        return super().latent_hw(*self.binned_size(height, width))

    def latent_shape(self, n: int, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        return (n, int(self.pipe.transformer.config.in_channels), *latent_hw)

    # ---------------------------------------------------------------- schedule, guidance rule, prompts

    def uses_cfg(self, guidance_scale: float, negative_prompt=None, extra=None) -> bool:
        return guidance_scale > 1.0

    def with_step_callback(self, call_kwargs: dict[str, Any], on_step_end) -> dict[str, Any]:
        """The pipeline's legacy ``callback(step, t, latents)``: ``on_step_end`` gets the latents and its result is
        written into the pipeline's own tensor, which the next step reads."""
        pipe = self.pipe
        kwargs = {k: v for k, v in call_kwargs.items() if k not in ("callback_on_step_end_tensor_inputs",)}
        if kwargs.pop(
            "cross_attention_kwargs", None
        ):  # the pipeline hands none to its transformer: not dropped quietly
            raise OptionError(
                "PixArtSigmaPipeline does not pass cross_attention_kwargs to its transformer (e.g. a LoRA scale); "
                "call it without them"
            )

        def callback(step: int, t, latents: torch.Tensor) -> None:
            out = on_step_end(pipe, step, t, {"latents": latents})
            new = out.get("latents", latents) if out else latents
            if new is not latents:
                latents.copy_(new)

        return {**kwargs, "callback": callback, "callback_steps": 1}

    def clean_caption(self, extra: dict[str, Any]) -> bool:
        """The pipeline's ``clean_caption`` (True by default in ``__call__``), where bs4 and ftfy allow it."""
        from diffusers.utils import is_bs4_available, is_ftfy_available

        wanted = extra.get("clean_caption")
        if wanted is None:
            wanted = inspect.signature(self.pipe.__call__).parameters["clean_caption"].default
        return bool(wanted) and is_bs4_available() and is_ftfy_available()

    def text_layout(self, prompts: list[str], pipe_kwargs: dict[str, Any]) -> TextLayout:
        """One T5 stream of ``max_sequence_length`` positions, over the text the encoder sees (lower-cased)."""
        seen = tuple(self.pipe._text_preprocessing(list(prompts), clean_caption=self.clean_caption(pipe_kwargs)))
        for prompt, text in zip(prompts, seen):
            if text != prompt.lower().strip():  # the caption cleaner rewrote it: the CLI's token tables would differ
                raise OptionError(
                    f"the pipeline's caption cleaning rewrites the prompt {prompt!r} into {text!r}, so subjects would "
                    "not sit where the token tables show them; pass generate(..., clean_caption=False) or write the "
                    "prompt as the cleaner leaves it"
                )
        tokenizer = STREAM_TEMPLATES["PixArtSigmaPipeline"]["tokenizer"].wrap(self.pipe.tokenizer)  # subjects too
        return TextLayout((TextSegment(tokenizer, 0, self.max_sequence_length(pipe_kwargs), seen, "T5"),))

    def encode(self, batch: PromptBatch, device) -> Encoded:
        pe, mask, npe, nmask = self.pipe.encode_prompt(
            batch.prompts,
            do_classifier_free_guidance=batch.do_cfg,
            negative_prompt=batch.negative_prompt if batch.negative_prompt is not None else "",
            num_images_per_prompt=batch.num_images_per_prompt,
            device=device,
            clean_caption=self.clean_caption(batch.extra),
            max_sequence_length=self.max_sequence_length(batch.extra),
        )
        to_pipe = {
            "prompt_embeds": pe,
            "prompt_attention_mask": mask,
            "negative_prompt": None,  # the pipeline refuses a negative prompt beside its embeddings
            "negative_prompt_embeds": npe,
            "negative_prompt_attention_mask": nmask,
        }
        return Encoded({"encoder_hidden_states": pe, "encoder_attention_mask": mask}, to_pipe)

    def guidance_forward(self, model_input: torch.Tensor, t, cond: dict[str, torch.Tensor], attention_kwargs=None):
        """The transformer on the cond branch as the pipeline calls it (its caption mask included), stopped after
        the last captured layer. ``attention_kwargs`` are not passed: the pipeline passes none either."""
        timestep = torch.as_tensor(t, device=model_input.device)
        timestep = (timestep[None] if timestep.ndim == 0 else timestep).expand(model_input.shape[0])
        with contextlib.suppress(EarlyExit):
            self.pipe.transformer(
                model_input,
                encoder_hidden_states=cond["encoder_hidden_states"],
                encoder_attention_mask=cond["encoder_attention_mask"],
                timestep=timestep,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )

    def checkpoint_modules(self, last_layer: str) -> list[torch.nn.Module]:
        """The transformer blocks before the one holding ``last_layer``."""
        return self.blocks_before(self.pipe.transformer.transformer_blocks, last_layer)
