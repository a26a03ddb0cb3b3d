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

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .attention import AttentionObserver, subjects_of
from .controls.base import Control, ControlContext, PreparedControl, PreparedEditor
from .controls.regions import PreparedRegions
from .controls.vocabulary import MapKey
from .errors import OptionError, OptionTypeError, UnsupportedPipelineError
from .limits import check_image_size
from .models import ModelAdapter, PromptBatch, get_adapter
from .request import check_pipeline
from .run import GenerationResult, Run
from .text import TextLayout
from .tokens import check_text

__all__ = ["GenerationResult", "Run", "generate", "prepare_run"]


def _as_prompts(prompt) -> list[str]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise OptionTypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
    for text in prompts:
        check_text(text, "prompt")
    return prompts


def _check_controls(controls) -> list[Control]:
    if isinstance(controls, Control):
        controls = [controls]  # a single control is a list of one
    if controls is None:
        controls = []
    if not isinstance(controls, (list, tuple)):
        raise OptionTypeError(f"controls must be a control or a list of controls, got {type(controls).__name__}")
    controls = list(controls)
    for c in controls:
        if not isinstance(c, Control):
            raise OptionTypeError(f"controls must be attncontrol controls (e.g. AttendExcite(...)), got {c!r}")
    kinds = [c.method for c in controls]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise OptionError(f"each method may appear once in controls; got several {', '.join(repeated)}")
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
    pipe, prompt, controls = args.pop("pipe"), args.pop("prompt"), args.pop("controls")
    return prepare_run(pipe, prompt, controls, **args.pop("pipe_kwargs"), **args).execute()


@dataclass
class GenerateArgs:
    """:func:`generate`'s keyword arguments (the pipeline's, with its defaults, plus ours); ``pipe_kwargs`` holds
    the pipeline arguments this library passes through unread (``prompt_2``, ``eta``, ...)."""

    negative_prompt: str | list[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    num_images_per_prompt: int = 1
    generator: Any = None
    latents: torch.Tensor | None = None
    output_type: str = "pil"
    clip_skip: int | None = None
    cross_attention_kwargs: dict[str, Any] | None = None
    callback_on_step_end: Any = None
    callback_on_step_end_tensor_inputs: list[str] | None = None
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    attention: bool | Sequence = False
    checkpointing: bool = False
    pipe_kwargs: dict[str, Any] = field(default_factory=dict)


def prepare_run(pipe, prompt, controls=(), *, sequential_cfg: bool = False, **kwargs) -> Run:
    """Check every input and prepare a :class:`~attncontrol.run.Run` (the keyword arguments are :func:`generate`'s).
    Nothing is installed and no noise is drawn yet; what fails on user input fails here, before model work.
    ``sequential_cfg``: the caller runs CFG as one forward per branch, positive first (a Modular Diffusers guider)."""
    args = _generate_args(kwargs)
    adapter = get_adapter(pipe)
    adapter.sequential_cfg = sequential_cfg
    controls = _check_controls(controls)
    prompts = _as_prompts(prompt)
    height, width, guidance_scale = _check_args(adapter, args)
    latent_hw = adapter.latent_hw(height, width)
    adapter.bind_size(latent_hw)
    device = pipe._execution_device
    do_cfg = adapter.uses_cfg(guidance_scale, args.negative_prompt, args.pipe_kwargs)

    # Resolve everything that can fail on user input before any model work.
    ts, n_steps = adapter.schedule(
        args.num_inference_steps, device, args.timesteps, args.sigmas, latent_hw, args.pipe_kwargs
    )
    ctx = ControlContext(
        text=_text_layout(adapter, prompts, controls, args.pipe_kwargs),
        num_images_per_prompt=args.num_images_per_prompt,
        latent_hw=latent_hw,
        num_steps=len(ts),
        grids=adapter.layers_by_grid(latent_hw),
        default_resolution=adapter.default_attn_res(latent_hw),
        exclude_eot_default=adapter.exclude_eot_default,
        device=device,
        cfg_batch=adapter.batches_cfg(do_cfg),
        block_index={la.name: la.block_index for la in adapter.layers if la.block_index is not None},
        default_blocks=adapter.default_blocks(),
        flow_sigmas=[float(s) for s in pipe.scheduler.sigmas] if adapter.flow_matching else None,
        timesteps=[float(t) for t in ts],
        missing_kinds=adapter.missing_kinds(),
    )
    prepared_all = [c.prepare(ctx) for c in controls]
    regions = _regions(adapter, prepared_all)
    observer, labels = _observer(args.attention, controls, ctx, adapter)
    _check_noise_inputs(adapter, args, len(prompts) * args.num_images_per_prompt, latent_hw)
    encoded = _encode(adapter, prompts, args, do_cfg, device, ctx.text, regions)
    latent_dtype = adapter.latent_dtype(encoded.cond["encoder_hidden_states"].dtype)
    if args.latents is not None:
        args.latents = args.latents.to(device=device, dtype=latent_dtype)
    call_kwargs = _call_kwargs(args, encoded, do_cfg, n_steps, adapter.attention_kwargs_name)
    return Run(
        pipe,
        adapter,
        ctx,
        controls=[c for c in prepared_all if isinstance(c, PreparedControl)],
        editors=[c for c in prepared_all if isinstance(c, PreparedEditor)],
        regions=regions,
        observer=observer,
        timesteps=ts,
        cond=encoded.cond,
        call_kwargs=call_kwargs,
        observer_labels=labels,
        attention_kwargs=args.cross_attention_kwargs,
        checkpointing=args.checkpointing,
        latent_dtype=latent_dtype,
    )


def _generate_args(kwargs: dict) -> GenerateArgs:
    names = {f.name for f in fields(GenerateArgs)} - {"pipe_kwargs"}
    args = GenerateArgs(**{k: v for k, v in kwargs.items() if k in names})
    args.pipe_kwargs = {k: v for k, v in kwargs.items() if k not in names}
    return args


def _text_layout(adapter: ModelAdapter, prompts: list[str], controls: list[Control], pipe_kwargs: dict):
    """The run's token axis: the prompt's streams, then each regional sub-prompt's, as the adapter lays out a
    prompt of its own (the prompt's own family arguments, ``prompt_2`` and the like, are not the sub-prompt's)."""
    text = adapter.text_layout(prompts, pipe_kwargs)
    extra = [t for c in controls for t in c.extra_text()]
    if not extra:
        return text
    own = {k: v for k, v in pipe_kwargs.items() if k not in adapter.consumed_kwargs}
    return text.with_regions([adapter.text_layout([t] * len(prompts), own) for t in extra])


def _regions(adapter: ModelAdapter, prepared: list) -> PreparedRegions | None:
    """The run's regional prompting, if asked for: refused on a family that cannot mask its attention, and beside an
    attention editor (Attention Regulation rewrites one softmax; regional attention blends two)."""
    regions = next((p for p in prepared if isinstance(p, PreparedRegions)), None)
    if regions is None:
        return None
    why = adapter.regions_unsupported()
    if why is not None:
        raise UnsupportedPipelineError(f"regions: {why}")
    editors = [p.name for p in prepared if isinstance(p, PreparedEditor)]
    if editors:
        raise OptionError(
            f"regions cannot run with {', '.join(editors)}: both rewrite the same attention (an editor changes one "
            "softmax, regions blend two); run them apart"
        )
    return regions


def _encode_regions(adapter: ModelAdapter, encoded, regions: PreparedRegions, prompts, args, do_cfg, device):
    """Each region's sub-prompt encoded as the pipeline encodes a prompt (its own template and padding; for every
    input prompt), appended after the base prompt's tokens; the regions learn the segments' lengths."""
    parts = []
    state = dict(vars(adapter))  # what the base prompt's encode left on the adapter (text ids, a CFG order, ...)
    for text in regions.texts:
        batch = PromptBatch(
            [text] * len(prompts),
            args.num_images_per_prompt,
            False,
            None,
            args.clip_skip,
            (args.cross_attention_kwargs or {}).get("scale"),
            args.height or 0,
            args.width or 0,
            dict(args.pipe_kwargs),
            args.guidance_scale,
        )
        with torch.no_grad():
            parts.append(adapter.encode(batch, device))
    vars(adapter).clear()
    vars(adapter).update(state)  # a sub-prompt's encode must not leave its state for the run; append_text joins
    base_len = int(encoded.cond["encoder_hidden_states"].shape[1])
    joined = adapter.append_text(encoded, parts, do_cfg)
    regions.bind_text(base_len, [int(p.cond["encoder_hidden_states"].shape[1]) for p in parts])
    return joined


def _check_noise_inputs(adapter: ModelAdapter, args: GenerateArgs, n_images: int, latent_hw) -> None:
    """One generator per image when a list is given; ``latents`` finite and of the shape the run draws."""
    if isinstance(args.generator, list) and len(args.generator) != n_images:
        raise OptionError(f"got {len(args.generator)} generators for {n_images} images; pass one per image")
    if args.latents is not None:
        expected = tuple(adapter.latent_shape(n_images, latent_hw))
        if torch.is_tensor(args.latents) and not bool(torch.isfinite(args.latents).all()):
            raise OptionError("latents hold NaN or infinite values; pass finite initial noise")
        if tuple(args.latents.shape) != expected:
            raise OptionError(
                f"latents have shape {tuple(args.latents.shape)}; {args.height}x{args.width} px with {n_images} "
                f"image(s) needs {expected}"
            )


def _check_kwargs(adapter: ModelAdapter, args: GenerateArgs) -> None:
    """Pipeline arguments the pipeline takes (it swallows unknown ones: a typo would be ignored) and finite numbers."""
    for key in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "return_dict"):
        if key in args.pipe_kwargs:
            raise OptionTypeError(f"generate() encodes the prompt itself and returns a GenerationResult; drop {key}=")
    accepted = set(inspect.signature(adapter.pipe.__call__).parameters) - {"kwargs", "self"}
    unknown = sorted(set(args.pipe_kwargs) - accepted - {"joint_attention_kwargs"})
    if unknown:
        ours = sorted(f.name for f in fields(GenerateArgs) if f.name != "pipe_kwargs")
        raise OptionTypeError(
            f"generate() got unexpected keyword argument(s) {', '.join(unknown)}; {type(adapter.pipe).__name__} "
            f"accepts {', '.join(sorted(accepted))}; generate also takes {', '.join(ours)}"
        )
    named = {f.name: getattr(args, f.name) for f in fields(GenerateArgs) if f.name != "pipe_kwargs"}
    for key, value in {**named, **args.pipe_kwargs}.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f"{key} must be a finite number, got {value}")


def _check_args(adapter: ModelAdapter, args: GenerateArgs) -> tuple[int, int, float]:
    """Checks that need no model work; fills in the pipeline's defaults (size, guidance scale). Returns the height,
    width and guidance scale, filled in."""
    _check_kwargs(adapter, args)
    if (
        isinstance(args.num_images_per_prompt, bool)
        or not isinstance(args.num_images_per_prompt, int)
        or (args.num_images_per_prompt < 1)
    ):
        raise OptionError(f"num_images_per_prompt must be an int >= 1, got {args.num_images_per_prompt!r}")
    # the request's checks, as every front end meets them (the size: by the model's own rule, in latent_hw)
    check_pipeline({"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale})
    if args.guidance_scale is None:  # the pipeline's own default (7.5 for SD, 5.0 for SDXL, 7.0 SD3, 3.5 FLUX)
        args.guidance_scale = adapter.default_guidance_scale()
    joint = args.pipe_kwargs.pop("joint_attention_kwargs", None)  # SD3's and FLUX's name for the same thing
    if joint is not None:
        if args.cross_attention_kwargs is not None:
            raise OptionTypeError("pass cross_attention_kwargs= or joint_attention_kwargs=, not both")
        args.cross_attention_kwargs = joint
    if args.timesteps is not None and "timesteps" not in inspect.signature(adapter.pipe.__call__).parameters:
        raise OptionTypeError(f"{type(adapter.pipe).__name__} takes no timesteps=; pass sigmas= instead")
    default_h, default_w = adapter.default_size()
    args.height = default_h if args.height is None else args.height
    args.width = default_w if args.width is None else args.width
    check_image_size(args.height, args.width)
    _check_objects(adapter, args)
    return args.height, args.width, args.guidance_scale


def _check_objects(adapter: ModelAdapter, args: GenerateArgs) -> None:
    """The arguments the pipeline would only trip over mid-run (a generator that is an int, numpy latents, a
    callback that is not callable, more steps than the scheduler has, SDXL's size conditioning that is not a pair
    of ints), refused before any model work with the value named."""
    generators = args.generator if isinstance(args.generator, list) else [args.generator]
    if args.generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        bad = next(g for g in generators if not isinstance(g, torch.Generator))
        raise OptionTypeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or a list "
            f"of them, got {bad!r} ({type(bad).__name__})"
        )
    if args.latents is not None and not torch.is_tensor(args.latents):
        raise OptionTypeError(
            f"latents must be a torch.Tensor, got {type(args.latents).__name__} (e.g. torch.from_numpy(array))"
        )
    if args.callback_on_step_end is not None and not callable(args.callback_on_step_end):
        raise OptionTypeError(
            f"callback_on_step_end must be callable (pipe, step, timestep, kwargs) -> dict, got "
            f"{args.callback_on_step_end!r}"
        )
    for text in [args.negative_prompt] if isinstance(args.negative_prompt, str) else args.negative_prompt or []:
        if isinstance(text, str):
            check_text(text, "negative_prompt")
    limit = getattr(adapter.pipe.scheduler.config, "num_train_timesteps", None)
    if (
        not adapter.flow_matching
        and args.timesteps is None
        and args.sigmas is None
        and isinstance(limit, int)
        and args.num_inference_steps > limit
    ):
        raise OptionError(
            f"num_inference_steps {args.num_inference_steps} is more than the "
            f"{type(adapter.pipe.scheduler).__name__}'s {limit} training timesteps; use at most "
            f"{limit}"
        )
    adapter.check_pipe_kwargs(args.pipe_kwargs)


def _encode(
    adapter: ModelAdapter,
    prompts: list[str],
    args: GenerateArgs,
    do_cfg: bool,
    device,
    layout: TextLayout,
    regions: PreparedRegions | None = None,
):
    """Encode the prompt once (the adapter consumes its own prompt arguments from ``pipe_kwargs``), then the
    regions' sub-prompts, appended after it."""
    lora_scale = (args.cross_attention_kwargs or {}).get("scale")
    assert args.height is not None and args.width is not None  # _check_args filled in the pipeline's default size
    batch = PromptBatch(
        prompts,
        args.num_images_per_prompt,
        do_cfg,
        args.negative_prompt,
        args.clip_skip,
        lora_scale,
        args.height,
        args.width,
        args.pipe_kwargs,
        args.guidance_scale,
    )
    with torch.no_grad():  # as the pipeline encodes (with grad on, some kernels round differently)
        encoded = adapter.encode(batch, device)
    for key in adapter.consumed_kwargs:
        args.pipe_kwargs.pop(key, None)
    _check_length(encoded, layout.base_length)
    if regions is not None:
        encoded = _encode_regions(adapter, encoded, regions, prompts, args, do_cfg, device)
        _check_length(encoded, layout.length)
    return encoded


def _check_length(encoded, expected: int) -> None:
    """The encoder's tokens are the positions the maps and subjects are read at."""
    text = encoded.cond["encoder_hidden_states"]
    if text.shape[1] != expected:
        raise UnsupportedPipelineError(
            f"the text encoder returned {text.shape[1]} tokens, the tokenizer allows {expected}; "
            "token positions would not line up with the attention maps"
        )


def _call_kwargs(args: GenerateArgs, encoded, do_cfg: bool, n_steps: int, attention_kwargs_name: str) -> dict[str, Any]:
    """What the stock pipeline is called with: the embeddings instead of the prompt, and the caller's arguments."""
    embeds = encoded.to_pipe if do_cfg else {k: v for k, v in encoded.to_pipe.items() if not k.startswith("negative_")}
    user_cb = args.callback_on_step_end
    tensor_inputs = list(
        args.callback_on_step_end_tensor_inputs or getattr(user_cb, "tensor_inputs", None) or ["latents"]
    )
    if "latents" not in tensor_inputs:
        tensor_inputs.append("latents")
    call_kwargs = dict(
        prompt=None,
        **embeds,
        height=args.height,
        width=args.width,
        num_inference_steps=n_steps,
        guidance_scale=args.guidance_scale,
        num_images_per_prompt=1,
        generator=args.generator,
        latents=args.latents,
        output_type=args.output_type,
        callback_on_step_end=user_cb,
        callback_on_step_end_tensor_inputs=tensor_inputs,
        sigmas=args.sigmas,
        return_dict=True,
        **args.pipe_kwargs,
    )
    call_kwargs[attention_kwargs_name] = args.cross_attention_kwargs
    if args.timesteps is not None:
        call_kwargs["timesteps"] = args.timesteps
    if args.timesteps is not None or args.sigmas is not None:
        del call_kwargs["num_inference_steps"]
    return call_kwargs


def _wanted_subjects(attention, controls) -> list | None:
    if attention is False or attention is None:
        return None
    if attention is True:
        subjects = subjects_of(controls)
        if not subjects:
            raise OptionError(
                "attention=True records the controls' subjects, but no control names any; "
                "name them: attention=['cat', 'dog']"
            )
        return subjects
    if isinstance(attention, str) or not isinstance(attention, Sequence) or not attention:
        raise OptionTypeError(f"attention must be True/False or a non-empty list of subjects, got {attention!r}")
    return list(attention)


def _observer(attention, controls, ctx: ControlContext, adapter: ModelAdapter):
    """The attention observer the run asks for (or None), and per image the subjects' names as given."""
    subjects = _wanted_subjects(attention, controls)
    if subjects is None:
        return None, None
    positions = ctx.subjects_per_image(subjects)  # raises SubjectError naming a bad subject, before model work
    resolution = ctx.default_resolution
    keep = ctx.keep_mask(adapter.exclude_eot_default).to(ctx.device)
    layers = ctx.select(MapKey("cross", resolution))
    columns = keep.any(0).nonzero().flatten()
    observer = AttentionObserver(layers, resolution, positions, keep, ctx.cfg_batch, columns=columns)
    nested = all(isinstance(s, (list, tuple)) for s in subjects)
    per_prompt = subjects if nested else [subjects] * len(ctx.prompts_per_input)
    labels = [[str(s) for s in subs] for subs in per_prompt for _ in range(ctx.num_images_per_prompt)]
    return observer, labels
