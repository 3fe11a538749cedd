"""Concept words (a placeholder word standing for learned token embeddings) on the tiny model:
injection, every engine, blend words, the inversion cache, textual inversion, the file formats
(ours, diffusers', A1111's) and the command line's bad input."""

import copy
import json

import pytest
import torch
from PIL import Image

from spdinv.inversion.ddim import DDIMOptions
from spdinv.cli import main
from spdinv.concepts import Concept, load_concept, save_concept
from spdinv.editing import edit
from spdinv.editing.cache import InversionCache
from spdinv.editing.p2p import blend_indicator
from spdinv.editing.tokens import word_positions
from spdinv.errors import SpdinvError
from spdinv.testing import DIFFUSION_METHODS, UNET_ENGINES, tiny_pipeline
from spdinv.textual_inversion import LearnOptions, learn_concept


SOURCE = "a large S in the centre on a white background"
TARGET = "a large S in the centre on a black background"
STEPS = 3


@pytest.fixture(scope="module")
def width(tiny):
    return tiny.text_encoder.get_input_embeddings().embedding_dim


@pytest.fixture(scope="module")
def concept(width):
    return Concept("S", torch.randn(2, width, generator=torch.Generator().manual_seed(1)))


@pytest.fixture(scope="module")
def image(red_circle):
    return Image.open(red_circle).convert("RGB")


def test_the_word_is_injected_only_where_it_occurs_and_nothing_shared_changes(tiny, concept):
    weights = tiny.text_encoder.get_input_embeddings().weight.clone()
    plain_ids = tiny.tokenize([SOURCE])
    plain = tiny.encode_prompt(SOURCE)
    with_s = tiny.with_concept(concept)
    assert not torch.equal(with_s.encode_prompt(SOURCE), plain)
    # "Sun" and "s" are not the (case-sensitive, whole) word: the same tokens as without a concept.
    for prompt in ("a large circle", "a Sun s", ""):
        assert torch.equal(with_s.tokenize([prompt]), tiny.tokenize([prompt]))
        assert torch.equal(with_s.encode_prompt(prompt), tiny.encode_prompt(prompt))
    assert torch.equal(tiny.tokenize([SOURCE]), plain_ids) and torch.equal(tiny.encode_prompt(SOURCE), plain)
    assert torch.equal(tiny.text_encoder.get_input_embeddings().weight, weights)
    embedding = tiny.text_encoder.get_input_embeddings()
    assert not embedding._forward_hooks and not embedding._forward_pre_hooks
    other = tiny.with_concept(Concept("S", concept.vectors + 1))
    assert not torch.equal(other.encode_prompt(SOURCE), with_s.encode_prompt(SOURCE))  # caches are per concept
    assert with_s.with_concept(None).tokenizer is tiny.tokenizer
    copied = copy.deepcopy(with_s.tokenizer)
    assert copied("a S").input_ids == with_s.tokenizer("a S").input_ids


def test_the_injected_vectors_are_the_token_embeddings(tiny, width):
    """A concept whose vector is a known word's embedding encodes exactly like that word."""
    row = tiny.tokenizer("black", add_special_tokens=False).input_ids
    vectors = tiny.text_encoder.get_input_embeddings().weight[row].detach().clone()
    as_black = tiny.with_concept(Concept("S", vectors))
    assert torch.allclose(as_black.encode_prompt("a S circle"), tiny.encode_prompt("a black circle"), atol=1e-6)


def test_blend_and_word_positions_find_the_placeholder(tiny, concept):
    model = tiny.with_concept(concept)
    assert word_positions(model.tokenizer, SOURCE, "S") == [3, 4]  # k = 2 vectors, after "a large"
    indicator = blend_indicator(model.tokenizer, SOURCE, TARGET, (("S",), ("S", "black")))
    assert indicator[0].nonzero().flatten().tolist() == [3, 4]
    assert set(indicator[1].nonzero().flatten().tolist()) >= {3, 4}


@pytest.mark.parametrize("engine", UNET_ENGINES)
def test_every_engine_edits_with_a_concept(tiny, concept, image, engine):
    model = tiny.with_concept(concept)
    options = dict(blend="S black") if engine == "p2p" else {}
    result = edit(model, image, SOURCE, TARGET, "ddim", engine, num_steps=STEPS, **options)
    assert torch.isfinite(result.edited).all()
    plain = edit(tiny, image, SOURCE, TARGET, "ddim", engine, num_steps=STEPS, **options)
    assert not torch.allclose(result.inversion.z_T, plain.inversion.z_T)  # the inversion saw the concept too


@pytest.mark.parametrize("method", DIFFUSION_METHODS)
def test_every_inversion_inverts_under_the_concept(tiny, concept, image, method):
    fast = {"spdinv": dict(K=2), "null_text": dict(inner_steps=1), "aidi": dict(iterations=2)}.get(method, {})
    result = edit(tiny.with_concept(concept), image, SOURCE, TARGET, method, "p2p", num_steps=STEPS,
                  blend="S black", **fast)
    assert torch.isfinite(result.edited).all() and torch.isfinite(result.reconstruction).all()
    assert result.mask is not None and result.mask.sum() > 0


def test_the_inversion_cache_keys_on_the_concept(tiny, concept, image, tmp_path):
    cache = InversionCache(tmp_path)
    keys = {cache.key(m, image, SOURCE, "ddim", STEPS, 0, DDIMOptions())
            for m in (tiny, tiny.with_concept(concept), tiny.with_concept(Concept("S", concept.vectors * 2)))}
    assert len(keys) == 3


def test_learning_is_seeded_moves_the_vector_and_loads_in_diffusers(tiny, image, tmp_path):
    options = LearnOptions(steps=4, learning_rate=0.05, batch=2, seed=3)
    first = learn_concept(tiny, image, SOURCE, "S", options, progress=False)
    again = learn_concept(tiny, image, SOURCE, "S", options, progress=False)
    assert torch.equal(first.concept.vectors, again.concept.vectors) and len(first.losses) == 4
    initial = tiny.text_encoder.get_input_embeddings().weight[tiny.tokenizer("S", add_special_tokens=False).input_ids]
    assert not torch.allclose(first.concept.vectors, initial.mean(0, keepdim=True))
    path = save_concept(first.concept, tmp_path / "S.safetensors")
    assert torch.equal(load_concept(path).vectors, first.concept.vectors)
    pipe = tiny_pipeline()
    pipe.load_textual_inversion(str(path))
    token = pipe.tokenizer.convert_tokens_to_ids("S")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token], first.concept.vectors[0])


def test_every_file_format_gives_the_same_vectors(tmp_path, width):
    vectors = torch.randn(1, width)
    torch.save({"<cat-toy>": vectors[0]}, tmp_path / "learned_embeds.bin")  # diffusers' .bin, a 1-D tensor
    torch.save({"string_to_param": {"*": vectors}, "name": "cat", "step": 3000}, tmp_path / "a1111.pt")
    torch.save(vectors, tmp_path / "bare.pt")
    save_concept(Concept("x", vectors), tmp_path / "ours.safetensors")
    for name in ("learned_embeds.bin", "a1111.pt", "bare.pt", "ours.safetensors"):
        loaded = load_concept(tmp_path / name, "S")
        assert loaded.word == "S" and torch.equal(loaded.vectors, vectors), name


def test_sdxl_is_refused_in_one_line(width):
    from spdinv.testing import tiny_xl_pipeline
    from spdinv.model import from_pipeline

    with pytest.raises(SpdinvError, match="SDXL"):
        from_pipeline(tiny_xl_pipeline()).with_concept(Concept("S", torch.zeros(1, 32)))


def cli_edit(image, out, model, concept, *extra):
    return ["edit", str(image), "--source", SOURCE, "--target", TARGET, "--model", str(model), "--steps", "2",
            "--inversion", "ddim", "--out", str(out), "--no-cache", "--quiet", "--concept", str(concept), *extra]


def test_cli_learn_then_edit_with_the_concept(tmp_path, tiny_dir, red_circle, capsys):
    concept = tmp_path / "S.safetensors"
    assert main(["concept", "learn", str(red_circle), "--prompt", SOURCE, "--out", str(concept), "--steps", "2",
                 "--model", str(tiny_dir), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    out = tmp_path / "edit"
    assert main(cli_edit(red_circle, out, tiny_dir, concept, "--blend", "white black")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["concept"]["word"] == "S" and config["concept"]["vectors"] == 1
    word = tmp_path / "edit-word"
    args = cli_edit(red_circle, word, tiny_dir, concept, "--concept-word", "<me>")
    args[args.index(SOURCE)] = SOURCE.replace("S", "<me>")
    args[args.index(TARGET)] = TARGET.replace("S", "<me>")
    assert main(args) == 0


def test_cli_invert_with_a_concept(tmp_path, tiny_dir, red_circle, capsys):
    concept = save_concept(Concept("<me>", torch.randn(1, 32)), tmp_path / "me.safetensors")
    out = tmp_path / "inv"
    assert main(["invert", str(red_circle), "--prompt", "a <me> on a white background", "--method", "ddim",
                 "--steps", "2", "--model", str(tiny_dir), "--out", str(out), "--quiet", "--concept", str(concept),
                 "--concept-word", "<me>"]) == 0
    assert out.is_dir() and "does not know" not in capsys.readouterr().err


@pytest.mark.parametrize("make, extra, message", [
    (lambda p: save_concept(Concept("S", torch.zeros(1, 7)), p / "c.safetensors"), [], "made for another model"),
    (lambda p: save_concept(Concept("S", torch.zeros(1, 32)), p / "c.safetensors"), ["--concept-word", "Z"],
     "no source prompt or target prompt contains the concept word 'Z'"),
    (lambda p: (p / "c.safetensors").write_bytes(b"\x00garbage"), [], "not a readable safetensors file"),
    (lambda p: torch.save({"S": torch.zeros(1, 32)}, p / "c.safetensors"), [], "not a readable safetensors file"),
    (lambda p: (p / "c.bin").write_bytes(b"not a pickle"), [], "not a readable textual-inversion file"),
    (lambda p: (p / "c.txt").write_text("S"), [], "unknown concept file format '.txt'"),
    (lambda p: torch.save({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, p / "c.pt"), [], "holds 2 embeddings"),
    (lambda p: p / "missing.safetensors", [], "concept file not found"),
])
def test_cli_bad_concept_input_exits_2_in_one_line(tmp_path, tiny_dir, red_circle, capsys, make, extra, message):
    made = make(tmp_path)
    path = made if isinstance(made, type(tmp_path)) and made.suffix else next(
        p for p in tmp_path.iterdir() if p.name.startswith("c."))
    out = tmp_path / "out"
    code = main(cli_edit(red_circle, out, tiny_dir, path, *extra))
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_cli_learn_needs_the_word_in_its_prompt(tmp_path, tiny_dir, red_circle, capsys):
    code = main(["concept", "learn", str(red_circle), "--prompt", "a red circle",
                 "--out", str(tmp_path / "S.safetensors"), "--model", str(tiny_dir), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "does not contain the concept word 'S'" in err and err.count("\n") == 1
    assert not (tmp_path / "S.safetensors").exists()
