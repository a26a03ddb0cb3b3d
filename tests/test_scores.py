"""Benchmark scores (#15): the rules on hand-made boxes with answers worked out by hand, the statistics against
brute force, and the VQA / detector scores against independent computations through the models' own forward."""

import csv
import itertools
import json
import math
import warnings

import pytest
import torch
from PIL import Image

from attncontrol.cli import main
from attncontrol.scores import (
    DetectionRules,
    bootstrap_ci,
    box_iou,
    geneval_correct,
    geneval_relations,
    nms,
    paired_comparison,
    sign_flip_p,
    subject_box_iou,
    t2i_spatial_position,
    t2i_spatial_score,
)
from attncontrol.scores.models import binding_score, vqa_question
from attncontrol.testing import save_tiny_blip_vqa, save_tiny_clip, save_tiny_owlv2

# ---------------------------------------------------------------- rules, by hand


def test_box_iou_and_nms():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)  # overlap 1, union 4 + 4 - 1
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    dets = [(0.5, (0, 0, 10, 10)), (0.9, (0, 0, 10, 11)), (0.7, (20, 20, 30, 30))]
    assert nms(dets, 0.5) == [(0.9, (0, 0, 10, 11)), (0.7, (20, 20, 30, 30))]  # IoU 100/110 > 0.5: dropped


@pytest.mark.parametrize(
    "box_a,box_b,expected",
    [
        # centres 30 apart in x; shrunk by 0.1 * (10 + 10) = 2 -> -28 / 30 = -0.93 < -0.5
        ((0, 0, 10, 10), (30, 0, 40, 10), {"left of"}),
        ((30, 0, 40, 10), (0, 0, 10, 10), {"right of"}),
        # 5 apart: shrunk to 3, 3 / 5 = 0.6 > 0.5
        ((0, 0, 10, 10), (5, 0, 15, 10), {"left of"}),
        # 1 apart: the shrink (2) swallows it: no relation
        ((0, 0, 10, 10), (1, 0, 11, 10), set()),
        # diagonal (-10, -10), each shrunk by 0.4 -> -9.6 / 14.14 = -0.68 on both axes
        ((0, 0, 2, 2), (10, 10, 12, 12), {"left of", "above"}),
        ((0, 40, 10, 50), (0, 0, 10, 10), {"below"}),
    ],
)
def test_geneval_relations(box_a, box_b, expected):
    assert geneval_relations(box_a, box_b) == expected


def test_t2i_spatial_position_and_score():
    left, right = (0, 0, 10, 10), (30, 0, 40, 10)
    assert t2i_spatial_position("on the left of", left, right) == 1.0  # dx = 30 > 0, no overlap
    assert t2i_spatial_position("on the right of", left, right) == 0.0
    # overlapping: dx = 5; IoU = 50 / 150 = 1/3 >= 0.1 -> 0.1 / (1/3)
    assert t2i_spatial_position("on the left of", (0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(0.3)
    assert t2i_spatial_position("on the top of", (0, 0, 10, 10), (0, 30, 10, 40)) == 1.0  # dy = 30 > 0
    assert t2i_spatial_position("near", (0, 0, 10, 10), (300, 300, 310, 310)) == pytest.approx(0.5)  # 150 / 300
    assert t2i_spatial_position("next to", (0, 0, 10, 10), (100, 300, 110, 310)) == 1.0  # |dx| = 100 < 150
    # 0.25 * 0.8 + 0.25 * 0.6 + 1 / 2
    assert t2i_spatial_score("on the left of", (0.8, left), (0.6, right)) == pytest.approx(0.85)
    assert t2i_spatial_score("on the left of", (0.8, left), None) == 0.0  # 0.2 < 0.5
    assert t2i_spatial_score("on the right of", (0.8, left), (0.6, right)) == 0.0  # 0.35 < 0.5
    # scale: the 150-pixel threshold is in the resized image; 300 apart at scale 0.25 is 75 -> 1
    assert t2i_spatial_score("near", (1.0, (0, 0, 1, 1)), (1.0, (300, 300, 301, 301)), scale=0.25) == 1.0


COUNTING = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
POSITION = {
    "tag": "position",
    "include": [{"class": "couch", "count": 1}, {"class": "bird", "count": 1, "position": ["left of", 0]}],
}
COLOURS = {
    "tag": "color_attr",
    "include": [
        {"class": "wine glass", "count": 1, "color": "purple"},
        {"class": "apple", "count": 1, "color": "black"},
    ],
}


def test_geneval_rule_on_hand_made_detections():
    box = (0, 0, 10, 10)
    assert geneval_correct(COUNTING, {"clock": [(0.95, box), (0.92, box), (0.5, box)]})[0] is True
    ok, reason = geneval_correct(COUNTING, {"clock": [(0.95, box), (0.93, box), (0.91, box)]})
    assert ok is False and "clock<3, found 3" in reason  # three above 0.9: the exclude clause fires
    assert geneval_correct(COUNTING, {"clock": [(0.95, box), (0.8, box)]})[0] is False  # one above 0.9
    couch, bird_left, bird_right = (50, 0, 90, 40), (0, 0, 20, 20), (95, 0, 115, 20)
    assert geneval_correct(POSITION, {"couch": [(0.5, couch)], "bird": [(0.4, bird_left)]})[0] is True
    ok, reason = geneval_correct(POSITION, {"couch": [(0.5, couch)], "bird": [(0.4, bird_right)]})
    assert ok is False and "bird left of" in reason
    ok, reason = geneval_correct(POSITION, {"couch": [(0.2, couch)], "bird": [(0.4, bird_left)]})  # 0.2 < 0.3
    assert ok is False and "no target" in reason
    dets = {"wine glass": [(0.5, box)], "apple": [(0.6, box)]}
    colours = {"wine glass": "purple", "apple": "black"}
    assert geneval_correct(COLOURS, dets, colour_of=lambda b, cls: colours[cls])[0] is True
    assert geneval_correct(COLOURS, dets, colour_of=lambda b, cls: "purple")[0] is False
    assert geneval_correct(COLOURS, dets)[0] is None  # a colour needs CLIP
    strict = DetectionRules(threshold=0.55)
    assert geneval_correct(COLOURS, dets, strict, colour_of=lambda b, cls: colours[cls])[0] is False


def test_subject_box_iou():
    dets = {"cat": [(0.9, (0, 0, 50, 50))], "dog": [(0.9, (25, 25, 75, 75))]}
    layout = {"cat": [[0, 0, 0.5, 0.5]], "dog": [[0, 0, 0.5, 0.5]], "bird": [[0, 0, 1, 1]]}
    iou = subject_box_iou(layout, dets, 100, 100)
    # dog: overlap 25 x 25 = 625, union 2500 + 2500 - 625 = 4375
    assert iou == {"cat": pytest.approx(1.0), "dog": pytest.approx(625 / 4375), "bird": 0.0}


# ---------------------------------------------------------------- statistics, against brute force


def test_sign_flip_p_is_the_exact_permutation_share():
    diffs = [0.3, -0.1, 0.25, 0.4, 0.05, -0.2, 0.15, 0.3]
    observed = abs(sum(diffs) / len(diffs))
    flips = [
        abs(sum(s * d for s, d in zip(signs, diffs)) / len(diffs))
        for signs in itertools.product((1, -1), repeat=len(diffs))
    ]
    assert sign_flip_p(diffs) == pytest.approx(sum(f >= observed - 1e-12 for f in flips) / len(flips))
    assert sign_flip_p([0.0] * 5) == 1.0
    assert sign_flip_p([1.0] * 6) == pytest.approx(2 / 64)  # only all-plus and all-minus reach the mean
    # n > 16 draws assignments; with 20 equal differences only 2 of 2^20 reach it: p ~ 1 / 20001
    assert sign_flip_p([1.0] * 20) < 1e-3


def test_bootstrap_interval_of_a_mean():
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, reps=4000)
    # the mean's standard error is 0.5 / sqrt(100) = 0.05: a 95% interval is about 0.5 +- 0.098
    assert 0.38 < lo < 0.44 and 0.56 < hi < 0.62
    cmp = paired_comparison([(1.0, 0.0), (0.5, 0.25), (0.75, 0.5)])
    assert cmp["n"] == 3 and cmp["delta"] == pytest.approx((1.0 + 0.25 + 0.25) / 3)
    assert cmp["p"] == pytest.approx(2 / 8) and cmp["ci_low"] <= cmp["delta"] <= cmp["ci_high"]


# ---------------------------------------------------------------- models, against their own forward


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoremodels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "vqa": save_tiny_blip_vqa(root / "vqa"),
            "det": save_tiny_owlv2(root / "owl"),
            "clip": save_tiny_clip(root / "clip"),
        }


COLOURS_RGB = [(200, 30, 30), (30, 30, 200), (30, 160, 60), (128, 128, 128), (240, 220, 40), (20, 20, 20)]


def _image(k: int) -> Image.Image:
    """A 64 px square: a colour with a lighter square whose place depends on k."""
    im = Image.new("RGB", (64, 64), COLOURS_RGB[k % len(COLOURS_RGB)])
    x = 8 * (k % 5)
    im.paste((250, 250, 250), (x, 40 - x, x + 20, 60 - x))
    return im


def test_question_cleanup_and_product():
    assert vqa_question("A green bench.") == "a green bench?"
    assert vqa_question('the "big" (red) car') == "the big red car?"
    assert binding_score([0.81234, 0.5]) == pytest.approx(0.4062)  # 0.8123 * 0.5 = 0.40615 -> 0.4062 (4 places)
    assert binding_score([]) == 1.0


def _vqa_reference(folder, image, phrases):
    """P(yes) / (P(yes) + P(no)) of the first answer token as transformers' own generate() scores it, one question
    at a time (no padding), then T2I-CompBench's product."""
    from transformers import BlipForQuestionAnswering, BlipProcessor

    model, proc = BlipForQuestionAnswering.from_pretrained(folder).eval(), BlipProcessor.from_pretrained(folder)
    yes, no = proc.tokenizer.convert_tokens_to_ids(["yes", "no"])
    probs = []
    for phrase in phrases:
        inputs = proc(images=image, text=phrase.lower() + "?", return_tensors="pt")
        out = model.generate(
            **inputs, max_new_tokens=1, output_scores=True, return_dict_in_generate=True, do_sample=False
        )
        p = out.scores[0][0].float().softmax(-1)
        probs.append(float(p[yes] / (p[yes] + p[no])))
    product = 1.0
    for p in probs:
        product *= round(p, 4)
    return round(product, 4), probs


def test_vqa_score_equals_blip_generate(eval_models):
    from attncontrol.scores.models import VqaScorer

    scorer = VqaScorer(str(eval_models["vqa"]))
    scores = []
    for k, phrases in enumerate([["a green bench", "a red car"], ["an oblong cucumber", "a teardrop plum", "cheese"]]):
        got, probs = scorer.score(_image(k), phrases)
        want, want_probs = _vqa_reference(eval_models["vqa"], _image(k), phrases)
        assert probs == pytest.approx(want_probs, abs=1e-5) and got == pytest.approx(want, abs=1e-4)
        scores.append(probs)
    assert scores[0][0] != scores[1][0]  # the image and the question matter


def _owl_reference(folder, image, names, threshold):
    """Detections from Owlv2ForObjectDetection's raw outputs, decoded here: per box query the best name by logit,
    its sigmoid score, the (cx, cy, w, h) box scaled to the padded square side and clipped to the image."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    model, proc = Owlv2ForObjectDetection.from_pretrained(folder).eval(), Owlv2Processor.from_pretrained(folder)
    inputs = proc(text=[[f"a photo of a {n}" for n in names]], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    side = max(image.size)
    found = {n: [] for n in names}
    for logits, (cx, cy, w, h) in zip(out.logits[0], out.pred_boxes[0].tolist()):
        best = int(torch.argmax(logits))
        score = float(torch.sigmoid(logits[best]))
        if score > threshold:
            box = [(cx - w / 2) * side, (cy - h / 2) * side, (cx + w / 2) * side, (cy + h / 2) * side]
            box = [min(max(v, 0.0), lim) for v, lim in zip(box, (image.width, image.height) * 2)]
            found[names[best]].append((score, box))
    return {n: sorted(d, key=lambda x: -x[0]) for n, d in found.items()}


@pytest.mark.slow
def test_detector_equals_owlv2_forward(eval_models):
    from attncontrol.scores.models import Detector

    det = Detector(str(eval_models["det"]))
    total = 0
    for k in range(4):
        got = det.detect(_image(k), ["cat", "dog", "clock"], 0.3)
        want = _owl_reference(eval_models["det"], _image(k), ["cat", "dog", "clock"], 0.3)
        assert got.keys() == want.keys()
        for name in want:
            assert [s for s, _ in got[name]] == pytest.approx([s for s, _ in want[name]], abs=1e-6)
            for (_, a), (_, b) in zip(got[name], want[name]):
                assert a == pytest.approx(b, abs=1e-3)
            total += len(want[name])
    assert total > 0


def test_detector_refuses_another_model(eval_models, capsys):
    from attncontrol.errors import ModelLoadError
    from attncontrol.scores.models import Detector

    with pytest.raises(ModelLoadError, match="'clip' model; --detector takes an OWLv2 or OWL-ViT"):
        Detector(str(eval_models["clip"]))


# ---------------------------------------------------------------- eval end to end on a hand-made batch folder

SOURCES = [  # (source, prompt, subjects, boxes)
    ("geneval:401", "a photo of a bird left of a couch", ["couch", "bird"], None),
    ("geneval:180", "a photo of two clocks", ["clocks"], None),
    ("geneval:454", "a photo of a purple wine glass and a black apple", ["wine glass", "apple"], None),
    ("t2i-compbench-color:1", "a green bench and a blue bowl", ["bench", "bowl"], None),
    ("t2i-compbench-spatial:1", "a giraffe next to a lamp", ["giraffe", "lamp"], None),
    (
        "t2i-compbench-non-spatial:1",
        "A person is looking at a rainbow and marveling at its beauty.",
        ["person", "rainbow", "beauty"],
        None,
    ),
    ("mine.txt:1", "a cat and a dog", ["cat", "dog"], {"cat": [[0.0, 0.0, 0.5, 0.5]], "dog": [[0.5, 0.5, 1.0, 1.0]]}),
]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """A batch folder as `attncontrol batch` leaves it (PNGs and manifest records), with hand-made images."""
    out = tmp_path_factory.mktemp("benchbatch")
    lines, k = [], 0
    for method in ("none", "attend-excite"):
        for seed in (0, 1):
            for source, prompt, subjects, boxes in SOURCES:
                name = f"{k:04d}.png"
                _image(k).save(out / name)
                lines.append(
                    json.dumps(
                        {
                            "key": f"k{k}",
                            "file": name,
                            "prompt": prompt,
                            "method": method,
                            "seed": seed,
                            "source": source,
                            "boxes": boxes,
                            "subjects": subjects if method != "none" else None,
                            "attention": {
                                "subjects": subjects,
                                "min_subject_attention": 0.1 * k,
                                "subject_overlap": 0.5,
                            },
                        }
                    )
                )
                k += 1
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _num(text):
    return float(text) if text not in ("", None) else None


@pytest.mark.slow
def test_eval_benchmark_scores_end_to_end(bench_dir, eval_models, capsys):
    from attncontrol.batch.inputs import benchmark_entry
    from attncontrol.eval import ClipScorer
    from attncontrol.scores.images import GENEVAL_COLOUR_TEMPLATES, GENEVAL_COLOURS

    args = [
        "eval",
        str(bench_dir),
        "--vqa",
        str(eval_models["vqa"]),
        "--detector",
        str(eval_models["det"]),
        "--clip",
        str(eval_models["clip"]),
        "--compare",
        "none",
        "--bootstrap",
        "500",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = _csv(bench_dir / "eval" / "per_image.csv")
    assert len(rows) == 2 * 2 * len(SOURCES)
    clip = ClipScorer(str(eval_models["clip"]))
    checked = {"vqa": 0, "geneval": 0, "spatial": 0, "box": 0}
    for r in rows:
        k = int(r["file"][:4])
        image = _image(k)
        entry = benchmark_entry(r["source"])
        if r["source"].startswith("t2i-compbench-color"):
            want, _ = _vqa_reference(eval_models["vqa"], image, entry.metadata["phrases"])
            assert _num(r["vqa_binding"]) == pytest.approx(want, abs=1e-4)
            checked["vqa"] += 1
        dets = _owl_reference(eval_models["det"], image, _queries(r, entry), 0.3)
        dets = {n: nms(d, 0.5) for n, d in dets.items()}
        above = {n: [d for d in v if d[0] > 0.3] for n, v in dets.items()}
        if r["source"].startswith("geneval"):

            def colour_of(box, cls, image=image):
                feats = clip.images([image.crop(tuple(int(round(v)) for v in box))])[0]
                sims = []
                for c in GENEVAL_COLOURS:
                    e = clip._texts([t.format(c=c, cls=cls) for t in GENEVAL_COLOUR_TEMPLATES]).mean(0)
                    sims.append(float(torch.nn.functional.normalize(e, dim=-1) @ feats))
                return GENEVAL_COLOURS[sims.index(max(sims))]

            ok, _ = geneval_correct(entry.metadata, dets, DetectionRules(), colour_of)
            assert _num(r["geneval_correct"]) == float(ok)
            checked["geneval"] += 1
        if r["source"].startswith("t2i-compbench-spatial"):
            top = [above[n][0] if above[n] else None for n in ("giraffe", "lamp")]
            assert _num(r["t2i_spatial"]) == pytest.approx(t2i_spatial_score("next to", *top, scale=479 / 64))
            checked["spatial"] += 1
        if r["source"] == "mine.txt:1":
            want = subject_box_iou(SOURCES[-1][3], above, 64, 64)
            assert _num(r["box_iou"]) == pytest.approx(sum(want.values()) / 2, abs=1e-6)
            assert _num(r["objects_found"]) == sum(1 for n in ("cat", "dog") if above[n]) / 2
            checked["box"] += 1
        # T2I-CompBench's non-spatial CLIPScore: the plain cosine of normalised embeddings
        assert _num(r["clip_score"]) == pytest.approx(
            float(clip.images([image])[0] @ clip.text(r["prompt"], False)), abs=1e-5
        )
    assert checked == {"vqa": 4, "geneval": 12, "spatial": 4, "box": 4}
    # the per-task tables are the means of the rows, in the benchmarks' layouts
    bench = (bench_dir / "eval" / "benchmarks.md").read_text()
    for method in ("none", "attend-excite"):
        mine = [r for r in rows if r["method"] == method]
        color = [_num(r["vqa_binding"]) for r in mine if r["task"] == "t2i-compbench:color"]
        spatial = [_num(r["t2i_spatial"]) for r in mine if r["task"] == "t2i-compbench:spatial"]
        nonsp = [_num(r["clip_score"]) for r in mine if r["task"] == "t2i-compbench:non_spatial"]
        row = f"| {method} | {sum(color) / 2:.4f} | {sum(spatial) / 2:.4f} | {sum(nonsp) / 2:.4f} |"
        assert row in bench
        tasks = ["geneval:counting", "geneval:position", "geneval:color_attr"]  # GenEval's column order
        cells = [sum(_num(r["geneval_correct"]) for r in mine if r["task"] == t) / 2 for t in tasks]
        assert f"| {method} |  | " + " | ".join(f"{c:.2f}" for c in cells) + " |" in bench
    assert "| method | color | spatial | non-spatial |" in bench and "### GenEval" in printed
    # --compare none: the gain is the mean paired difference over (prompt, seed)
    comp = {(c["method"], c["metric"]): c for c in _csv(bench_dir / "eval" / "compare.csv")}
    base = {(r["prompt"], r["seed"]): r for r in rows if r["method"] == "none"}
    ae = [r for r in rows if r["method"] == "attend-excite"]
    diffs = [_num(r["clip_score"]) - _num(base[(r["prompt"], r["seed"])]["clip_score"]) for r in ae]
    c = comp[("attend-excite", "clip_score")]
    assert int(c["n"]) == len(diffs) == 14 and _num(c["delta"]) == pytest.approx(sum(diffs) / 14, abs=1e-9)
    assert _num(c["p"]) == pytest.approx(sign_flip_p(diffs)) and _num(c["ci_low"]) <= _num(c["delta"])
    att = comp[("attend-excite", "min_subject_attention")]  # the hand-made metric grows by 0.1 * 14 per pair
    assert _num(att["delta"]) == pytest.approx(1.4) and _num(att["p"]) < 1e-3
    summary = _csv(bench_dir / "eval" / "summary.csv")
    for s in summary:
        values = [_num(r["vqa_binding"]) for r in rows if r["method"] == s["method"] and r["vqa_binding"]]
        assert _num(s["vqa_binding"]) == pytest.approx(sum(values) / len(values))
        assert _num(s["vqa_binding_ci_low"]) <= _num(s["vqa_binding"]) <= _num(s["vqa_binding_ci_high"])
        assert not math.isnan(_num(s["vqa_binding_std"]))


def _queries(row, entry):
    if entry is not None and "include" in entry.metadata:
        return [c["class"] for c in entry.metadata["include"] + entry.metadata.get("exclude", [])]
    if entry is not None and "relation" in entry.metadata:
        return [entry.metadata["obj1"], entry.metadata["obj2"]]
    return [s for s in row["subjects"].split(";") if s]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--compare", "dalle"], "--compare dalle: no image of method 'dalle' here (methods: none, attend-excite)"),
        (["--detection-threshold", "1.5"], "--detection-threshold must be in [0, 1), got 1.5"),
        (["--bootstrap", "10"], "--bootstrap must be >= 100 resamples, got 10"),
        (["--vqa", "/nowhere/vqa"], "the VQA model folder '/nowhere/vqa' does not exist"),
    ],
)
def test_eval_benchmark_errors(bench_dir, extra, message, capsys):
    assert main(["eval", str(bench_dir), *extra]) == 2
    assert message in capsys.readouterr().err


class FixedDetector:
    """A stand-in detector that returns given boxes: the wiring of eval's detector scores on known answers."""

    def __init__(self, boxes):
        self.boxes, self.asked = boxes, []

    def detect(self, image, names, threshold):
        self.asked.append(list(names))
        return {n: [d for d in self.boxes.get(n, []) if d[0] > threshold] for n in names}


def test_detector_scores_wiring_on_known_boxes():
    from attncontrol.scores.images import score_image

    image = Image.new("RGB", (100, 100))
    # GenEval line 401 "a photo of a bird left of a couch": bird left of couch, plus a duplicate couch box (NMS)
    det = FixedDetector({"couch": [(0.8, (50, 0, 90, 40)), (0.7, (51, 0, 90, 40))], "bird": [(0.5, (0, 0, 20, 20))]})
    row = {"prompt": "a photo of a bird left of a couch", "source": "geneval:401", "subjects": "couch;bird"}
    score_image(row, {}, image, {"detector": det}, DetectionRules())
    assert det.asked == [["couch", "bird"]] and row["geneval_correct"] == 1.0 and row["objects_found"] == 1.0
    det.boxes["bird"] = [(0.5, (95, 0, 100, 20))]  # now right of the couch
    score_image(row, {}, image, {"detector": det}, DetectionRules())
    assert row["geneval_correct"] == 0.0 and "bird left of" in row["geneval_reason"]
    # GenEval counting "a photo of two clocks": two above 0.9 and a third at 0.5 pass; NMS keeps apart boxes
    det = FixedDetector({"clock": [(0.95, (0, 0, 10, 10)), (0.92, (50, 50, 60, 60)), (0.5, (80, 80, 90, 90))]})
    row = {"prompt": "a photo of two clocks", "source": "geneval:180", "subjects": "clocks"}
    score_image(row, {}, image, {"detector": det}, DetectionRules())
    assert row["geneval_correct"] == 1.0
    # T2I-CompBench spatial line 1 "a giraffe next to a lamp": 0.25 * (0.6 + 0.8) + 1 / 2 (centres 10 px apart)
    det = FixedDetector({"giraffe": [(0.6, (0, 0, 20, 20))], "lamp": [(0.8, (10, 0, 30, 20))]})
    row = {"prompt": "a giraffe next to a lamp", "source": "t2i-compbench-spatial:1", "subjects": ""}
    score_image(row, {}, image, {"detector": det}, DetectionRules())
    assert row["t2i_spatial"] == pytest.approx(0.85)
    # a user's layout: the cat's box is found exactly, the dog's not at all (its detection is under 0.3)
    det = FixedDetector({"cat": [(0.9, (0, 0, 50, 50))], "dog": [(0.2, (50, 50, 100, 100))]})
    row = {"prompt": "a cat and a dog", "source": "mine.txt:1", "subjects": "cat;dog#1"}
    record = {"boxes": {"cat": [[0, 0, 0.5, 0.5]], "dog": [[0.5, 0.5, 1, 1]]}}
    score_image(row, record, image, {"detector": det}, DetectionRules())
    assert row["box_iou"] == pytest.approx(0.5) and row["objects_found"] == 0.5 and det.asked == [["cat", "dog"]]
    # a box keyed by an occurrence ("cat#2" in "a cat and a cat") is the cat's detections
    row = {"prompt": "a cat and a cat", "source": "mine.txt:2", "subjects": "cat#1;cat#2"}
    record = {"boxes": {"cat#1": [[0, 0, 0.5, 0.5]], "cat#2": [[0.5, 0.5, 1, 1]]}}
    det.asked.clear()
    score_image(row, record, image, {"detector": det}, DetectionRules())
    assert det.asked == [["cat"]] and row["box_iou"] == pytest.approx(0.5)  # the one cat box fits #1 exactly


# ---------------------------------------------------------------- HRS-Bench and DrawBench CSVs

L, R, TOP, BOTTOM = (0, 40, 10, 50), (40, 40, 50, 50), (20, 0, 30, 10), (20, 80, 30, 90)
MID = (20, 40, 30, 50)


@pytest.mark.parametrize(
    "objects,rel1,rel2,boxes,expected",
    [
        (["dog", "cat"], "on the left of", "", {"dog": L, "cat": R}, True),  # xmin 0 < 40
        (["dog", "cat"], "on the right of", "", {"dog": L, "cat": R}, False),  # xmax 10 > 50 fails
        (["dog", "cat"], "above", "", {"dog": TOP, "cat": BOTTOM}, True),  # ymin 0 < 80
        (["dog", "cat"], "under", "", {"dog": TOP, "cat": BOTTOM}, False),  # ymax 10 > 90 or ymin 0 > 80: no
        (["dog", "cat"], "on", "", {"dog": TOP, "cat": MID}, True),  # "on" is HRS's above
        (["dog", "cat"], "on the left of", "", {"dog": L}, False),  # the cat is not found
        # the dog is right of L and left of R
        (["dog", "cat", "car"], "in the middle of", "", {"dog": MID, "cat": L, "car": R}, True),
        (["dog", "cat", "car"], "between", "", {"dog": L, "cat": MID, "car": R}, False),
        (["dog", "cat", "car"], "on the left of", "above", {"dog": L, "cat": R, "car": BOTTOM}, True),
        (["dog", "cat", "car"], "on the left of", "below", {"dog": L, "cat": R, "car": BOTTOM}, False),
        # hard: both of the first two between the others
        (
            ["dog", "cat", "car", "horse"],
            "among",
            "",
            {"dog": MID, "cat": (22, 42, 28, 48), "car": L, "horse": R},
            True,
        ),
        # hard with two relations (our reading): dog and cat left of the car and above the horse
        (
            ["dog", "cat", "car", "horse"],
            "on the left of",
            "above",
            {"dog": (0, 0, 5, 5), "cat": (5, 0, 10, 5), "car": R, "horse": BOTTOM},
            True,
        ),
        (
            ["dog", "cat", "car", "horse"],
            "on the left of",
            "above",
            {"dog": (0, 0, 5, 5), "cat": (45, 0, 60, 5), "car": R, "horse": BOTTOM},
            False,
        ),
        (["dog", "cat"], "inside", "", {"dog": L, "cat": R}, None),  # not a relation HRS-Bench names
    ],
)
def test_hrs_rule_on_hand_made_boxes(objects, rel1, rel2, boxes, expected):
    from attncontrol.scores import hrs_spatial_correct

    dets = {n: [(0.9, b)] for n, b in boxes.items()}
    assert hrs_spatial_correct(objects, rel1, rel2, dets) is expected


def test_hrs_takes_the_last_detection_of_a_class():
    from attncontrol.scores import hrs_spatial_correct

    # best first: the dog's best box is right of the cat, its last (weaker) one left of it; HRS uses the last
    dets = {"dog": [(0.9, R), (0.6, L)], "cat": [(0.9, MID)]}
    assert hrs_spatial_correct(["dog", "cat"], "on the left of", "", dets) is True


HRS_CSV = """meta_prompt,obj1,obj2,obj3,obj4,rel1,rel2,synthetic_prompt
a dog on the left of a cat.,dog,cat,,,on the left of,,
a car in the middle of banana and airplane.,car,banana,airplane,,in the middle of,,
a person and horse on a chair and under a airplane.,person,horse,chair,airplane,on,under,
"""
DRAWBENCH_CSV = """Prompts,Category
A red colored car.,Colors
A black apple and a green backpack.,Colors
"""


def test_hrs_and_drawbench_csv(tmp_path):
    from attncontrol.batch import read_entries

    (tmp_path / "hrs.csv").write_text(HRS_CSV)
    easy, medium, hard = read_entries(tmp_path / "hrs.csv")
    assert (easy.prompt, easy.subjects, easy.task, easy.source) == (
        "a dog on the left of a cat.",
        ["dog", "cat"],
        "easy",
        "hrs.csv:2",
    )
    assert medium.task == "medium" and medium.metadata["rel1"] == "in the middle of"
    assert hard.subjects == ["person", "horse", "chair", "airplane"] and hard.metadata["rel2"] == "under"
    assert hard.benchmark_record() == {
        "benchmark": "hrs",
        "task": "hard",
        "metadata": {"objects": ["person", "horse", "chair", "airplane"], "rel1": "on", "rel2": "under"},
    }
    (tmp_path / "db.csv").write_text(DRAWBENCH_CSV)
    car, apple = read_entries(tmp_path / "db.csv")
    assert (car.subjects, car.task, car.benchmark) == (["car"], "Colors", "drawbench")
    assert apple.subjects == ["apple", "backpack"]
    (tmp_path / "bad.csv").write_text("meta_prompt,obj1,obj2\na dog.,dog,\n")
    from attncontrol.batch import BatchInputError

    with pytest.raises(BatchInputError, match=r"bad.csv:2: an HRS-Bench row needs a meta_prompt and 2 to 4 objects"):
        read_entries(tmp_path / "bad.csv")


@pytest.mark.slow
def test_hrs_batch_records_its_benchmark_and_eval_scores_it(tiny_dirs, eval_models, tmp_path, capsys):
    """A real tiny batch on HRS-Bench rows: the manifest keeps each row's benchmark entry; eval's hrs_spatial equals
    HRS's rule on the detector's raw outputs decoded by hand; the HRS table is the rows' mean in percent."""
    from attncontrol.scores import hrs_spatial_correct

    (tmp_path / "hrs.csv").write_text(HRS_CSV)
    out = tmp_path / "out"
    args = [
        "batch",
        str(tmp_path / "hrs.csv"),
        "--out",
        str(out),
        "--seeds",
        "0-1",
        "--methods",
        "none",
        "--model",
        str(tiny_dirs["sd1"]),
        "--steps",
        "2",
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 6 and {r["benchmark"]["task"] for r in records} == {"easy", "medium", "hard"}
    assert main(["eval", str(out), "--detector", str(eval_models["det"]), "--detection-threshold", "0.45"]) == 0
    capsys.readouterr()
    rows = {r["file"]: r for r in _csv(out / "eval" / "per_image.csv")}
    by_level: dict = {}
    for rec in records:
        meta = rec["benchmark"]["metadata"]
        with Image.open(out / rec["file"]) as im:
            dets = _owl_reference(eval_models["det"], im.convert("RGB"), meta["objects"], 0.45)
        dets = {n: nms(d, 0.5) for n, d in dets.items()}
        want = hrs_spatial_correct(meta["objects"], meta["rel1"], meta["rel2"], dets)
        assert _num(rows[rec["file"]]["hrs_spatial"]) == float(want)
        by_level.setdefault(rec["benchmark"]["task"], []).append(float(want))
    means = [100 * sum(v) / len(v) for v in (by_level["easy"], by_level["medium"], by_level["hard"])]
    line = "| none | " + " | ".join(f"{m:.2f}" for m in means) + f" | {sum(means) / 3:.2f} |"
    assert line in (out / "eval" / "benchmarks.md").read_text()


def test_export_to_the_benchmarks_layouts(bench_dir, tmp_path, capsys):
    from importlib import resources

    dest = tmp_path / "export"
    assert main(["export", str(bench_dir), "--to", str(dest)]) == 0
    assert "wrote 12 GenEval and 12 T2I-CompBench images" in capsys.readouterr().out
    records = [json.loads(line) for line in (bench_dir / "manifest.jsonl").read_text().splitlines()]
    upstream = resources.files("attncontrol").joinpath("data/geneval_metadata.jsonl").read_text().splitlines()
    for method in ("none", "attend-excite"):
        folder = dest / method / "geneval" / "00400"  # line 401 of GenEval's metadata file
        assert (folder / "metadata.jsonl").read_text() == upstream[400] + "\n"
        mine = sorted(
            (r for r in records if r["method"] == method and r["source"] == "geneval:401"), key=lambda r: r["seed"]
        )
        for k, rec in enumerate(mine):
            assert (folder / "samples" / f"{k:05d}.png").read_bytes() == (bench_dir / rec["file"]).read_bytes()
        color = dest / method / "t2i-compbench" / "color" / "samples"
        names = sorted(p.name for p in color.iterdir())
        assert names == [f"a green bench and a blue bowl_00000{k}.png" for k in (0, 1)]
    assert not list(dest.rglob("*.tmp")) and sum(1 for _ in dest.rglob("*.png")) == 24  # mine.txt is no benchmark
    assert main(["export", str(bench_dir), "--to", str(bench_dir / "x")]) == 2
    assert "is inside the batch folder" in capsys.readouterr().err
    assert main(["export", str(bench_dir), "--to", str(dest), "--methods", "astar"]) == 2
    assert "no image of method(s) ['astar']" in capsys.readouterr().err
