"""The customisation benchmark: concept edit pairs (world/concept_edits.py) and its runner
(bench/customisation.py) on the tiny model with few steps."""

import dataclasses
import difflib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from spdinv.bench.customisation import (CONCEPT_COLUMNS, ENCODER, METHODS, ConceptStore, CustomisationOptions,
                                        edit_with_concept, run_customisation)
from spdinv.bench.results import read_rows
from spdinv.concepts import Concept, mentions
from spdinv.errors import SpdinvError
from spdinv.textual_inversion import LearnOptions
from spdinv.world.concept_edits import CONCEPT_EDITS, IDENTITY, concept_pairs, held_out_rule, no_held_out
from spdinv.world.concept_encoder import is_held_out
from spdinv.world.render import render_array


def test_pairs_are_deterministic_from_the_seed():
    first, again, other = concept_pairs(10, seed=3), concept_pairs(10, seed=3), concept_pairs(10, seed=4)
    assert first == again
    assert [p.source_prompt for p in first] == [p.source_prompt for p in again]
    assert first != other
    assert concept_pairs(15, seed=3)[:10] == first  # more pairs extend a run, never change it


def _changed(before, after) -> set[str]:
    return {f.name for f in dataclasses.fields(before) if f.compare and getattr(before, f.name) != getattr(after, f.name)}


def test_the_target_differs_from_the_source_only_where_the_edit_says():
    expected = {"background colour": ({"background"}, set()), "background kind": ({"background_kind"}, set()),
                "position": ({"objects"}, {"position"}), "size": ({"objects"}, {"size"}),
                "add object": ({"objects"}, set())}
    pairs = concept_pairs(20, seed=1)
    assert {p.edit for p in pairs} == set(CONCEPT_EDITS)
    for pair in pairs:
        scene_change, concept_change = expected[pair.edit]
        assert _changed(pair.source, pair.target) == scene_change, pair
        assert _changed(pair.concept, pair.target.objects[0]) == concept_change, pair
        assert len(pair.target.objects) == (2 if pair.edit == "add object" else 1)
        # the placeholder stands for the identity: no identity word of the concept in either prompt
        for prompt in (pair.source_prompt, pair.target_prompt):
            assert mentions(prompt, "S")
        assert not {pair.concept.shape, pair.concept.colour} & set(pair.source_prompt.split())
        # the rendered truth differs from the source inside the mask only, and somewhere
        source, target = (render_array(s).astype(int) for s in (pair.source, pair.target))
        differs = np.abs(source - target).max(axis=2) > 8
        assert differs.any() and not (differs & (pair.mask() == 0)).any()
        # the prompts differ in the edited words only: the placeholder and the template stay
        src, tgt = pair.source_prompt.split(), pair.target_prompt.split()
        changes = [op for op in difflib.SequenceMatcher(a=src, b=tgt).get_opcodes() if op[0] != "equal"]
        changed = {w for _, i1, i2, j1, j2 in changes for w in src[i1:i2] + tgt[j1:j2]}
        assert "S" not in changed and "background" not in changed, (src, tgt)
        if pair.edit == "add object":
            assert [op[0] for op in changes] == ["insert"] and tgt[changes[0][3]] == "and"


def test_every_pair_is_tagged_by_the_encoders_held_out_set():
    pairs = concept_pairs(20, seed=0)
    assert [p.held_out for p in pairs] == [is_held_out(p.concept) for p in pairs]
    assert {p.split for p in pairs} == {"seen", "held-out"}
    assert not any(p.held_out for p in concept_pairs(10, seed=0, is_held_out=no_held_out))
    rule = held_out_rule("shape=star+colour=red,material=dotted")
    held = [p for p in concept_pairs(10, seed=0, is_held_out=rule) if p.held_out]
    assert held and all(p.concept.material == "dotted" or (p.concept.shape, p.concept.colour) == ("star", "red")
                        for p in held)
    with pytest.raises(ValueError, match="bad held-out condition"):
        held_out_rule("shape=blob")


class FixedEncoder:
    def __init__(self, width: int):
        self.width = width
        self.images = []

    def encode(self, image, word="S"):
        self.images.append(image)
        return Concept(word, torch.full((1, self.width), 0.01))


def test_the_runner_writes_one_finite_row_per_pair_and_method_and_resumes(tiny, tmp_path):
    width = tiny.text_encoder.get_input_embeddings().embedding_dim
    encoder = FixedEncoder(width)
    methods = ["ti-noise", "ti+ddim", "ti+spdinv", "elite-noise", "elite+aidi"]
    options = CustomisationOptions(out=tmp_path / "out", methods=methods, pairs=2, steps=2,
                                   learn=LearnOptions(steps=2, batch=1), progress=False)
    results = run_customisation(options, model=tiny, encoder_factory=lambda: encoder)
    rows = read_rows(results)
    assert [(r["id"], r["inversion"]) for r in rows] == [(f"{i:03d}", m) for i in range(2) for m in methods]
    assert all(r["error"] == "" for r in rows)
    for row in rows:
        for metric in ("ssim", "gt_psnr", "edit_accuracy", "edit_seconds", "concept_seconds", *CONCEPT_COLUMNS):
            assert math.isfinite(float(row[metric])), (row["inversion"], metric)
        assert row["engine"] == ("none" if row["inversion"].endswith("noise") else "p2p")
    assert len(encoder.images) == 2  # one concept per pair, shared by the encoder's methods
    assert all(img.getpixel((0, 0)) == (128, 128, 128) for img in encoder.images)  # the concept image, on gray
    again = run_customisation(options, model=tiny, encoder_factory=lambda: pytest.fail("nothing left to compute"))
    assert read_rows(again) == rows
    with pytest.raises(SpdinvError, match="other settings"):
        run_customisation(dataclasses.replace(options, steps=3), model=tiny)
    store = ConceptStore(options.out / "concepts", tiny, options.learn, lambda: encoder, encoder_id="another")
    with pytest.raises(SpdinvError, match="another concept encoder"):
        store.get(concept_pairs(1)[0], ENCODER, Image.new("RGB", (64, 64)))


def test_the_random_noise_baseline_does_not_read_the_image(tiny):
    pair = concept_pairs(1, seed=0)[0]
    width = tiny.text_encoder.get_input_embeddings().embedding_dim
    concept = Concept("S", torch.randn(1, width, generator=torch.Generator().manual_seed(0)) * 0.02)
    settings = dict(steps=2, seed=0, guidance_scale=7.5)
    without = edit_with_concept(tiny, concept, pair, METHODS["ti-noise"], None, **settings)
    black = Image.new("RGB", (64, 64))
    assert torch.equal(edit_with_concept(tiny, concept, pair, METHODS["ti-noise"], black, **settings).edited,
                       without.edited)
    other_seed = edit_with_concept(tiny, concept, pair, METHODS["ti-noise"], None, steps=2, seed=1, guidance_scale=7.5)
    assert not torch.equal(other_seed.edited, without.edited)
    with_image = edit_with_concept(tiny, concept, pair, METHODS["ti+ddim"], pair.images()[0], **settings)
    assert with_image.inversion.method == "ddim"
