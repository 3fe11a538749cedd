"""The shapes-world concept encoder (ELITE-style): shapes, the shipped asset, training (seeded,
resumable), `spdinv concept encode`, and ELITE's global mapper on `spdinv edit` (tiny instances)."""

import json

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

import spdinv.commands.common
import spdinv.commands.edit
from spdinv.cli import main
from spdinv.concepts import load_concept
from spdinv.elite import GlobalMapper, projections_installed
from spdinv.world.concept_encoder import (CONCEPT_BACKGROUND, ENCODER_PATH, ConceptEncoder, EncoderConfig,
                                          concept_image, identities, is_held_out, load_concept_encoder)
from spdinv.world.concept_training import ConceptEncoderTrainer, encoder_from_checkpoint, target_scene
from spdinv.world.config import ConceptEncoderConfig
from spdinv.world.scene import BACKGROUNDS, COLOURS

SMALL = EncoderConfig(patch_size=16, width=16, layers=2, heads=2, mlp_width=32, feature_layers=(1,), mapper_hidden=16,
                      word_width=32)  # 32: the tiny model's text width
SOURCE = "a large S in the centre on a white background"
TARGET = "a large S in the centre on a black background"


def test_encoder_shapes_and_the_shipped_encoder_gives_a_width_128_concept():
    words = ConceptEncoder(SMALL)(torch.zeros(3, 3, 64, 64))
    assert words.shape == (3, SMALL.levels, 32)
    encoder = load_concept_encoder()
    assert encoder.config.levels >= 2 and ENCODER_PATH.stat().st_size <= 10_000_000
    image = concept_image(identities()[0])
    concept = encoder.encode(image, "<me>")
    assert concept.word == "<me>" and concept.vectors.shape == (1, 128) and torch.isfinite(concept.vectors).all()
    with torch.no_grad():  # w0 is the deepest level's word
        assert torch.allclose(encoder(torch.from_numpy(np.asarray(image) / 127.5 - 1).permute(2, 0, 1)[None].float())[0, :1],
                              concept.vectors, atol=1e-5)


def test_identities_held_out_pairs_and_the_concept_image_convention():
    everything = identities()
    held = [o for o in everything if is_held_out(o)]
    assert len(everything) == 192 and len(held) == 32
    assert {o.colour for o in held} == set(COLOURS)  # one pair per colour
    image = np.asarray(concept_image(held[0]))
    assert image.shape == (64, 64, 3) and tuple(image[0, 0]) == BACKGROUNDS[CONCEPT_BACKGROUND]


def test_target_scenes_keep_the_identity_and_never_hide_it():
    import random

    rng = random.Random(0)
    for obj in identities()[::17]:
        scene, index = target_scene(rng, obj)
        placed = scene.objects[index]
        assert (placed.shape, placed.colour, placed.material, placed.style) == (obj.shape, obj.colour, obj.material,
                                                                                obj.style)
        assert scene.background != obj.colour


def trainer(tiny, work, steps=4, **settings):
    config = ConceptEncoderConfig(steps=steps, batch=2, warmup=2, checkpoint_every=2, learning_rate=1e-3, **settings)
    return ConceptEncoderTrainer(work, config, model=tiny, encoder_config=SMALL)


def test_training_is_seeded_and_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny, tmp_path):
    straight = trainer(tiny, tmp_path / "a")
    straight.train(progress=False)
    interrupted = trainer(tiny, tmp_path / "b")
    interrupted.train(progress=False, until=2)
    resumed = trainer(tiny, tmp_path / "b")
    assert resumed.resume() and resumed.step == 2
    resumed.train(progress=False)
    assert resumed.losses == straight.losses and len(straight.losses) == 4
    for key, value in straight.encoder.state_dict().items():
        assert torch.equal(value, resumed.encoder.state_dict()[key]), key
    fresh = trainer(tiny, tmp_path / "c").encoder.state_dict()  # the seed fixes the initial weights; training moved them
    again = trainer(tiny, tmp_path / "d").encoder.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in fresh.items())
    assert any(not torch.equal(v, fresh[k]) for k, v in straight.encoder.state_dict().items())
    path = straight.save_result(tmp_path / "out")
    loaded = load_concept_encoder(path)
    assert json.loads(path.with_suffix(".json").read_text())["steps_done"] == 4
    assert torch.equal(loaded.mapper.mapping_0[0].weight, straight.encoder.mapper.mapping_0[0].weight)
    measured = encoder_from_checkpoint(straight.checkpoint_path)  # a run measured part-way: its last checkpoint
    assert all(torch.equal(v, measured.state_dict()[k]) for k, v in straight.encoder.state_dict().items())


def test_the_teacher_target_moves_from_the_noise_to_the_models_prediction_under_the_objects_words(tiny, tmp_path):
    first = trainer(tiny, tmp_path / "a")
    chosen, poses, latents, prompts, worded, generator = first.batch(0)
    w0 = first.tokenizer.tokens[0]
    for prompt, words in zip(prompts, worded):  # the same caption, the object named in words instead of S
        assert (" S " in prompt) != (w0 in prompt)
        assert " S " not in words and w0 not in words and words != prompt
        assert words.split()[-2:] == prompt.split()[-2:]  # the same background phrase
    noise = torch.randn(latents.shape, generator=generator)
    noisy, timesteps = 0.8 * latents + 0.6 * noise, [500, 20]
    with torch.no_grad():
        taught = tiny.eps(noisy, timesteps, tiny.encode_prompt(worded))
    assert not torch.allclose(taught, noise, atol=1e-2)
    # the same UNet on the same batch shape: equal up to float rounding of the (uncached) prompt encoding
    for teacher, expected in ((0.0, noise), (1.0, taught), (0.25, 0.75 * noise + 0.25 * taught)):
        got = trainer(tiny, tmp_path / str(teacher), teacher=teacher).target(noisy, timesteps, noise, worded)
        assert torch.allclose(got, expected, atol=1e-5), teacher


def test_the_attribute_loss_adds_its_weight_times_the_heads_loss_and_trains_the_head(tiny, tmp_path):
    plain, weighted = trainer(tiny, tmp_path / "a", attributes=0.0), trainer(tiny, tmp_path / "b", attributes=2.0)
    chosen = plain.batch(0)[0]
    features = plain.encoder.features(plain.concept_pixels[chosen])
    labels = {name: values[chosen] for name, values in plain.labels.items()}
    head_loss = plain.head.loss(features[0], labels)
    assert head_loss > 0.5  # untrained read-outs of 6, 8, 3 and 2 classes
    assert torch.allclose(weighted.loss(0)[0], plain.loss(0)[0] + 2.0 * head_loss, atol=1e-5)
    before = {k: v.clone() for k, v in weighted.head.state_dict().items()}
    weighted.train(progress=False, until=2)
    plain.train(progress=False, until=2)
    assert any(not torch.equal(v, weighted.head.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, plain.head.state_dict()[k]) for k, v in before.items())  # unused: never stepped


def test_a_checkpoint_from_before_a_setting_existed_resumes_as_it_was_trained(tiny, tmp_path):
    first = trainer(tiny, tmp_path, teacher=0.0, attributes=0.0)  # how the first runs trained
    first.train(progress=False, until=2)
    payload = torch.load(first.checkpoint_path, weights_only=False)
    del payload["config"]["teacher"], payload["config"]["attributes"], payload["attribute_head"]
    torch.save(payload, first.checkpoint_path)
    again = trainer(tiny, tmp_path, teacher=0.0, attributes=0.0)
    assert again.resume() and again.step == 2
    with pytest.raises(Exception, match="other settings.*attributes, teacher"):
        trainer(tiny, tmp_path).resume()  # today's defaults train otherwise


def test_a_checkpoint_of_other_settings_is_refused(tiny, tmp_path):
    first = trainer(tiny, tmp_path)
    first.train(progress=False, until=2)
    other = ConceptEncoderTrainer(tmp_path, ConceptEncoderConfig(steps=4, batch=3, warmup=2, checkpoint_every=2),
                                  model=tiny, encoder_config=SMALL)
    with pytest.raises(Exception, match="other settings"):
        other.resume()


def test_cli_encode_writes_a_loadable_concept(tmp_path, capsys):
    image = tmp_path / "star.png"
    concept_image(identities()[40]).save(image)
    out = tmp_path / "S.safetensors"
    assert main(["concept", "encode", str(image), "--out", str(out), "--concept-word", "<star>"]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = load_concept(out, "<star>")
    assert torch.equal(loaded.vectors, load_concept_encoder().encode(concept_image(identities()[40])).vectors)


# ---------------------------------------------------------------- ELITE's global mapper on spdinv edit

@pytest.fixture(scope="module")
def elite_files(tmp_path_factory):
    """A tiny CLIP vision folder (17 layers: ELITE reads layer 16) and a global_mapper.pt for the tiny UNet."""
    from spdinv.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("elite")
    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=17, num_attention_heads=2,
                                     image_size=32, patch_size=16)).save_pretrained(folder / "clip")
    mapper = GlobalMapper.for_unet(tiny_pipeline().unet, input_dim=8, hidden=12)
    with torch.no_grad():
        for name, module in mapper.named_modules():
            if name.endswith(("_to_k", "_to_v")):
                module.weight.mul_(3)  # projections unlike the UNet's own
    torch.save(mapper.state_dict(), folder / "global_mapper.pt")
    return folder / "global_mapper.pt", folder / "clip"


def edit_args(image, out, model, mapper, clip, *extra):
    return ["edit", str(image), "--source", SOURCE, "--target", TARGET, "--model", str(model), "--steps", "3",
            "--inversion", "ddim", "--out", str(out), "--no-cache", "--quiet", "--concept-encoder", str(mapper),
            "--image-encoder", str(clip), *extra]


def test_elite_on_edit_projections_only_inside_and_they_change_the_result(tmp_path, tiny_dir, red_circle, elite_files,
                                                                          monkeypatch, capsys):
    from PIL import Image

    mapper, clip = elite_files
    seen = {}
    load = spdinv.commands.common.load_model_from_args
    edit_all = spdinv.commands.edit.edit_all

    def loading(args):
        model = load(args)
        seen["unet"] = model.unet
        seen["originals"] = {n: (m.to_k, m.to_v) for n, m in model.unet.named_modules()
                             if getattr(m, "is_cross_attention", False)}
        return model

    def editing(model, *args, **kwargs):
        seen["inside"] = {n: (m.to_k, m.to_v) for n, m in model.unet.named_modules()
                          if getattr(m, "is_cross_attention", False)}
        return edit_all(model, *args, **kwargs)

    monkeypatch.setattr(spdinv.commands.common, "load_model_from_args", loading)
    monkeypatch.setattr(spdinv.commands.edit, "edit_all", editing)
    plain, swapped = tmp_path / "plain", tmp_path / "swapped"
    assert main(edit_args(red_circle, plain, tiny_dir, mapper, clip)) == 0
    assert seen["inside"] == seen["originals"]  # without the switch the UNet's own projections
    assert main(edit_args(red_circle, swapped, tiny_dir, mapper, clip, "--elite-projections")) == 0
    inside, originals = seen["inside"], seen["originals"]
    assert all(inside[n][0] is not originals[n][0] and inside[n][1] is not originals[n][1] for n in originals)
    after = {n: (m.to_k, m.to_v) for n, m in seen["unet"].named_modules() if getattr(m, "is_cross_attention", False)}
    assert after == originals
    config = json.loads((swapped / "config.json").read_text())
    assert config["concept"]["elite_projections"] and config["concept"]["encoder"] == str(mapper)
    assert config["concept"]["shape_reader"] is None  # the shape reader is for spdinv's encoders only
    first, second = (np.asarray(Image.open(folder / "edit.png")).astype(int) for folder in (plain, swapped))
    assert np.abs(first - second).max() > 0
    capsys.readouterr()


def test_projections_are_put_back_on_error(tiny, elite_files):
    from spdinv.elite import load_global_mapper

    mapper = load_global_mapper(elite_files[0], tiny.unet, input_dim=8)
    before = {n: m.to_k for n, m in tiny.unet.named_modules() if getattr(m, "is_cross_attention", False)}
    with pytest.raises(RuntimeError, match="boom"):
        with projections_installed(tiny.unet, mapper):
            raise RuntimeError("boom")
    assert {n: m.to_k for n, m in tiny.unet.named_modules() if getattr(m, "is_cross_attention", False)} == before


def test_cli_encode_with_elite_and_the_concept_image(tmp_path, tiny_dir, red_circle, elite_files, capsys):
    mapper, clip = elite_files
    out = tmp_path / "S.safetensors"
    assert main(["concept", "encode", str(red_circle), "--out", str(out), "--concept-encoder", str(mapper),
                 "--image-encoder", str(clip), "--model", str(tiny_dir), "--quiet"]) == 0
    assert load_concept(out).vectors.shape == (1, 32)
    other = tmp_path / "other.png"
    concept_image(identities()[7]).save(other)
    assert main(edit_args(red_circle, tmp_path / "e", tiny_dir, mapper, clip, "--concept-image", str(other))) == 0
    assert json.loads((tmp_path / "e" / "config.json").read_text())["concept"]["image"] == str(other)
    capsys.readouterr()


def test_hand_drawn_objects_are_one_filled_shape_of_the_colour_on_the_background():
    import random

    from spdinv.testing import hand_drawn_object
    from spdinv.world.scene import SHAPES

    rng = random.Random(0)
    gray, red = BACKGROUNDS["gray"], COLOURS["red"]
    areas = {}
    for shape in SHAPES:
        pixels = np.asarray(hand_drawn_object(shape, red, gray, rng)).reshape(-1, 3).astype(int)
        drawn = np.any(pixels != gray, axis=1)
        colours = np.unique(pixels[drawn], axis=0)
        assert len(colours) == 1 and np.abs(colours[0] - red).max() <= 20  # one aliased shade of red
        areas[shape] = drawn.mean()
    assert all(0.04 < area < 0.3 for area in areas.values()), areas  # a world "large" object covers 0.06-0.12
    assert areas["star"] < areas["square"]
    with pytest.raises(ValueError, match="no drawing"):
        hand_drawn_object("cloud", red, gray, rng)


def test_posed_concept_images_move_and_reshade_the_object_and_keep_the_plain_background():
    import random

    from spdinv.images import to_tensor
    from spdinv.world.concept_training import IDENTITY_POSE, posed, random_pose

    pixels = torch.cat([to_tensor(concept_image(o)) for o in identities()[:4]])
    gray = BACKGROUNDS[CONCEPT_BACKGROUND]
    # the identity pose resamples every pixel at its own centre: equal up to float rounding of the grid
    assert torch.allclose(posed(pixels, torch.tensor([IDENTITY_POSE] * 4), gray), pixels, atol=1e-4)
    rng = random.Random(0)
    poses = torch.tensor([random_pose(rng) for _ in range(4)])
    moved = posed(pixels, poses, gray)
    plain = torch.tensor(gray).view(1, 3, 1, 1) / 127.5 - 1
    assert torch.allclose(moved[..., :4, :4], plain.expand(4, 3, 4, 4), atol=1e-4)  # corners stay background
    assert all((moved[i] - pixels[i]).abs().max() > 0.2 for i in range(4))
    turned = posed(pixels[:1], torch.tensor([[90.0, 1, 0, 0, 0, 0, 0]]), gray)  # a quarter turn moves the rows
    assert torch.allclose(turned[0], pixels[0].transpose(1, 2).flip(1), atol=0.05) or torch.allclose(
        turned[0], pixels[0].transpose(1, 2).flip(2), atol=0.05)
    shaded = posed(pixels[:1], torch.tensor([[0.0, 1, 0, 0, 0.1, 0, 0]]), gray)  # red channel up inside the object
    inside = (pixels[0] - plain[0]).abs().amax(0) > 0.5
    assert torch.allclose((shaded - pixels)[0, 0][inside], torch.tensor(0.1), atol=1e-3)


def test_a_plain_background_is_repainted_gray_for_the_encoder_and_anything_else_is_left_alone():
    import random

    from spdinv.testing import hand_drawn_object
    from spdinv.world.concept_encoder import on_concept_background
    from spdinv.world.render import render
    from spdinv.world.scene import Scene

    gray = BACKGROUNDS[CONCEPT_BACKGROUND]
    drawn = hand_drawn_object("star", COLOURS["blue"], BACKGROUNDS["blue"], random.Random(0))  # blue on light blue
    pixels, repainted = np.asarray(drawn), np.asarray(on_concept_background(drawn))
    background = (pixels == BACKGROUNDS["blue"]).all(axis=2)
    assert (repainted[background] == gray).all() and (repainted[~background] == pixels[~background]).all()
    on_gray = concept_image(identities()[0])
    assert np.array_equal(np.asarray(on_concept_background(on_gray)), np.asarray(on_gray))
    grid = render(Scene((identities()[0],), background="blue", background_kind="grid"))  # not plain: untouched
    assert np.array_equal(np.asarray(on_concept_background(grid)), np.asarray(grid))
    encoder = ConceptEncoder(SMALL)  # encode() reads the repainted image
    assert torch.equal(encoder.encode(drawn).vectors, encoder.encode(on_concept_background(drawn)).vectors)


def test_random_drawings_are_seeded_one_object_of_the_identity_on_the_concept_gray():
    import random

    from spdinv.world.concept_drawing import random_drawing
    from spdinv.world.scene import SHAPES

    gray = np.array(BACKGROUNDS[CONCEPT_BACKGROUND])
    palette = np.array(list(COLOURS.values()))
    rng = random.Random(0)
    for obj in identities()[::5]:
        state = rng.getstate()
        pixels = np.asarray(random_drawing(obj, rng)).astype(int)
        rng.setstate(state)
        assert np.array_equal(pixels, np.asarray(random_drawing(obj, rng)))  # the same draws, the same drawing
        assert pixels.shape == (64, 64, 3) and (pixels[0] == gray).all() and (pixels[:, -1] == gray).all()
        drawn = np.abs(pixels - gray).max(axis=2) > 30
        assert 0.005 < drawn.mean() < 0.4, (obj, drawn.mean())
        if obj.material == "plain" and obj.style == "filled":  # its typical pixel is nearest the identity's colour
            typical = np.median(pixels[drawn], axis=0)
            assert list(COLOURS)[int(np.abs(palette - typical).sum(1).argmin())] == obj.colour, obj
    assert {o.shape for o in identities()[::5]} == set(SHAPES)


def test_the_drawn_share_replaces_concept_images_by_drawings_of_the_same_identity(tiny, tmp_path):
    rendered, drawn = trainer(tiny, tmp_path / "a"), trainer(tiny, tmp_path / "b", drawn=1.0)
    chosen, poses = rendered.batch(0)[:2]
    assert torch.equal(rendered.concept_batch(0, chosen, poses), rendered.concept_pixels[chosen])
    pictures = drawn.concept_batch(0, chosen, poses)
    assert torch.equal(pictures, drawn.concept_batch(0, chosen, poses))  # seeded by (seed, step)
    assert all((pictures[i] - drawn.concept_pixels[chosen[i]]).abs().max() > 0.3 for i in range(len(chosen)))
    assert not torch.equal(pictures, drawn.concept_batch(1, chosen, poses))


def test_a_fine_tune_starts_from_the_start_encoder_and_the_word_teacher_keeps_its_words(tiny, tmp_path):
    from spdinv.errors import SpdinvError
    from spdinv.world.concept_encoder import save_concept_encoder

    torch.manual_seed(3)
    start = save_concept_encoder(ConceptEncoder(SMALL), tmp_path / "start.safetensors")
    keep = trainer(tiny, tmp_path / "a", start=str(start), word_teacher=2.0, attributes=0.0, diffusion=0.0)
    assert all(torch.equal(v, load_concept_encoder(start).state_dict()[k]) for k, v in keep.encoder.state_dict().items())
    assert keep.batch(0)[2] is None  # no UNet term: no target latents
    total, logged = keep.loss(0)  # rendered images, the start's own weights: the word-teacher term is 0
    # up to float rounding: the start's words were computed in a batch of every identity, these in a batch of 2
    # (a relative squared error: rounding of 1e-6 relative gives 1e-12)
    assert logged == pytest.approx(0.0, abs=1e-10)
    drawn = trainer(tiny, tmp_path / "b", start=str(start), word_teacher=2.0, attributes=0.0, diffusion=0.0, drawn=1.0)
    total, logged = drawn.loss(0)
    words = drawn.encoder(drawn.concept_batch(0, *drawn.batch(0)[:2]))
    assert logged > 1e-3 and float(total.detach()) == pytest.approx(2.0 * logged + 0.01 * float(words.detach().abs().mean()), rel=1e-4)
    drawn.train(progress=False, until=2)
    assert len(drawn.losses) == 2 and drawn.save_result(tmp_path / "out").is_file()
    with pytest.raises(SpdinvError, match="needs --start"):
        trainer(tiny, tmp_path / "c", word_teacher=1.0)
