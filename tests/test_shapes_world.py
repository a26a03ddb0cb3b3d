"""The shapes world without its model: renderer, captions, tokenizer, scorer, prompt set, eval wiring.

The scorer's expected answers come from the renderer's own truth (what it drew) or are worked by hand; the scorer
never sees the truth it is checked against.
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest

from attncontrol.cli import main
from attncontrol.scores.rules import box_iou
from attncontrol.shapes import prompts, score, world
from attncontrol.shapes.score import Found


def _match(found: list[Found], scene: world.Scene) -> tuple[int, int, int]:
    """(objects drawn, objects detected in their colour and shape at IoU > 0.5 with the drawn box, extra detections)."""
    used, right = set(), 0
    for thing in scene.things:
        hits = [
            j
            for j, f in enumerate(found)
            if j not in used and f.colour == thing.colour and box_iou(f.box, thing.box) > 0.5
        ]
        if hits:
            used.add(hits[0])
            right += found[hits[0]].shape == thing.shape
    return len(scene.things), right, len(found) - len(used)


@pytest.mark.parametrize("contact", ["apart", "touching", "overlap"])
def test_scorer_finds_what_the_renderer_drew(contact):
    """At least 99% of drawn objects detected with their colour, shape and box (IoU > 0.5), including objects
    that touch and objects partly hidden (5-20% of the smaller box) by the one drawn over them; at most 1% extra."""
    rng = np.random.default_rng({"apart": 11, "touching": 12, "overlap": 13}[contact])
    drawn = right = extra = 0
    kinds = ["one", "two", "spatial", "count"] if contact == "apart" else ["two"]
    for i in range(200):
        scene = world.make_scene(rng, kinds[i % len(kinds)], contact=contact)
        n, r, e = _match(score.detect(world.draw(scene)), scene)
        drawn, right, extra = drawn + n, right + r, extra + e
    assert right >= 0.99 * drawn, (right, drawn)
    assert extra <= 0.01 * drawn, (extra, drawn)


def test_contact_scenes_touch_and_overlap_as_they_say():
    rng = np.random.default_rng(3)
    for _ in range(50):
        a, b = world.make_scene(rng, "two", contact="overlap").things
        assert 0.05 <= world.overlap_fraction(a.box, b.box) <= 0.2
        a, b = world.make_scene(rng, "two", contact="touching").things
        shared_x = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
        shared_y = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
        assert min(shared_x, shared_y) == pytest.approx(0.0, abs=1e-9) and max(shared_x, shared_y) > 0
        a, b = world.make_scene(rng, "two").things
        assert world.overlap_fraction(a.box, b.box) == 0.0


def test_spatial_scenes_hold_their_relation_by_genevals_rule():
    from attncontrol.scores.rules import geneval_relations

    rng = np.random.default_rng(4)
    for rel in world.RELATIONS:
        for _ in range(20):
            scene = world.make_scene(rng, "spatial", relation=rel)
            assert f" {world.RELATION_WORDS[rel]} " in scene.caption
            assert rel in geneval_relations(scene.things[0].box, scene.things[1].box)
            found = score.detect(world.draw(scene))
            spec = {"objects": [{"colour": t.colour, "shape": t.shape} for t in scene.things], "relation": rel}
            assert score.score(found, spec)["spatial"] == 1.0


def test_hand_made_scores():
    """score() on detections placed by hand, each answer worked out from the rules in its docstring."""
    red_circle = Found("red", "circle", (4, 20, 24, 40), 300)
    blue_square = Found("blue", "square", (40, 20, 60, 40), 400)
    red_square = Found("red", "square", (40, 20, 60, 40), 400)
    spec = {"objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}]}
    assert score.score([red_circle, blue_square], spec) == {"present": 1.0, "bound": 1.0, "found_fraction": 1.0}
    # the square is there but red: present, not bound
    assert score.score([red_circle, red_square], spec) == {"present": 1.0, "bound": 0.0, "found_fraction": 1.0}
    # only the circle: half the subjects
    assert score.score([red_circle], spec) == {"present": 0.0, "bound": 0.0, "found_fraction": 0.5}
    # relation: the circle's centre (14, 30) is left of the square's (50, 30)
    assert score.score([red_circle, blue_square], {**spec, "relation": "left of"})["spatial"] == 1.0
    assert score.score([red_circle, blue_square], {**spec, "relation": "above"})["spatial"] == 0.0
    # boxes: the circle's box exactly; the square's (40..60) against 0.5..1.0 of 64 (32..64): 400 / 640
    boxes = [[4 / 64, 20 / 64, 24 / 64, 40 / 64], [0.5, 20 / 64, 1.0, 40 / 64]]
    got = score.score([red_circle, blue_square], {**spec, "boxes": boxes})["box_iou"]
    assert got == pytest.approx((1.0 + 400 / 640) / 2)
    # a missing subject's IoU is 0
    assert score.score([red_circle], {**spec, "boxes": boxes})["box_iou"] == pytest.approx(0.5)
    # counting: two red circles and one blue one against "two red circles" and "three red circles"
    circles = [red_circle, Found("red", "circle", (40, 4, 56, 20), 200), Found("blue", "circle", (40, 40, 56, 56), 200)]
    two = {"objects": [{"colour": "red", "shape": "circle"}], "count": 2}
    assert score.score(circles, two)["count_correct"] == 1.0
    assert score.score(circles, {**two, "count": 3})["count_correct"] == 0.0


def test_shape_prototypes_match_the_ideal_shapes():
    """measures() of ideal masks drawn with numpy (no renderer): each lands on its own prototype."""
    yy, xx = np.mgrid[0:40, 0:40] + 0.5
    masks = {
        "square": np.ones((40, 40), bool),
        "circle": (xx - 20) ** 2 + (yy - 20) ** 2 <= 400,
        "triangle": np.abs(xx - 20) <= yy / 2,
    }
    none = np.zeros((40, 40), bool)
    for name, mask in masks.items():
        m = score.measures(mask, none)
        assert score.classify(m) == name
        assert m[0] == pytest.approx(score.PROTOTYPES[name][0], abs=0.03)
        assert m[1] == pytest.approx(score.PROTOTYPES[name][1], abs=0.03)


def test_colour_labels_follow_hue_and_skip_the_background():
    img = np.full((4, 4, 3), 225, np.uint8)
    img[0, 0] = world.COLOURS["red"]
    img[1, 1] = world.COLOURS["yellow"]
    img[2, 2] = world.COLOURS["green"]
    img[3, 3] = world.COLOURS["blue"]
    img[0, 3] = (215, 226, 220)  # a tinted background
    labels = score.colour_labels(img)
    names = list(world.COLOURS)
    assert [labels[i, i] for i in range(4)] == [names.index(c) for c in ("red", "yellow", "green", "blue")]
    assert labels[0, 3] == -1 and labels[0, 1] == -1


def test_training_never_shows_a_held_out_pair():
    held = world.held_out_pairs()
    assert 5 <= len(held) <= 20
    rng = np.random.default_rng(0)
    seen_single, kinds = set(), Counter()
    for _ in range(3000):
        scene = world.training_scene(rng)
        kinds[scene.kind] += 1
        objs = [(t.colour, t.shape) for t in scene.things]
        if scene.kind in ("two", "spatial"):
            assert world.pair_key(*objs) not in held, scene.caption
        if scene.kind == "one":
            seen_single.add(objs[0])
    assert seen_single == set(world.all_objects())
    for kind, share in world.TRAINING_MIX.items():
        assert kinds[kind] / 3000 == pytest.approx(share, abs=0.03)


def test_bpe_merges_make_every_world_word_one_token(tmp_path):
    from attncontrol.shapes.train import write_tokenizer

    tok = write_tokenizer(tmp_path)
    for word in world.vocabulary():
        assert tok.tokenize(word) == [word + "</w>"]
    assert tok.tokenize("a cat") == ["a</w>", "c", "a", "t</w>"]  # any other word still tokenises, byte by byte
    ids = tok("a red circle").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 5


def test_prompt_set_counts_subjects_and_layouts():
    from attncontrol.batch import prompt_set

    specs = prompts.prompt_specs()
    assert Counter(s["task"] for s in specs) == {"two": 72, "spatial": 144, "count": 24}
    held = [s for s in specs if s["metadata"].get("held_out")]
    assert 0 < len(held) < len(specs) // 2
    for s in specs:
        for subject in s["subjects"]:
            assert subject in s["prompt"].split()
        if s["task"] == "count":
            assert list(s["boxes"]) == s["subjects"] and len(s["boxes"][s["subjects"][0]]) == 1
        else:
            (a,), (b,) = s["boxes"].values()
            assert box_iou(a, b) == 0.0
            if s["task"] == "spatial":
                assert world.relation_holds(a, b, s["metadata"]["relation"])
    entries = prompt_set("shapes")
    assert len(entries) == 240 and entries[0].source == "shapes:1" and entries[0].benchmark == "shapes"
    assert len(prompt_set("shapes-two")) == 72 and len(prompt_set("shapes-count")) == 24


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _at_layout(entry, keep: int, rng) -> world.Scene:
    """The entry's objects drawn exactly in its layout boxes (the first ``keep`` of them)."""
    meta = entry.metadata
    if entry.task == "count":
        row = prompts.COUNT_LAYOUTS[meta["count"]]
        n = meta["count"]
        step = (row[2] - row[0]) * world.SIZE / n
        side = min((row[3] - row[1]) * world.SIZE, 0.8 * step)  # a gap between objects of one colour
        boxes = [(row[0] * world.SIZE + k * step + (step - side) / 2, row[1] * world.SIZE) for k in range(n)]
        boxes = [(x, y, x + side, y + side) for x, y in boxes]
        objs = [(meta["objects"][0]["colour"], meta["objects"][0]["shape"])] * n
    else:
        boxes = [tuple(v * world.SIZE for v in b) for b in meta["boxes"]]
        objs = [(o["colour"], o["shape"]) for o in meta["objects"]]
    things = [world.Thing(c, s, b) for (c, s), b in zip(objs, boxes)][:keep]
    return world.Scene(entry.prompt, entry.task, things, world.background(rng))


def test_eval_scores_a_shapes_batch_with_no_model(tmp_path):
    """A batch folder as `attncontrol batch` leaves it (records carry the set's entry, as batch writes them), its
    images drawn by the renderer in each prompt's layout: every object for method "none", all but the last one
    for "attend-excite". Expected per image, from what was drawn: present, bound, relation and count 1 with every
    object, 0 without the last; the layout IoU near 1 with every object, near 1/2 with one of two (a missing
    subject's IoU is 0)."""
    from attncontrol.batch import prompt_set

    entries = prompt_set("shapes-spatial")[:4] + prompt_set("shapes-two")[:2] + prompt_set("shapes-count")[:2]
    rng = np.random.default_rng(0)
    lines, k = [], 0
    for method in ("none", "attend-excite"):
        for e in entries:
            full = method == "none"
            n = e.metadata.get("count") or len(e.metadata["objects"])
            name = f"{k:04d}.png"
            world.draw(_at_layout(e, n if full else n - 1, rng)).save(tmp_path / name)
            lines.append(
                json.dumps(
                    {
                        "key": f"k{k}",
                        "file": name,
                        "prompt": e.prompt,
                        "method": method,
                        "seed": 0,
                        "source": e.source,
                        "boxes": None,
                        "subjects": e.subjects,
                        "benchmark": e.benchmark_record(),
                    }
                )
            )
            k += 1
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["eval", str(tmp_path), "--compare", "none", "--bootstrap", "200"]) == 0
    rows = _csv(tmp_path / "eval" / "per_image.csv")
    assert len(rows) == 16
    for row in rows:
        full = row["method"] == "none"
        if "count" in row["source"]:
            assert float(row["shapes_count"]) == float(full)
            assert float(row["shapes_present"]) == 1.0  # one circle of two is still a circle
            assert row["shapes_box_iou"] == ""
            continue
        assert float(row["shapes_present"]) == float(full)
        assert float(row["shapes_bound"]) == float(full)
        if "spatial" in row["source"]:
            assert float(row["shapes_spatial"]) == float(full)
        else:
            assert row["shapes_spatial"] == ""
        iou = float(row["shapes_box_iou"])
        assert (0.85 < iou <= 1.0) if full else (0.42 < iou <= 0.5), (row["file"], iou)
    compare = [r for r in _csv(tmp_path / "eval" / "compare.csv") if r["metric"] == "shapes_present"]
    assert compare and float(compare[0]["delta"]) == pytest.approx(-6 / 8)
    tables = (tmp_path / "eval" / "benchmarks.md").read_text()
    assert "### Shapes world" in tables and "| none | 1.000 | 1.000 |" in tables


def test_detector_inputs_and_non_square_images():
    scene = world.make_scene(np.random.default_rng(7), "one", objs=[("red", "square")])
    rgb = np.asarray(world.draw(scene))
    want = score.detect(rgb)
    assert [(f.colour, f.shape) for f in want] == [("red", "square")]
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    assert score.detect(rgba) == want  # alpha is dropped, not read as a colour
    assert score.detect(rgb / 255.0) == want  # floats in [0, 1]
    assert score.detect(rgb.mean(-1)) == []  # grey: nothing saturated
    dark = np.full((64, 64, 3), 225, np.uint8)
    dark[10:40, 10:40] = (60, 20, 20)  # a dark red-brown smudge is not a red object
    assert score.detect(dark) == []
    with pytest.raises(ValueError, match="shape"):
        score.detect(np.zeros((4, 4, 5)))
    # a 128x64 image: the layout box in [0, 1] of width and height each
    wide = np.full((64, 128, 3), 225, np.uint8)
    wide[16:48, 64:96] = world.COLOURS["blue"]
    (found,) = score.detect(wide)
    assert found.norm_box(128, 64) == (0.5, 0.25, 0.75, 0.75)
    spec = {"objects": [{"colour": "blue", "shape": "square"}], "boxes": [[0.5, 0.25, 0.75, 0.75]]}
    assert score.score([found], spec, size=(128, 64))["box_iou"] == pytest.approx(1.0)


def test_set_options_batch_limit_and_precedence(tmp_path):
    """SynGen gets each noun's colour from the set; --set replaces it; --limit takes the first N prompts."""
    from attncontrol.batch import prompt_set
    from attncontrol.batch.items import expand
    from attncontrol.cli.parser import build_parser
    from attncontrol.cli.runs import _batch_items

    entries = prompt_set("shapes-two")[:1]  # "a red circle and a green square"
    (item,) = expand(entries, [0], ["syngen"])
    assert json.loads(item.options) == {"syngen": {"bindings": {"circle": ["red"], "square": ["green"]}}}
    (item,) = expand(entries, [0], ["syngen"], options={"syngen": {"bindings": {"square": ["red"]}}})
    assert json.loads(item.options) == {"syngen": {"bindings": {"square": ["red"]}}}
    (item,) = expand(entries, [0], ["attend-excite"])
    assert json.loads(item.options) == {"attend-excite": {}}  # other methods get nothing from the set
    args = build_parser().parse_args(
        [
            "batch",
            "--prompt-set",
            "shapes-count",
            "--limit",
            "3",
            "--model",
            "shapes",
            "--methods",
            "none,refocus",
            "--out",
            str(tmp_path),
        ]
    )
    items, settings = _batch_items(args)
    assert sorted({i.source for i in items}) == ["shapes-count:1", "shapes-count:2", "shapes-count:3"]
    assert settings.model == "shapes"  # the name, not an install path: the items' keys do not move with the install
    with pytest.raises(SystemExit) as exit_:
        main(["batch", "--prompt-set", "shapes-two", "--limit", "0", "--out", str(tmp_path)])
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--no-control", "--side-by-side", "pair.png"], "drop --no-control"),
        (["--side-by-side", "out.png"], "same path as --out"),
        (["--side-by-side", "pair.jpg"], "pair.jpg"),
    ],
)
def test_side_by_side_mistakes_are_named_before_loading(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "a red circle and a blue square", "--model", "shapes", "--out", "out.png", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
