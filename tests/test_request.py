"""The method seam and the one request: a method registered by its one ``@register`` line shows its options in
every front end with nothing else edited, and every front end's values go through ``build_request``, whose
errors name where a value came from."""

from dataclasses import dataclass

import pytest

import attncontrol
from attncontrol.controls import METHODS, register
from attncontrol.controls.base import PreparedControl, subjects_field
from attncontrol.controls.common import GuidanceOptions
from attncontrol.controls.fields import Range, option
from attncontrol.controls.options import method_fields, options_markdown
from attncontrol.errors import OptionError, OptionTypeError, ResolutionError
from attncontrol.request import build_request, method_list


@pytest.fixture
def toy_method():
    """A method defined in one place, as a new method file would be; removed from the registry afterwards."""

    @register("toy-method", order=99)
    @dataclass
    class ToyMethod(GuidanceOptions):
        """Toy: a method that exists only in this test."""

        subjects: list = subjects_field()
        strength: float = option(2.0, "how hard it pushes (ours: 2).", range=Range(0, 10), aliases=("push",))
        rounds: int = option(3, "how often.", low=1, high=5, unit="iterations", app=(1, 4))

        def prepare(self, ctx):
            return PreparedControl()

    yield ToyMethod
    METHODS.pop("toy-method")


def test_a_registered_method_appears_in_every_front_end(toy_method, capsys):
    from attncontrol.batch.items import checked_controls
    from attncontrol.cli import main
    from attncontrol.ui.logic import check_param, method_params

    assert list(METHODS)[-1] == "toy-method" and attncontrol.ToyMethod is toy_method
    specs = {s.name: s for s in method_fields(toy_method)}
    assert specs["strength"].help == "how hard it pushes (ours: 2)." and specs["strength"].aliases == ("push",)
    assert specs["rounds"].range_text() == "between 1 and 5 (iterations)"
    # `attncontrol methods` and the README's generator
    assert main(["methods", "toy_method"]) == 0
    assert "strength (alias push): float = 2.0  [between 0 and 10]" in capsys.readouterr().out
    assert "| `strength` (`push`) | `2.0` | between 0 and 10 | how hard it pushes (ours: 2). |" in options_markdown(
        METHODS, GuidanceOptions
    )
    # --set (either spelling), a batch line's options, the app's fields and bounds
    (control,) = build_request("toy_method", ["cat"], options={"toy-method": {"push": "4"}}, text=True).controls
    assert control.strength == 4.0 and control.push == 4.0
    (control,) = checked_controls(["toy-method"], ["cat"], None, {"toy_method": {"rounds": "5"}}, "p.jsonl:1")
    assert control.rounds == 5
    params = {p.name: p for p in method_params() if p.method == "toy-method"}
    assert params["rounds"].bounds == (1, 4) and params["strength"].bounds == (0, 10)
    assert check_param(params["rounds"], 4) == 4
    # its range, from the field's metadata, in every front end
    with pytest.raises(OptionError, match=r"p.jsonl:1: options: toy-method: strength \(push\) must be between 0 "):
        checked_controls(["toy-method"], ["cat"], None, {"toy-method": {"strength": 11}}, "p.jsonl:1")
    with pytest.raises(OptionError, match="rounds must be between 1 and 5, got 9"):
        toy_method(subjects=["cat"], rounds=9)


GUIDED = {
    "attend-excite": {"subjects": ["cat", "dog"]},
    "astar": {"subjects": ["cat", "dog"]},
    "refocus": {"boxes": {"cat": (0, 0, 0.5, 1), "dog": (0.5, 0, 1, 1)}},
    "divide-bind": {"subjects": ["red cat", "dog"]},
    "conform": {"subjects": ["red cat", "dog"]},
    "syngen": {"subjects": ["red cat", "dog"]},
    "boxdiff": {"boxes": {"cat": (0, 0, 0.5, 1), "dog": (0.5, 0, 1, 1)}},
    "initno": {"subjects": ["cat", "dog"]},
}


def test_every_guidance_method_is_listed_here():
    edits = {"regulate", "regions"}  # they change the attention itself: nothing to plan or evaluate
    assert set(GUIDED) == {k for k, cls in METHODS.items() if k not in edits and cls.__module__.startswith("attn")}


@pytest.mark.parametrize("method", sorted(GUIDED))
def test_plans_are_pure_and_evaluations_write_no_state(tokenizer, method):
    """A prepared control is fixed once prepared: its plan depends on the step alone (asked in any order, the
    same), and evaluating it (the engine's guidance pass) leaves every attribute as it was; what it carries to
    its next evaluation comes back in the Evaluation for the engine to keep."""
    import torch

    from attncontrol.controls import ControlContext, StepInfo
    from attncontrol.controls.vocabulary import MapKey

    ctx = ControlContext.simple(tokenizer, ["a red cat and a dog"], (8, 8), (4, 4), 30)
    prepared = METHODS[method](**GUIDED[method], attn_res=(4, 4)).prepare(ctx)
    shape = [(p.update, p.step_size, p.max_refinement, p.refine is None) for p in map(prepared.plan, range(30))]
    backwards = [prepared.plan(i) for i in reversed(range(30))][::-1]
    assert shape == [(p.update, p.step_size, p.max_refinement, p.refine is None) for p in backwards]
    before = {name: (id(value), repr(value)) for name, value in vars(prepared).items()}
    generator = torch.Generator().manual_seed(0)
    maps = {
        MapKey("cross", (4, 4)): torch.rand(1, 4, 4, 77, generator=generator).softmax(-1),
        MapKey("self", (4, 4)): torch.rand(1, 4, 4, 16, generator=generator).softmax(-1),
    }
    carry = [None]
    for index in (10, 10, 11):  # a step's evaluation, a refinement iteration's, the next step's
        evaluation = prepared.evaluate(maps, [0], StepInfo(index, 500.0, 30), carry)
        assert evaluation.loss.shape == (1,) and torch.isfinite(evaluation.loss).all()
        carry = evaluation.carry if evaluation.carry is not None else carry
    assert {name: (id(value), repr(value)) for name, value in vars(prepared).items()} == before


@pytest.mark.parametrize(
    "methods,expected",
    [("attend_excite+refocus", ["attend-excite", "refocus"]), (["Attend-Excite", "astar"], ["attend-excite", "astar"])],
)
def test_method_names_take_either_spelling(methods, expected):
    assert method_list(methods) == expected


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(methods="magic", subjects=["cat"]), OptionError, r"methods: unknown method\(s\) \['magic'\]"),
        (dict(methods=["astar", "astar"], subjects=["cat"]), OptionError, "given once, got astar"),
        (
            dict(methods="astar", subjects=["cat"], options={"refocus": {"tiered": "false"}}, text=True),
            OptionError,
            "options: refocus is not among the methods astar",
        ),
        (
            dict(
                methods="attend-excite", subjects=["c"], options={"attend-excite": {"stop": 3, "max_iter_to_alter": 4}}
            ),
            OptionError,
            "sets attend-excite.stop, which options already sets",
        ),
        (
            dict(methods="astar", subjects=["cat"], options={"astar": {"scale_factor": "x"}}, text=True, where="p:2"),
            OptionTypeError,
            "p:2: options: astar.scale_factor must be a number, got 'x'",
        ),
        (dict(methods="refocus", boxes="cat=0,0,2,1"), OptionError, r"refocus: box for 'cat' must lie inside \[0, 1\]"),
        (dict(methods="refocus", boxes="cat=0,0,1"), OptionError, "boxes: box 'cat=0,0,1': expected 4 numbers"),
    ],
)
def test_request_errors_name_their_source(kwargs, error, message):
    with pytest.raises(error, match=message):
        build_request(**kwargs)


def test_the_docs_example_method_runs_end_to_end(sd1):
    """docs/methods.md's complete example registers, checks its options and guides a run on the tiny model."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {"__name__": "docs_example"}
    try:
        exec(compile(code, "docs/methods.md", "exec"), namespace)
        assert "weakest-mean" in METHODS
        (control,) = build_request(
            "weakest_mean", ["cat"], options={"weakest-mean": {"step-size": "5"}}, text=True
        ).controls
        assert control.step_size == 5.0
        with pytest.raises(OptionError, match="step_size must be > 0"):
            build_request("weakest-mean", ["cat"], options={"weakest-mean": {"step_size": 0}})
        out = attncontrol.generate(
            sd1,
            "a cat and a dog",
            [control],
            num_inference_steps=3,
            output_type="latent",
            generator=__import__("torch").Generator().manual_seed(0),
        )
        assert out.trace[0].losses["weakest-mean"] and out.trace[0].updated == [True]
    finally:
        METHODS.pop("weakest-mean", None)


@pytest.mark.parametrize(
    "pipeline,error,message",
    [
        ({"num_inference_steps": 0}, OptionError, "--steps must be an int >= 1, got 0"),
        ({"guidance_scale": float("nan")}, OptionError, "--guidance-scale must be a finite number, got nan"),
        ({"guidance_scale": "7"}, OptionTypeError, "--guidance-scale must be a number, got '7'"),
        ({"seed": 2**64}, OptionError, "--seed must be between 0 and 18446744073709551615"),
        ({"height": 9000}, ResolutionError, "--height 9000 is larger than 8192 px"),
        ({"prompt": "a cat \ud800"}, OptionError, "the prompt is not valid text: a lone surrogate"),
        ({"negative_prompt": ["ok", 5]}, OptionTypeError, "--negative-prompt must be text or a list of texts, got 5"),
    ],
)
def test_pipeline_arguments_are_checked_by_the_request_and_named_by_the_front_end(pipeline, error, message):
    from attncontrol.cli.commands import PIPELINE_FLAGS

    with pytest.raises(error, match=message):
        build_request("none", pipeline=pipeline, pipeline_from=PIPELINE_FLAGS)
    good = {"prompt": "a cat", "num_inference_steps": 3, "guidance_scale": 7.5, "height": 64, "seed": 0}
    assert build_request("none", pipeline=good).pipeline == good


# ------------------------------------------------------------------ regions


def test_regions_select_their_method_and_are_kept_in_the_request():
    request = build_request(None, regions="a red car@0.1,0.1,0.5,0.9|a dog@0.5,0.1,0.9,0.9")
    assert request.methods == ("regions",)
    assert request.regions == [("a red car", [(0.1, 0.1, 0.5, 0.9)]), ("a dog", [(0.5, 0.1, 0.9, 0.9)])]
    (control,) = request.controls
    assert control.regions == request.regions and control.base_prompt_weight == 0.3
    # with other methods named, regions go to the regions method among them, the options to theirs
    request = build_request(
        "attend-excite,regions",
        ["car"],
        regions=[("a red car", (0.1, 0.1, 0.5, 0.9)), "a dog@0.5,0.1,0.9,0.9;0.0,0.0,0.2,0.2"],
        options={"regions": {"base_ratio": "0.2", "until": "0.5"}},
        text=True,
    )
    ae, regions = request.controls
    assert ae.subjects == ["car"] and regions.base_prompt_weight == 0.2 and regions.stop == 0.5
    assert regions.regions[1] == ("a dog", [(0.5, 0.1, 0.9, 0.9), (0.0, 0.0, 0.2, 0.2)])  # ';' joins one's boxes
    assert build_request("astar", ["cat"], regions="").regions is None  # empty: none given


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(methods="astar", subjects=["cat"], regions="a cat@0,0,1,1"),
            "regions is for the regions method, which is not among the methods astar",
        ),
        (
            dict(methods="astar", subjects=["cat"], regions="a cat@0,0,1,1", regions_from="--region", where="p:3"),
            "p:3: --region is for the regions method, which is not among the methods astar",
        ),
        (dict(methods="regions"), "regions needs regions, e.g. 'a red car@0.1,0.1,0.5,0.9'"),
        (dict(methods=None, regions=[("a cat", (0, 0, 2, 1))]), "regions[0]: box for 'a cat' must lie inside"),
        (dict(methods=None, regions=5), "regions must be a list of (sub-prompt, (x0, y0, x1, y1)) pairs"),
        (dict(methods=None, regions="a cat\ud800@0,0,1,1", where="p:3"), "is not valid text: a lone surrogate"),
        (dict(methods=None, regions="a cat@0,0,1", where="p:3"), "p:3: regions 'a cat@0,0,1': expected 4 numbers"),
    ],
)
def test_regions_errors_name_their_source(kwargs, message):
    with pytest.raises(OptionError) as err:
        build_request(**kwargs)
    assert message in str(err.value), str(err.value)


def test_the_regions_parser_loads_no_torch():
    """The command line checks regions before it imports torch: the parser and the request builder need none."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from attncontrol.request import build_request\n"
        "r = build_request(None, regions=['a red car@0.1,0.1,0.5,0.9', 'a dog@0.5,0.1,0.9,0.9'])\n"
        "print(r.controls[0].extra_text(), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "('a red car', 'a dog') False"
