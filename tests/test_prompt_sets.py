"""Built-in benchmark prompt sets: counts and entries checked against the sources, subjects by the documented
rule from each set's own metadata, every subject found in its prompt by the tokenizer."""

import hashlib
from collections import Counter
from importlib import resources

import pytest

from attncontrol.batch import PROMPT_SETS, expand, prompt_set
from attncontrol.batch.inputs import geneval_subjects
from attncontrol.tokens import resolve_subjects


def test_geneval_is_the_upstream_file_byte_for_byte():
    data = resources.files("attncontrol").joinpath("data/geneval_metadata.jsonl").read_bytes()
    # sha256 of djghosh13/geneval@af4902f prompts/evaluation_metadata.jsonl (git blob efc21c7e), taken upstream
    assert hashlib.sha256(data).hexdigest().startswith("5c48e0813e81")
    licence = resources.files("attncontrol").joinpath("data/LICENSES/GenEval.txt").read_text()
    assert "MIT License" in licence and "Copyright (c) 2023 Dhruba Ghosh" in licence


def test_geneval_counts_per_task_as_upstream():
    entries = prompt_set("geneval")
    assert len(entries) == 553
    assert Counter(e.task for e in entries) == {"position": 100, "color_attr": 100, "two_object": 99, "colors": 94,
                                                "single_object": 80, "counting": 80}  # fmt: skip
    assert len(prompt_set("geneval-color-attr")) == 100 and len(prompt_set("geneval-two-object")) == 99


@pytest.mark.parametrize(
    "line,prompt,subjects",
    [
        (1, "a photo of a bench", ["bench"]),
        (401, "a photo of a bird left of a couch", ["couch", "bird"]),  # GenEval's include order: target first
    ],
)
def test_geneval_entries(line, prompt, subjects):
    e = prompt_set("geneval")[line - 1]
    assert (e.source, e.prompt, e.subjects) == (f"geneval:{line}", prompt, subjects)
    assert e.metadata["prompt"] == prompt


def test_geneval_subject_rule_on_hand_made_records():
    assert geneval_subjects({"prompt": "a photo of three clocks", "include": [{"class": "clock", "count": 3}]}) == [
        "clocks"
    ]
    assert geneval_subjects({"prompt": "a photo of two buses", "include": [{"class": "bus", "count": 2}]}) == ["buses"]
    # the colour word and the object are the same word: the object is the last one
    orange = {"prompt": "a photo of an orange orange", "include": [{"class": "orange", "count": 1, "color": "orange"}]}
    assert geneval_subjects(orange) == ["orange#2"]
    assert ["orange#2"] in [e.subjects for e in prompt_set("geneval-colors")]


def test_t2i_compbench_spatial():
    entries = prompt_set("t2i-compbench-spatial")
    assert len(entries) == 300
    first, last = entries[0], entries[-1]
    assert (first.prompt, first.subjects, first.metadata["relation"]) == ("a giraffe next to a lamp",
                                                                         ["giraffe", "lamp"], "next to")  # fmt: skip
    expected = ("a pig on the bottom of a wallet", ["pig", "wallet"], "on the bottom of")
    assert (last.prompt, last.subjects, last.metadata["relation"]) == expected
    assert Counter(e.metadata["relation"] for e in entries) == {
        "on the top of": 56, "on the right of": 56, "on the bottom of": 52, "on the left of": 51, "on side of": 37,
        "next to": 24, "near": 24,
    }  # fmt: skip


@pytest.mark.parametrize("name", [n for n in PROMPT_SETS if not n.startswith("ae-")])
def test_every_subject_is_found_in_its_prompt(name, tokenizer):
    entries = prompt_set(name)
    for e in entries:
        positions = resolve_subjects(tokenizer, e.prompt, e.subjects)
        assert len(positions) == len(e.subjects)
    items = expand(entries, [0], ["attend-excite"])  # a whole set expands for a subject method
    assert len(items) == len(entries)


def test_the_sets_are_listed_and_a_run_needs_out(capsys):
    from attncontrol.cli import main

    assert main(["batch", "--prompt-set", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: int(line.split()[1]) for line in lines[1:-1]}
    assert rows == {name: len(prompt_set(name)) for name in PROMPT_SETS}
    assert rows["geneval"] == 553 and rows["t2i-compbench-spatial"] == 300 and rows["ae-all"] == 276
    assert main(["batch", "--prompt-set", "ae-animals"]) == 2
    assert "batch needs --out FOLDER" in capsys.readouterr().err
