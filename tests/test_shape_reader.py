"""The shape reader (issue 26): the shipped asset reads drawings of a family drawn here (PIL primitives, code
none of spdinv's drawing code shares), `spdinv concept encode` uses it by default, bad reader files are
one-line errors."""

import math
import random

import pytest
import torch
from PIL import Image, ImageDraw

from spdinv.cli import main
from spdinv.concepts import load_concept
from spdinv.errors import SpdinvError
from spdinv.world.concept_choice import EncoderChoice, encode_with
from spdinv.world.concept_encoder import identities, load_concept_encoder
from spdinv.world.scene import BACKGROUNDS, COLOURS, SHAPES
from spdinv.world.shape_reader import (READER_PATH, ShapeReader, identity_words, load_shape_reader, read_concept,
                                       save_shape_reader)


def star(cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(turn + k * math.pi / 5),
             cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(turn + k * math.pi / 5)) for k in range(10)]


def sketch(shape: str, rgb: tuple[int, int, int], background: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """One object drawn 4x large with PIL's own primitives (ellipse, regular_polygon, pieslice) and shrunk with
    a box filter: a size, offset and tilt of its own, a slightly squashed or widened body."""
    k = 4
    image = Image.new("RGB", (64 * k, 64 * k), background)
    draw = ImageDraw.Draw(image)
    cx, cy = k * (32 + rng.uniform(-4, 4)), k * (32 + rng.uniform(-4, 4))
    r, tilt = k * rng.uniform(10, 15), rng.uniform(-15, 15)
    squash = rng.uniform(0.8, 1.0)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r * squash, cx + r, cy + r * squash), fill=rgb)
    elif shape in ("square", "triangle", "hexagon"):
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        draw.regular_polygon((cx, cy, r), sides, rotation=tilt, fill=rgb)
    elif shape == "star":
        draw.polygon(star(cx, cy, r, math.radians(tilt)), fill=rgb)
    else:  # heart: two discs and a wedge below them
        lobe = 0.52 * r
        for side in (-1, 1):
            draw.ellipse((cx + side * lobe - lobe, cy - 0.9 * lobe - lobe, cx + side * lobe + lobe, cy - 0.9 * lobe + lobe),
                         fill=rgb)
        draw.polygon([(cx - 2 * lobe, cy - 0.6 * lobe), (cx + 2 * lobe, cy - 0.6 * lobe), (cx, cy + 1.25 * r)], fill=rgb)
    return image.resize((64, 64), Image.BOX)


def sketches(n: int, seed: int, background: str = "gray") -> list[tuple[Image.Image, str, str]]:
    rng = random.Random(seed)
    out = []
    for index in range(n):
        shape, colour = SHAPES[index % len(SHAPES)], rng.choice([c for c in COLOURS if c != background])
        out.append((sketch(shape, COLOURS[colour], BACKGROUNDS[background], rng), shape, colour))
    return out


def test_the_shipped_reader_reads_a_family_drawn_here():
    reader = load_shape_reader()
    right = sum(reader.read(image) == shape for image, shape, _ in sketches(24, seed=0))
    assert right >= 20  # measured 22 of 24, and 691 of 720 more of this family on gray, blue and white


def test_encode_uses_the_reader_shape_and_keeps_the_colour(tmp_path):
    encoder, reader = load_concept_encoder(), load_shape_reader()
    objects, words = identity_words(encoder)
    for image, shape, colour in sketches(6, seed=1, background="blue"):
        concept, _ = encode_with(EncoderChoice("world", None, shape_reader=True), None, image, "S")
        torch.testing.assert_close(concept.vectors, read_concept(encoder, reader, image).vectors, rtol=0, atol=0)
        match = [o for o, w in zip(objects, words) if torch.equal(w, concept.vectors[0])]
        assert len(match) == 1 and match[0].colour == colour  # the word of one identity's render


def test_a_world_render_keeps_the_encoders_own_word():
    """A world concept render read right gets the encoder's own w0 of it (the identities' words are encoded one
    by one, the same computation)."""
    from spdinv.world.concept_encoder import concept_image

    encoder, reader = load_concept_encoder(), load_shape_reader()
    for obj in identities()[::37]:
        image = concept_image(obj)
        assert torch.equal(read_concept(encoder, reader, image).vectors, encoder.encode(image).vectors)


def test_cli_encode_reads_the_shape_by_default_and_off_gives_the_encoder_alone(tmp_path, capsys):
    image, shape, _ = sketches(1, seed=2)[0]
    path = tmp_path / "drawn.png"
    image.save(path)
    assert main(["concept", "encode", str(path), "--out", str(tmp_path / "a.safetensors")]) == 0
    assert main(["concept", "encode", str(path), "--out", str(tmp_path / "b.safetensors"), "--shape-reader", "off"]) == 0
    encoder, reader = load_concept_encoder(), load_shape_reader()
    from PIL import Image as PILImage

    opened = PILImage.open(path).convert("RGB")
    torch.testing.assert_close(load_concept(tmp_path / "a.safetensors", "S").vectors,
                               read_concept(encoder, reader, opened).vectors, rtol=0, atol=0)
    torch.testing.assert_close(load_concept(tmp_path / "b.safetensors", "S").vectors, encoder.encode(opened).vectors,
                               rtol=0, atol=0)
    capsys.readouterr()


def test_a_saved_reader_loads_back_and_bad_files_are_errors(tmp_path):
    torch.manual_seed(0)
    reader = ShapeReader()
    path = save_shape_reader(reader, tmp_path / "r.safetensors")
    loaded = load_shape_reader(path)
    assert all(torch.equal(a.half().float(), b) for a, b in zip(reader.state_dict().values(), loaded.state_dict().values()))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    (tmp_path / "junk.json").write_text(READER_PATH.with_suffix(".json").read_text())
    with pytest.raises(SpdinvError, match="not a readable safetensors"):
        load_shape_reader(tmp_path / "junk.safetensors")
    with pytest.raises(SpdinvError, match="shape reader not found"):
        load_shape_reader(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("extra, message", [
    (["--shape-reader", "reader.txt"], "--shape-reader must be off or a shape reader .safetensors file, not reader.txt"),
    (["--shape-reader", "missing.safetensors"], "--shape-reader must be off or a shape reader .safetensors file"),
])
def test_bad_shape_reader_flags_are_one_line(tmp_path, capsys, extra, message):
    image = tmp_path / "x.png"
    sketches(1, seed=3)[0][0].save(image)
    code = main(["concept", "encode", str(image), "--out", str(tmp_path / "S.safetensors"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "S.safetensors").exists()


@pytest.mark.parametrize("extra, message", [
    ([], "--shape-reader needs --concept-encoder (a spdinv concept encoder)"),
    (["--concept-encoder", "global_mapper.pt", "--image-encoder", "clip"],
     "--shape-reader is for spdinv concept encoders (.safetensors), not"),
])
def test_shape_reader_on_edit_needs_a_spdinv_encoder(tmp_path, tiny_dir, capsys, extra, message):
    image = tmp_path / "x.png"
    sketches(1, seed=4)[0][0].save(image)
    (tmp_path / "global_mapper.pt").write_bytes(b"not read before the flags are checked")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    extra = [str(tmp_path / e) if e in ("global_mapper.pt", "clip") else e for e in extra]
    code = main(["edit", str(image), "--source", "a large S in the centre on a gray background", "--target",
                 "a large S in the centre on a blue background", "--model", str(tiny_dir), "--out", str(tmp_path / "out"),
                 "--shape-reader", "off", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_edit_config_records_the_shape_reader():
    from argparse import Namespace
    from pathlib import Path

    from spdinv.commands.edit import concept_record
    from spdinv.concepts import Concept

    concept = Concept("S", torch.zeros(1, 4))
    base = dict(concept_encoder=Path("enc.safetensors"), image_encoder=None, concept_image=None, image="x.png",
                elite_projections=False)
    assert concept_record(Namespace(**base, shape_reader=None), concept)["shape_reader"] == "shipped"
    assert concept_record(Namespace(**base, shape_reader="off"), concept)["shape_reader"] == "off"
