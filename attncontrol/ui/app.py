"""``attncontrol ui``: the Gradio app (layout only; the work is in ``logic.py``).

Nothing runs at import: ``main()`` loads the model once and builds the app with :func:`build_demo`.
"""

from __future__ import annotations

import contextvars
import threading

from ..controls import METHODS
from .logic import (
    DemoError,
    Limits,
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
    return [[e.prompt, ", ".join(e.subjects)] for g in groups for e in prompt_set(g)[:per_group]]


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
    import gradio as gr
    import pandas as pd

    limits = limits or runner.limits
    params = method_params()
    height0, width0 = runner.native_size()

    # Every handler takes its inputs as sent (preprocess=False): Gradio's own checks of a value (a choice not
    # offered, a number out of a slider's range, a string for a number) would log a traceback for what only an API
    # client can send. The logic functions check every input instead, and a mistake is a gr.Error without one.
    def on_prompt(prompt, picked):
        rows, words, kept = prompt_update(runner.tokenizer, prompt, picked)
        table = pd.DataFrame(rows, columns=["index", "token", "word"])
        return table, gr.update(choices=words, value=kept), gr.update(choices=words)

    class Click(gr.EventData):
        """A select event's data, read leniently (gr.SelectData fails inside Gradio on data without an index)."""

        def __init__(self, target, data):
            super().__init__(target, data)
            self.index = data.get("index") if isinstance(data, dict) else None

    def on_canvas_click(pending, subject, text, height, width, evt=None):
        try:  # evt is None when the call came without event data (the API): canvas_click says what it needs
            return canvas_click(pending, evt, subject, text, height, width, (height0, width0), limits)
        except DemoError as err:
            raise gr.Error(str(err), print_exception=False) from None

    # gradio finds the event-data parameter by its annotation: give it the class, not the postponed string
    on_canvas_click.__annotations__["evt"] = Click

    def on_boxes(text, height, width):
        return boxes_canvas(text, height, width, (height0, width0), limits)

    track = gr.Progress()  # gradio finds it as the handler's default and reports through it

    def run(prompt, picked, typed, methods, boxes, seed, steps, guidance, height, width, *values, progress=track):
        chosen = {(p.method, p.name): v for p, v in zip(params, values)}
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
            )
        except DemoError as err:
            raise gr.Error(str(err), print_exception=False) from None
        result = yield from _run_cancellable(runner, req, progress, tuple(gr.update() for _ in range(5)))
        curves = pd.DataFrame(result.curves, columns=["step", "value", "series"])
        yield result.baseline, result.controlled, result.heatmaps, curves, result.summary

    with gr.Blocks(title="attncontrol") as demo:
        gr.Markdown(
            "## attncontrol: make the model draw every subject\n"
            f"Model: `{runner.model_name}`. Type a prompt, tick the subjects, pick methods, run: the baseline and "
            "the controlled image use the same seed."
        )
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", value="", placeholder="a cat and a dog", elem_id="prompt")
                subjects = gr.CheckboxGroup(label="Subjects (tick words of the prompt)", choices=[], elem_id="subjects")
                typed = gr.Textbox(
                    label="…or type subjects (comma-separated: words, 'red car', 'cat#2', indices)",
                    elem_id="typed-subjects",
                )
                methods = gr.CheckboxGroup(
                    label="Methods", choices=list(METHODS), value=["attend-excite"], elem_id="methods"
                )
                boxes = gr.Textbox(
                    label="Boxes for refocus (normalised x0,y0,x1,y1)",
                    placeholder="cat=0.05,0.2,0.5,0.9; dog=0.55,0.2,0.95,0.9",
                    elem_id="boxes",
                )
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, minimum=0)  # no precision: 1.5 is refused, not rounded
                    steps = gr.Slider(
                        1, limits.max_steps, value=min(50, limits.max_steps), step=1, label="Steps", elem_id="steps"
                    )
                    guidance = gr.Slider(
                        0, limits.max_guidance, value=runner.default_guidance(), step=0.5, label="Guidance scale"
                    )
                with gr.Row():
                    height = gr.Slider(
                        limits.min_side, limits.max_side, value=height0, step=8, label="Height", elem_id="height"
                    )
                    width = gr.Slider(
                        limits.min_side, limits.max_side, value=width0, step=8, label="Width", elem_id="width"
                    )
                param_inputs = []
                for method in METHODS:
                    with gr.Accordion(f"{method} parameters", open=False):
                        param_inputs += [_field(gr, p) for p in params if p.method == method]
                run_btn = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                token_table = gr.Dataframe(
                    headers=["index", "token", "word"], label="Tokens", interactive=False, elem_id="tokens"
                )
                box_subject = gr.Dropdown(
                    label="Draw a box for", choices=[], allow_custom_value=True, elem_id="box-subject"
                )
                box_preview = gr.Image(
                    value=draw_boxes({}, (width0, height0)),
                    label="Boxes: click two opposite corners on this canvas (or type them)",
                    type="pil",
                    interactive=False,
                    elem_id="box-canvas",  # no fixed height: with one, clicks on the image are not reported
                )
                clear_boxes = gr.Button("Clear boxes", size="sm")
                pending = gr.State(None)
        with gr.Row():
            baseline = gr.Image(
                label="Baseline (no control)",
                type="pil",
                interactive=False,
                format="png",
                height=384,
                elem_id="baseline",
            )
            controlled = gr.Image(
                label="Controlled", type="pil", interactive=False, format="png", height=384, elem_id="controlled"
            )
        heatmaps = gr.Gallery(
            label="Attention heatmaps (mean over steps)", columns=4, height="auto", elem_id="heatmaps"
        )
        curve = gr.LinePlot(
            x="step", y="value", color="series", label="Loss and weakest subject attention per step", elem_id="curve"
        )
        summary = gr.Markdown(elem_id="summary")
        gr.Examples(examples=example_prompts(), inputs=[prompt, typed], label="Examples (Attend-and-Excite set)")

        raw = dict(preprocess=False)  # see above: the logic functions check every input
        prompt.change(on_prompt, [prompt, subjects], [token_table, subjects, box_subject], queue=False, **raw)
        box_preview.select(on_canvas_click, [pending, box_subject, boxes, height, width], [pending, boxes],
                           queue=False, **raw)  # fmt: skip
        clear_boxes.click(lambda: (None, ""), None, [pending, boxes], queue=False)
        for trigger in (boxes.change, height.change, width.change):
            trigger(on_boxes, [boxes, height, width], box_preview, queue=False, **raw)
        run_btn.click(
            run,
            [prompt, subjects, typed, methods, boxes, seed, steps, guidance, height, width, *param_inputs],
            [baseline, controlled, heatmaps, curve, summary],
            api_name="run",
            **raw,
        )
    return demo


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
