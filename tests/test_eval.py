"""`attncontrol eval`: attention metrics from the manifest, CLIP and caption scores with tiny random models."""

import csv
import json
import math
import shutil
import warnings

import pytest
import torch
from PIL import Image

from attncontrol.cli import main
from attncontrol.eval import imagenet_templates, prompt_halves, summarise
from attncontrol.testing import save_tiny_blip, save_tiny_clip


@pytest.fixture(scope="module")
def batch_dir(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalbatch")
    prompts = root / "p.txt"
    prompts.write_text("a cat and a dog | cat, dog\na frog with a crown | frog, crown\n")
    out = root / "out"
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
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmodels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_tiny_clip(root / "clip"), save_tiny_blip(root / "blip")


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_templates_and_halves():
    templates = imagenet_templates()
    assert len(templates) == len(set(templates)) == 80 and all(t.count("{}") == 1 for t in templates)
    assert "a bad photo of a {}." in templates and "a tattoo of the {}." in templates
    assert prompt_halves("a cat and a dog") == ["a cat", "a dog"]
    assert prompt_halves("a frog with a crown") == ["a frog", "a crown"]
    assert prompt_halves("a red car") == ["a red car"]


def test_summary_statistics_by_hand():
    rows = [
        {"method": "none", "clip_full": 0.2, "min_subject_attention": None},
        {"method": "none", "clip_full": 0.4, "min_subject_attention": float("nan")},
        {"method": "a", "clip_full": 0.3, "min_subject_attention": 0.5},
    ]
    none, a = summarise(rows)
    assert none["method"] == "none" and none["images"] == 2
    assert none["clip_full"] == pytest.approx(0.3) and none["clip_full_std"] == pytest.approx(0.1414213, rel=1e-5)
    assert "min_subject_attention" not in none  # missing and NaN values are not averaged
    assert a["min_subject_attention"] == 0.5 and a["clip_full_std"] == 0.0


@pytest.mark.slow
def test_attention_only_eval_and_grid(batch_dir, capsys):
    assert main(["eval", str(batch_dir), "--grid"]) == 0
    table = capsys.readouterr().out
    assert "| none | 4 |" in table and "| attend-excite | 4 |" in table and "clip_full" not in table
    rows = _csv(batch_dir / "eval" / "per_image.csv")
    manifest = {json.loads(line)["file"]: json.loads(line) for line in (batch_dir / "manifest.jsonl").open()}
    assert len(rows) == 8 == len(manifest)
    for row in rows:
        att = manifest[row["file"]]["attention"]
        assert float(row["min_subject_attention"]) == pytest.approx(att["min_subject_attention"])
        assert 0 < float(row["min_subject_attention"]) <= 1 and 0 <= float(row["subject_overlap"]) <= 1
    assert {r["subjects"] for r in rows} == {"cat;dog", "frog;crown"}  # the baseline is measured too
    summary = _csv(batch_dir / "eval" / "summary.csv")
    none = next(s for s in summary if s["method"] == "none")
    values = [float(r["min_subject_attention"]) for r in rows if r["method"] == "none"]
    assert float(none["min_subject_attention"]) == pytest.approx(sum(values) / 4)
    grids = sorted((batch_dir / "eval" / "grids").glob("*.png"))
    assert len(grids) == 2
    with Image.open(grids[0]) as g:
        assert g.size == (2 * 256, 20 + 2 * 256)  # methods across, seeds down


def test_clip_and_caption_scores_match_transformers(batch_dir, models):
    """Scores against an independent computation through CLIPModel's forward (its own normalised embeddings)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPProcessor

    clip, blip = models
    assert main(["eval", str(batch_dir), "--clip", str(clip), "--captioner", str(blip), "--batch-size", "3"]) == 0
    rows = _csv(batch_dir / "eval" / "per_image.csv")
    model, proc = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    cap_model, cap_proc = BlipForConditionalGeneration.from_pretrained(blip).eval(), BlipProcessor.from_pretrained(blip)
    templates = imagenet_templates()

    def text_embed(text):
        with torch.no_grad():
            emb = model(
                **proc(
                    text=[t.format(text) for t in templates],
                    images=Image.new("RGB", (32, 32)),
                    return_tensors="pt",
                    padding=True,
                )
            ).text_embeds
        mean = emb.mean(0)
        return mean / mean.norm()

    for row in rows[:3]:
        image = Image.open(batch_dir / row["file"]).convert("RGB")
        with torch.no_grad():
            img = model(**proc(text=["x"], images=image, return_tensors="pt")).image_embeds[0]
        full = float(img @ text_embed(row["prompt"]))
        halves = [float(img @ text_embed(h)) for h in prompt_halves(row["prompt"])]
        assert float(row["clip_full"]) == pytest.approx(full, abs=1e-5)
        assert float(row["clip_min_half"]) == pytest.approx(min(halves), abs=1e-5)
        with torch.no_grad():
            ids = cap_model.generate(**cap_proc(images=image, return_tensors="pt"), max_new_tokens=30)
        caption = cap_proc.batch_decode(ids, skip_special_tokens=True)[0].strip()
        assert row["caption"] == caption
        with torch.no_grad():
            pair = model(**proc(text=[caption, row["prompt"]], images=image, return_tensors="pt", padding=True))
        assert float(row["caption_similarity"]) == pytest.approx(
            float(pair.text_embeds[0] @ pair.text_embeds[1]), abs=1e-5
        )
    summary = _csv(batch_dir / "eval" / "summary.csv")
    for s in summary:  # numbers, not "nan" or empty
        assert math.isfinite(float(s["clip_full"])) and math.isfinite(float(s["caption_similarity"]))
    assert "caption_similarity" in (batch_dir / "eval" / "summary.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--captioner", "x"], "add --clip"),
        (["--clip", "/nonexistent/clip"], "'/nonexistent/clip' does not exist"),
    ],
)
def test_eval_errors(batch_dir, extra, message, capsys):
    assert main(["eval", str(batch_dir), *extra]) == 2
    assert message in capsys.readouterr().err


def test_eval_needs_a_batch_folder(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "no manifest.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_eval_names_a_record_without_its_prompt(batch_dir, tmp_path, capsys):
    out = tmp_path / "edited"
    shutil.copytree(batch_dir, out)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    del first["prompt"]
    (out / "manifest.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"key {first['key']}" in err[0] and "lacks prompt" in err[0]
