"""Step options on schedules of any length: what each method's defaults do at 50, 8 and 4 steps (the README's
table, computed from the defaults), and a window with no step in the schedule refused instead of silently doing
nothing (few-step models: FLUX.2 Klein at 4 steps, Z-Image-Turbo at 8)."""

import subprocess
import sys
from pathlib import Path

import pytest

from attncontrol import AttendExcite, InitNO, OptionError, Refocus, Regulate
from attncontrol.controls import METHODS
from attncontrol.controls.base import ControlContext
from attncontrol.controls.steps import step_rules, steps_markdown, window_text

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_windows_and_step_options_at_each_length():
    ae = AttendExcite(subjects=["cat", "dog"])
    assert window_text(ae, 50) == "steps 0-24 (25 of 50)"  # diffusers' max_iter_to_alter=25
    assert window_text(ae, 4) == "steps 0-3 (4 of 4)"  # an index past the schedule: every step
    assert window_text(AttendExcite(subjects=["cat"], stop=0.5), 4) == "steps 0-1 (2 of 4)"
    (thresholds,) = step_rules(ae, 4)
    assert (thresholds.option, thresholds.steps, thresholds.beyond) == ("thresholds", (0,), (10, 20))
    rules = {r.option: r for r in step_rules(Refocus(boxes={"cat": (0, 0, 0.5, 1)}), 8)}
    assert rules["early_steps"].steps == tuple(range(8)) and rules["early_steps"].beyond == (8, 9)
    assert rules["late_steps"].steps == () and rules["late_steps"].beyond == (10, 15, 20, 25, 30, 35)
    (refine,) = step_rules(InitNO(subjects=["cat", "dog"]), 4)
    assert refine.text() == "refinement_steps: steps none (10, 20 beyond the schedule)"
    assert window_text(Regulate(subjects=["cat"]), 4) == "steps 0-1 (2 of 4)"  # its stop is a fraction: 0.5


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_window_past_the_schedule_is_refused_naming_the_step(method, tokenizer):
    from attncontrol.controls.steps import default_control

    cfg = default_control(METHODS[method])
    cfg.start = 6
    cfg.stop = None
    ctx = ControlContext.simple(tokenizer, ["a a and a b"], (8, 8), (4, 4), num_steps=4)
    with pytest.raises(OptionError, match=r"start is step 6 \(start=6\), but this schedule has 4 steps"):
        cfg.prepare(ctx)
    cfg.start = 3  # the last step: it acts there
    assert window_text(cfg, 4) == "steps 3 (1 of 4)"


def test_the_readme_table_is_the_defaults():
    text = README.read_text()
    block = text.split("<!-- steps:begin -->\n", 1)[1].split("\n<!-- steps:end -->", 1)[0]
    assert block == steps_markdown(METHODS)


def test_the_cli_prints_the_rules_at_n_steps():
    out = subprocess.run(
        [sys.executable, "-m", "attncontrol", "methods", "attend-excite", "--steps", "4"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "attend-excite: steps 0-3 (4 of 4); thresholds: steps 0 (10, 20 beyond the schedule)" in out
    command = [sys.executable, "-m", "attncontrol", "methods", "--steps", "0"]
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode != 0 and "--steps must be >= 1, got 0" in bad.stderr
