import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from attncontrol.cli import main

from .conftest import SUBPROCESS_TIMEOUT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "attncontrol", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=SUBPROCESS_TIMEOUT,
    )


@pytest.mark.slow
def test_generate_writes_a_png_with_its_parameters(tiny_dirs, tmp_path):
    out = tmp_path / "cat_dog.png"
    res = _cli(
        "generate",
        "a cat and a dog",
        "--subjects",
        "cat",
        "dog",
        "--model",
        str(tiny_dirs["sd1"]),
        "--out",
        str(out),
        "--steps",
        "6",
        "--seed",
        "3",
        "--trace",
        str(tmp_path / "trace.json"),
    )
    assert res.returncode == 0, res.stderr
    assert "sampling" in res.stderr and "6/6" in res.stderr  # the progress bar
    with Image.open(out) as img:
        img.load()
        params = json.loads(img.text["parameters"])
        assert img.size == (64, 64)
    assert params["prompt"] == "a cat and a dog" and params["seed"] == 3 and params["steps"] == 6
    assert params["controls"][0]["method"] == "attend-excite" and params["controls"][0]["subjects"] == ["cat", "dog"]
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert len(trace) == 6 and trace[0]["loss"] is not None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    base = tmp_path / "base.png"  # the baseline in-process: the process itself is checked above
    argv = [
        "generate",
        "a cat and a dog",
        "--no-control",
        "--model",
        str(tiny_dirs["sd1"]),
        "--out",
        str(base),
        "--steps",
        "6",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    with Image.open(base) as a, Image.open(out) as b:
        assert json.loads(a.text["parameters"])["controls"] == []
        assert list(a.getdata()) != list(b.getdata())  # the control changed the image


def test_tokens_prints_the_table(tiny_dirs, capsys):
    assert main(["tokens", "a cat and a dog", "--model", str(tiny_dirs["sd1"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split() == ["2", "cat</w>", "cat"] and lines[6].split() == ["5", "dog</w>", "dog"]


def test_offline_default_model_fails_clearly_and_writes_nothing(tmp_path):
    res = _cli("generate", "a cat and a dog", "--subjects", "cat", "dog", "--out", str(tmp_path / "x.png"))
    assert res.returncode == 2
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in res.stderr and "--model" in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["--subjects", "cat", "horse"], "'horse' is not in the prompt"),
        (["--subjects", "cat", "--height", "63"], "height must be a positive multiple of 8"),
        ([], "--subjects are required"),
        (["--subjects", "cat", "--attn-res", "5"], "attn_res 5x5"),
    ],
)
def test_bad_input_exits_2_with_the_reason_and_no_file(tiny_dirs, tmp_path, capsys, args, message):
    out = tmp_path / "x.png"
    code = main(
        ["generate", "a cat and a dog", "--model", str(tiny_dirs["sd1"]), "--out", str(out), "--steps", "2", *args]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_folder_and_non_png_output(tmp_path, capsys):
    assert main(["generate", "a cat", "--subjects", "cat", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "a cat", "--subjects", "cat", "--out", "x.jpg"]) == 2
    assert "must end in .png" in capsys.readouterr().err


@pytest.mark.slow
def test_pickled_weights_refused_unless_allowed(tmp_path, capsys):
    from attncontrol.testing import make_tiny_sd_pipeline

    folder = tmp_path / "pickled"
    make_tiny_sd_pipeline().save_pretrained(folder, safe_serialization=False)
    out = tmp_path / "p.png"
    args = ["generate", "a cat", "--subjects", "cat", "--model", str(folder), "--out", str(out), "--steps", "2"]
    assert main(args) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--allow-pickle"]) == 0 and out.exists()


def test_failure_mid_run_leaves_no_partial_file(tiny_dirs, tmp_path, monkeypatch):
    import attncontrol.pipeline as pipeline_module

    def broken(*a, **k):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(pipeline_module, "generate", broken)
    out = tmp_path / "x.png"
    with pytest.raises(RuntimeError, match="simulated"):
        main(["generate", "a cat", "--subjects", "cat", "--model", str(tiny_dirs["sd1"]), "--out", str(out)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_generate_on_an_sdxl_folder(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "xl.png"
    code = main(
        [
            "generate",
            "a cat and a dog",
            "--subjects",
            "cat",
            "dog",
            "--model",
            str(tiny_dirs["sdxl"]),
            "--out",
            str(out),
            "--steps",
            "3",
        ]
    )
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as img:
        params = json.loads(img.text["parameters"])
    assert params["guidance_scale"] == 5.0  # SDXL's own default, not SD's 7.5


@pytest.mark.parametrize(
    "args,methods",
    [
        (["--subjects", "cat", "dog", "--methods", "astar"], ["astar"]),
        (["--boxes", "cat=0.05,0.2,0.5,0.9;dog=0.55,0.2,0.95,0.9"], ["refocus"]),
        (["--subjects", "cat", "dog", "--methods", "regulate"], ["regulate"]),
        (
            [
                "--subjects",
                "cat",
                "dog",
                "--methods",
                "attend-excite,astar,refocus,regulate",
                "--boxes",
                "cat=0.05,0.2,0.5,0.9;dog=0.55,0.2,0.95,0.9",
            ],
            ["attend-excite", "astar", "refocus", "regulate"],
        ),
    ],
    ids=["astar", "refocus", "regulate", "all-four"],
)
@pytest.mark.slow
def test_each_method_and_a_combination(tiny_dirs, tmp_path, args, methods):
    out, trace = tmp_path / "m.png", tmp_path / "t.json"
    assert (
        main(
            [
                "generate",
                "a cat and a dog",
                "--model",
                str(tiny_dirs["sd1"]),
                "--out",
                str(out),
                "--steps",
                "4",
                "--trace",
                str(trace),
                *args,
            ]
        )
        == 0
    )
    with Image.open(out) as img:
        assert [c["method"] for c in json.loads(img.text["parameters"])["controls"]] == methods
    steps = json.loads(trace.read_text())
    if "regulate" in methods:
        assert steps[0]["edits"]["regulate"]["quantile_after"] > steps[0]["edits"]["regulate"]["quantile_before"]
    if methods != ["regulate"]:
        assert steps[0]["losses"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "magic", "--subjects", "cat"], "unknown method(s) ['magic']"),
        (["--methods", "refocus"], "refocus needs --boxes"),
        (["--boxes", "cat=0.1,0.1,1.3,0.5"], "1.3"),
        (["--boxes", "cat=0.1,0.1,0.5"], "4 numbers"),
        (
            ["--subjects", "cat", "--methods", "astar", "--boxes", "cat=0,0,0.5,0.5"],
            "--boxes are for refocus, boxdiff; none is among the methods astar",
        ),
        (["--boxes", "horse=0,0,0.5,0.5"], "'horse'"),
    ],
)
def test_method_option_errors(tiny_dirs, tmp_path, capsys, args, message):
    out = tmp_path / "x.png"
    assert main(["generate", "a cat and a dog", "--model", str(tiny_dirs["sd1"]), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------ regions

CAR_DOG = ["--region", "a red car@0.05,0.1,0.5,0.9", "--region", "a brown dog@0.5,0.1,0.95,0.9"]


@pytest.mark.slow
def test_generate_with_two_regions_uses_them(tiny_dirs, tmp_path, capsys):
    """--region twice on a tiny saved model: the run record names the regions method with both regions in order
    and the --set value, and the image differs from the same run without regions and from the boxes swapped."""

    def run(name, *args):
        out = tmp_path / f"{name}.png"
        argv = ["generate", "a car and a dog", "--model", str(tiny_dirs["sd1"]), "--out", str(out), "--steps", "4"]
        assert main([*argv, "--seed", "3", *args]) == 0, capsys.readouterr().err
        with Image.open(out) as img:
            return json.loads(img.text["parameters"]), np.asarray(img.convert("RGB"), dtype=np.int16)

    params, regional = run("regions", *CAR_DOG, "--set", "regions.base_prompt_weight=0.2")
    (control,) = params["controls"]
    assert control["method"] == "regions" and control["base_prompt_weight"] == 0.2
    assert control["regions"] == [["a red car", [[0.05, 0.1, 0.5, 0.9]]], ["a brown dog", [[0.5, 0.1, 0.95, 0.9]]]]
    plain_params, plain = run("plain", "--no-control")
    assert plain_params["controls"] == []
    swap = ["--region", "a red car@0.5,0.1,0.95,0.9", "--region", "a brown dog@0.05,0.1,0.5,0.9"]
    _, swapped = run("swapped", *swap, "--set", "regions.base_prompt_weight=0.2")
    assert np.abs(regional - plain).max() > 0  # the regions changed the image
    assert np.abs(regional - swapped).max() > 0  # and which box holds which sub-prompt matters


def test_generate_help_documents_region(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--region TEXT@X0,Y0,X1,Y1" in text and "'a red car@0.1,0.1,0.5,0.9'" in text
    assert "repeatable, in order, at most 8" in text and "--set regions.base_prompt_weight=0.2" in text


def test_region_flags_build_the_regions_control():
    from attncontrol.cli.commands import controls_from_args
    from attncontrol.cli.parser import build_parser

    def controls(*args):
        return controls_from_args(build_parser().parse_args(["generate", "a car and a dog", *args]))

    (control,) = controls(*CAR_DOG[2:], *CAR_DOG[:2], "--set", "regions.until=0.5")
    assert control.extra_text() == ("a brown dog", "a red car") and control.stop == 0.5  # order kept
    ae, regions = controls("--subjects", "car", *CAR_DOG)  # --subjects and --region: attend-excite and regions
    assert (ae.method, regions.method) == ("attend-excite", "regions")
    assert [c.method for c in controls("--methods", "regions", "--region", "a car@0,0,1,1")] == ["regions"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "astar", "--subjects", "car", *CAR_DOG], "--region is for the regions method, which is not"),
        (["--methods", "regions"], "regions needs --region"),
        (["--no-control", *CAR_DOG], "--no-control runs the plain pipeline; drop --region"),
        (["--region", "a red car@0.1,0.1,0.5,0.9", "--set", "regions.base_prompt_weight=2"], "between 0 and 1"),
        (["--region", "a car@0.1,0.1,0.5,0.9", "--set", "regions.regions=x"], "regions has no option 'regions'"),
    ],
)
def test_region_mistakes_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch, args, message):
    import attncontrol.loading

    monkeypatch.setattr(attncontrol.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "x.png"
    assert main(["generate", "a car and a dog", "--model", str(tmp_path), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_bad_region_fails_before_torch_is_imported(tmp_path):
    code = (
        "import sys\n"
        "from attncontrol.cli import main\n"
        f"argv = ['generate', 'a car', '--region', 'a car@0.1,0.1,1.5,0.9', '--out', {str(tmp_path / 'x.png')!r}]\n"
        "code = main(argv)\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.stdout.split() == ["2", "False"], res.stderr
    assert res.stderr.strip() == (
        "error: --region 'a car@0.1,0.1,1.5,0.9': box for 'a car' must lie inside [0, 1] (normalised x0, y0, x1, y1), "
        "got (0.1, 0.1, 1.5, 0.9)"
    )


def test_a_family_that_refuses_regions_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """--region on a folder whose model_index.json names a pipeline whose adapter refuses regional prompting
    (loading.REGIONS_UNSUPPORTED, checked against the adapters in tests/test_families.py): exit 2, no model
    loaded, no image; the same folder without --region gets past that check (to the tokenizers it lacks)."""
    import json

    import attncontrol.loading

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    monkeypatch.setattr(attncontrol.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "x.png"
    argv = ["generate", "a car and a dog", "--model", str(tmp_path), "--out", str(out)]
    assert main([*argv, *CAR_DOG]) == 2
    assert "regional prompting does not support ZImagePipeline" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--subjects", "car"]) == 2  # without --region: past that check, to the next one (the folder)
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "regional prompting" not in err
