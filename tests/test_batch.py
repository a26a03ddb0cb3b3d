import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from attncontrol.batch import BatchInputError, auto_subjects, expand, parse_seeds, prompt_set, read_entries
from attncontrol.cli import main
from attncontrol.errors import OptionError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _manifest(out):
    lines = (out / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line must parse: no partial line


def _check_folder(out, expected):
    records = _manifest(out)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == expected  # every item exactly once
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(r["file"] for r in records)
    for name in pngs:
        with Image.open(out / name) as img:
            img.load()  # decodes
            assert json.loads(img.text["parameters"])["key"] in keys
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.part-*.jsonl"))
    return records


# ------------------------------------------------------------------ parsing


def test_seeds_and_auto_subjects():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10] and parse_seeds("5") == [5]
    with pytest.raises(ValueError, match="backwards"):
        parse_seeds("5-2")
    with pytest.raises(ValueError, match="'x'"):
        parse_seeds("1,x")
    assert auto_subjects("a horse with a glasses") == ["horse", "glasses"]
    assert auto_subjects("a pink crown and a purple bow") == ["crown", "bow"]


def test_builtin_prompt_sets_have_the_papers_276_prompts_with_subjects():
    sizes = {name: len(prompt_set(name)) for name in ("ae-animals", "ae-animal-objects", "ae-objects", "ae-all")}
    assert sizes == {"ae-animals": 66, "ae-animal-objects": 144, "ae-objects": 66, "ae-all": 276}
    for entry in prompt_set("ae-all"):
        assert len(entry.subjects) == 2 and all(s in entry.prompt for s in entry.subjects)


def test_txt_jsonl_csv(tmp_path):
    txt = read_entries(_write(tmp_path, "p.txt", "# comment\na cat and a dog | cat, dog\n\na bird and a bear\n"))
    assert [(e.prompt, e.subjects, e.source) for e in txt] == [
        ("a cat and a dog", ["cat", "dog"], "p.txt:2"),
        ("a bird and a bear", None, "p.txt:4"),
    ]
    assert read_entries(tmp_path / "p.txt", auto=True)[1].subjects == ["bird", "bear"]
    jsonl = read_entries(
        _write(
            tmp_path,
            "p.jsonl",
            json.dumps(
                {
                    "prompt": "a cat and a dog",
                    "subjects": ["cat", "dog"],
                    "boxes": "cat=0,0,0.5,1;dog=0.5,0,1,1",
                    "seeds": "1-2",
                    "methods": ["refocus", "attend-excite+astar"],
                    "options": {"astar": {"mask_threshold": 0.4}},
                }
            )
            + "\n",
        )
    )
    e = jsonl[0]
    assert e.seeds == [1, 2] and e.methods == ["refocus", "attend-excite+astar"] and e.boxes["cat"] == [(0, 0, 0.5, 1)]
    items = expand(jsonl, [0], ["none"])
    assert sorted((it.method, it.seed) for it in items) == [
        ("attend-excite+astar", 1),
        ("attend-excite+astar", 2),
        ("refocus", 1),
        ("refocus", 2),
    ]
    assert json.loads(next(it for it in items if it.method != "refocus").options)["astar"] == {"mask_threshold": 0.4}
    csv = read_entries(_write(tmp_path, "p.csv", "prompt,subjects,seeds\na cat and a dog,cat;dog,3\n"))
    assert csv[0].subjects == ["cat", "dog"] and csv[0].seeds == [3]


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog"\n', "p.jsonl:2: not valid JSON"),
        ("p.jsonl", '{"prompt": "a cat", "colour": "red"}\n', "p.jsonl:1: unknown field(s) ['colour']"),
        ("p.jsonl", '{"prompt": "a cat", "seeds": "a-b"}\n', "p.jsonl:1: seeds must look like"),
        ("p.jsonl", '{"prompt": "a cat", "boxes": "cat=0,0,2,1"}\n', r"p.jsonl:1: box for 'cat' must lie inside"),
        ("p.jsonl", '{"prompt": ""}\n', "p.jsonl:1: a non-empty 'prompt'"),
        ("p.jsonl", '{"prompt": "a cat", "methods": "magic"}\n', "unknown method(s) ['magic']; choose from none"),
        ("p.csv", "text\nhello\n", "p.csv:1: the header must have a 'prompt' column"),
        ("p.yaml", "prompt: a cat\n", "must be .txt, .jsonl or .csv"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, name, text, message):
    with pytest.raises(
        BatchInputError,
        match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
        if "must lie" not in message
        else message,
    ):
        read_entries(_write(tmp_path, name, text))


def test_missing_subjects_fail_at_expansion_naming_the_line(tmp_path):
    entries = read_entries(_write(tmp_path, "p.txt", "a cat and a dog | cat, dog\na bird and a bear\n"))
    with pytest.raises(OptionError, match="p.txt:2: subjects are required for attend-excite"):  # the one validator
        expand(entries, [0], ["attend-excite"])
    assert len(expand(entries, [0, 1], ["none"])) == 4  # the baseline needs no subjects


# ------------------------------------------------------------------ runs


@pytest.mark.slow
def test_batch_run_failures_and_rerun(tiny_dirs, tmp_path, capsys):
    prompts = _write(
        tmp_path,
        "p.jsonl",
        "\n".join(
            json.dumps(x)
            for x in [
                {"prompt": "a cat and a dog", "subjects": ["cat", "dog"]},
                {"prompt": "a bird and a bear", "subjects": ["bird", "horse"]},  # horse is not in the prompt
            ]
        )
        + "\n",
    )
    out = tmp_path / "out"
    args = [
        "batch",
        str(prompts),
        "--out",
        str(out),
        "--seeds",
        "0-1",
        "--methods",
        "none,attend-excite",
        "--model",
        str(tiny_dirs["sd1"]),
        "--steps",
        "3",
    ]
    assert main(args) == 1  # something failed
    summary = capsys.readouterr().out
    assert "done 6, skipped 0, failed 2 of 8 items" in summary
    records = _check_folder(out, 6)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 2 and all("'horse' is not in the prompt" in f["error"] for f in failures)
    assert all(f["source"] == "p.jsonl:2" for f in failures)
    guided = [r for r in records if r["method"] == "attend-excite"]
    assert len(guided) == 2 and guided[0]["losses"]["attend-excite"]["steps"] == 3
    assert main(args) == 1
    assert "done 0, skipped 6, failed 2 of 8 items" in capsys.readouterr().out
    _check_folder(out, 6)


@pytest.mark.slow
def test_batched_generation_matches_one_by_one(tiny_dirs, tmp_path):
    prompts = _write(tmp_path, "p.txt", "a cat and a dog | cat, dog\na frog with a crown | frog, crown\n")
    outs = {}
    for bs in (1, 2):
        out = tmp_path / f"bs{bs}"
        assert (
            main(
                [
                    "batch",
                    str(prompts),
                    "--out",
                    str(out),
                    "--seeds",
                    "0-1",
                    "--model",
                    str(tiny_dirs["sd1"]),
                    "--steps",
                    "3",
                    "--batch-size",
                    str(bs),
                ]
            )
            == 0
        )
        outs[bs] = {r["key"]: r for r in _check_folder(out, 4)}
    assert outs[1].keys() == outs[2].keys()
    assert {r["settings"]["batch_size"] for r in outs[2].values()} == {2}
    for rec in outs[1].values():
        a = np.asarray(Image.open(tmp_path / "bs1" / rec["file"]), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "bs2" / rec["file"]), dtype=np.int16)
        assert np.abs(a - b).max() <= 3  # same seeds, batched guidance: the same images up to rounding


def _manifest_lines(out) -> int:
    """Records written so far by any process (parts before the merge, the merged manifest after)."""
    files = [*out.glob("manifest.part-*.jsonl"), out / "manifest.jsonl"]
    return sum(len(f.read_text().splitlines()) for f in files if f.exists())


# generous on purpose: a loaded CI machine may take minutes to import torch and start the tiny model
READY_TIMEOUT = 600


@pytest.mark.slow
def test_resume_after_kill_9(tiny_dirs, tmp_path):
    prompts = _write(tmp_path, "p.txt", "a cat and a dog | cat, dog\na bird and a bear | bird, bear\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "attncontrol",
        "batch",
        str(prompts),
        "--out",
        str(out),
        "--seeds",
        "0-4",
        "--model",
        str(tiny_dirs["sd1"]),
        "--steps",
        "6",
    ]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + READY_TIMEOUT
    while time.time() < deadline and _manifest_lines(out) < 2 and proc.poll() is None:  # readiness: 2 records
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run, possibly mid-write
    proc.wait()
    from attncontrol.batch import finished_keys

    finished = len(finished_keys(out))  # records whose PNG is in place: what a rerun must skip
    assert 2 <= finished < 10, finished  # it really was interrupted
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=READY_TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert f"done {10 - finished}, skipped {finished}, failed 0 of 10 items" in res.stdout
    _check_folder(out, 10)


@pytest.mark.slow
def test_two_workers_on_one_folder_make_each_item_once(tiny_dirs, tmp_path):
    """Two independent batch commands on one folder share the items through per-item claims."""
    prompts = _write(tmp_path, "p.txt", "a cat and a dog | cat, dog\na bird and a bear | bird, bear\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "attncontrol",
        "batch",
        str(prompts),
        "--out",
        str(out),
        "--seeds",
        "0-3",
        "--model",
        str(tiny_dirs["sd1"]),
        "--steps",
        "4",
    ]
    env = {**ENV, "OMP_NUM_THREADS": "1"}  # two workers on two cores: oversubscribed OpenMP threads spin (10x slower)
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=READY_TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    done = []
    for stdout, _ in outputs:
        summary = stdout.strip().splitlines()[-1]
        n_done, n_skipped = (int(x) for x in re.match(r"done (\d+), skipped (\d+), failed 0 of 8", summary).groups())
        assert n_done + n_skipped == 8
        done.append(n_done)
    assert sum(done) == 8  # each item made once, by one of them
    records = _check_folder(out, 8)
    assert len({r["key"] for r in records}) == 8


def test_batch_size_fills_groups_across_prompts_and_seeds(tmp_path):
    from attncontrol.batch import group_items

    entries = read_entries(_write(tmp_path, "p.txt", "a cat and a dog | cat, dog\na bird and a bear | bird, bear\n"))
    items = expand(entries, [0, 1], ["none", "attend-excite"])
    groups = group_items(items, 8)
    assert sorted(len(g) for g in groups) == [4, 4]
    assert all(len({it.method for it in g}) == 1 for g in groups)
    assert sorted(len(g) for g in group_items(items, 3)) == [1, 1, 3, 3]


@pytest.mark.slow
def test_repeated_write_errors_stop_the_batch_in_one_line(tiny_dirs, tmp_path, capsys, monkeypatch):
    import errno

    from attncontrol.batch import runner

    def full_disk(image, path, text=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(runner, "atomic_save_png", full_disk)
    prompts = _write(tmp_path, "p.txt", "a cat and a dog | cat, dog\n")
    out = tmp_path / "out"
    code = main(
        ["batch", str(prompts), "--out", str(out), "--seeds", "0-9", "--model", str(tiny_dirs["sd1"]), "--steps", "2"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: stopped after 3 write errors in a row") and "No space left" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not list(out.glob("*.png")) and _manifest_lines(out) == 0
    claims = list((out / ".claims").iterdir())
    assert len(claims) == 3 and all(c.read_bytes() == b"" for c in claims)  # given back: a rerun takes them


@pytest.mark.slow
def test_each_record_is_appended_only_once_its_png_is_in_place(tiny_dirs, tmp_path, monkeypatch):
    from attncontrol.batch import runner

    seen = []
    real = runner.append_json_line

    def checked(path, record):
        if "manifest" in path.name:
            seen.append((out / record["file"]).is_file())
        real(path, record)

    monkeypatch.setattr(runner, "append_json_line", checked)
    prompts = _write(tmp_path, "p.txt", "a cat and a dog | cat, dog\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                "batch",
                str(prompts),
                "--out",
                str(out),
                "--seeds",
                "0-2",
                "--model",
                str(tiny_dirs["sd1"]),
                "--steps",
                "2",
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    assert seen == [True, True, True]
    for rec in _check_folder(out, 3):
        assert rec["settings"]["guidance_scale"] == 7.5  # the pipeline's default, not null
        assert rec["scheduler"] and rec["versions"]["attncontrol"]


@pytest.mark.slow
def test_two_process_accelerate_launch_covers_every_item_once(tiny_dirs, tmp_path):
    prompts = _write(tmp_path, "p.txt", "a cat and a dog | cat, dog\na bird and a bear | bird, bear\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "attncontrol",
        "batch",
        str(prompts),
        "--out",
        str(out),
        "--seeds",
        "0-2",
        "--methods",
        "none,attend-excite",
        "--model",
        str(tiny_dirs["sd1"]),
        "--steps",
        "3",
    ]
    res = subprocess.run(cmd, env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    records = _check_folder(out, 12)
    assert {r["rank"] for r in records} == {0, 1}  # both processes worked, no item twice (checked above)
    assert res.stdout.count("done 12, skipped 0, failed 0 of 12 items") == 1  # one summary, from the main process


@pytest.mark.slow
def test_other_settings_are_other_items(tiny_dirs, tmp_path, capsys):
    prompts = _write(tmp_path, "p.txt", "a cat and a dog | cat, dog\n")
    out = tmp_path / "out"
    base = ["batch", str(prompts), "--out", str(out), "--model", str(tiny_dirs["sd1"])]
    assert main([*base, "--steps", "2"]) == 0
    assert main([*base, "--steps", "3"]) == 0  # not "already done": different steps make a different image
    assert "done 1, skipped 0" in capsys.readouterr().out.splitlines()[-1]
    assert len(_check_folder(out, 2)) == 2


# ------------------------------------------------------------------ files


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    from attncontrol.io import atomic_write_bytes

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.json", lambda fh: fh.write(b"{}"))
        plain = tmp_path / "plain"
        plain.write_bytes(b"")  # what open() makes under this umask
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == mode == plain.stat().st_mode & 0o777


def test_json_lines_are_strict_json(tmp_path):
    from attncontrol.io import append_json_line

    append_json_line(tmp_path / "m.jsonl", {"loss": float("nan"), "x": [1.0, float("inf")], "ok": 0.5})
    line = (tmp_path / "m.jsonl").read_text()
    assert line == '{"loss": null, "x": [1.0, null], "ok": 0.5}\n'

    def reject(name):
        raise ValueError(name)

    json.loads(line, parse_constant=reject)  # no NaN / Infinity tokens


# ------------------------------------------------------------------ regions

REGIONS = [["a red car", [0.05, 0.1, 0.5, 0.9]], ["a brown dog", [0.5, 0.1, 0.95, 0.9]]]


def test_regions_are_part_of_an_item_only_where_the_regions_method_runs(tmp_path):
    import hashlib

    line = {"prompt": "a car and a dog", "subjects": ["car", "dog"], "regions": REGIONS}
    path = _write(tmp_path, "p.jsonl", json.dumps(line) + "\n")
    plain, ae, regional = expand(read_entries(path), [0], ["none", "attend-excite", "attend-excite+regions"])
    assert plain.regions is None and ae.regions is None
    assert json.loads(regional.regions) == [["a red car", [REGIONS[0][1]]], ["a brown dog", [REGIONS[1][1]]]]
    # an item without regions keeps the key it had before regions existed (old folders resume)
    old = [ae.prompt, ae.subjects, ae.boxes, ae.method, ae.seed, ae.options, ae.negative_prompt]  # settings "{}"
    assert ae.key == hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    # other regions are another item
    line["regions"] = REGIONS[:1]
    path.write_text(json.dumps(line) + "\n")
    (other,) = expand(read_entries(path), [0], ["attend-excite+regions"])
    assert other.key != regional.key and other.controls()[1].extra_text() == ("a red car",)


def test_regions_without_the_regions_method_name_both(tmp_path):
    path = _write(tmp_path, "p.jsonl", json.dumps({"prompt": "a car", "subjects": ["car"], "regions": REGIONS}) + "\n")
    with pytest.raises(BatchInputError, match="p.jsonl:1: regions are for the regions method, which is not among the "):
        expand(read_entries(path), [0], ["none", "astar"])
    line = {"prompt": "a car", "methods": ["regions"]}
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(OptionError, match="p.jsonl:1: regions needs regions"):
        expand(read_entries(path), [0], ["attend-excite"])


@pytest.mark.slow
def test_a_regions_batch_records_its_regions_and_resumes(tiny_dirs, tmp_path, capsys):
    """A csv line's regions reach the run: the record keeps them, the image differs from the baseline's, and a
    rerun rebuilds the same items (every one skipped)."""
    prompts = _write(
        tmp_path, "p.csv", 'prompt,regions\na car and a dog,"a red car@0.05,0.1,0.5,0.9|a brown dog@0.5,0.1,0.95,0.9"\n'
    )
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--out", str(out), "--methods", "none,regions", "--model", str(tiny_dirs["sd1"])]
    args += ["--steps", "3", "--set", "regions.base_prompt_weight=0.2"]
    assert main(args) == 0
    assert "done 2, skipped 0, failed 0 of 2 items" in capsys.readouterr().out
    records = {r["method"]: r for r in _check_folder(out, 2)}
    assert records["none"]["regions"] is None
    assert records["regions"]["regions"] == [["a red car", [REGIONS[0][1]]], ["a brown dog", [REGIONS[1][1]]]]
    assert records["regions"]["options"] == {"regions": {"base_prompt_weight": 0.2}}
    with Image.open(out / records["none"]["file"]) as a, Image.open(out / records["regions"]["file"]) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert main(args) == 0
    assert "done 0, skipped 2, failed 0 of 2 items" in capsys.readouterr().out
