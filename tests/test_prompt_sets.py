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
    assert Counter(e.task for e in entries) == {
        "position": 100,
        "color_attr": 100,
        "two_object": 99,
        "colors": 94,
        "single_object": 80,
        "counting": 80,
    }
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
    assert (first.prompt, first.subjects, first.metadata["relation"]) == (
        "a giraffe next to a lamp",
        ["giraffe", "lamp"],
        "next to",
    )
    expected = ("a pig on the bottom of a wallet", ["pig", "wallet"], "on the bottom of")
    assert (last.prompt, last.subjects, last.metadata["relation"]) == expected
    assert Counter(e.metadata["relation"] for e in entries) == {
        "on the top of": 56,
        "on the right of": 56,
        "on the bottom of": 52,
        "on the left of": 51,
        "on side of": 37,
        "next to": 24,
        "near": 24,
    }


@pytest.mark.parametrize("name", [n for n in PROMPT_SETS if not n.startswith("ae-")])
def test_every_subject_is_found_in_its_prompt(name, tokenizer):
    entries = prompt_set(name)
    for e in entries:
        positions = resolve_subjects(tokenizer, e.prompt, e.subjects)
        assert len(positions) == len(e.subjects)
    items = expand(entries, [0], ["attend-excite"])  # a whole set expands for a subject method
    assert len(items) == len({e.prompt for e in entries})  # a prompt listed twice is one image


def test_the_sets_are_listed_and_a_run_needs_out(capsys):
    from attncontrol.cli import main

    assert main(["batch", "--prompt-set", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: int(line.split()[1]) for line in lines[1:-1]}
    assert rows == {name: len(prompt_set(name)) for name in PROMPT_SETS}
    assert rows["geneval"] == 553 and rows["t2i-compbench-spatial"] == 300 and rows["ae-all"] == 276
    assert main(["batch", "--prompt-set", "ae-animals"]) == 2
    assert "batch needs --out FOLDER" in capsys.readouterr().err


# sha256 of Karine-Huang/T2I-CompBench examples/dataset/*_val.txt, CRLF -> LF, each line stripped, one per line
# with a final newline; computed from the upstream files when they were copied (color at 1b70949 and at 7710d05)
T2I_FILES = {
    "t2i-compbench-color": ("t2i_compbench_color_val.txt", "a green bench and a blue bowl"),
    "t2i-compbench-color-2023": ("t2i_compbench_color_val_2023.txt", "a green bench and a blue bowl"),
    "t2i-compbench-shape": ("t2i_compbench_shape_val.txt", "an oblong cucumber and a teardrop plum"),
    "t2i-compbench-texture": ("t2i_compbench_texture_val.txt", "a plastic toy and a glass bottle"),
    "t2i-compbench-non-spatial": (
        "t2i_compbench_non_spatial_val.txt",
        "A person is looking at a rainbow and marveling at its beauty.",
    ),
}


# lines 150 and 300 of the upstream files (Karine-Huang/T2I-CompBench @ 1b70949, examples/dataset/*_val.txt),
# read with `git show` when the sets were copied
T2I_LINES = {
    "t2i-compbench-color": (
        "a black dove and a white feather",
        "a black bathroom with a black and white shower curtain",
    ),
    "t2i-compbench-shape": (
        "a tall lighthouse and a short bench",
        "The big house and the small cabin provided different types of accommodations.",
    ),
    "t2i-compbench-texture": (
        "a plastic bag and a wooden table",
        "The metallic pen and fluffy notebook jot down ideas on the wooden desk.",
    ),
    "t2i-compbench-non-spatial": (
        "A dog is jumping over a hurdle and competing in an agility course.",
        "A child is playing with a toy construction set and building a tower.",
    ),
}


@pytest.mark.parametrize("name", list(T2I_LINES))
def test_t2i_compbench_lines_as_upstream(name):
    entries = prompt_set(name)
    assert (entries[149].prompt, entries[299].prompt) == T2I_LINES[name]
    assert entries[299].source == f"{name}:300"


@pytest.mark.parametrize("name", list(T2I_FILES))
def test_t2i_compbench_phrase_sets(name):
    filename, first = T2I_FILES[name]
    entries = prompt_set(name)
    assert len(entries) == 300 and entries[0].prompt == first and entries[0].source == f"{name}:1"
    text = resources.files("attncontrol").joinpath(f"data/{filename}").read_text()
    assert text.splitlines() == [e.prompt for e in entries]
    for e in entries:  # the subjects are the phrases' heads, each phrase's text is in the prompt
        assert len(e.subjects) == len(e.metadata["phrases"]) >= 1
        assert all(p.lower() in e.prompt.lower() for p in e.metadata["phrases"])


def test_t2i_compbench_color_versions_differ_where_upstream_changed_them():
    now, then = prompt_set("t2i-compbench-color"), prompt_set("t2i-compbench-color-2023")
    changed = [(a.prompt, b.prompt) for a, b in zip(now, then) if a.prompt != b.prompt]
    # upstream commit 3310c2f "remove duplicates" edited 5 lines; the 2023 file has 295 distinct prompts
    assert len(changed) == 5 and len({e.prompt for e in then}) == 295 and len({e.prompt for e in now}) == 300
    assert ("a yellow taxi and a red tire", "a yellow taxi and a black tire") in changed


@pytest.mark.parametrize(
    "prompt,phrases,subjects",
    [
        ("a green bench and a red car", ["a green bench", "a red car"], ["bench", "car"]),
        ("a blue cup and a green cell phone", ["a blue cup", "a green cell phone"], ["cup", "phone"]),
        ("rubber sole shoes and fluffy clouds", ["rubber sole shoes", "fluffy clouds"], ["shoes", "clouds"]),
        (
            "A person is looking at a rainbow and marveling at its beauty.",
            ["A person", "a rainbow", "its beauty"],
            ["person", "rainbow", "beauty"],
        ),
        ("A cat is lazily lounging in a sunny windowsill.", ["A cat", "a sunny windowsill"], ["cat", "windowsill"]),
        (
            "a triangular slice of cheese and a rectangular cheese board",
            ["a triangular slice", "cheese", "a rectangular cheese board"],
            ["slice", "cheese#1", "board"],
        ),
        ("a red cup and a red cup", ["a red cup", "a red cup"], ["cup#1", "cup#2"]),
        (
            "A group of people are cheering at a sports game.",
            ["A group", "people", "a sports game"],
            ["group", "people", "game"],
        ),
        (
            "A scientist is conducting experiments in a high-tech lab.",
            ["A scientist", "a high-tech lab"],
            ["scientist", "lab"],
        ),
    ],
)
def test_noun_phrase_rule_on_hand_made_prompts(prompt, phrases, subjects):
    from attncontrol.phrases import noun_phrases

    found = noun_phrases(prompt)
    assert [p.text for p in found] == phrases and [p.subject for p in found] == subjects


def test_a_record_maps_back_to_its_set_entry():
    from attncontrol.batch.inputs import benchmark_entry

    assert benchmark_entry("geneval:401").metadata["include"][1]["position"] == ["left of", 0]
    assert benchmark_entry("t2i-compbench-shape:1").metadata["phrases"] == ["an oblong cucumber", "a teardrop plum"]
    assert benchmark_entry("prompts.txt:3") is None and benchmark_entry(None) is None
    assert benchmark_entry("ae-animals:1") is None  # A&E's sets carry no benchmark metadata
