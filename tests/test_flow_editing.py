"""Editing on rectified-flow transformers (tiny SD3 / SD3.5 / FLUX pipelines built in memory): the
joint-attention engines (p2p, masactrl, rf_edit) and FlowEdit, through `edit()`, `edits()` and
`spdinv edit`."""

import json

import pytest
import torch

import spdinv.editing.joint as joint
from spdinv.cli import main
from spdinv.editing import edit, edits, get_engine
from spdinv.editing.flow_p2p import FlowP2PEditor
from spdinv.editing.joint import JointEditingProcessor, JointEditor, TokenLayout, joint_layers
from spdinv.editing.attention import installed_processors
from spdinv.editing.p2p import P2POptions
from spdinv.errors import SpdinvError
from spdinv.images import conform_image, to_tensor
from spdinv.inversion import METHODS, applies
from spdinv.model import from_pipeline
from spdinv.sampling import BatchRows
from spdinv.testing import hand_drawn_square, tiny_flux_pipeline, tiny_model, tiny_sd3_pipeline

SOURCE = "a large purple square in the centre on a brown background"
TARGET = "a large green square in the centre on a brown background"
STEPS = 4
FLOW_ENGINES = ["p2p", "masactrl", "none", "rf_edit"]
BUILDERS = {
    "sd3": lambda: tiny_sd3_pipeline(),
    "sd35-medium": lambda: tiny_sd3_pipeline(t5=True, dual_attention_layers=(0,)),
    "flux-dev": lambda: tiny_flux_pipeline(),
}


@pytest.fixture(scope="module")
def models():
    return {name: from_pipeline(build()) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def image():
    return to_tensor(conform_image(hand_drawn_square(), 32)[0])


def transformer_output(model, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(2, model.vae.config.latent_channels, 4, 4, generator=generator)
    return model.eps(z, 500.0, model.encode_prompt([SOURCE, TARGET]), 3.0)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_joint_processor_computes_what_the_stock_processor_does(models, name):
    """Installed on every layer with nothing to edit, the outputs equal the stock processors' up to
    float rounding (1e-5: the same products, another kernel order)."""
    model = models[name]
    stock = transformer_output(model)
    editor = JointEditor()
    editor.rows = BatchRows.of([], 2)
    processors = {layer.key: JointEditingProcessor(layer, editor) for layer in joint_layers(model.transformer)}
    with installed_processors(model.transformer, processors):
        ours = transformer_output(model)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_processors_are_restored_after_the_context_and_on_error(models, image):
    model = models["flux-dev"]
    before = dict(model.transformer.attn_processors)
    for engine in FLOW_ENGINES:
        edit(model, image, SOURCE, TARGET, "ddim", engine, num_steps=2)
        assert all(before[key] is value for key, value in model.transformer.attn_processors.items())
    editor = get_engine("masactrl").editor(model, SOURCE, TARGET, get_engine("masactrl").options(start_layer=0.0))
    editor.prepare(model, __import__("spdinv.inversion", fromlist=["invert"]).invert(
        model, image, SOURCE, "ddim", 2, progress=False, diagnose=False))
    with pytest.raises(RuntimeError, match="boom"):
        with editor.installed(model.transformer):
            assert any(isinstance(p, JointEditingProcessor) for p in model.transformer.attn_processors.values())
            raise RuntimeError("boom")
    assert all(before[key] is value for key, value in model.transformer.attn_processors.items())


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("engine", FLOW_ENGINES)
def test_identical_prompts_reproduce_the_reconstruction(models, image, name, engine):
    """Source and target prompts equal, guidance equal: every engine's target is the source branch
    (the reconstruction) up to rounding (1e-4: p2p recomputes the target row from its maps)."""
    result = edit(models[name], image, SOURCE, SOURCE, "ddim", engine, num_steps=STEPS, guidance_scale=3.0,
                  source_guidance_scale=3.0)
    torch.testing.assert_close(result.latents[-1, 1], result.latents[-1, 0], atol=1e-4, rtol=0)


def capture_attention(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every (q, k, v) the joint processors hand to the attention kernel, in call order."""
    seen = []
    kernel = joint.attention

    def spy(q, k, v, mask):
        seen.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return kernel(q, k, v, mask)

    monkeypatch.setattr(joint, "attention", spy)
    return seen


def image_tokens(name: str) -> slice:
    """The image tokens of the tiny models' joint layers (32x32 images: 8x8 latents, 2x2 patches = 16 tokens)."""
    return slice(None, 16) if name.startswith("sd3") else slice(-16, None)


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_masactrl_target_rows_read_the_source_image_keys_and_values(models, image, monkeypatch, name):
    model = models[name]
    seen = capture_attention(monkeypatch)
    edit(model, image, SOURCE, TARGET, "ddim", "masactrl", num_steps=STEPS, start_step=0.0, start_layer=0.0,
         guidance_scale=1.0, source_guidance_scale=1.0)  # one conditional row per branch: rows 0 and 1
    image_part = image_tokens(name)
    assert len(seen) == STEPS * len(joint_layers(model.transformer))
    for q, k, v in seen:
        torch.testing.assert_close(k[1, :, image_part], k[0, :, image_part], atol=0, rtol=0)
        torch.testing.assert_close(v[1, :, image_part], v[0, :, image_part], atol=0, rtol=0)
    text = slice(16, None) if name == "sd3" else slice(None, -16)
    assert any(not torch.equal(k[1, :, text], k[0, :, text]) for _, k, _ in seen)  # the text keys stay the target's


def test_rf_edit_shares_values_in_the_chosen_blocks_and_steps_only(models, image, monkeypatch):
    """FLUX (1 dual + 1 single block): start_layer 0 of the single blocks, inject 2 of 4 steps: the
    single block's whole V is the source's in steps 0-1, and nowhere else."""
    model = models["flux-dev"]
    seen = capture_attention(monkeypatch)
    edit(model, image, SOURCE, TARGET, "ddim", "rf_edit", num_steps=STEPS, inject=0.5, start_layer=0.0)
    layers = joint_layers(model.transformer)
    assert [layer.kind for layer in layers] == ["joint", "single"]
    assert len(seen) == STEPS  # only the single block gets a processor: the dual block keeps the stock one
    assert [torch.equal(v[1], v[0]) for _, _, v in seen] == [True, True, False, False]
    assert not torch.equal(seen[0][1][1], seen[0][1][0])  # the keys stay the target's own


def test_flow_p2p_replaces_the_image_query_text_key_block_and_keeps_rows_normalised(models):
    model = models["sd3"]
    editor = FlowP2PEditor(model, SOURCE, TARGET, P2POptions(cross_replace=1.0, self_replace=0.0, reweight=1.0))
    editor.cross_steps, editor.self_steps, editor.blend_names, editor.step_index = 10, 0, set(), 0
    text = editor.mapper.shape[0]
    layout = TokenLayout(slice(0, 4), slice(4, 4 + text))
    probs = torch.rand(2, 2, 4 + text, 4 + text).softmax(-1)
    original = probs.clone()
    layer = joint_layers(model.transformer)[0]
    assert editor.edit_joint_probs(layer, probs, layout)
    aligned = editor.alphas == 1
    torch.testing.assert_close(probs[1, :, :4, 4:][..., aligned], original[0, :, :4, 4:][..., editor.mapper][..., aligned])
    torch.testing.assert_close(probs[1, :, :4].sum(-1), torch.ones(2, 4))
    assert torch.equal(probs[1, :, 4:], original[1, :, 4:])  # text queries untouched
    assert torch.equal(probs[0], original[0])
    assert not bool(aligned.all())  # "purple" -> "green": the swapped word keeps its own map


@pytest.mark.parametrize("name", list(BUILDERS))  # CLIP + T5's zeros, CLIP + T5, T5 only
def test_flow_p2p_local_blend_cuts_a_mask_from_the_blend_word_maps(models, image, name):
    result = edit(models[name], image, SOURCE, TARGET, "ddim", "p2p", num_steps=STEPS, blend="purple green",
                  blend_start=0.0)
    assert result.mask is not None and result.mask.shape == (1, 1, 8, 8)
    assert 0 < float(result.mask.mean()) <= 1 and torch.isfinite(result.edited).all()


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_every_flow_inversion_with_every_flow_engine_through_edits(models, image, name):
    model = models[name]
    methods = [m for m in METHODS if applies(model, m) and not METHODS[m].engine_free and m != "null_text"]
    options = {"spdinv": {"K": 2}, "aidi": {"iterations": 2}}
    results = list(edits(model, image, SOURCE, TARGET, methods, FLOW_ENGINES, num_steps=3,
                         inversion_options=options))
    assert [(r.inversion.method, r.engine) for r in results] == [(m, e) for m in methods for e in FLOW_ENGINES]
    for result in results:
        assert torch.isfinite(result.edited).all() and result.network_calls_by["edit"] > 0


def test_the_engines_that_do_not_apply_are_refused_in_one_line(models, image):
    with pytest.raises(SpdinvError, match="engine pnp does not support rectified-flow transformers") as error:
        edit(models["sd3"], image, SOURCE, TARGET, "ddim", "pnp", num_steps=2)
    assert "\n" not in str(error.value)
    with pytest.raises(SpdinvError, match="rf_edit shares the values of a flow transformer") as error:
        edit(tiny_model(), image, SOURCE, TARGET, "ddim", "rf_edit", num_steps=2)
    assert "\n" not in str(error.value)
    with pytest.raises(SpdinvError, match="ProxEdit guidance \\(prox\\) is for diffusion models"):
        edit(models["sd3"], image, SOURCE, TARGET, "ddim", "p2p", num_steps=2, prox=True)
    with pytest.raises(SpdinvError, match="blend word 'cat' is not in the source prompt"):
        edit(models["flux-dev"], image, SOURCE, TARGET, "ddim", "p2p", num_steps=2, blend="cat green")


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_flowedit_runs_counts_its_rows_and_keeps_the_source_for_identical_prompts(models, image, name):
    model = models[name]
    rows_per_call = 4 if name == "sd3" else 2  # SD3: [uncond, cond] x [source, target]; FLUX: distilled guidance
    edited = edit(model, image, SOURCE, TARGET, "flowedit", "none", num_steps=8, n_max=0.5)
    assert torch.isfinite(edited.edited).all() and edited.inversion.network_calls == 0
    assert edited.network_calls_by["edit"] == 4 * rows_per_call  # 4 of 8 steps in the window, one call each
    assert not torch.allclose(edited.latents[-1, 1], edited.inversion.z_0[0], atol=1e-3)
    torch.testing.assert_close(edited.latents[-1, 0], edited.inversion.z_0[0], atol=0, rtol=0)  # x_src kept
    guidance = edited.inversion.guidance_scale
    same = edit(model, image, SOURCE, SOURCE, "flowedit", "none", num_steps=8, n_max=1.0, guidance_scale=guidance)
    # v_tar - v_src of identical inputs in different rows of one batch: zero up to the kernels' row-dependent
    # rounding, summed over 8 steps (measured <= 2e-5; an edit moves the latent by ~0.2)
    torch.testing.assert_close(same.latents[-1, 1], same.inversion.z_0[0], atol=1e-4, rtol=0)
    averaged = edit(model, image, SOURCE, TARGET, "flowedit", "none", num_steps=8, n_max=0.5, n_min=0.25, n_avg=2)
    assert averaged.network_calls_by["edit"] == (2 * 2 + 2) * rows_per_call  # 2 FlowEdit steps x 2 draws, 2 regular steps


def test_flowedit_takes_engine_none_only_and_flow_models_only(models, image):
    with pytest.raises(SpdinvError, match="flowedit edits without an inversion.*engine none only, not p2p") as error:
        edit(models["sd3"], image, SOURCE, TARGET, "flowedit", "p2p", num_steps=2)
    assert "\n" not in str(error.value)
    with pytest.raises(SpdinvError, match="flowedit inverts rectified-flow models"):
        edit(tiny_model(), image, SOURCE, TARGET, "flowedit", "none", num_steps=2)


def test_a_saved_flowedit_samples_back_the_same(models, image, tmp_path):
    from spdinv.export import load_inversion, save_inversion
    from spdinv.editing import run_editor
    from spdinv.editing.base import NoEditor

    model = models["sd3"]
    result = edit(model, image, SOURCE, TARGET, "flowedit", "none", num_steps=6, n_max=0.5, n_avg=2)
    save_inversion(result.inversion, tmp_path)
    loaded = load_inversion(tmp_path, model)
    _, latents, _, _ = run_editor(model, loaded, TARGET, NoEditor())
    torch.testing.assert_close(latents, result.latents, atol=1e-6, rtol=0)


def test_spdinv_edit_runs_flow_engines_and_flowedit_from_the_command_line(tmp_path, capsys):
    folder = tmp_path / "sd3"
    tiny_sd3_pipeline().save_pretrained(folder)
    picture = tmp_path / "square.png"
    hand_drawn_square().resize((32, 32)).save(picture)
    common = [str(picture), "--source", SOURCE, "--target", TARGET, "--model", str(folder), "--steps", "3",
              "--no-cache", "--quiet"]
    assert main(["edit", *common, "--inversion", "ddim", "--engine", "all", "--out", str(tmp_path / "a")]) == 0
    runs = json.loads((tmp_path / "a" / "config.json").read_text())["runs"]
    assert [r["engine"] for r in runs] == ["p2p", "masactrl", "none", "rf_edit"]  # pnp: UNets only
    assert all(r["network_calls"]["edit"] > 0 for r in runs)
    assert main(["edit", *common, "--inversion", "flowedit", "--engine", "none", "--n-max", "1",
                 "--out", str(tmp_path / "b")]) == 0
    runs = json.loads((tmp_path / "b" / "config.json").read_text())["runs"]
    assert runs[0]["network_calls"] == {"invert": 0, "diagnostics": 0, "edit": 3 * 4}
    assert main(["edit", *common, "--inversion", "flowedit", "--engine", "p2p", "--out", str(tmp_path / "c")]) != 0
    assert "engine none only" in capsys.readouterr().err
