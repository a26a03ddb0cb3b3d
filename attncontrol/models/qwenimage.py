"""Qwen-Image (``QwenImagePipeline`` with a ``QwenImageTransformer2DModel``): an MMDiT of double-stream blocks only
(60 in the published model), each one joint softmax over [text; image] with the text tokens FIRST
(``transformer_qwenimage.py:QwenDoubleStreamAttnProcessor2_0.__call__``: ``torch.cat([txt_query, img_query])``),
RMS q/k norms per head, and RoPE given as complex frequencies (``QwenEmbedRope.forward`` returns ``(vid_freqs,
txt_freqs)``, applied by ``apply_rotary_emb_qwen(..., use_real=False)``): the attention form is
:class:`~attncontrol.processors.complex_rotary.ComplexRotaryJointAttention`.

The text is Qwen2.5-VL's last hidden state of the prompt rendered into ``pipe.prompt_template_encode`` (a ChatML
system turn, the user turn holding the prompt, the opened assistant turn), with the first
``pipe.prompt_template_encode_start_idx`` (34) tokens dropped and only attention-masked tokens kept
(``pipeline_qwenimage.py:QwenImagePipeline._get_qwen_prompt_embeds``): the text length is the longest prompt's,
so it varies per prompt, and a batch of prompts of different lengths carries ``encoder_hidden_states_mask``. The
maps handle that mask exactly (masked keys get probability 0; :func:`~attncontrol.processors.complex_rotary.
masked_text_probs`). Token tables are the template's tokens after the drop (:class:`~attncontrol.tokens.
TemplatedTokenizer`): in the published tokenizer the 34 dropped tokens are exactly the system turn and the user
turn's opening, so position 0 is the prompt's first token and the table's suffix is ``<|im_end|>``, a newline,
``<|im_start|>``, ``assistant`` and a newline.

Latents: (B, 1, C, H/8, W/8) noise from one ``randn_tensor`` call, packed 2x2 into a sequence
(``QwenImagePipeline.prepare_latents`` / ``_pack_latents``); flow matching with the pipeline's own shift ``mu``
(``calculate_shift`` of the packed sequence length) and sigmas ``linspace(1, 1/n, n)``. CFG is "true CFG"
(``true_cfg_scale`` > 1, default 4.0, AND a negative prompt): the negative branch is a second forward after the
positive one, combined with a norm rescale; ``guidance_scale`` only feeds a guidance embedding in
guidance-distilled configs (``guidance_embeds``), which the published model is not.

Captured maps (at the packed token grid, H/16 x W/16): "cross", the image->text part of each block's joint
softmax; "self", its image->image part renormalised over the image keys. Default blocks: all of them. Every block
is the same double-stream joint attention (there are no single-stream blocks to leave out, as FLUX's adapter
does), and no per-block localisation study of Qwen-Image exists that we could rest a narrower choice on; with
random test weights it cannot be measured here. So the default follows the rule FOCUS applies to SD3 and FLUX
(average every joint block's image->text attention). It is the costliest choice: a guidance pass runs to the last
captured block, i.e. the whole transformer; ``blocks=`` narrows it (and ``checkpointing=True`` cuts its memory).
"""

from __future__ import annotations

import contextlib
from functools import cached_property
from typing import Any

import torch

from ..errors import OptionError
from ..loading import TOKEN_STREAMS
from ..processors.complex_rotary import COMPLEX_ROTARY_JOINT
from ..store import AttnLayer, EarlyExit
from ..text import TextLayout, TextSegment
from ..tokens import PromptTemplate
from .base import Encoded, PackedLatents, PromptBatch, joint_layers


class QwenImageAdapter(PackedLatents):
    description = "QwenImagePipeline (Qwen-Image)"
    modular_names = ("QwenImageModularPipeline",)
    modular_guidance = "true_cfg_scale"
    pipeline_names = ("QwenImagePipeline",)
    token_streams = TOKEN_STREAMS["QwenImagePipeline"]
    attention_kwargs_name = "attention_kwargs"
    flow_matching = True

    @staticmethod
    def matches(pipe) -> bool:
        from diffusers import QwenImageTransformer2DModel
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

        return isinstance(pipe, QwenImagePipeline) and isinstance(pipe.transformer, QwenImageTransformer2DModel)

    # regional prompting appends each sub-prompt's embeddings and mask (``_encode`` always gives a mask)
    text_keys = (
        "encoder_hidden_states",
        "prompt_embeds",
        "prompt_embeds_mask",
        "negative_prompt_embeds",
        "negative_prompt_embeds_mask",
    )

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        self.guidance_scale: float | None = None
        self.text_limit: int | None = None

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @cached_property
    def layers(self) -> list[AttnLayer]:
        blocks = [f"transformer_blocks.{i}" for i in range(len(self.pipe.transformer.transformer_blocks))]
        return joint_layers(blocks, COMPLEX_ROTARY_JOINT)

    def default_blocks(self) -> dict[str, tuple[int, ...]]:
        every = tuple(range(len(self.pipe.transformer.transformer_blocks)))
        return {"cross": every, "self": every}

    @property
    def exclude_eot_default(self) -> bool:
        # the template's suffix (<|im_end|>, <|im_start|>assistant) and the padding of shorter prompts: left out
        return True

    # ---------------------------------------------------------------- sizes and latents

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2  # the 2x2 packing (QwenImagePipeline.check_inputs)

    def default_size(self) -> tuple[int, int]:
        size = int(self.pipe.default_sample_size) * self.vae_scale_factor
        return size, size

    @property
    def channels(self) -> int:
        return int(self.pipe.transformer.config.in_channels) // 4

    def latent_shape(self, n: int, latent_hw: tuple[int, int]) -> tuple[int, ...]:
        return (n, (latent_hw[0] // 2) * (latent_hw[1] // 2), self.channels * 4)

    def initial_latents(self, n: int, latent_hw, generator, device, dtype) -> torch.Tensor:
        """``QwenImagePipeline.prepare_latents``: one (n, 1, C, h, w) draw, then ``_pack_latents``."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor((n, 1, self.channels, *latent_hw), generator=generator, device=device, dtype=dtype)
        return self.pipe._pack_latents(noise, n, self.channels, *latent_hw)

    # ---------------------------------------------------------------- schedule and guidance rule

    def schedule(self, num_inference_steps, device, timesteps=None, sigmas=None, latent_hw=None, extra=None):
        """``QwenImagePipeline.__call__``: sigmas ``linspace(1, 1/n, n)`` (or the caller's) and always the shift
        ``mu`` of the packed sequence length."""
        import numpy as np
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

        config = self.pipe.scheduler.config
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(
            (latent_hw[0] // 2) * (latent_hw[1] // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return retrieve_timesteps(self.pipe.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)

    def default_guidance_scale(self) -> float:
        """The pipeline's ``guidance_scale`` defaults to None: it only feeds a guidance embedding, which the
        published model has not (1.0 is then passed and ignored). A guidance-distilled config needs one given."""
        if self.pipe.transformer.config.guidance_embeds:
            raise OptionError("this Qwen-Image transformer is guidance-distilled: pass guidance_scale (e.g. 3.5)")
        return 1.0

    def uses_cfg(self, guidance_scale: float, negative_prompt=None, extra=None) -> bool:
        """True CFG: ``true_cfg_scale`` (default 4.0) > 1 and a negative prompt (``QwenImagePipeline.__call__``)."""
        scale = self.call_default("true_cfg_scale", extra)
        return float(scale) > 1.0 and negative_prompt is not None

    def cfg_batched(self, do_cfg: bool) -> bool:
        return False  # the negative branch is a second forward, after the positive one

    # ---------------------------------------------------------------- prompts

    @property
    def template(self) -> PromptTemplate:
        """The pipeline instance's own template and drop (``prompt_template_encode``, ``..._start_idx``)."""
        return PromptTemplate(
            pattern=self.pipe.prompt_template_encode, drop=int(self.pipe.prompt_template_encode_start_idx)
        )

    @property
    def tokenizer(self):
        return self.template.wrap(self.pipe.tokenizer)

    def text_layout(self, prompts: list[str], pipe_kwargs: dict[str, Any]) -> TextLayout:
        """One stream as long as the longest templated prompt after the drop (the encoder's output pads the others),
        at most the pipeline's ``tokenizer_max_length`` and ``max_sequence_length``."""
        tok = self.tokenizer
        longest = max(len(tok(p).input_ids) for p in prompts)
        limit = min(int(self.pipe.tokenizer_max_length), self.max_sequence_length(pipe_kwargs))
        label = TOKEN_STREAMS["QwenImagePipeline"][0][1]
        return TextLayout((TextSegment(tok, 0, min(longest, limit), tuple(prompts), label),))

    def _encode(self, prompts, batch: PromptBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_prompt`` once per prompt, each prompt's rows then repeated for its images, the embeddings and
        the mask alike; an all-ones mask where it returns None (the pipeline turns it back into None).

        Not ``encode_prompt(num_images_per_prompt=k)``: diffusers 0.42.1 repeats the embeddings prompt by prompt
        ([p0, p0, p1, p1]) but the mask as a whole ([p0, p1, p0, p1]) (``pipeline_qwenimage.py:encode_prompt``),
        so with prompts of different lengths and k > 1 an image would read its padding through another prompt's
        mask."""
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length(batch.extra),
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        k = batch.num_images_per_prompt
        return embeds.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)

    def encode(self, batch: PromptBatch, device) -> Encoded:
        self.guidance_scale = batch.guidance_scale
        self.text_limit = self.max_sequence_length(batch.extra)
        embeds, mask = self._encode(batch.prompts, batch, device)
        to_pipe = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if batch.do_cfg:
            negative = batch.negative_prompt
            negative = [negative] * len(batch.prompts) if isinstance(negative, str) else negative
            neg_embeds, neg_mask = self._encode(negative, batch, device)
            to_pipe.update(negative_prompt_embeds=neg_embeds, negative_prompt_embeds_mask=neg_mask)
        cond = {"encoder_hidden_states": embeds}
        if not bool(mask.all()):
            cond["encoder_hidden_states_mask"] = mask
        return Encoded(cond, to_pipe)

    def append_text(self, base: Encoded, parts: list[Encoded], do_cfg: bool) -> Encoded:
        """The sub-prompts' tokens and masks after the base's (each sub-prompt templated and cut as a prompt).

        The joined mask is the transformer's ``encoder_hidden_states_mask`` where it hides anything (the padding of
        a shorter base prompt), else absent, as ``QwenImagePipeline.encode_prompt`` turns an all-ones mask into
        None; the text RoPE then runs over the whole joined length (``QwenEmbedRope.forward``'s
        ``max_txt_seq_len`` from ``compute_text_seq_len_from_mask``), so the base keeps its positions and the
        sub-prompts continue after it. The pipeline cuts the embeddings it is given to ``max_sequence_length``
        (``encode_prompt``: ``prompt_embeds[:, :max_sequence_length]``), so a longer joined text is refused."""

        def unmasked(e: Encoded) -> Encoded:
            return Encoded({k: v for k, v in e.cond.items() if k != "encoder_hidden_states_mask"}, e.to_pipe)

        joined = super().append_text(unmasked(base), [unmasked(e) for e in parts], do_cfg)
        length, limit = int(joined.cond["encoder_hidden_states"].shape[1]), self.text_limit
        if limit is not None and length > limit:
            raise OptionError(
                f"regions: the prompt and its sub-prompts take {length} text tokens, more than max_sequence_length="
                f"{limit}, to which QwenImagePipeline cuts its embeddings; pass max_sequence_length={length} "
                "(at most 1024) or shorten the sub-prompts"
            )
        mask = joined.to_pipe["prompt_embeds_mask"]
        if not bool(mask.all()):
            joined.cond["encoder_hidden_states_mask"] = mask
        return joined

    def guidance_forward(self, model_input: torch.Tensor, t, cond: dict[str, torch.Tensor], attention_kwargs=None):
        """The pipeline's cond forward (``QwenImagePipeline.__call__``'s loop) up to the last captured layer."""
        transformer = self.pipe.transformer
        b, seq = model_input.shape[:2]
        timestep = torch.as_tensor(t, device=model_input.device).expand(b).to(model_input.dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([b], float(self.guidance_scale or 1.0), device=model_input.device)
        rows, cols = self.grid_of(seq)
        with contextlib.suppress(EarlyExit):
            transformer(
                hidden_states=model_input,
                timestep=timestep / 1000,
                guidance=guidance,
                encoder_hidden_states_mask=cond.get("encoder_hidden_states_mask"),
                encoder_hidden_states=cond["encoder_hidden_states"],
                img_shapes=[[(1, rows, cols)]] * b,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )

    def checkpoint_modules(self, last_layer: str) -> list[torch.nn.Module]:
        """The double-stream blocks before the one holding ``last_layer``."""
        return self.blocks_before(self.pipe.transformer.transformer_blocks, last_layer)
