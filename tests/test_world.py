import json
import random

import numpy as np
import pytest

from spdinv.masks import rle_decode, rle_encode
from spdinv.errors import SpdinvError
from spdinv.world.captions import Phrasing, caption, vocabulary
from spdinv.world.edits import CATEGORIES, category_counts, make_edit
from spdinv.world.render import render_array
from spdinv.world.scene import SHAPES, Scene, WorldObject, random_scene
from spdinv.world.tokenizer import build_tokenizer


def test_render_is_deterministic_and_antialiased():
    scene = random_scene(random.Random(3))
    a, b = render_array(scene), render_array(scene)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    circle = render_array(Scene((WorldObject("circle", "red", "centre"),), "white"))
    assert len(np.unique(circle.reshape(-1, 3), axis=0)) > 2  # edge pixels blend


def test_every_shape_renders_differently():
    images = [render_array(Scene((WorldObject(s, "blue", "centre"),), "white")) for s in SHAPES]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i].astype(int) - images[j].astype(int)).sum() > 1000


def test_scene_validation():
    with pytest.raises(ValueError, match="unknown shape"):
        WorldObject("blob", "red", "left")
    with pytest.raises(ValueError, match="invisible"):
        Scene((WorldObject("circle", "blue", "left"),), "blue")
    with pytest.raises(ValueError, match="share a position"):
        Scene((WorldObject("circle", "red", "left"), WorldObject("star", "red", "left")))


def test_captions_vary_and_use_one_token_per_word():
    scene = Scene((WorldObject("star", "red", "left", "large", "striped"),), "blue", "grid")
    phrasings = {caption(scene, Phrasing.random(random.Random(i))) for i in range(40)}
    assert len(phrasings) > 10
    assert caption(scene) == "a large red striped star on the left on a blue grid background"
    tokenizer = build_tokenizer()
    for text in phrasings:
        words = text.split()
        assert set(words) - {","} <= set(vocabulary())
        assert len(tokenizer(text, add_special_tokens=False).input_ids) == len(words)


@pytest.mark.parametrize("type_id", list(CATEGORIES))
def test_edit_pairs_have_ground_truth(type_id):
    pair = make_edit(random.Random(int(type_id)), type_id)
    source, target = pair.images()
    mask = pair.mask()
    changed = np.abs(source.astype(int) - target.astype(int)).max(axis=2) > 8
    assert changed.any() and mask[changed].all()  # the mask covers every changed pixel
    assert pair.source_prompt != pair.target_prompt and "[" in pair.editing_prompt or type_id in "37"
    for side, word in zip((pair.source_prompt, pair.target_prompt), pair.blended_word.split()):
        assert word in side.split()


def test_category_mix_follows_pie_bench():
    counts = category_counts(700)
    assert counts == {"0": 140, "1": 80, "2": 80, "3": 80, "4": 40, "5": 40, "6": 40, "7": 40, "8": 80, "9": 80}
    assert sum(category_counts(37).values()) == 37


def test_rle_round_trip_and_official_border():
    mask = np.zeros((6, 5), dtype=np.uint8)
    mask[2:4, 1:3] = 1
    mask[5, 4] = 1
    rle = rle_encode(mask)
    assert rle == [11, 2, 16, 2, 29, 1]
    assert np.array_equal(rle_decode(rle, (6, 5), official_border=False), mask)
    bordered = rle_decode(rle, (6, 5))
    assert bordered[0].all() and bordered[:, 0].all() and bordered[-1].all() and bordered[:, -1].all()
    for bad in ([1, 2, 3], "x", [-1, 2]):
        with pytest.raises(SpdinvError, match="malformed mask"):
            rle_decode(bad, (6, 5))
    # a run past the frame is not malformed: PIE-Bench's decoder clips it there (issue 18), and so do we
    assert rle_decode([0, 100], (6, 5), official_border=False).all()


def test_world_export_cli_writes_pie_bench_format(tmp_path, capsys):
    from spdinv.cli import main

    assert main(["world", "export", str(tmp_path / "data"), "--n", "12", "--seed", "1"]) == 0
    mapping = json.loads((tmp_path / "data" / "mapping_file.json").read_text())
    assert len(mapping) == 12
    for item in mapping.values():
        assert {"image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id",
                "blended_word", "mask", "target_image_path", "source_scene", "target_scene"} <= set(item)
        assert (tmp_path / "data" / "annotation_images" / item["image_path"]).exists()
        assert (tmp_path / "data" / "target_images" / item["target_image_path"]).exists()
        assert rle_decode(item["mask"], 64, official_border=False).any()
    assert main(["world", "export", str(tmp_path / "other"), "--n", "0"]) == 2


def test_unplaced_comparison_ignores_where_objects_are():
    from spdinv.world.classifier import SceneReading, compare, compare_unplaced

    scene = Scene((WorldObject("star", "red", "left"), WorldObject("circle", "blue", "right")), "white")
    drifted = SceneReading({"top": {"shape": "star", "colour": "red", "size": "large", "material": "plain", "style": "filled"},
                            "bottom": {"shape": "circle", "colour": "green", "size": "large", "material": "plain",
                                       "style": "filled"}}, "white", "plain")
    flags = compare_unplaced(drifted, scene)
    assert flags["shape"] and flags["background"] and flags["count"]
    assert not flags["colour"] and not flags["bound"] and not flags["position"]
    assert not compare(drifted, scene)["shape"]


def test_single_object_is_the_one_at_the_position_or_the_only_one_read():
    from spdinv.world.classifier import SceneReading, single_object

    red, blue = {"shape": "circle", "colour": "red"}, {"shape": "star", "colour": "blue"}
    assert single_object(SceneReading({"left": blue, "centre": red}, "white", "plain")) == red
    assert single_object(SceneReading({"left": blue}, "white", "plain")) == blue
    assert single_object(SceneReading({"left": blue, "right": red}, "white", "plain")) is None
    assert single_object(SceneReading({"left": blue, "right": red}, "white", "plain"), "right") == red
    assert single_object(SceneReading({}, "white", "plain")) is None
