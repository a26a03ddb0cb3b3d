"""What a new user hit (issue #31), one table per front end: every mistake ends in one ``error:`` line and exit
status 2 (CLI), a typed attncontrol error (Python API) or a DemoError (the app), naming the bad value, found before
the model loads or samples where it can be, and leaving no output file behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import attncontrol
from attncontrol import (
    AttendExcite,
    BoxDiff,
    Conform,
    DivideBind,
    InitNO,
    OptionError,
    Refocus,
    Regulate,
    ResolutionError,
)
from attncontrol.cli import main
from attncontrol.errors import OptionTypeError

from .conftest import SUBPROCESS_TIMEOUT, _load

PROMPT = "a cat and a dog"


@pytest.fixture()
def no_model_load(monkeypatch):
    """Mistakes found before the model loads: loading it fails the test."""
    import attncontrol.loading

    monkeypatch.setattr(attncontrol.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))


def _cli(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _one_error(code: int, err: str, message: str) -> None:
    assert code == 2 and message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


# ---------------------------------------------------------------- CLI: generate and tokens, before the model loads

GENERATE_CASES = {
    "invalid-set-beside-no-refinement": (
        PROMPT,
        ["--subjects", "cat", "--set", "attend-excite.thresholds=xyz", "--no-refinement"],
        "attend-excite.thresholds must be KEY:VALUE pairs (e.g. 0:0.05,10:0.5) or a JSON object, got 'xyz'",
    ),
    "unbounded-refinement": (
        PROMPT,
        ["--subjects", "cat", "--max-refinement-steps", "1000000000"],
        "max_refinement_steps must be between 0 and 1000, got 1000000000",
    ),
    "unbounded-set-count": (
        PROMPT,
        ["--subjects", "cat", "--methods", "initno", "--set", "initno.round_steps=99999"],
        "round_steps must be between 1 and 1000, got 99999",
    ),
    "huge-side": (
        PROMPT,
        ["--subjects", "cat", "--height", "1000000", "--width", "1000000"],
        "--height 1000000 is larger than 8192 px",
    ),
    "huge-image": (
        PROMPT,
        ["--subjects", "cat", "--height", "8192", "--width", "8192"],
        "--height 8192 x --width 8192 is 67108864 pixels; attncontrol makes at most 16777216",
    ),
    "prompt-not-utf8": (
        "a cat \udcff and a dog",
        ["--subjects", "cat"],
        "the prompt is not valid text: the byte 0xff, which is not UTF-8, at character 6",
    ),
    "prompt-not-utf8-no-control": ("a cat \udcff and a dog", ["--no-control"], "the prompt is not valid text"),
    "negative-prompt-not-utf8": (
        PROMPT,
        ["--subjects", "cat", "--negative-prompt", "blurr\udce9"],
        "--negative-prompt is not valid text: the byte 0xe9",
    ),
    "subject-not-utf8": (PROMPT, ["--subjects", "c\udcffat"], "the subject is not valid text: the byte 0xff"),
}


@pytest.mark.parametrize("name", list(GENERATE_CASES))
def test_generate_mistakes_are_one_line_before_the_model(name, tiny_dirs, tmp_path, capsys, no_model_load):
    prompt, args, message = GENERATE_CASES[name]
    out = tmp_path / "o"
    out.mkdir()
    argv = [
        "generate",
        prompt,
        "--model",
        str(tiny_dirs["sd1"]),
        "--steps",
        "2",
        "--out",
        str(out / "x.png"),
        "--trace",
        str(out / "t.json"),
        *args,
    ]
    _one_error(*_cli(argv, capsys), message)
    assert list(out.iterdir()) == []


def test_tokens_of_a_prompt_that_is_not_utf8(tiny_dirs, capsys):
    code, err = _cli(["tokens", "a \udcff cat", "--model", str(tiny_dirs["sd1"])], capsys)
    _one_error(code, err, "the prompt is not valid text: the byte 0xff, which is not UTF-8, at character 2")


def _without_unet(folder):
    shutil.rmtree(folder / "unet")


def _tokenizer_without_added_tokens(folder):
    path = folder / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    del data["added_tokens"]
    path.write_text(json.dumps(data))


MODEL_CASES = {
    "no-unet": (
        _without_unet,
        "its model_index.json lists the component 'unet' (diffusers.UNet2DConditionModel), but the folder",
    ),
    "tokenizer-json-without-added-tokens": (_tokenizer_without_added_tokens, "could not load the tokenizer of"),
}


@pytest.mark.parametrize("command", ["generate", "tokens"])
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_an_incomplete_model_folder_is_named_before_the_model_loads(
    name, command, tiny_dirs, tmp_path, capsys, no_model_load
):
    damage, message = MODEL_CASES[name]
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["sd1"], model)
    damage(model)
    extra = ["--subjects", "cat", "--out", str(tmp_path / "x.png")] if command == "generate" else []
    code, err = _cli([command, PROMPT, "--model", str(model), *extra], capsys)
    _one_error(code, err, message)
    if name == "tokenizer-json-without-added-tokens":
        assert "its 'added_tokens' entry is missing" in err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- CLI: a full disk leaves no output at all


@pytest.mark.parametrize("failing", [".x.png.", ".t.json.", ".att."])
@pytest.mark.slow
def test_a_full_disk_on_any_output_leaves_none(failing, tiny_dirs, tmp_path, capsys, monkeypatch):
    """--out, --trace and --save-attention are written to temporaries and renamed together: the image is not left
    behind without its trace (or maps), and the message names the output that failed."""
    real = os.fsync

    def fsync(fd):
        if failing in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "o"
    out.mkdir()
    code, err = _cli(
        [
            "generate",
            PROMPT,
            "--subjects",
            "cat",
            "dog",
            "--model",
            str(tiny_dirs["sd1"]),
            "--steps",
            "1",
            "--out",
            str(out / "x.png"),
            "--trace",
            str(out / "t.json"),
            "--save-attention",
            str(out / "att"),
        ],
        capsys,
    )
    name = {".x.png.": "x.png", ".t.json.": "t.json", ".att.": "att"}[failing]
    assert code == 2 and "No space left on device" in err and name in err.splitlines()[-1], err
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- CLI: export


def _batch_folder(tmp_path):
    from PIL import Image

    out = tmp_path / "batch"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "a.png")
    record = {
        "key": "k1",
        "file": "a.png",
        "prompt": "a photo of a bench",
        "method": "none",
        "seed": 0,
        "source": "geneval:1",
    }
    (out / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    return out


def test_export_to_a_file_or_a_read_only_place(tmp_path, capsys, monkeypatch):
    from attncontrol.scores import export

    out = _batch_folder(tmp_path)
    (tmp_path / "afile").write_text("x")
    _one_error(*_cli(["export", str(out), "--to", str(tmp_path / "afile")], capsys), "afile' is a file, not a folder")

    def read_only(src, target):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))

    monkeypatch.setattr(export, "_copy", read_only)
    code, err = _cli(["export", str(out), "--to", str(tmp_path / "dest")], capsys)
    _one_error(code, err, f"--to '{tmp_path / 'dest'}': cannot write {tmp_path / 'dest'}")
    assert "Read-only file system" in err


# ---------------------------------------------------------------- CLI: batch

BATCH_CASES = {
    "methods-none-twice": (
        "p.txt",
        "a cat and a dog | cat, dog\n",
        ["--methods", "none,none"],
        "--methods none,none: each run may be given once, got none more than once",
    ),
    "methods-comma": ("p.txt", "a cat and a dog | cat, dog\n", ["--methods", ","], "--methods: no method named in ','"),
    "seed-negative": (
        "p.jsonl",
        '{"prompt": "a cat", "subjects": ["cat"], "seeds": [-1]}\n',
        [],
        "p.jsonl:1: seeds must be integers between 0 and 18446744073709551615, got -1",
    ),
    "seed-1e400": (
        "p.jsonl",
        '{"prompt": "a cat", "subjects": ["cat"], "seeds": [1e400]}\n',
        [],
        "p.jsonl:1: seeds must be integers between 0 and 18446744073709551615, got inf",
    ),
    "seed-range-too-long": (
        "p.txt",
        "a cat and a dog | cat, dog\n",
        ["--seeds", "0-1000000000000"],
        "--seeds: '0-1000000000000' asks for 1000000000001 seeds; one batch takes at most 1000000",
    ),
    "csv-unbalanced-quote": (
        "p.csv",
        'prompt,subjects\n"a cat and a dog,cat\na bird,bird\na fish,fish\n',
        [],
        "p.csv:2: unexpected end of data (a quote opened on this line is never closed?)",
    ),
    "prompt-file-is-a-folder": ("folder", None, [], "is a folder; give a .txt, .jsonl or .csv file"),
}


@pytest.mark.parametrize("name", list(BATCH_CASES))
def test_batch_mistakes_are_one_line_before_the_model(name, tiny_dirs, tmp_path, capsys, no_model_load):
    filename, text, args, message = BATCH_CASES[name]
    source = tmp_path / filename
    source.mkdir() if text is None else source.write_text(text)
    out = tmp_path / "out"
    _one_error(
        *_cli(["batch", str(source), "--out", str(out), "--model", str(tiny_dirs["sd1"]), *args], capsys), message
    )
    assert not out.exists()


def test_a_full_disk_in_the_manifest_merge_is_one_line(tiny_dirs, tmp_path, capsys, monkeypatch, no_model_load):
    from attncontrol.batch import state

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(state, "atomic_write_bytes", full_disk)
    (tmp_path / "p.txt").write_text("a cat and a dog | cat, dog\n")
    out = tmp_path / "out"
    code, err = _cli(["batch", str(tmp_path / "p.txt"), "--out", str(out), "--model", str(tiny_dirs["sd1"])], capsys)
    _one_error(
        code,
        err,
        f"cannot update {out / 'manifest.jsonl'}: No space left on device; the images and the "
        "per-process manifest parts are kept",
    )


def test_batch_records_a_nan_run_and_a_lone_surrogate_as_failures(tiny_dirs, tmp_path, capsys):
    """A run whose latents turn NaN is a failure, not a black image (earlier fix); a prompt with a lone surrogate
    fails its item, and the failures log is still written (escaped), not lost to a UnicodeEncodeError."""
    nan = {
        "prompt": PROMPT,
        "subjects": ["cat", "dog"],
        "methods": ["attend-excite"],
        "options": {"attend-excite": {"scale_factor": 1e30, "thresholds": {}}},
    }
    lines = json.dumps(nan) + "\n" + '{"prompt": "a cat \\ud800 and a dog", "methods": ["none"]}\n'
    (tmp_path / "p.jsonl").write_text(lines)
    out = tmp_path / "out"
    code = main(
        ["batch", str(tmp_path / "p.jsonl"), "--out", str(out), "--model", str(tiny_dirs["sd1"]), "--steps", "3"]
    )
    std = capsys.readouterr()
    assert code == 1 and "failed 2 of 2" in std.out, std
    records = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    failures = {r["source"]: r for r in records}
    assert failures["p.jsonl:1"]["error"].startswith("NonFiniteError: the latents are not finite")
    assert failures["p.jsonl:2"]["prompt"] == "a cat \ud800 and a dog"
    assert "OptionError: prompt is not valid text: a lone surrogate \\ud800" in failures["p.jsonl:2"]["error"]
    assert (out / "manifest.jsonl").read_text() == "" and not list(out.glob("*.png"))


# ---------------------------------------------------------------- Python API: typed errors naming the value

CONTROL_CASES = {
    "box-of-three": (
        lambda: Refocus(boxes={"cat": (0, 0, 1)}),
        OptionError,
        "box for 'cat' must be four numbers (x0, y0, x1, y1), got (0, 0, 1)",
    ),
    "boxdiff-box-of-three": (lambda: BoxDiff(boxes={"cat": (0, 0, 1)}), OptionError, "box for 'cat' must be four"),
    "schedule-entry-of-two": (
        lambda: Refocus(boxes={"cat": (0, 0, 1, 1)}, schedule=[[1, 2]]),
        OptionTypeError,
        "Refocus.schedule[0] must have 3 values, got [1, 2]",
    ),
    "schedule-iterations": (
        lambda: Refocus(boxes={"cat": (0, 0, 1, 1)}, schedule=[[1, 2.0, 10**6]]),
        OptionError,
        "schedule entries need steps >= 0, a loss scale > 0 and 1 to 1000 iterations",
    ),
    "ae-refinement": (
        lambda: AttendExcite(subjects=["cat"], max_refinement_steps=10**9),
        OptionError,
        "max_refinement_steps must be between 0 and 1000, got 1000000000",
    ),
    "boxdiff-refinement": (
        lambda: BoxDiff(boxes={"cat": (0, 0, 1, 1)}, max_refinement_steps=5000),
        OptionError,
        "max_refinement_steps must be between 0 and 1000, got 5000",
    ),
    "conform-iterations": (
        lambda: Conform(subjects=["cat"], refinement_iterations=5000),
        OptionError,
        "refinement_iterations must be between 0 and 1000",
    ),
    "divide-bind-first": (
        lambda: DivideBind(subjects=["cat"], first_refinement_steps=5000),
        OptionError,
        "first_refinement_steps must be between 0 and 1000",
    ),
    "initno-rounds": (lambda: InitNO(subjects=["cat"], rounds=5000), OptionError, "rounds must be between 1 and 1000"),
    "regulate-iterations": (
        lambda: Regulate(subjects=["cat"], iterations=5000),
        OptionError,
        "iterations must be between 1 and 1000",
    ),
}


@pytest.mark.parametrize("name", list(CONTROL_CASES))
def test_control_mistakes_are_typed_and_named(name):
    make, kind, message = CONTROL_CASES[name]
    with pytest.raises(kind) as err:
        make()
    assert message in str(err.value)


def test_load_pipeline_refuses_an_unknown_device_before_loading(tiny_dirs, monkeypatch):
    from attncontrol.loading import load_pipeline

    monkeypatch.setitem(sys.modules, "diffusers", None)  # importing diffusers would fail: nothing is loaded
    with pytest.raises(OptionError, match="device must be cpu, cuda, cuda:N or mps, got 'tpu'"):
        load_pipeline(str(tiny_dirs["sd1"]), device="tpu")


@pytest.fixture(scope="module")
def pipe(tiny_dirs):
    return _load(tiny_dirs["sd1"])


API_CASES = {
    "generator-int": (dict(generator=0), OptionTypeError, "generator must be a torch.Generator"),
    "numpy-latents": (
        dict(latents=np.zeros((1, 4, 32, 32), np.float32)),
        OptionTypeError,
        "latents must be a torch.Tensor, got ndarray",
    ),
    "callback-int": (dict(callback_on_step_end=5), OptionTypeError, "callback_on_step_end must be callable"),
    "steps-over-scheduler": (
        dict(num_inference_steps=5000),
        OptionError,
        "num_inference_steps 5000 is more than the DDIMScheduler's 1000 training timesteps",
    ),
    "huge-size": (dict(height=10**6, width=10**6), ResolutionError, "height 1000000 is larger than 8192 px"),
    "prompt-lone-surrogate": (
        dict(prompt="a cat \ud800"),
        OptionError,
        "prompt is not valid text: a lone surrogate \\ud800, at character 6",
    ),
    "negative-prompt-not-utf8": (
        dict(negative_prompt="blurr\udce9"),
        OptionError,
        "negative_prompt is not valid text: the byte 0xe9",
    ),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_generate_mistakes_are_typed_before_any_model_work(name, pipe, monkeypatch):
    kwargs, kind, message = API_CASES[name]
    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, "output_type": "latent", **kwargs}
    for module in (pipe.unet, pipe.text_encoder):
        monkeypatch.setattr(module, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(kind) as err:
        attncontrol.generate(pipe, controls=[AttendExcite(subjects=["cat"])], **kwargs)
    assert message in str(err.value)


def test_sdxl_size_conditioning_is_checked(sdxl, monkeypatch):
    monkeypatch.setattr(sdxl.unet, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(OptionTypeError, match=r"original_size must be a pair \(height, width\) ints >= 1, got 'big'"):
        attncontrol.generate(sdxl, PROMPT, [], original_size="big", num_inference_steps=2, output_type="latent")


# ---------------------------------------------------------------- the app's logic: DemoError for any input


def _request(**kw):
    from attncontrol.ui.logic import build_request

    args = dict(
        prompt=PROMPT,
        subjects=["cat", "dog"],
        methods=["attend-excite"],
        boxes_text="",
        seed=0,
        steps=3,
        guidance_scale=7.5,
        height=64,
        width=64,
    )
    args.update(kw)
    return build_request(**args)


APP_CASES = {  # what only a client of the API can send (the page's fields cannot); the logic refused a
    # text seed, a fraction, None steps, a huge height, a text guidance scale and a list for an int field before
    "prompt-int": (dict(prompt=5), "the prompt must be text, got 5"),
    "prompt-lone-surrogate": (dict(prompt="a cat \ud800"), "the prompt is not valid text: a lone surrogate"),
    "methods-str": (dict(methods="attend-excite"), "methods must be a list of method names"),
    "methods-ints": (dict(methods=[1]), "methods must be a list of method names"),
    "subjects-str": (dict(subjects="cat"), "subjects must be a list of words or token indices, got 'cat'"),
    "boxes-int": (dict(boxes_text=5), "boxes must be text, got 5"),
    "seed-bool": (dict(seed=True), "seed must be a whole number, got True"),
    "seed-inf": (dict(seed=float("inf")), "seed must be a whole number, got inf"),
    "params-list": (dict(params=[1]), "the method parameters must be a mapping"),
    "kernel-size-fraction": (
        dict(params={("attend-excite", "kernel_size"): 3.4}),
        "'attend-excite · kernel size' must be a whole number, got 3.4",
    ),
    "float-field-huge-int": (
        dict(params={("attend-excite", "scale_factor"): 10**400}),
        "attend-excite.scale_factor must be a finite number, got 100000000000... (401 digits)",
    ),
    "refocus-schedule-of-two": (
        dict(methods=["refocus"], boxes_text="cat=0,0,0.5,1", params={("refocus", "schedule"): "[[1, 2]]"}),
        "refocus.schedule[0] must have 3 values, got [1, 2]",
    ),
}


@pytest.mark.parametrize("name", list(APP_CASES))
def test_app_inputs_only_an_api_client_can_send_are_demo_errors(name):
    from attncontrol.ui.logic import DemoError

    change, message = APP_CASES[name]
    with pytest.raises(DemoError) as err:
        _request(**change)
    assert message in str(err.value)


def test_app_handlers_take_any_input(tokenizer):
    from types import SimpleNamespace

    from attncontrol.ui.logic import DemoError, boxes_canvas, canvas_click, parse_subjects, prompt_update

    for prompt, picked in ((5, "x"), (None, None), ("a \ud800 cat", [1]), (PROMPT, {"cat": 1})):
        rows, words, kept = prompt_update(tokenizer, prompt, picked)
        assert kept == [] and (rows == [] or prompt == PROMPT)
    assert prompt_update(tokenizer, PROMPT, ["cat", "horse"])[2] == ["cat"]
    for size in ((10**9, 10**9), ("x", None), (-64, 3.5)):
        assert boxes_canvas("cat=0,0,1,1", *size, (64, 96)).size == (96, 64)  # (width, height): the native size
    assert boxes_canvas(5, 64, 64, (64, 64)).size == (64, 64)
    for event in (None, SimpleNamespace(index=None), SimpleNamespace(index=("a", 1)), SimpleNamespace(index=[1])):
        with pytest.raises(DemoError, match="no point came with this click"):
            canvas_click(None, event, "cat", "", 64, 64, (64, 64))
    with pytest.raises(DemoError, match="the subject a box is for must be a word, got 5"):
        canvas_click(None, SimpleNamespace(index=(1, 1)), 5, "", 64, 64, (64, 64))
    pending, _ = canvas_click(None, SimpleNamespace(index=(16, 16)), "cat", None, 64, 64, (64, 64))
    assert canvas_click(pending, SimpleNamespace(index=(48, 48)), "cat", None, 64, 64, (64, 64))[1] == (
        "cat=0.250,0.250,0.750,0.750"
    )
    with pytest.raises(DemoError, match="the ticked subjects must be a list of words, got 'cat'"):
        parse_subjects("cat", None)
    with pytest.raises(DemoError, match="the typed subjects must be text, got 5"):
        parse_subjects([], 5)


def test_the_app_hands_every_input_to_the_logic_unrounded(tokenizer):
    """Gradio's own preprocessing rounded an int field (kernel 3.4 -> 3) and logged a traceback for a value its
    component refuses (a choice not offered, a string for a number): every handler takes its inputs as sent."""
    gr = pytest.importorskip("gradio")
    from types import SimpleNamespace

    from attncontrol.ui.app import build_demo
    from attncontrol.ui.logic import Limits

    runner = SimpleNamespace(
        tokenizer=tokenizer,
        limits=Limits(),
        model_name="tiny",
        native_size=lambda: (64, 64),
        default_guidance=lambda: 7.5,
    )
    demo = build_demo(runner)
    handlers = {fn.name: fn.preprocess for fn in demo.fns.values() if fn.inputs and fn.name != "load_example"}
    assert set(handlers) == {"on_prompt", "on_canvas_click", "on_boxes", "run"} and not any(handlers.values())
    numbers = [b for b in demo.blocks.values() if isinstance(b, gr.Number)]
    assert numbers and all(b.precision is None for b in numbers)


def test_the_time_limit_is_checked_before_the_controlled_run(pipe):
    from attncontrol.ui.logic import DemoError, Limits, Runner

    runner = Runner(pipe, "tiny", Limits(time_limit=5))
    times = iter([0.0] * 4)  # the start, before the baseline, its two steps; then 6 s have passed
    runner.clock = lambda: next(times, 6.0)
    forwards = []
    real = pipe.unet.forward
    pipe.unet.forward = lambda *a, **k: forwards.append(1) or real(*a, **k)
    try:
        with pytest.raises(DemoError, match=r"ran past the app's limit of 5 s \(before the controlled image\)"):
            runner.run(_request(steps=2))
    finally:
        del pipe.unet.forward
    assert len(forwards) == 2  # the baseline's two steps; the controlled run did not start


# ---------------------------------------------------------------- eval and the cost of a mistake


def test_methods_prints_whole_summaries_with_the_class_named_once(capsys):
    from attncontrol.controls import METHODS

    assert main(["methods"]) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith(" ")][:-1]
    assert [h.split()[0] for h in heads] == list(METHODS)
    for head, cls in zip(heads, METHODS.values()):
        assert head.endswith(".)"), head  # the whole first paragraph, not cut mid-sentence
        assert head.lower().count(f"{cls.__name__.lower()}:") <= 1, head  # "SynGen: SynGen:" once was printed


def test_a_closed_pipe_and_a_memory_error_are_no_traceback(capsys, monkeypatch):
    """`attncontrol methods | head -1`: the reader closes the pipe, which is not a failure; running out of memory is
    one line (both printed tracebacks before)."""
    import attncontrol.cli.commands as commands

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    def no_memory(args):
        raise MemoryError()

    monkeypatch.setattr(commands, "cmd_methods", closed)
    assert main(["methods"]) == 0
    monkeypatch.setattr(commands, "cmd_methods", no_memory)
    _one_error(*_cli(["methods"], capsys), "methods ran out of memory")


def test_the_compare_table_prints_no_negative_zero():
    from attncontrol.eval import comparison_markdown

    table = comparison_markdown(
        [
            {
                "baseline": "none",
                "method": "astar",
                "metric": "clip",
                "n": 4,
                "delta": -1e-9,
                "ci_low": -0.0,
                "ci_high": -3e-7,
                "p": 1.0,
            }
        ]
    )
    assert "| +0.0000 | [+0.0000, +0.0000] |" in table and "-0.0000" not in table


def test_a_mistake_costs_no_torch_and_no_diffusers(tiny_dirs):
    """The README's promise: a subject typo is found with the tokenizer alone, an offline hub id at once; neither
    imports torch or diffusers (about 8 s of the 10-14 s such a mistake used to cost)."""
    code = (
        "import sys\nfrom attncontrol.cli import main\n"
        f"a = main(['generate', 'a cat', '--subjects', 'horse', '--model', {str(tiny_dirs['sd1'])!r}])\n"
        "b = main(['generate', 'a cat', '--subjects', 'cat', '--model', 'some-org/any-id'])\n"
        "print(a, b, 'torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT
    )
    assert res.stdout.split() == ["2", "2", "False", "False"], res.stderr
    assert "'horse' is not in the prompt" in res.stderr and "could not load the model 'some-org/any-id'" in res.stderr
