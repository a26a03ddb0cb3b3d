"""A prepared generation (:class:`Run`) and the object that drives it step by step (:class:`StepDriver`).

A run is built by :func:`attncontrol.pipeline.prepare_run` once every user input has been checked. It holds the
family adapter, the controls bound to this run, the attention editors and observer, the encoded prompt and the
schedule. Its steps: install the processors (:meth:`Run.installed`), draw the initial noise and guide it for
step 0 (:meth:`Run.initial_latents`), then let the stock pipeline sample with :class:`StepDriver` as its
``callback_on_step_end``: at the end of step i it closes the step's record and guides the latents of step i + 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import AttentionMaps, AttentionObserver
from .controls.base import ControlContext, PreparedControl, PreparedEditor
from .errors import NonFiniteError
from .guidance import GuidanceEngine, StepRecord
from .models import ModelAdapter
from .processors import capture_layers
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
    noise_search: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def guided_steps(self) -> list[StepRecord]:
        return [r for r in self.trace if r.loss is not None]


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Parameters do not require grad during guidance (only the latents do); flags restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class Run:
    """One generation, prepared: inputs checked, controls bound, prompt encoded, schedule known."""

    pipe: Any
    adapter: ModelAdapter
    ctx: ControlContext
    controls: list[PreparedControl]  # latent guidance
    editors: list[PreparedEditor]  # attention editing
    observer: AttentionObserver | None
    timesteps: torch.Tensor
    cond: dict[str, torch.Tensor]  # cond-branch inputs of a guidance forward
    call_kwargs: dict[str, Any]  # what the pipeline is called with (embeddings instead of the prompt, ...)
    observer_labels: list[list[str]] | None = None
    regions: Any = None  # a PreparedRegions: regional prompting in every forward
    attention_kwargs: dict[str, Any] | None = None
    checkpointing: bool = False
    latent_dtype: torch.dtype = torch.float32  # the pipeline's latents (ModelAdapter.latent_dtype)
    store: AttentionStore | None = field(default=None, init=False)
    engine: GuidanceEngine | None = field(default=None, init=False)
    noise_reports: dict[str, list[dict]] = field(default_factory=dict, init=False)  # per control that chose noise

    def __post_init__(self) -> None:
        if self.controls:
            # one capture of the union of what the controls need; one guidance pass serves them all
            keys = {key for c in self.controls for key in c.map_keys()}
            names = {key: self.ctx.select(key) for key in keys}
            wanted = {n for layer_names in names.values() for n in layer_names}
            layers = [la for la in self.adapter.layers if la.name in wanted]
            grids = {la.name: self.adapter.grid(la, self.ctx.latent_hw) for la in layers}
            self.store = AttentionStore(
                layers,
                grids,
                columns=union_columns(self.controls),
                text_len=self.ctx.seq_len,
                text_normalised=any(key.normalise == "text" for key in keys),
            )
            self.engine = GuidanceEngine(
                self.adapter,
                self.store,
                self.controls,
                self.cond,
                self.timesteps,
                self.attention_kwargs,
                checkpointing=self.checkpointing,
                layer_names=names,
            )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Capture processors on the layers the controls, editors and observer need (only those); parameters
        frozen while guidance may run. Everything restored on exit, however the block ends."""
        by_layer: dict[str, list] = {}
        for e in self.editors:
            for name in e.layers:
                by_layer.setdefault(name, []).append(e)
        with ExitStack() as stack:
            denoiser = self.adapter.denoiser
            if self.store is not None or by_layer or self.observer is not None or self.regions is not None:
                stack.enter_context(
                    capture_layers(
                        denoiser, self.adapter.layers, self.store, by_layer, self.observer, regions=self.regions
                    )
                )
            if self.store is not None:
                stack.enter_context(frozen(denoiser))
            yield

    def guide(self, latents: torch.Tensor, step: int) -> tuple[torch.Tensor, StepRecord]:
        """Start ``step``: the editors' step begins and the latents (the scheduler's, for that step) are guided."""
        for e in self.editors:
            e.begin_step(step)
        if self.regions is not None:
            self.regions.begin_step(step)
        if self.engine is None:
            return latents, StepRecord(index=step, timestep=float(self.timesteps[step]))
        return self.engine.guide(latents, step)

    def apply_deferred(self, latents: torch.Tensor, step: int) -> torch.Tensor | None:
        """The latents after step ``step`` minus the velocity-rule shift computed at that step (None: no shift)."""
        shift = self.engine.take_deferred(step) if self.engine is not None else None
        if shift is None:
            return None
        return (latents.to(shift.dtype) - shift).to(latents.dtype)

    def draw_latents(self) -> torch.Tensor:
        """The initial noise: the ``latents`` given, or drawn exactly as the pipeline would draw it."""
        latents = self.call_kwargs["latents"]
        if latents is None:
            n = len(self.ctx.prompts)
            device = self.pipe._execution_device
            generator = self.call_kwargs["generator"]
            latents = self.adapter.initial_latents(n, self.ctx.latent_hw, generator, device, self.latent_dtype)
        return latents

    def initial_latents(self, driver: StepDriver) -> torch.Tensor:
        """The initial noise (chosen by the controls that choose it, e.g. InitNO), guided for step 0 in the
        scheduler's scale."""
        latents = self.draw_latents()
        if self.engine is not None:
            search = NoiseSearch(self)
            for c in self.controls:
                latents, report = c.initial_noise(latents, search)
                if report:
                    self.noise_reports[c.name] = report
        sigma0 = self.adapter.start_noise_sigma()
        if self.engine is not None and self.engine.needed_at(0):
            return driver.begin(latents * sigma0, 0) / sigma0
        driver.begin(latents, 0)  # nothing to guide at step 0: starts the step's record and the editors
        return latents

    def execute(self) -> GenerationResult:
        """Sample with the stock pipeline; the processors are installed for the whole call."""
        driver = StepDriver(self, self.call_kwargs.pop("callback_on_step_end", None))
        with self.installed():
            kwargs = dict(self.call_kwargs, latents=self.initial_latents(driver))
            kwargs = self.adapter.with_step_callback(kwargs, driver)
            out = self.pipe(**kwargs)
        maps = None
        if self.observer is not None:
            assert self.observer_labels is not None  # prepare_run gives the labels with the observer
            maps = self.observer.result(self.observer_labels, [float(t) for t in self.timesteps])
            if isinstance(out.images, list):
                maps.images = list(out.images)
        return GenerationResult(
            images=out.images,
            trace=driver.trace,
            nsfw_content_detected=getattr(out, "nsfw_content_detected", None),
            prompts=self.ctx.prompts_per_input,
            attention=maps,
            noise_search=dict(self.noise_reports),
        )


class NoiseSearch:
    """What a control that chooses the initial noise may do: forward one image's candidate noise (N(0, I), as
    drawn) at the first step, reading the maps every control reads, and draw fresh noise from the run's generator
    (the stream continues as the pipeline's own draw left it)."""

    def __init__(self, run: Run):
        self.run = run
        adapter = run.adapter
        self.scale = adapter.start_noise_sigma() * adapter.input_scale(run.timesteps[0])

    def maps(self, noise: torch.Tensor, image: int) -> dict:
        """The maps of image ``image`` for ``noise`` (1, ...), differentiable w.r.t. ``noise``."""
        engine = self.run.engine
        assert engine is not None  # a noise search is made only for a run that guides
        model_input = (noise * self.scale).to(self.run.latent_dtype)
        with torch.enable_grad():
            return engine.forward_maps(model_input, 0, [image])

    def draw(self, image: int) -> torch.Tensor:
        """Fresh noise (1, ...) for image ``image``, from its generator (or the global RNG without one)."""
        run = self.run
        generator = run.call_kwargs.get("generator")
        if isinstance(generator, list):
            generator = generator[image]
        device = run.pipe._execution_device
        return run.adapter.initial_latents(1, run.ctx.latent_hw, generator, device, run.latent_dtype)


def union_columns(controls) -> torch.Tensor | None:
    """The token positions any control reads (joint layers compute probabilities for those only); None: all."""
    union = None
    for c in controls:
        mine = c.text_columns()
        if mine is None:
            return None
        union = mine if union is None else union | mine
    return None if union is None else union.nonzero().flatten()


class StepDriver:
    """The run's ``callback_on_step_end``: at the end of step i it closes step i's record (time, editors'
    statistics, observed maps), calls the user's callback (whatever it returns is kept), and guides the latents of
    step i + 1."""

    def __init__(self, run: Run, user_callback=None):
        self.run = run
        self.user_callback = user_callback
        self.trace: list[StepRecord] = []
        self.pending: StepRecord | None = None
        self.clock = time.perf_counter()

    def begin(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        latents, self.pending = self.run.guide(latents, step)
        if self.pending is not None and self.pending.loss is not None:
            _check_finite(latents, f"after the guidance of step {step} (loss {self.pending.loss})")
        if self.run.observer is not None:
            self.run.observer.begin_step()  # records the ordinary forward of this step (not the guidance passes)
        return latents

    def end_step(self, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        """Close step ``i`` (its record: time, editors' statistics, observed maps), check its latents and return
        them less the velocity-rule shift computed at that step. The stock pipeline's callback and the Modular
        loop's end-of-step block both end a step here; :meth:`begin` starts the next."""
        run = self.run
        if run.observer is not None:
            run.observer.end_step(i)
        record = self.pending or StepRecord(index=i, timestep=float(t))
        self.pending = None
        for e in run.editors:
            record.edits[e.name] = e.step_stats()
        if run.regions is not None:  # the weight of the base prompt in the image tokens' attention at this step
            record.edits[run.regions.name] = {"base_prompt_weight": run.regions.weight}
        now = time.perf_counter()
        record.seconds = now - self.clock
        self.trace.append(record)
        self.clock = now
        _check_finite(latents, f"after step {i}")
        shifted = run.apply_deferred(latents, i)
        return latents if shifted is None else shifted

    def __call__(self, pipe, i: int, t, kwargs: dict) -> dict:
        out = kwargs
        if self.user_callback is not None:
            out = self.user_callback(pipe, i, t, kwargs)
            out = dict(kwargs) if out is None else out
        latents = self.end_step(i, t, out.get("latents", kwargs["latents"]))
        out["latents"] = latents
        if i + 1 < self.run.num_steps and not getattr(pipe, "_interrupt", False):
            out["latents"] = self.begin(latents, i + 1)
        return out


def _check_finite(latents: torch.Tensor, where: str) -> None:
    """Stop the run (one device sync) when the latents hold a NaN or an infinity."""
    if torch.is_tensor(latents) and not bool(torch.isfinite(latents).all()):
        raise NonFiniteError(
            f"the latents are not finite {where}: the image would be black or noise; lower the step size "
            "(e.g. scale_factor) or run the model in float32"
        )
