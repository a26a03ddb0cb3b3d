"""``attncontrol ui``: the Gradio app (layout only; the work is in ``logic.py``).

Nothing runs at import: ``main()`` loads the model once and builds the app with :func:`build_demo`.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

from ..controls import METHODS
from .logic import (
    DemoError,
    Limits,
    Param,
    Runner,
    boxes_canvas,
    build_request,
    canvas_click,
    draw_boxes,
    method_params,
    parse_subjects,
    prompt_update,
)


def example_prompts(per_group: int = 2) -> list[list[str]]:
    """``[prompt, "subject, subject"]`` from each group of the Attend-and-Excite evaluation set."""
    from ..batch import prompt_set

    groups = ("ae-animals", "ae-animal-objects", "ae-objects")
    return [[e.prompt, ", ".join(e.subjects or [])] for g in groups for e in prompt_set(g)[:per_group]]


def _run_cancellable(runner: Runner, req, progress, idle):
    """``runner.run(req)`` in a worker thread; yields ``idle`` (a no-change update) every 0.25 s while it runs and
    returns its result. Used as ``result = yield from ...`` inside a Gradio generator handler: Gradio closes that
    generator when the client disconnects, and the ``GeneratorExit`` sets the run's cancel flag on the way out."""
    import gradio as gr

    cancel = threading.Event()
    box: dict = {}

    def work():
        try:
            box["result"] = runner.run(req, lambda done, total, what: progress((done, total), desc=what), cancel)
        except BaseException as err:  # handed to the request's own thread below
            box["error"] = err

    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.25)
            if worker.is_alive():
                yield idle
    finally:
        if worker.is_alive():
            cancel.set()
    if "error" in box:
        if isinstance(box["error"], DemoError):
            raise gr.Error(str(box["error"]), print_exception=False) from None  # a user mistake: no traceback
        raise box["error"]
    return box["result"]


def build_demo(runner: Runner, limits: Limits | None = None):
    """The app for ``runner``'s model: its inputs and outputs laid out, the handlers wired to them."""
    import gradio as gr

    limits = limits or runner.limits
    params = method_params()
    native = runner.native_size()
    with gr.Blocks(title="attncontrol") as demo:
        gr.Markdown(
            "## attncontrol: make the model draw every subject\n"
            f"Model: `{runner.model_name}`. Type a prompt, tick the subjects, pick methods, run: the baseline and "
            "the controlled image use the same seed."
        )
        with gr.Row():
            with gr.Column(scale=3):
                ui = _request_inputs(gr, runner, limits, params, native)
            with gr.Column(scale=2):
                ui.update(_token_and_box_inputs(gr, native))
        ui.update(_outputs(gr))
        gr.Examples(
            examples=example_prompts(), inputs=[ui["prompt"], ui["typed"]], label="Examples (Attend-and-Excite set)"
        )
        _wire(ui, runner, limits, params, native)
    return demo


def _request_inputs(gr, runner: Runner, limits: Limits, params: list[Param], native: tuple[int, int]) -> dict:
    """The request's inputs (prompt, subjects, methods, boxes, sampling, each method's options) and the Run
    button, by name; ``params``: the inputs of the method options, in ``params``' order."""
    height0, width0 = native
    ui: dict[str, Any] = {}
    ui["prompt"] = gr.Textbox(label="Prompt", value="", placeholder="a cat and a dog", elem_id="prompt")
    ui["subjects"] = gr.CheckboxGroup(label="Subjects (tick words of the prompt)", choices=[], elem_id="subjects")
    ui["typed"] = gr.Textbox(
        label="…or type subjects (comma-separated: words, 'red car', 'cat#2', indices)",
        elem_id="typed-subjects",
    )
    ui["methods"] = gr.CheckboxGroup(label="Methods", choices=list(METHODS), value=["attend-excite"], elem_id="methods")
    ui["boxes"] = gr.Textbox(
        label="Boxes for refocus (normalised x0,y0,x1,y1)",
        placeholder="cat=0.05,0.2,0.5,0.9; dog=0.55,0.2,0.95,0.9",
        elem_id="boxes",
    )
    with gr.Accordion("Regions (regional prompting: tick regions)", open=False):
        ui["regions"] = gr.Textbox(
            label=f"One region a line, at most {limits.max_boxes}: its sub-prompt, '@', its box (normalised "
            "x0,y0,x1,y1); or draw it on the canvas",
            value="",  # a default: an API client that leaves the regions out sends none
            placeholder="a red car@0.05,0.3,0.5,0.9\na dog@0.55,0.3,0.95,0.9",
            lines=3,
            elem_id="regions",
        )
    with gr.Row():
        ui["seed"] = gr.Number(label="Seed", value=0, minimum=0)  # no precision: 1.5 is refused, not rounded
        ui["steps"] = gr.Slider(
            1, limits.max_steps, value=min(50, limits.max_steps), step=1, label="Steps", elem_id="steps"
        )
        ui["guidance"] = gr.Slider(
            0, limits.max_guidance, value=runner.default_guidance(), step=0.5, label="Guidance scale"
        )
    with gr.Row():
        ui["height"] = gr.Slider(
            limits.min_side, limits.max_side, value=height0, step=8, label="Height", elem_id="height"
        )
        ui["width"] = gr.Slider(limits.min_side, limits.max_side, value=width0, step=8, label="Width", elem_id="width")
    ui["params"] = []
    for method in METHODS:
        with gr.Accordion(f"{method} parameters", open=False):
            ui["params"] += [_field(gr, p) for p in params if p.method == method]
    ui["run"] = gr.Button("Run", variant="primary", elem_id="run")
    return ui


def _token_and_box_inputs(gr, native: tuple[int, int]) -> dict:
    """The token table and the box canvas (with the subject a box is drawn for, and the first corner clicked)."""
    height0, width0 = native
    ui: dict[str, Any] = {}
    ui["tokens"] = gr.Dataframe(headers=["index", "token", "word"], label="Tokens", interactive=False, elem_id="tokens")
    ui["box_subject"] = gr.Dropdown(
        label="Draw a box for (a subject; for a region, type its sub-prompt)",
        choices=[],
        allow_custom_value=True,
        elem_id="box-subject",
    )
    ui["draw_into"] = gr.Radio(
        ["boxes", "regions"], value="boxes", label="The canvas draws", elem_id="draw-into", interactive=True
    )
    ui["canvas"] = gr.Image(
        value=draw_boxes({}, (width0, height0)),
        label="Boxes: click two opposite corners on this canvas (or type them)",
        type="pil",
        interactive=False,
        elem_id="box-canvas",  # no fixed height: with one, clicks on the image are not reported
    )
    ui["clear_boxes"] = gr.Button("Clear boxes", size="sm")
    ui["pending"] = gr.State(None)
    return ui


def _outputs(gr) -> dict:
    """What a run shows: the two images, the heatmaps, the curves and the one-line summary."""
    ui: dict[str, Any] = {}
    with gr.Row():
        ui["baseline"] = gr.Image(
            label="Baseline (no control)",
            type="pil",
            interactive=False,
            format="png",
            height=384,
            elem_id="baseline",
        )
        ui["controlled"] = gr.Image(
            label="Controlled", type="pil", interactive=False, format="png", height=384, elem_id="controlled"
        )
    ui["heatmaps"] = gr.Gallery(
        label="Attention heatmaps (mean over steps)", columns=4, height="auto", elem_id="heatmaps"
    )
    ui["curve"] = gr.LinePlot(
        x="step", y="value", color="series", label="Loss and weakest subject attention per step", elem_id="curve"
    )
    ui["summary"] = gr.Markdown(elem_id="summary")
    return ui


# Every handler takes its inputs as sent (preprocess=False): Gradio's own checks of a value (a choice not offered, a
# number out of a slider's range, a string for a number) would log a traceback for what only an API client can
# send. The logic functions check every input instead, and a mistake is a gr.Error without one.


def _wire(ui: dict, runner: Runner, limits: Limits, params: list[Param], native: tuple[int, int]) -> None:
    """The events: a prompt change updates the tokens and the words to tick, the canvas draws boxes or regions, Run
    runs."""
    on_prompt, on_canvas_click, on_boxes = _token_and_box_handlers(runner, limits, native)
    ui["prompt"].change(
        on_prompt,
        [ui["prompt"], ui["subjects"]],
        [ui["tokens"], ui["subjects"], ui["box_subject"]],
        queue=False,
        preprocess=False,
    )
    ui["canvas"].select(
        on_canvas_click,
        [ui["pending"], ui["box_subject"], ui["boxes"], ui["regions"], ui["draw_into"], ui["height"], ui["width"]],
        [ui["pending"], ui["boxes"], ui["regions"]],
        queue=False,
        preprocess=False,
    )
    ui["clear_boxes"].click(lambda: (None, "", ""), None, [ui["pending"], ui["boxes"], ui["regions"]], queue=False)
    for trigger in (ui["boxes"].change, ui["regions"].change, ui["height"].change, ui["width"].change):
        drawn = [ui["boxes"], ui["height"], ui["width"], ui["regions"]]
        trigger(on_boxes, drawn, ui["canvas"], queue=False, preprocess=False)
    inputs = ["prompt", "subjects", "typed", "methods", "boxes", "seed", "steps", "guidance", "height", "width"]
    ui["run"].click(
        _run_handler(runner, limits, params),
        # the regions last: an API client's positional inputs before them keep their places
        [*(ui[name] for name in inputs), *ui["params"], ui["regions"]],
        [ui[name] for name in ("baseline", "controlled", "heatmaps", "curve", "summary")],
        api_name="run",
        preprocess=False,
    )


def _token_and_box_handlers(runner: Runner, limits: Limits, native: tuple[int, int]):
    """The handlers of a prompt change (the token table, the words to tick), a click on the box canvas and a change
    of the boxes or the size (the canvas redrawn)."""
    import gradio as gr
    import pandas as pd

    def on_prompt(prompt, picked):
        rows, words, kept = prompt_update(runner.tokenizer, prompt, picked)
        table = pd.DataFrame(rows, columns=["index", "token", "word"])
        return table, gr.update(choices=words, value=kept), gr.update(choices=words)

    class Click(gr.EventData):
        """A select event's data, read leniently (gr.SelectData fails inside Gradio on data without an index)."""

        def __init__(self, target, data):
            super().__init__(target, data)
            self.index = data.get("index") if isinstance(data, dict) else None

    def on_canvas_click(pending, subject, boxes, regions, into, height, width, evt=None):
        """The click draws into the boxes or, with ``into == "regions"``, into the regions."""
        try:  # evt is None when the call came without event data (the API): canvas_click says what it needs
            if into == "regions":
                pending, regions = canvas_click(pending, evt, subject, regions, height, width, native, limits, into)
            else:
                pending, boxes = canvas_click(pending, evt, subject, boxes, height, width, native, limits)
        except DemoError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return pending, boxes, regions

    # gradio finds the event-data parameter by its annotation: give it the class, not the postponed string
    on_canvas_click.__annotations__["evt"] = Click

    def on_boxes(text, height, width, regions=None):
        return boxes_canvas(text, height, width, native, limits, regions)

    return on_prompt, on_canvas_click, on_boxes


def _run_handler(runner: Runner, limits: Limits, params: list[Param]):
    """The Run handler: the request checked, then the two images made in a worker (cancelled when the client
    leaves); yields the baseline, the controlled image, the heatmaps, the curves and the summary."""
    import gradio as gr
    import pandas as pd

    track = gr.Progress()  # gradio finds it as the handler's default and reports through it

    def run(prompt, picked, typed, methods, boxes, seed, steps, guidance, height, width, *values, progress=track):
        chosen = {(p.method, p.name): v for p, v in zip(params, values)}
        regions = values[len(params)] if len(values) > len(params) else None  # the last input
        try:
            req = build_request(
                prompt,
                parse_subjects(picked, typed),  # inside the try: an API client may send anything
                methods,
                boxes,
                seed,
                steps,
                guidance,
                height,
                width,
                chosen,
                limits,
                regions,
            )
        except DemoError as err:
            raise gr.Error(str(err), print_exception=False) from None
        result = yield from _run_cancellable(runner, req, progress, tuple(gr.update() for _ in range(5)))
        curves = pd.DataFrame(result.curves, columns=["step", "value", "series"])
        yield result.baseline, result.controlled, result.heatmaps, curves, result.summary

    return run


def _field(gr, p):
    """The input of one method option: a checkbox, a bounded number, or a text box read as on the command line."""
    info = p.spec.help if p.spec is not None else None
    if p.kind == "bool":
        return gr.Checkbox(label=p.label, value=p.default, info=info)
    if p.kind in ("int", "float"):
        lo, hi = p.bounds
        # no precision=0 for ints: Gradio would round 3.4 to 3; the logic refuses it instead
        return gr.Number(label=f"{p.label} ({lo:g}..{hi:g})", value=p.default, minimum=lo, maximum=hi, info=info)
    return gr.Textbox(label=f"{p.label} ({p.spec.type_text if p.spec else p.kind})", value=p.shown(), info=info)


def launch(runner: Runner, host: str = "127.0.0.1", port: int | None = 7860, concurrency: int = 1, **kwargs):
    """Build and serve the app (``prevent_thread_lock=True`` returns at once, for tests)."""
    demo = build_demo(runner)
    demo.queue(default_concurrency_limit=concurrency)
    demo.launch(server_name=host, server_port=port, show_error=True, **kwargs)
    return demo
