"""The Modular Diffusers blocks: one :class:`~attncontrol.run.Run` per call, the same one ``generate`` drives.

- :class:`AttnControl` stands in for the family's text-encoder step and holds the controls (its config). It builds
  the stock pipeline class on the modular pipeline's own modules (a view: same weights, nothing copied), prepares
  the run with :func:`attncontrol.pipeline.prepare_run` (every input checked, the prompt encoded once, as
  ``generate`` encodes it) and writes the embeddings under the names the family's encoder step gives them. With no
  controls and no ``attention`` it runs that encoder step itself: the pipeline is then the stock one.
- :class:`AttnControlNoise`, before the family's prepare-latents step: the initial noise as ``generate`` draws it,
  chosen by the controls that choose it (InitNO) and guided for step 0 (:meth:`Run.initial_latents`).
- :class:`AttnControlGuide`, first in the denoise loop: guides the latents of step ``i >= 1``
  (:meth:`StepDriver.begin`) before the denoiser is called.
- :class:`AttnControlEndStep`, last in the loop: closes the step (:meth:`StepDriver.end_step`).
- :class:`AttnControlScope`: a sequential block around the noise block through the loop that installs the capture
  processors (and freezes the denoiser's parameters) for all of it and restores them however it ends; it writes
  the trace. Modular loops have no enter/exit hook, so this is where that lives.

Nothing per call is stored on a block (blocks are shared and saved): the run travels in the pipeline state as
``attncontrol_run``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from diffusers.modular_pipelines.modular_pipeline import ModularPipelineBlocks, PipelineState, SequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam, OutputParam

from ..controls.base import Control
from ..controls.data import _plain, controls_data, controls_from_data
from ..errors import OptionError, UnsupportedPipelineError
from ..models import ADAPTERS, ModelAdapter
from ..pipeline import prepare_run
from ..run import Run, StepDriver
from .folder import OWN_KEYS, UntrustedBlockError, read_folder, write_folder

RUN = "attncontrol_run"
TRACE, ATTENTION, NOISE_SEARCH = "attncontrol_trace", "attncontrol_attention", "attncontrol_noise_search"
# what prepare_run takes from the pipeline state besides the encoder step's own inputs
RUN_INPUTS = (
    "height",
    "width",
    "num_inference_steps",
    "timesteps",
    "sigmas",
    "generator",
    "latents",
    "num_images_per_prompt",
)
ATTENTION_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


def _handle(values) -> RunHandle | None:
    """The run handle in a pipeline state or a loop's block state (None: no controls, or no AttnControl block)."""
    handle = values.get(RUN) if isinstance(values, PipelineState) else getattr(values, RUN, None)
    return handle if isinstance(handle, RunHandle) else None


class RunHandle:
    """One call's run and its step driver, carried in the pipeline state. ``ModularPipeline.__call__`` deep-copies
    a state passed back in (``pipe(state=...)``): the handle is shared, never copied (it holds the models)."""

    def __init__(self, run: Run):
        self.run = run
        self.driver = StepDriver(run)

    def __deepcopy__(self, memo) -> RunHandle:
        return self

    def __repr__(self) -> str:
        return f"RunHandle({type(self.run.adapter).__name__}, {self.run.num_steps} steps)"


def adapter_class_of(modular_name: str) -> type[ModelAdapter]:
    for cls in ADAPTERS:
        if modular_name in cls.modular_names:
            return cls
    supported = ", ".join(n for cls in ADAPTERS for n in cls.modular_names)
    raise UnsupportedPipelineError(
        f"{modular_name} is not supported by attncontrol.modular; supported modular pipelines: {supported}"
    )


def stock_view(components) -> Any:
    """The stock pipeline of the modular pipeline ``components``'s family, built on its modules (the same objects:
    no weight is copied), so every adapter method works unchanged."""
    import diffusers

    adapter = adapter_class_of(type(components).__name__)
    stock = getattr(diffusers, adapter.pipeline_names[0])
    config = getattr(components, "config", {}) or {}
    kwargs = {}
    for p in list(inspect.signature(stock.__init__).parameters.values())[1:]:
        value = getattr(components, p.name, None)
        if value is None:
            value = config.get(p.name)
        if value is not None:
            kwargs[p.name] = value
        elif p.default is inspect.Parameter.empty:
            raise UnsupportedPipelineError(
                f"{type(components).__name__} has no {p.name!r} loaded; attncontrol needs it "
                f"(pipe.load_components() or pipe.update_components({p.name}=...))"
            )
    return stock(**kwargs)


class AttnControl(ModularPipelineBlocks):
    """The controls, as a Modular Diffusers block that stands in for the family's text-encoder step.

    ``attach(StableDiffusionXLAutoBlocks(), AttnControl([AttendExcite(subjects=["cat", "dog"])]))`` gives the
    text-to-image blocks with every attncontrol block in place (see :func:`attncontrol.modular.attach`).
    ``attention=True`` (or a list of subjects) also records the per-subject maps (``attncontrol_attention``);
    ``checkpointing=True`` as in :func:`attncontrol.generate`. Saved with :meth:`save_pretrained`; loaded offline
    with :meth:`from_pretrained` (see :mod:`attncontrol.modular.folder`)."""

    def __init__(self, controls=(), attention: bool | list = False, checkpointing: bool = False):
        super().__init__()
        controls = list(controls or ())
        if all(isinstance(c, dict) for c in controls):
            controls = controls_from_data(controls)
        bad = [c for c in controls if not isinstance(c, Control)]
        if bad:
            raise OptionError(f"controls must be attncontrol controls (e.g. AttendExcite(...)), got {bad[0]!r}")
        if not isinstance(attention, (bool, list, tuple)):
            raise OptionError(f"attention must be true, false or a list of subjects, got {attention!r}")
        if not isinstance(checkpointing, bool):
            raise OptionError(f"checkpointing must be true or false, got {checkpointing!r}")
        self.controls: list[Control] = controls
        self.attention = attention
        self.checkpointing = checkpointing
        self.register_to_config(
            controls=controls_data(controls), attention=_plain(attention, "attention"), checkpointing=checkpointing
        )
        self.encoder: ModularPipelineBlocks | None = None  # the family's text-encoder step (attach sets it)

    # -- what the modular pipeline sees: the encoder step's components, inputs and outputs, plus the run
    @property
    def description(self) -> str:
        names = ", ".join(type(c).__name__ for c in self.controls) or "no controls"
        return f"attncontrol ({names}): encodes the prompt and prepares the guided run; stands in for the text encoder"

    def _encoder(self) -> ModularPipelineBlocks:
        if self.encoder is None:
            raise UnsupportedPipelineError(
                "this AttnControl block is not attached to a pipeline's blocks: use "
                "attncontrol.modular.attach(blocks, block) (it stands in for the family's text-encoder step)"
            )
        return self.encoder

    @property
    def expected_components(self):
        return self.encoder.expected_components if self.encoder is not None else []

    @property
    def expected_configs(self):
        return self.encoder.expected_configs if self.encoder is not None else []

    @property
    def inputs(self) -> list[InputParam]:
        return list(self.encoder.inputs) if self.encoder is not None else [InputParam("prompt")]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        own = [OutputParam(RUN, description="the attncontrol run of this call (None: no controls)")]
        return (list(self.encoder.intermediate_outputs) if self.encoder is not None else []) + own

    @property
    def active(self) -> bool:
        return bool(self.controls) or self.attention not in (False, None, [], ())

    def __call__(self, components, state: PipelineState):
        encoder: Any = self._encoder()
        if not self.active:
            components, state = encoder(components, state)
            state.set(RUN, None)
            return components, state
        view = stock_view(components)
        kwargs = self._run_kwargs(components, state, encoder, view)
        run = prepare_run(view, state.get("prompt"), self.controls, sequential_cfg=True, **kwargs)
        _check_guider(getattr(components, "guider", None), run)
        to_pipe = {k: v for k, v in run.call_kwargs.items() if k in run.adapter.text_keys or k.endswith("_embeds")}
        outputs = {o.name: o for o in encoder.intermediate_outputs}
        stray = sorted(k for k, v in to_pipe.items() if v is not None and k not in outputs)
        if stray:
            raise UnsupportedPipelineError(
                f"{type(encoder).__name__} gives no {', '.join(stray)}, which {type(view).__name__} is called with"
            )
        _pad_negative(run)
        for name, out in outputs.items():
            state.set(name, run.call_kwargs.get(name), out.kwargs_type)
        # the embeddings are per image already; the size as the pipeline resolved its defaults
        state.set("num_images_per_prompt", 1)
        state.set("height", run.call_kwargs["height"])
        state.set("width", run.call_kwargs["width"])
        state.set(RUN, RunHandle(run))
        return components, state

    def _run_kwargs(self, components, state: PipelineState, encoder, view) -> dict[str, Any]:
        """prepare_run's arguments from the pipeline state, and the guider's scale as the stock argument."""
        kwargs: dict[str, Any] = {"attention": self.attention, "checkpointing": self.checkpointing}
        names = [p.name for p in encoder.inputs if p.name and p.name != "prompt"]
        for name in [*RUN_INPUTS, *names]:
            value = state.get(name)
            if value is None:
                continue
            kwargs["cross_attention_kwargs" if name in ATTENTION_KWARGS else name] = value
        adapter = adapter_class_of(type(components).__name__)
        if adapter.modular_guidance is None:
            if state.get("guidance_scale") is not None:
                kwargs["guidance_scale"] = state.get("guidance_scale")
            return kwargs
        guider = getattr(components, "guider", None)
        wants = guider is not None and bool(guider._enabled) and guider.num_conditions > 1
        scale = adapter.from_guider_scale(float(guider.guidance_scale) if guider is not None and wants else 1.0)
        kwargs[adapter.modular_guidance] = scale
        extra = {adapter.modular_guidance: scale}
        if wants and kwargs.get("negative_prompt") is None and not adapter(view).uses_cfg(scale, None, extra):
            # the modular encoders encode the empty negative prompt when the guider asks for an unconditional
            # branch; a family whose stock pipeline runs CFG only with a negative prompt (true CFG) gets that one
            kwargs["negative_prompt"] = ""
        return kwargs

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write the block as a Modular Diffusers custom-block folder (see :mod:`attncontrol.modular.folder`)."""
        if push_to_hub:
            raise OptionError("AttnControl.save_pretrained writes a folder; upload it with huggingface_hub")
        write_folder({k: self.config[k] for k in OWN_KEYS}, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, trust_remote_code: bool = False, **kwargs):
        """The block saved in a folder: one written by :meth:`save_pretrained` loads offline and runs none of its
        code; any other needs ``trust_remote_code=True`` and goes to ``ModularPipelineBlocks.from_pretrained``."""
        settings, why = read_folder(pretrained_model_name_or_path)
        if settings is not None:
            return AttnControl(settings["controls"], settings["attention"], settings["checkpointing"])
        if not trust_remote_code:
            raise UntrustedBlockError(
                f"{pretrained_model_name_or_path}: {why}; loading it would run its Python code. Pass "
                "trust_remote_code=True if you trust it"
            )
        return ModularPipelineBlocks.from_pretrained(
            str(pretrained_model_name_or_path), trust_remote_code=True, **kwargs
        )


def save_block(block: AttnControl, folder) -> Path:
    """Write ``block`` to ``folder`` (:meth:`AttnControl.save_pretrained`). Returns the folder."""
    if not isinstance(block, AttnControl):
        raise OptionError(f"save_block saves an AttnControl block, got {type(block).__name__}")
    block.save_pretrained(folder)
    return Path(folder)


def load_block(path, trust_remote_code: bool = False, **kwargs) -> AttnControl:
    """The block saved in ``path`` (:meth:`AttnControl.from_pretrained`)."""
    return AttnControl.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def _check_guider(guider, run: Run) -> None:
    """Attention editors, regional prompting and the map observer tell the branches of a forward apart by their
    order (the conditional one first, as the CFG guider runs them); a guider with more branches (PAG, SEG, ...)
    runs forwards they would misread."""
    if guider is None or not guider._enabled or guider.num_conditions <= 2:
        return
    users = [e.name for e in run.editors] + (["regions"] if run.regions is not None else [])
    users += ["attention"] if run.observer is not None else []
    if users:
        raise UnsupportedPipelineError(
            f"{type(guider).__name__} runs {guider.num_conditions} branches per step; {', '.join(users)} can "
            "only tell the conditional forward apart under a two-branch guider (ClassifierFreeGuidance)"
        )


def _pad_negative(run: Run) -> None:
    """Regional prompting under a guider on a family whose modular input step wants the negative text as long as
    the positive one: the negative is zero-padded (as a batched negative is) and attends to its own tokens only."""
    if run.regions is None or not type(run.adapter).modular_equal_lengths:
        return
    padded = False
    for key in run.adapter.text_keys:
        neg, pos = run.call_kwargs.get(f"negative_{key}"), run.call_kwargs.get(key)
        if key.startswith("negative_") or not torch.is_tensor(neg) or not torch.is_tensor(pos):
            continue
        extra = pos.shape[1] - neg.shape[1]
        if extra > 0:
            run.call_kwargs[f"negative_{key}"] = torch.cat([neg, neg.new_zeros(neg.shape[0], extra, *neg.shape[2:])], 1)
            padded = True
    run.regions.padded_negative = padded


class _RunStep(ModularPipelineBlocks):
    """A block of the run's steps: it reads the latents and the run handle (and does nothing without a run)."""

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("latents"), InputParam(RUN)]


class AttnControlNoise(_RunStep):
    """Before the family's prepare-latents step: the initial noise of the run (the ``latents`` given, or drawn as
    the stock pipeline draws it), chosen by the controls that choose it and guided for step 0."""

    @property
    def description(self) -> str:
        return "attncontrol: the initial noise, chosen (InitNO) and guided for step 0"

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("latents", type_hint=torch.Tensor)]

    def __call__(self, components, state: PipelineState):
        handle = _handle(state)
        if handle is not None:
            state.set("latents", handle.run.initial_latents(handle.driver))
        return components, state


class AttnControlGuide(_RunStep):
    """First in the denoise loop: the latents of step ``i >= 1`` guided before the denoiser runs (step 0 was
    guided by :class:`AttnControlNoise`)."""

    @property
    def description(self) -> str:
        return "attncontrol: guides the latents of this step before the denoiser"

    def __call__(self, components, block_state, i: int, t):
        handle = _handle(block_state)
        if handle is not None and i > 0:
            block_state.latents = handle.driver.begin(block_state.latents, i)
        return components, block_state


class AttnControlEndStep(_RunStep):
    """Last in the denoise loop: closes the step's record, checks the latents are finite, applies the velocity
    rule's deferred shift."""

    @property
    def description(self) -> str:
        return "attncontrol: closes the step (trace record, finite check)"

    def __call__(self, components, block_state, i: int, t):
        handle = _handle(block_state)
        if handle is not None:
            block_state.latents = handle.driver.end_step(i, t, block_state.latents)
        return components, block_state


class AttnControlScope(SequentialPipelineBlocks):
    """Its sub-blocks (attncontrol's noise block through the family's denoise loop) run with the run's capture
    processors installed; restored however they end. Writes ``attncontrol_trace`` (one record per step),
    ``attncontrol_attention`` (the maps, when asked) and ``attncontrol_noise_search``."""

    block_classes: list = []
    block_names: list = []

    @property
    def description(self) -> str:
        return "attncontrol: the capture processors installed around the noise and the denoise loop"

    @property
    def intermediate_outputs(self) -> list[Any]:  # diffusers annotates list[str]; they are OutputParams
        return [
            *super().intermediate_outputs,
            OutputParam(TRACE, description="attncontrol: one StepRecord per step"),
            OutputParam(ATTENTION, description="attncontrol: the per-subject maps (attention=...)"),
            OutputParam(NOISE_SEARCH, description="attncontrol: what a noise search (InitNO) tried"),
        ]

    def __call__(self, components, state: PipelineState):
        handle = _handle(state)
        if handle is None:
            components, state = super().__call__(components, state)
            state.set(TRACE, [])
            state.set(ATTENTION, None)
            state.set(NOISE_SEARCH, {})
            return components, state
        run = handle.run
        with run.installed():
            components, state = super().__call__(components, state)
        maps = None
        if run.observer is not None:
            assert run.observer_labels is not None  # prepare_run gives the labels with the observer
            maps = run.observer.result(run.observer_labels, [float(t) for t in run.timesteps])
        state.set(TRACE, handle.driver.trace)
        state.set(ATTENTION, maps)
        state.set(NOISE_SEARCH, dict(run.noise_reports))
        return components, state
