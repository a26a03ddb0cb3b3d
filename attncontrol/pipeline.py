"""``generate``: run a stock diffusers pipeline with controls, as a plugin (no forked pipeline).

How: the prompt is encoded once and passed as embeddings; the initial noise is drawn as the pipeline
would draw it and guided for step 0 before the pipeline starts; at the end of each step i,
``callback_on_step_end`` guides the latents for step i + 1. Only the layers the controls need get a
capture processor, restored (with the UNet's ``requires_grad`` flags) when the run ends, however it ends.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import AttentionMaps, AttentionObserver, subjects_of
from .controls.base import Control, ControlContext, PreparedEditor
from .errors import UnsupportedPipelineError
from .guidance import GuidanceEngine, StepRecord
from .models import get_adapter
from .processors.capture import capture_layers, layer_resolution
from .store import AttentionStore


@dataclass
class GenerationResult:
    """``images``: exactly what the pipeline returned for ``output_type``; ``trace``: one record per step;
    ``attention``: the per-subject maps per step, when ``generate(..., attention=...)`` asked for them."""

    images: Any
    trace: list[StepRecord] = field(default_factory=list)
    nsfw_content_detected: list[bool] | None = None
    prompts: list[str] = field(default_factory=list)
    attention: AttentionMaps | None = None

    @property
    def guided_steps(self) -> list[StepRecord]:
        return [r for r in self.trace if r.loss is not None]


@contextmanager
def _frozen(module: torch.nn.Module):
    """Parameters do not require grad during guidance (only the latents do); flags restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _as_prompts(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")


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
    ``checkpointing=True`` recomputes the UNet layers before the captured ones in each guidance backward
    instead of keeping their activations: less memory per guidance pass, ~1.3x slower passes, same images.
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
    from diffusers.utils.torch_utils import randn_tensor

    adapter = get_adapter(pipe)
    controls = list(controls)
    for c in controls:
        if not isinstance(c, Control):
            raise TypeError(f"controls must be attncontrol controls (e.g. AttendExcite(...)), got {c!r}")
    kinds = [type(c).__name__ for c in controls]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise ValueError(f"each method may appear once in controls; got several {', '.join(repeated)}")
    for key in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "return_dict"):
        if key in pipe_kwargs:
            raise TypeError(f"generate() encodes the prompt itself and returns a GenerationResult; drop {key}=")
    prompts = _as_prompts(prompt)
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if guidance_scale is None:  # the pipeline's own default (7.5 for SD, 5.0 for SDXL)
        guidance_scale = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
    default_h, default_w = adapter.default_size()
    height = default_h if height is None else height
    width = default_w if width is None else width
    latent_hw = adapter.latent_hw(height, width)
    device = pipe._execution_device
    do_cfg = guidance_scale > 1.0 and not getattr(pipe.unet.config, "time_cond_proj_dim", None)
    n_images = len(prompts) * num_images_per_prompt

    # Resolve everything that can fail on user input before any model work.
    ctx = ControlContext(
        tokenizer=adapter.tokenizer,
        prompts=[p for p in prompts for _ in range(num_images_per_prompt)],
        prompts_per_input=prompts,
        num_images_per_prompt=num_images_per_prompt,
        latent_hw=latent_hw,
        num_steps=0,  # set once the schedule is known
        cross_resolutions=sorted(set(adapter.resolutions(latent_hw, "cross").values())),
        default_resolution=adapter.default_attn_res(latent_hw),
        exclude_eot_default=adapter.exclude_eot_default,
        seq_len=int(adapter.tokenizer.model_max_length),
        device=device,
        secondary=adapter.secondary_prompts(prompts, pipe_kwargs),
        cfg_batch=do_cfg,
        cross_layers=_layers_by_resolution(adapter, latent_hw, "cross"),
    )
    ts, n_steps = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, timesteps, sigmas)
    ctx.num_steps = len(ts)
    prepared_all = [c.prepare(ctx) for c in controls]
    prepared = [c for c in prepared_all if not isinstance(c, PreparedEditor)]  # latent guidance
    editors = [c for c in prepared_all if isinstance(c, PreparedEditor)]  # attention editing
    observer = _observer(attention, controls, ctx, adapter, do_cfg)

    lora_scale = (cross_attention_kwargs or {}).get("scale")
    cond, embeds = adapter.encode(
        prompts,
        device,
        num_images_per_prompt,
        do_cfg,
        negative_prompt,
        clip_skip,
        lora_scale,
        height,
        width,
        pipe_kwargs,
    )
    for key in adapter.consumed_kwargs:
        pipe_kwargs.pop(key, None)
    if not do_cfg:
        embeds = {k: v for k, v in embeds.items() if not k.startswith("negative_")}
    text = cond["encoder_hidden_states"]
    if text.shape[1] != ctx.seq_len:
        raise UnsupportedPipelineError(
            f"the text encoder returned {text.shape[1]} tokens, the tokenizer allows {ctx.seq_len}; "
            "token positions would not line up with the attention maps"
        )

    if latents is None:
        shape = (n_images, pipe.unet.config.in_channels, *latent_hw)
        if isinstance(generator, list) and len(generator) != n_images:
            raise ValueError(f"got {len(generator)} generators for {n_images} images; pass one per image")
        latents = randn_tensor(shape, generator=generator, device=device, dtype=text.dtype)
    else:
        latents = latents.to(device=device, dtype=text.dtype)

    trace: list[StepRecord] = []
    user_cb = callback_on_step_end
    tensor_inputs = list(callback_on_step_end_tensor_inputs or getattr(user_cb, "tensor_inputs", None) or ["latents"])
    if "latents" not in tensor_inputs:
        tensor_inputs.append("latents")

    with ExitStack() as stack:
        engine = store = None
        if prepared:
            # one capture of the union of what the controls need; one guidance pass serves them all
            needed = {(kind, c.resolution) for c in prepared for kind in c.kinds}
            resolutions = {
                la.name: res
                for la in adapter.layers
                if (la.kind, res := layer_resolution(latent_hw, la.level)) in needed
            }
            layers = [la for la in adapter.layers if la.name in resolutions]
            store = AttentionStore(layers, resolutions)
        by_layer: dict[str, list] = {}
        for e in editors:
            for name in e.layers:
                by_layer.setdefault(name, []).append(e)
        if store is not None or by_layer or observer is not None:
            stack.enter_context(capture_layers(pipe.unet, store, by_layer, observer))
        if store is not None:
            stack.enter_context(_frozen(pipe.unet))
            engine = GuidanceEngine(
                adapter, store, prepared, cond, ts, cross_attention_kwargs, checkpointing=checkpointing
            )

        clock = {"start": time.perf_counter()}
        pending: dict[str, StepRecord] = {}

        def guide(z: torch.Tensor, i: int) -> torch.Tensor:
            for e in editors:
                e.begin_step(i)
            if engine is None:
                record = StepRecord(index=i, timestep=float(ts[i]))
            else:
                z, record = engine.guide(z, i)
            pending["record"] = record
            if observer is not None:
                observer.begin_step()  # records the ordinary forward of step i (not the guidance passes)
            return z

        def on_step_end(p, i, t, kwargs):
            if observer is not None:
                observer.end_step(i)
            out = kwargs
            if user_cb is not None:
                out = user_cb(p, i, t, kwargs)
                out = dict(kwargs) if out is None else out
            record = pending.pop("record", None) or StepRecord(index=i, timestep=float(t))
            for e in editors:
                record.edits[e.name] = e.step_stats()
            now = time.perf_counter()
            record.seconds = now - clock["start"]
            trace.append(record)
            clock["start"] = now
            if i + 1 < len(ts) and not getattr(p, "_interrupt", False):
                out["latents"] = guide(out.get("latents", kwargs["latents"]), i + 1)
            return out

        sigma0 = pipe.scheduler.init_noise_sigma
        if engine is not None and engine.needed_at(0):
            latents = guide(latents * sigma0, 0) / sigma0
        else:
            guide(latents, 0)  # nothing to guide at step 0: starts the step's record and the editors
        call_kwargs = dict(
            prompt=None,
            **embeds,
            height=height,
            width=width,
            num_inference_steps=n_steps if timesteps is None and sigmas is None else None,
            guidance_scale=guidance_scale,
            num_images_per_prompt=1,
            generator=generator,
            latents=latents,
            output_type=output_type,
            cross_attention_kwargs=cross_attention_kwargs,
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=tensor_inputs,
            timesteps=timesteps,
            sigmas=sigmas,
            return_dict=True,
            **pipe_kwargs,
        )
        if call_kwargs["num_inference_steps"] is None:
            del call_kwargs["num_inference_steps"]
        out = pipe(**call_kwargs)
    maps = None
    if observer is not None:
        maps = observer.result(observer_labels(attention, controls, ctx), [float(t) for t in ts])
        if isinstance(out.images, list):
            maps.images = list(out.images)
    return GenerationResult(
        images=out.images,
        trace=trace,
        nsfw_content_detected=getattr(out, "nsfw_content_detected", None),
        prompts=prompts,
        attention=maps,
    )


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


def observer_labels(attention, controls, ctx: ControlContext) -> list[list[str]]:
    """Per image, the subjects' names as given (per prompt, when given per prompt)."""
    subjects = _wanted_subjects(attention, controls)
    nested = all(isinstance(s, (list, tuple)) for s in subjects)
    per_prompt = subjects if nested else [subjects] * len(ctx.prompts_per_input)
    return [[str(s) for s in subs] for subs in per_prompt for _ in range(ctx.num_images_per_prompt)]


def _observer(attention, controls, ctx: ControlContext, adapter, do_cfg: bool) -> AttentionObserver | None:
    subjects = _wanted_subjects(attention, controls)
    if subjects is None:
        return None
    positions = ctx.subjects_per_image(subjects)  # raises SubjectError naming a bad subject, before model work
    resolution = ctx.default_resolution
    keep = ctx.keep_mask(adapter.exclude_eot_default).to(ctx.device)
    return AttentionObserver(ctx.cross_layers[resolution], resolution, positions, keep, do_cfg)


def _layers_by_resolution(adapter, latent_hw, kind: str) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for name, res in adapter.resolutions(latent_hw, kind).items():
        out.setdefault(res, []).append(name)
    return out
