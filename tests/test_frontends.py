"""Front ends from one source: every method option reaches its control from the command line and from a batch
line; every mistake ends in exit status 2 and one message naming the bad value (no traceback, nothing written)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import attncontrol
from attncontrol import AttendExcite, AttnControlError, OptionError
from attncontrol.cli import main
from attncontrol.controls import METHODS
from attncontrol.controls.options import method_fields, takes_boxes, takes_regions

from .conftest import SUBPROCESS_TIMEOUT, seeded

# A non-default value per field, valid for its method (the generic rule: ints + 1, floats x 0.5 ...).
SPECIAL = {
    "kernel_size": 5,
    "start": 1,
    "stop": 10,
    "quantile": 0.8,
    "quantile_target": 0.7,
    "blend": 0.5,
    "decay": 0.9,
    "mask_threshold": 0.4,
    "update": "velocity",
    "normalise": "text",
    "recipe": "focus",
    "scale_range": (0.9, 0.4),
    "thresholds": {0: 0.3, 5: 0.6},
    "schedule": ((3, 2.0, 2), (6, 1.0, 3)),
    "late": (2.0, 3),
    "late_steps": (12, 14),
    "attn_res": (8, 8),
    "blocks": (0, 1),
    "exclude_eot": True,
    "inside_threshold": 0.3,
    "loss_threshold": 0.2,
    "tv": "neighbour",
    "attribute_levels": "same",
    "bindings": {"cat": ("furry", "small")},
    "refinement_steps": (5, 15),
    "alignment_cache": "once",
    "image_self": "all",
    "kernel": "dense",
    "base_prompt_weight": 0.2,
    "background": "a photo",
}


def _other(spec):
    if spec.name in SPECIAL:
        return SPECIAL[spec.name]
    if spec.scalar == "bool":
        return not spec.default
    if spec.scalar == "int":
        return spec.default + 1
    if spec.scalar == "float":
        return spec.default * 0.5 + 0.3
    raise AssertionError(f"no test value for {spec.method}.{spec.name}")


def _text(value) -> str:
    """The command line's form of a value."""
    if isinstance(value, dict):
        return json.dumps({str(k): v for k, v in value.items()})
    if isinstance(value, tuple) and any(isinstance(v, tuple) for v in value):
        return json.dumps(value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


FIELDS = [(m, s) for m, cls in METHODS.items() for s in method_fields(cls)]


@pytest.mark.parametrize("method,spec", FIELDS, ids=[f"{m}.{s.name}" for m, s in FIELDS])
def test_every_option_reaches_its_control_from_the_cli_and_from_a_batch_line(method, spec, tmp_path):
    from attncontrol.batch import expand, read_entries
    from attncontrol.cli.commands import controls_from_args
    from attncontrol.cli.parser import build_parser

    value = _other(spec)
    assert value != spec.default
    boxed, regional = takes_boxes(METHODS[method]), takes_regions(METHODS[method])
    extra = ["--boxes", "cat=0,0,0.5,1"] if boxed else ["--region", "a cat@0,0,0.5,1"] if regional else []
    extra = extra or ["--subjects", "cat"]
    args = build_parser().parse_args(
        ["generate", "a cat", "--methods", method, *extra, "--set", f"{method}.{spec.name}={_text(value)}"]
    )
    (control,) = controls_from_args(args)
    assert getattr(control, spec.name) == value

    line = {"prompt": "a cat", "options": {method: {spec.name: json.loads(json.dumps(value))}}, "methods": [method]}
    line.update({"boxes": "cat=0,0,0.5,1"} if boxed else {"subjects": ["cat"]})
    if regional:
        line.update(regions=[["a cat", [0, 0, 0.5, 1]]])
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n")
    (item,) = expand(read_entries(tmp_path / "p.jsonl"), [0], [method])
    (from_batch,) = item.controls()
    assert getattr(from_batch, spec.name) == value


@pytest.mark.parametrize(
    "spelling",
    [
        "attend-excite.scale_factor",
        "attend_excite.scale_factor",
        "attend-excite.scale-factor",
        "Attend_Excite.scale-factor",
    ],
)
def test_method_and_field_names_take_dash_or_underscore(spelling, tmp_path, capsys):
    """`-` and `_` alike in method and field names: --set, --methods, batch lines and `attncontrol methods`."""
    from attncontrol.batch import expand, read_entries
    from attncontrol.cli.commands import controls_from_args
    from attncontrol.cli.parser import build_parser

    method = spelling.split(".")[0]
    args = build_parser().parse_args(
        ["generate", "a cat", "--subjects", "cat", "--methods", method, "--set", f"{spelling}=5"]
    )
    (control,) = controls_from_args(args)
    assert isinstance(control, AttendExcite) and control.scale_factor == 5
    field = spelling.split(".")[1]
    line = {"prompt": "a cat", "subjects": ["cat"], "methods": [method], "options": {method: {field: 5}}}
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n")
    (item,) = expand(read_entries(tmp_path / "p.jsonl"), [0], ["none"])
    assert item.method == "attend-excite" and item.controls()[0].scale_factor == 5
    assert main(["methods", method]) == 0
    assert capsys.readouterr().out.startswith("attend-excite  (AttendExcite: ")


# ---------------------------------------------------------------- mistakes: exit 2, one message, nothing written

CLI_CASES = {
    "scale-factor-with-astar": (
        ["--subjects", "cat", "--methods", "astar", "--scale-factor", "5"],
        "--scale-factor is an attend-excite option",
    ),
    "max-iter-with-astar": (
        ["--subjects", "cat", "--methods", "astar", "--max-iter-to-alter", "3"],
        "--max-iter-to-alter is an attend-excite option",
    ),
    "scale-factor-zero": (
        ["--subjects", "cat", "--scale-factor", "0"],
        "--scale-factor: attend-excite: scale_factor must be > 0, got 0",
    ),
    "attn-res-zero": (["--subjects", "cat", "--attn-res", "0"], "--attn-res: attend-excite: attn_res"),
    "device-cuda": (["--subjects", "cat", "--device", "cuda"], "--device cuda: this machine has no CUDA"),
    "device-tpu": (["--subjects", "cat", "--device", "tpu"], "--device must be cpu, cuda, cuda:N or mps, got 'tpu'"),
    "method-twice": (["--subjects", "cat", "--methods", "astar,astar"], "given once, got astar"),
    "set-unknown-field": (
        ["--subjects", "cat", "--methods", "astar", "--set", "astar.nonsense=1"],
        "astar has no option 'nonsense'",
    ),
    "set-text-for-number": (
        ["--subjects", "cat", "--methods", "astar", "--set", "astar.scale_factor=abc"],
        "astar.scale_factor must be a number, got 'abc'",
    ),
    "set-nan": (
        ["--subjects", "cat", "--methods", "astar", "--set", "astar.scale_factor=nan"],
        "astar.scale_factor must be a finite number, got nan",
    ),
    "set-unknown-method": (["--subjects", "cat", "--set", "magic.x=1"], "unknown method 'magic'"),
    "set-method-not-run": (
        ["--subjects", "cat", "--set", "astar.scale_factor=5"],
        "astar is not among the methods attend-excite",
    ),
    "set-malformed": (["--subjects", "cat", "--set", "scale_factor=5"], "--set takes METHOD.FIELD=VALUE"),
    "steps-over-scheduler": (["--subjects", "cat", "--steps", "5000"], "1000 training timesteps"),
    "seed-too-large": (["--subjects", "cat", "--seed", "99999999999999999999999"], "--seed must be between 0 and"),
    "height": (["--subjects", "cat", "--height", "63"], "--height must be a positive multiple of 8"),
    "subject-not-in-prompt": (["--subjects", "cat", "horse"], "'horse' is not in the prompt"),
    "none-method": (["--subjects", "cat", "--methods", "none"], "use --no-control for the baseline"),
    "no-control-with-methods": (
        ["--subjects", "cat", "--no-control", "--methods", "astar"],
        "--no-control runs the plain pipeline; drop --methods",
    ),
    "shortcut-and-set": (
        ["--subjects", "cat", "--scale-factor", "5", "--set", "attend-excite.scale_factor=6"],
        "--scale-factor sets attend-excite.scale_factor, which --set attend-excite.scale_factor=6",
    ),
    "alias-and-field": (
        ["--subjects", "cat", "--set", "attend-excite.stop=3", "--set", "attend-excite.max_iter_to_alter=5"],
        "which --set attend-excite.stop=3 already sets",
    ),
    "no-refinement-and-thresholds": (
        ["--subjects", "cat", "--set", "attend-excite.thresholds={}", "--no-refinement"],
        "--no-refinement sets attend-excite.thresholds",
    ),
    "trace-is-out": (
        ["--subjects", "cat", "--out", "same.png", "--trace", "same.png"],
        "--trace same.png is the same path as --out",
    ),
    "methods-comma": (["--subjects", "cat", "--methods", ","], "--methods: no method named in ','"),
    "none-with-astar": (["--subjects", "cat", "--methods", "none+astar"], "use --no-control for the baseline"),
    "boxes-without-refocus": (
        ["--subjects", "cat", "--methods", "astar", "--boxes", "cat=0,0,0.5,0.5"],
        "--boxes are for refocus",
    ),
}


def _generate(args, tiny_dirs, tmp_path, capsys):
    code = main(["generate", "a cat and a dog", "--model", str(tiny_dirs["sd1"]), "--steps", "2", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_generate_mistakes_exit_2_with_one_message(name, tiny_dirs, tmp_path, capsys, monkeypatch):
    if name == "device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    args, message = CLI_CASES[name]
    code, err = _generate(args, tiny_dirs, tmp_path, capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert list(tmp_path.iterdir()) == []  # no image, no temporary file


def test_output_paths_are_checked_before_the_model_loads(tiny_dirs, tmp_path, capsys, monkeypatch):
    import attncontrol.loading

    monkeypatch.setattr(attncontrol.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "exists.png").write_bytes(b"")
    cases = [
        (["--out", str(tmp_path / "folder.png")], "is a folder"),
        (["--out", str(tmp_path / "afile" / "x.png")], "is a file, not a folder"),
        (["--out", str(tmp_path / "missing" / "x.png")], "does not exist"),
        (["--out", str(tmp_path / "x.jpg")], "must end in .png"),
        (["--out", str(tmp_path / "exists.png"), "--no-clobber"], "exists and --no-clobber"),
        (["--out", str(tmp_path / "y.png"), "--trace", str(tmp_path / "missing" / "t.json")], "--trace"),
        (["--out", str(tmp_path / "y.png"), "--save-attention", str(tmp_path / "afile")], "is a file, not a folder"),
    ]
    for args, message in cases:
        code, err = _generate(["--subjects", "cat", *args], tiny_dirs, tmp_path, capsys)
        assert code == 2 and message in err, (args, err)


def test_model_paths_that_are_not_pipelines(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    for model, message in (
        (tmp_path / "notes.txt", "is a file, not a diffusers pipeline folder"),
        (tmp_path / "weird", "'NoSuchPipeline', which diffusers"),
    ):
        code = main(["generate", "a cat", "--subjects", "cat", "--model", str(model), "--out", str(tmp_path / "o.png")])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err


def test_a_real_process_prints_no_traceback(tiny_dirs, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "attncontrol",
            "generate",
            "a cat",
            "--model",
            str(tiny_dirs["sd1"]),
            "--subjects",
            "cat",
            "--methods",
            "astar",
            "--set",
            "astar.scale_factor=abc",
            "--out",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and "'abc'" in res.stderr


BATCH_CASES = {
    "not-utf8": ("p.txt", b"a cat \xff\xfe and a dog | cat\n", "is not UTF-8"),
    "bad-option-value": (
        "p.jsonl",
        json.dumps(
            {"prompt": "a cat", "subjects": ["cat"], "methods": ["astar"], "options": {"astar": {"scale_factor": "x"}}}
        ).encode(),
        "p.jsonl:1: options: astar.scale_factor must be a number, got 'x'",
    ),
    "unknown-option": (
        "p.jsonl",
        json.dumps(
            {"prompt": "a cat", "subjects": ["cat"], "methods": ["astar"], "options": {"astar": {"nope": 1}}}
        ).encode(),
        "p.jsonl:1: options: astar has no option 'nope'",
    ),
    "method-twice": ("p.txt", b"a cat | cat\n", "given once"),
}


@pytest.mark.parametrize("name", list(BATCH_CASES))
def test_batch_mistakes_exit_2_and_write_no_manifest(name, tiny_dirs, tmp_path, capsys):
    filename, data, message = BATCH_CASES[name]
    (tmp_path / filename).write_bytes(data)
    extra = ["--methods", "astar+astar"] if name == "method-twice" else []
    code = main(
        [
            "batch",
            str(tmp_path / filename),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(tiny_dirs["sd1"]),
            "--steps",
            "2",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_batch_reads_a_utf8_bom(tmp_path):
    from attncontrol.batch import read_entries

    (tmp_path / "p.txt").write_bytes("\ufeffa cat and a dog | cat, dog\n".encode())
    (tmp_path / "p.csv").write_bytes("\ufeffprompt,subjects\na cat and a dog,cat;dog\n".encode())
    assert read_entries(tmp_path / "p.txt")[0].prompt == "a cat and a dog"
    assert read_entries(tmp_path / "p.csv")[0].subjects == ["cat", "dog"]


# ---------------------------------------------------------------- the Python API is strict


def test_generate_is_strict(sd1):
    kw = dict(num_inference_steps=2, output_type="latent")
    with pytest.raises(OptionError, match="guidance_scale must be a finite number, got nan"):
        attncontrol.generate(sd1, "a cat", [AttendExcite(subjects=["cat"])], guidance_scale=float("nan"), **kw)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) num_inference_step;.*accepts"):
        attncontrol.generate(sd1, "a cat", [], num_inference_step=4)
    with pytest.raises(
        OptionError,
        match=r"latents have shape \(1, 4, 8, 8\); 64x64 px with 1 image\(s\) needs "
        r"\(1, 4, 32, 32\)",
    ):
        attncontrol.generate(sd1, "a cat", [], latents=torch.zeros(1, 4, 8, 8), **kw)
    with pytest.raises(
        TypeError,
        match=r"AttendExcite.stop \(max_iter_to_alter\) must be int or float or None, "
        r"got '3' \(str\)",
    ):
        AttendExcite(subjects=["cat"], max_iter_to_alter="3")
    one = attncontrol.generate(sd1, "a cat", AttendExcite(subjects=["cat"]), generator=seeded(0), **kw)
    listed = attncontrol.generate(sd1, "a cat", [AttendExcite(subjects=["cat"])], generator=seeded(0), **kw)
    assert torch.equal(one.images, listed.images)


@pytest.mark.parametrize(
    "make",
    [
        lambda: AttendExcite(subjects=[]),
        lambda: AttendExcite(subjects=["cat"], scale_factor=-1),
        lambda: AttendExcite(subjects=["cat"], thresholds={0: 2.0}),
        lambda: attncontrol.Refocus(boxes={"cat": (0, 0, 2, 1)}),
        lambda: attncontrol.Regulate(subjects=["cat"], quantile=1.5),
        lambda: attncontrol.AStar(subjects=["cat"], mask_threshold=math.inf),
        lambda: AttendExcite(subjects=["cat"], update="sideways"),
    ],
)
def test_every_validation_error_is_an_attncontrol_error(make):
    with pytest.raises(AttnControlError):
        make()


# ---------------------------------------------------------------- the rest of the mistakes a new user met


def test_ui_on_a_busy_port_fails_before_the_model_loads(tiny_dirs, capsys, monkeypatch):
    import socket

    import attncontrol.loading

    pytest.importorskip("gradio")
    monkeypatch.setattr(attncontrol.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["ui", "--model", str(tiny_dirs["sd1"]), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in err, err
    assert err.count("\n") == 1


def test_a_truncated_safetensors_file_is_called_damaged(tiny_dirs, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["sd1"], model)
    (weights,) = (model / "unet").glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    code = main(["generate", "a cat", "--subjects", "cat", "--model", str(model), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and "is damaged" in err and "download the model again" in err, err
    assert "--allow-pickle" not in err  # the unsafe flag is not the cure for a damaged file
    assert "Traceback" not in err and err.endswith("\n") and err.count("error: ") == 1  # stderr also has the
    assert not (tmp_path / "o.png").exists()  # loading bar; the error is one line


@pytest.mark.slow
def test_ctrl_c_in_a_batch_says_what_was_done_and_how_to_resume(tiny_dirs, tmp_path, capsys, monkeypatch):
    from attncontrol.batch import runner

    real, calls = runner.BatchRun.generate, []

    def interrupted_on_the_third(self, group):
        calls.append(len(group))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, group)

    monkeypatch.setattr(runner.BatchRun, "generate", interrupted_on_the_third)
    (tmp_path / "p.txt").write_text("a cat and a dog | cat, dog\n")
    out = tmp_path / "out"
    args = [
        "batch",
        str(tmp_path / "p.txt"),
        "--out",
        str(out),
        "--seeds",
        "0-3",
        "--model",
        str(tiny_dirs["sd1"]),
        "--steps",
        "2",
    ]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130
    assert err[-1] == "interrupted: batch stopped after 2 done (0 failed); rerun the same command to resume"
    assert len(list(out.glob("*.png"))) == 2 and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(runner.BatchRun, "generate", real)
    assert main(args) == 0  # the rerun makes only the two that are missing
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done 2, skipped 2, failed 0 of 4")


def test_batch_no_refinement_reaches_every_item(tmp_path):
    from attncontrol.batch import expand, read_entries
    from attncontrol.cli.parser import build_parser
    from attncontrol.cli.runs import _batch_items

    (tmp_path / "p.txt").write_text("a cat and a dog | cat, dog\na frog and a crown | frog, crown\n")
    args = build_parser().parse_args(
        ["batch", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--seeds", "0-1", "--no-refinement"]
    )
    items, _ = _batch_items(args)
    assert len(items) == 4
    for item in items:
        (control,) = item.controls()
        assert control.thresholds == {}  # no refinement step at any denoising step
    (plain,) = expand(read_entries(tmp_path / "p.txt"), [0], ["attend-excite"])[0].controls()
    assert plain.thresholds  # without the flag the official refinement schedule is used


# ------------------------------------------------------------------ regions: one parser, every front end

GOOD_REGIONS = [("a red car", (0.1, 0.1, 0.5, 0.9)), ("a dog@home", (0.5, 0.1, 0.9, 0.9))]  # split at the last @
NINE = "|".join(f"thing {k}@0.1,0.1,0.5,0.9" for k in range(9))
# (the regions as text, one per --region / app line / '|' in a csv cell; a fragment of the error that names it)
BAD_REGIONS = {
    "empty-text": (["@0.1,0.1,0.5,0.9"], "'@0.1,0.1,0.5,0.9': the sub-prompt before '@' is empty"),
    "outside": (["a red car@0.1,0.1,1.5,0.9"], "'a red car@0.1,0.1,1.5,0.9': box for 'a red car' must lie inside"),
    "x0-not-below-x1": (["a red car@0.5,0.1,0.5,0.9"], "box for 'a red car' needs x0 < x1 and y0 < y1"),
    "nine": (NINE.split("|"), "at most 8 regions, got 9"),
    "no-at": (["a red car 0.1,0.1,0.5,0.9"], "'a red car 0.1,0.1,0.5,0.9': a region is a sub-prompt, '@' and its box"),
}


def _region_controls(tmp_path, texts: list[str]) -> dict:
    """The regions control each front end builds from the same regions: Python (pairs and text), the command line
    (--region each), a jsonl line (pairs), a csv cell ('|'-joined) and the app (one a line)."""
    from attncontrol.batch import expand, read_entries
    from attncontrol.cli.commands import controls_from_args
    from attncontrol.cli.parser import build_parser
    from attncontrol.request import build_request
    from attncontrol.ui.logic import build_request as app_request

    built = {"python-text": build_request(None, regions="|".join(texts)).controls}
    pairs = [(t.rpartition("@")[0], [float(v) for v in t.rpartition("@")[2].split(",")]) for t in texts]
    built["python-pairs"] = build_request(["regions"], regions=pairs).controls
    argv = ["generate", "a car and a dog", *(x for t in texts for x in ("--region", t))]
    built["cli"] = controls_from_args(build_parser().parse_args(argv))
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a car and a dog", "regions": pairs}) + "\n")
    (tmp_path / "p.csv").write_text(f'prompt,regions\na car and a dog,"{"|".join(texts)}"\n')
    for name in ("p.jsonl", "p.csv"):
        (item,) = expand(read_entries(tmp_path / name), [0], ["regions"])
        built[name] = item.controls()
    request = app_request("a car and a dog", [], ["regions"], "", 0, 3, 7.5, 64, 64, regions_text="\n".join(texts))
    built["app"] = request.controls
    return built


def test_every_front_end_builds_the_same_regions_control(tmp_path):
    texts = [f"{t}@{','.join(map(str, box))}" for t, box in GOOD_REGIONS]
    expected = attncontrol.Regions(regions=GOOD_REGIONS)
    built = _region_controls(tmp_path, texts)
    assert set(built) == {"python-text", "python-pairs", "cli", "p.jsonl", "p.csv", "app"}
    for name, controls in built.items():
        assert controls == [expected], name
    assert expected.extra_text() == ("a red car", "a dog@home")  # in order, each split at its last '@'


@pytest.mark.parametrize("name", list(BAD_REGIONS))
def test_every_front_end_refuses_the_same_bad_regions_naming_them(name, tmp_path, capsys):
    """The same bad regions are refused by Python, the command line (exit 2, one line, before any model), a csv
    batch line and the app, each error naming the bad region and where it came from."""
    from attncontrol.batch import read_entries
    from attncontrol.request import build_request
    from attncontrol.ui.logic import DemoError
    from attncontrol.ui.logic import build_request as app_request

    texts, fragment = BAD_REGIONS[name]
    with pytest.raises(OptionError) as err:
        build_request(None, regions="|".join(texts))
    assert fragment in str(err.value) and str(err.value).startswith("regions")
    argv = ["generate", "a car", "--model", str(tmp_path / "never-read"), "--out", str(tmp_path / "x.png")]
    assert main([*argv, *(x for t in texts for x in ("--region", t))]) == 2
    cli = capsys.readouterr().err
    assert cli.startswith("error: --region") and fragment in cli and cli.count("\n") == 1, cli
    (tmp_path / "p.csv").write_text(f'prompt,regions\na car,"{"|".join(texts)}"\n')
    with pytest.raises(AttnControlError) as err:
        read_entries(tmp_path / "p.csv")
    assert str(err.value).startswith("p.csv:2: regions") and fragment in str(err.value)
    with pytest.raises(DemoError) as err:
        app_request("a car", [], ["regions"], "", 0, 3, 7.5, 64, 64, regions_text="\n".join(texts))
    assert fragment in str(err.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "p.csv"]  # the command line wrote nothing


@pytest.mark.parametrize(
    "region,message",
    [
        (["", [0.1, 0.1, 0.5, 0.9]], "regions[1]: the sub-prompt is empty"),
        (["a red car", [0.1, 0.1, 1.5, 0.9]], "regions[1]: box for 'a red car' must lie inside [0, 1]"),
        (["a red car", [0.5, 0.1, 0.4, 0.9]], "regions[1]: box for 'a red car' needs x0 < x1"),
        (["a red car", [0.1, 0.1, 0.5]], "regions[1]: box for 'a red car' must be four numbers"),
        (["a red car"], "regions[1]: a region is (sub-prompt, (x0, y0, x1, y1)), got ['a red car']"),
    ],
)
def test_a_jsonl_line_names_its_bad_region(region, message, tmp_path):
    from attncontrol.batch import read_entries

    line = {"prompt": "a car", "regions": [["a dog", [0, 0, 0.5, 1]], region]}
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(AttnControlError) as err:
        read_entries(tmp_path / "p.jsonl")
    assert str(err.value).startswith("p.jsonl:1: ") and message in str(err.value), str(err.value)


def test_a_jsonl_line_takes_at_most_8_regions(tmp_path):
    from attncontrol.batch import read_entries

    for count in (8, 9):
        line = {"prompt": "a car", "regions": [[f"thing {k}", [0, 0, 1, 1]] for k in range(count)]}
        (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n")
        if count == 8:
            assert len(read_entries(tmp_path / "p.jsonl")[0].regions) == 8
            continue
        with pytest.raises(AttnControlError, match="p.jsonl:1: regions: at most 8 regions, got 9"):
            read_entries(tmp_path / "p.jsonl")
