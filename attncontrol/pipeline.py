"""``generate``: run a stock diffusers pipeline with controls, as a plugin (no forked pipeline).

How: the prompt is encoded once and passed as embeddings; the initial noise is drawn as the pipeline would draw
it and guided for step 0 before the pipeline starts; at the end of each step i, ``callback_on_step_end`` guides
the latents for step i + 1. Only the layers the controls need get a capture processor, restored (with the
denoiser's ``requires_grad`` flags) when the run ends, however it ends. Everything family-specific is asked of
the pipeline's adapter (:mod:`attncontrol.models`).

``generate`` = :func:`prepare_run` (check every input, bind the controls, encode the prompt) +
:meth:`Run.execute <attncontrol.run.Run.execute>` (install, draw and pre-guide the noise, sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .attention import AttentionObserver, subjects_of
from .controls.base import Control, ControlContext, PreparedEditor
from .errors import UnsupportedPipelineError
from .models import ModelAdapter, PromptBatch, get_adapter
from .run import GenerationResult, Run

__all__ = ["GenerationResult", "Run", "generate", "prepare_run"]


def _as_prompts(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")


def _check_controls(controls) -> list[Control]:
    controls = list(controls)
    for c in controls:
        if not isinstance(c, Control):
            raise TypeError(f"controls must be attncontrol controls (e.g. AttendExcite(...)), got {c!r}")
    kinds = [type(c).__name__ for c in controls]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise ValueError(f"each method may appear once in controls; got several {', '.join(repeated)}")
    return controls


def generate(
    pipe,
    prompt: str | list[str],
    controls: Sequence[Control] = (),
    *,
    negative_prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    num_images_per_prompt: int = 1,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    output_type: str = "pil",
    clip_skip: int | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs: list[str] | None = None,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    attention: bool | Sequence = False,
    checkpointing: bool = False,
    **pipe_kwargs,
) -> GenerationResult:
    """Generate with ``controls`` applied; every other argument means what it means for ``pipe(...)``, with the
    pipeline's defaults.

    Example::

        pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
        out = attncontrol.generate(pipe, "a cat and a dog", [attncontrol.AttendExcite(subjects=["cat", "dog"])],
                                   generator=torch.Generator().manual_seed(0))
        out.images[0].save("cat_dog.png")

    ``attention=True`` also records each subject's cross-attention map per step (the controls' subjects; or
    name them: ``attention=["cat", "dog"]``, also without controls) into ``result.attention``.
    ``checkpointing=True`` recomputes the denoiser layers before the captured ones in each guidance backward
    instead of keeping their activations: less memory per guidance pass, ~1.3x slower passes, same images.
    """
    args = dict(locals())
    args.pop("pipe_kwargs")
    return prepare_run(**args, **pipe_kwargs).execute()


def prepare_run(
    pipe,
    prompt,
    controls=(),
    *,
    negative_prompt=None,
    height=None,
    width=None,
    num_inference_steps=50,
    guidance_scale=None,
    num_images_per_prompt=1,
    generator=None,
    latents=None,
    output_type="pil",
    clip_skip=None,
    cross_attention_kwargs=None,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=None,
    timesteps=None,
    sigmas=None,
    attention=False,
    checkpointing=False,
    **pipe_kwargs,
) -> Run:
    """Check every input and prepare a :class:`~attncontrol.run.Run` (the arguments are :func:`generate`'s).
    Nothing is installed and no noise is drawn yet; what fails on user input fails here, before model work."""
    adapter = get_adapter(pipe)
    controls = _check_controls(controls)
    for key in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "return_dict"):
        if key in pipe_kwargs:
            raise TypeError(f"generate() encodes the prompt itself and returns a GenerationResult; drop {key}=")
    prompts = _as_prompts(prompt)
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if guidance_scale is None:  # the pipeline's own default (7.5 for SD, 5.0 for SDXL)
        guidance_scale = adapter.default_guidance_scale()
    default_h, default_w = adapter.default_size()
    height = default_h if height is None else height
    width = default_w if width is None else width
    latent_hw = adapter.latent_hw(height, width)
    device = pipe._execution_device
    do_cfg = adapter.uses_cfg(guidance_scale)

    # Resolve everything that can fail on user input before any model work.
    ts, n_steps = adapter.schedule(num_inference_steps, device, timesteps, sigmas, latent_hw)
    ctx = ControlContext(
        text=adapter.text_layout(prompts, pipe_kwargs),
        num_images_per_prompt=num_images_per_prompt,
        latent_hw=latent_hw,
        num_steps=len(ts),
        grids=adapter.layers_by_grid(latent_hw),
        default_resolution=adapter.default_attn_res(latent_hw),
        exclude_eot_default=adapter.exclude_eot_default,
        device=device,
        cfg_batch=do_cfg,
    )
    prepared_all = [c.prepare(ctx) for c in controls]
    observer, labels = _observer(attention, controls, ctx, adapter)

    lora_scale = (cross_attention_kwargs or {}).get("scale")
    batch = PromptBatch(prompts, num_images_per_prompt, do_cfg, negative_prompt, clip_skip, lora_scale, height, width,
                        pipe_kwargs)  # fmt: skip
    encoded = adapter.encode(batch, device)
    for key in adapter.consumed_kwargs:
        pipe_kwargs.pop(key, None)
    embeds = encoded.to_pipe if do_cfg else {k: v for k, v in encoded.to_pipe.items() if not k.startswith("negative_")}
    text = encoded.cond["encoder_hidden_states"]
    if text.shape[1] != ctx.seq_len:
        raise UnsupportedPipelineError(
            f"the text encoder returned {text.shape[1]} tokens, the tokenizer allows {ctx.seq_len}; "
            "token positions would not line up with the attention maps"
        )
    n_images = len(prompts) * num_images_per_prompt
    if isinstance(generator, list) and len(generator) != n_images:
        raise ValueError(f"got {len(generator)} generators for {n_images} images; pass one per image")
    if latents is not None:
        latents = latents.to(device=device, dtype=text.dtype)
    tensor_inputs = list(callback_on_step_end_tensor_inputs or getattr(callback_on_step_end, "tensor_inputs", None)
                         or ["latents"])  # fmt: skip
    if "latents" not in tensor_inputs:
        tensor_inputs.append("latents")
    call_kwargs = dict(
        prompt=None, **embeds, height=height, width=width, num_inference_steps=n_steps, guidance_scale=guidance_scale,
        num_images_per_prompt=1, generator=generator, latents=latents, output_type=output_type,
        cross_attention_kwargs=cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
        callback_on_step_end_tensor_inputs=tensor_inputs, timesteps=timesteps, sigmas=sigmas, return_dict=True,
        **pipe_kwargs,
    )  # fmt: skip
    if timesteps is not None or sigmas is not None:
        del call_kwargs["num_inference_steps"]
    return Run(
        pipe, adapter, ctx,
        controls=[c for c in prepared_all if not isinstance(c, PreparedEditor)],
        editors=[c for c in prepared_all if isinstance(c, PreparedEditor)],
        observer=observer, timesteps=ts, cond=encoded.cond, call_kwargs=call_kwargs, observer_labels=labels,
        attention_kwargs=cross_attention_kwargs, checkpointing=checkpointing, latent_dtype=text.dtype,
    )  # fmt: skip


def _wanted_subjects(attention, controls) -> list | None:
    if attention is False or attention is None:
        return None
    if attention is True:
        subjects = subjects_of(controls)
        if not subjects:
            raise ValueError(
                "attention=True records the controls' subjects, but no control names any; "
                "name them: attention=['cat', 'dog']"
            )
        return subjects
    if isinstance(attention, str) or not isinstance(attention, Sequence) or not attention:
        raise TypeError(f"attention must be True/False or a non-empty list of subjects, got {attention!r}")
    return list(attention)


def _observer(attention, controls, ctx: ControlContext, adapter: ModelAdapter):
    """The attention observer the run asks for (or None), and per image the subjects' names as given."""
    subjects = _wanted_subjects(attention, controls)
    if subjects is None:
        return None, None
    positions = ctx.subjects_per_image(subjects)  # raises SubjectError naming a bad subject, before model work
    resolution = ctx.default_resolution
    keep = ctx.keep_mask(adapter.exclude_eot_default).to(ctx.device)
    observer = AttentionObserver(ctx.cross_layers[resolution], resolution, positions, keep, ctx.cfg_batch)
    nested = all(isinstance(s, (list, tuple)) for s in subjects)
    per_prompt = subjects if nested else [subjects] * len(ctx.prompts_per_input)
    labels = [[str(s) for s in subs] for subs in per_prompt for _ in range(ctx.num_images_per_prompt)]
    return observer, labels
