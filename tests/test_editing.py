"""Editing: every inversion x every engine on the tiny model, processor restoration, P2P / MasaCtrl /
PnP behaviour, bad input, the `spdinv edit` command and its inversion cache."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import Tensor

import spdinv.editing.cache
import spdinv.sampling
from spdinv.cli import main
from spdinv.editing import ENGINES, edit, run_editor
from spdinv.editing.attention import attention_layers, nearest_scale
from spdinv.editing.cache import InversionCache
from spdinv.editing.p2p import P2PEditor, P2POptions, blend_map_scale
from spdinv.editing.tokens import names_background, refinement_mapper, word_positions
from spdinv.errors import SpdinvError
from spdinv.inversion import invert
from spdinv.inversion.reconstruction import reconstruct_latent
from spdinv.testing import DIFFUSION_METHODS, UNET_ENGINES, same_up_to_rounding, unet_batch_sizes


SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"
STEPS = 6
FAST = {"spdinv": dict(K=3), "null_text": dict(inner_steps=2), "aidi": dict(iterations=3)}
FAST_FLAGS = ["--K", "2", "--inner-steps", "1", "--iterations", "2"]


@pytest.fixture(scope="module")
def image(red_circle):
    return Image.open(red_circle).convert("RGB")


@pytest.fixture(scope="module")
def inversions(tiny, image):
    return {m: invert(tiny, image, SOURCE, m, STEPS, progress=False, diagnose=False, **FAST.get(m, {}))
            for m in DIFFUSION_METHODS}


def untouched(model, before: dict) -> bool:
    """The UNet has exactly the original processor objects and no forward hooks left."""
    after = model.unet.attn_processors
    same = list(after) == list(before) and all(after[k] is before[k] for k in before)
    return same and not any(module._forward_hooks for module in model.unet.modules())


def engine_options(engine: str) -> dict:
    return dict(blend="red blue") if engine == "p2p" else {}


@pytest.mark.parametrize("engine", UNET_ENGINES)
@pytest.mark.parametrize("method", DIFFUSION_METHODS)
def test_every_inversion_with_every_engine(tiny, inversions, method, engine):
    before = dict(tiny.unet.attn_processors)
    inversion = inversions[method]
    result = edit(tiny, None, SOURCE, TARGET, inversion, engine, **engine_options(engine))
    assert result.edited.shape == result.reconstruction.shape == (1, 3, 32, 32)
    assert torch.isfinite(result.edited).all() and result.latents.shape == (STEPS + 1, 2, 4, 8, 8)
    assert untouched(tiny, before)
    assert (result.mask is not None) == (engine == "p2p")
    assert set(result.timings) >= {"invert", "edit", "total"}
    if engine != "pnp":  # the source branch is the reconstruction (PnP pins it to the trajectory)
        assert same_up_to_rounding(result.latents[-1, :1], reconstruct_latent(tiny, inversion))  # batch 3-4 vs 1-2


@pytest.mark.parametrize("engine", UNET_ENGINES)
def test_direct_inversion_source_branch_walks_the_trajectory(tiny, inversions, engine):
    direct = inversions["direct"]
    result = edit(tiny, None, SOURCE, TARGET, direct, engine, **engine_options(engine))
    assert torch.equal(result.latents[:, 0].flip(0), direct.trajectory)  # exact by construction, in any batch
    assert not torch.allclose(result.latents[-1, 1], result.latents[-1, 0], atol=1e-3)


@pytest.mark.parametrize("engine", UNET_ENGINES)
def test_processors_restored_after_an_error_inside_the_sampler(tiny, inversions, engine):
    before = dict(tiny.unet.attn_processors)
    editor = ENGINES[engine].editor(tiny, SOURCE, TARGET, ENGINES[engine].options(**engine_options(engine)))
    end_step = editor.end_step

    def failing(i, t, z):
        if i == 2:
            assert not untouched(tiny, before) or engine == "none"  # the engine really was installed
            raise RuntimeError("boom")
        return end_step(i, t, z)

    editor.end_step = failing
    with pytest.raises(RuntimeError, match="boom"):
        run_editor(tiny, inversions["spdinv"], TARGET, editor)
    assert untouched(tiny, before)


def test_edit_inverts_by_name_and_uses_the_cache(tiny, image, tmp_path):
    cache = InversionCache(tmp_path / "cache")
    first = edit(tiny, image, SOURCE, TARGET, "ddim", "none", num_steps=3, cache=cache)
    second = edit(tiny, image, SOURCE, TARGET, "ddim", "masactrl", num_steps=3, cache=cache)
    assert (first.cache_hit, second.cache_hit, cache.hits, cache.misses) == (False, True, 1, 1)
    assert torch.equal(first.inversion.trajectory, second.inversion.trajectory)
    assert edit(tiny, image, SOURCE, TARGET, "spdinv", "none", num_steps=3, cache=cache, K=2).cache_hit is False
    assert edit(tiny, image, SOURCE, TARGET, "spdinv", "none", num_steps=3, cache=cache, K=3).cache_hit is False
    assert edit(tiny, image, SOURCE, TARGET, "spdinv", "none", num_steps=3, cache=cache, K=3).cache_hit is True
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no staging leftovers


@pytest.mark.parametrize("method,sampler", [("spdinv", dict(uncond="source")), ("negative_prompt", {}), ("null_text", {}),
                                            ("ddim", dict(source_guidance_scale=7.5))])
def test_p2p_replace_with_identical_prompts_reproduces_the_reconstruction(tiny, inversions, method, sampler):
    result = edit(tiny, None, SOURCE, SOURCE, inversions[method], "p2p", mode="replace", **sampler)
    assert torch.allclose(result.latents[:, 1], result.latents[:, 0], atol=1e-3)
    assert torch.allclose(result.edited, result.reconstruction, atol=1e-3)


def test_p2p_full_replacement_gives_the_target_the_source_attention(tiny, inversions):
    def recorded(**options):
        editor = P2PEditor(tiny, SOURCE, TARGET, P2POptions(mode="replace", reweight=1.0, **options))
        editor.record = True
        run_editor(tiny, inversions["spdinv"], TARGET, editor)
        return editor.recorded

    replaced = recorded(cross_replace=1.0, self_replace=1.0, self_replace_scale=1.0)
    assert {name.endswith("attn2") for name in replaced} == {True, False}
    for maps in replaced.values():
        assert torch.equal(maps[1], maps[0])
    free = recorded(cross_replace=0.0, self_replace=0.0)
    assert any(not torch.allclose(maps[1], maps[0]) for name, maps in free.items() if name.endswith("attn2"))


def test_p2p_refine_and_reweight_change_the_edit(tiny, inversions):
    inversion = inversions["spdinv"]
    plain = edit(tiny, None, SOURCE, TARGET, inversion, "p2p", reweight=1.0, blend="red blue")
    weighted = edit(tiny, None, SOURCE, TARGET, inversion, "p2p", blend="red blue")  # x2 on 'blue' by default
    assert not torch.allclose(plain.latents[-1, 1], weighted.latents[-1, 1])
    refined = edit(tiny, None, SOURCE, "a large blue circle in the centre on a white background with stripes",
                   inversion, "p2p")
    assert torch.isfinite(refined.edited).all()


def test_local_blend_mask(tiny, inversions):
    result = edit(tiny, None, SOURCE, TARGET, inversions["spdinv"], "p2p", blend="red blue")
    mask = result.mask
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.max() == 1.0
    outside = (mask[0, 0] == 0).expand(4, -1, -1)
    assert torch.equal(result.latents[-1, 1][outside], result.latents[-1, 0][outside])


def test_local_blend_localises_a_synthetic_word_map(tiny, inversions):
    editor = P2PEditor(tiny, SOURCE, TARGET, P2POptions(blend="red blue"))
    editor.prepare(tiny, inversions["spdinv"])
    red, blue = word_positions(tiny.tokenizer, SOURCE, "red")[0], word_positions(tiny.tokenizer, TARGET, "blue")[0]
    for layer in editor.blend_layers:  # 8x8 layers: source 'red' at (2, 5), target 'blue' at (6, 1)
        maps = torch.full((2, 4, 64, tiny.tokenizer.model_max_length), 1e-3)
        maps[0, :, 2 * 8 + 5, red] = 1.0
        maps[1, :, 6 * 8 + 1, blue] = 1.0
        editor._keep_blend_maps(layer, maps)  # what it keeps of them: the blend words' rows, summed
    z = torch.stack([torch.zeros(4, 8, 8), torch.ones(4, 8, 8)])
    blended = editor.local_blend(z)
    expected = torch.zeros(8, 8)
    expected[1:4, 4:7] = 1  # 3x3 max-pool around each peak, union of source and target
    expected[5:8, 0:3] = 1
    assert torch.equal(editor.mask[0, 0], expected)
    assert torch.equal(blended[1], expected.expand(4, -1, -1)) and torch.equal(blended[0], z[0])


def test_prox_guidance_is_off_by_default_and_changes_the_edit(tiny, inversions):
    inversion = inversions["spdinv"]
    assert P2POptions().prox is False
    plain = edit(tiny, None, SOURCE, TARGET, inversion, "p2p")
    prox = edit(tiny, None, SOURCE, TARGET, inversion, "p2p", prox=True, prox_timestep=1000)
    # ProxEdit reads every unconditional row, so the source branch is sampled in a batch of 4, not 3
    assert same_up_to_rounding(prox.latents[:, 0], plain.latents[:, 0])
    assert not torch.allclose(plain.latents[-1, 1], prox.latents[-1, 1])


def test_masactrl_before_its_start_step_is_plain_sampling(tiny, inversions):
    inversion = inversions["spdinv"]
    plain = edit(tiny, None, SOURCE, TARGET, inversion, "none")
    mutual = edit(tiny, None, SOURCE, TARGET, inversion, "masactrl", start_step=0.5, start_layer=0.0)
    start = 3  # round(0.5 * 6): steps 0, 1, 2 are plain
    assert same_up_to_rounding(mutual.latents[: start + 1], plain.latents[: start + 1])  # batch of 4 against 3
    assert not same_up_to_rounding(mutual.latents[start + 1, 1], plain.latents[start + 1, 1])
    pinned = edit(tiny, None, SOURCE, TARGET, inversion, "masactrl", pin_source=True)
    assert torch.equal(pinned.latents[:, 0].flip(0), inversion.trajectory.to(pinned.latents))


def test_pnp_injection_changes_the_target(tiny, inversions):
    inversion = inversions["spdinv"]
    plain = edit(tiny, None, SOURCE, TARGET, inversion, "none")
    injected = edit(tiny, None, SOURCE, TARGET, inversion, "pnp")
    assert not torch.allclose(injected.latents[-1, 1], plain.latents[-1, 1], atol=1e-3)
    off = edit(tiny, None, SOURCE, TARGET, inversion, "pnp", feature_injection=0.0, attention_injection=0.0)
    # with nothing injected PnP's processors compute the same attention as the default one, through
    # other kernels: equal up to rounding (same_up_to_rounding's 1e-4 of the magnitude), not bit for bit
    assert same_up_to_rounding(off.latents[:, 1], plain.latents[:, 1])
    features = edit(tiny, None, SOURCE, TARGET, inversion, "pnp", attention_injection=0.0)
    assert not torch.allclose(features.latents[-1, 1], plain.latents[-1, 1], atol=1e-3)


@pytest.mark.parametrize("engine, rows", [("none", 3), ("p2p", 3), ("pnp", 3), ("masactrl", 4)])
def test_an_unguided_source_branch_costs_no_unconditional_row(tiny, inversions, monkeypatch, engine, rows):
    """The source samples at guidance 1, so its unconditional row would be discarded: the UNet batch
    is [target uncond, source cond, target cond] (MasaCtrl keeps it: the target's unconditional row
    reads it), and the edit is the one the full [uncond, cond] batch gives."""
    inversion = inversions["spdinv"]
    with unet_batch_sizes(tiny.unet) as batches:
        lean = edit(tiny, None, SOURCE, TARGET, inversion, engine, **engine_options(engine))
    assert batches == [rows] * STEPS
    full_rows = spdinv.sampling.batch_rows
    monkeypatch.setattr(spdinv.sampling, "batch_rows", lambda branches, every_uncond=False: full_rows(branches, True))
    full = edit(tiny, None, SOURCE, TARGET, inversion, engine, **engine_options(engine))
    assert same_up_to_rounding(full.latents, lean.latents)
    if engine == "p2p":  # a binary mask cut from attention maps computed in batches of 4 and of 3 rows:
        # a cell whose map sits within rounding of the threshold may flip; at most one of the 64 may
        assert int((full.mask != lean.mask).sum()) <= 1


def test_attention_layers_follow_the_module_tree_not_the_dict_order(tiny):
    layers = attention_layers(tiny.unet)
    assert [layer.place for layer in layers] == ["down", "down", "mid", "mid", "up", "up", "up", "up"]
    assert list(tiny.unet.attn_processors)[-1].startswith("mid_block")  # the dict puts mid last
    assert [layer.downscale for layer in layers] == [1, 1, 2, 2, 1, 1, 1, 1]
    assert {layer.key for layer in layers} == set(tiny.unet.attn_processors)
    assert [layer.depth for layer in layers if not layer.cross] == [0, 1, 2, 3]


def test_layers_of_a_three_level_unet_like_the_embedded_model():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=16)
    layers = [layer for layer in attention_layers(unet) if layer.cross]
    assert [(layer.place, layer.block, layer.downscale) for layer in layers] == [
        ("down", 0, 1), ("down", 1, 2), ("mid", 0, 4), ("up", 1, 2), ("up", 1, 2), ("up", 2, 1), ("up", 2, 1)]
    blend = nearest_scale([layer for layer in layers if layer.place != "mid"], 0.25)
    assert {layer.downscale for layer in blend} == {2}  # SD's 16x16-of-64 level is absent: the nearest one
    # LocalBlend's default reads the maps 16 tokens a side: this model's finest for its 16x16 latent
    default = nearest_scale([layer for layer in layers if layer.place != "mid"], blend_map_scale((16, 16), None))
    assert {layer.downscale for layer in default} == {1}
    assert blend_map_scale((64, 64), None) == 0.25 and blend_map_scale((16, 16), 0.5) == 0.5


def test_local_blend_range_norm_removes_the_maps_floor(tiny, inversions):
    """A word map with a floor of 0.8 of its max: 'max' (P2P's) keeps the whole frame at threshold
    0.3, 'range' only the peak and its 3x3 neighbourhood."""
    masks = {}
    for norm in ("max", "range"):
        editor = P2PEditor(tiny, SOURCE, TARGET, P2POptions(blend="red blue", blend_norm=norm))
        editor.prepare(tiny, inversions["spdinv"])
        red, blue = word_positions(tiny.tokenizer, SOURCE, "red")[0], word_positions(tiny.tokenizer, TARGET, "blue")[0]
        for layer in editor.blend_layers:
            maps = torch.full((2, 4, 64, tiny.tokenizer.model_max_length), 0.8)
            maps[:, :, 3 * 8 + 3, [red, blue]] = 1.0
            editor._keep_blend_maps(layer, maps)
        editor.local_blend(torch.zeros(2, 4, 8, 8))
        masks[norm] = editor.mask[0, 0]
    assert masks["max"].sum() == 64 and masks["range"].sum() == 9 and masks["range"][2:5, 2:5].all()


def test_local_blend_noise_map_follows_where_the_noise_predictions_differ(tiny, inversions):
    """blend_map 'noise': the mask is cut from |eps_target - eps_source| summed over the steps, with no
    blend words and no cross-attention layers read; a difference at one latent cell keeps that
    cell and its 3x3 neighbourhood."""
    assert (P2POptions().blend_threshold, P2POptions(blend_map="noise").blend_threshold) == (0.3, 0.5)
    editor = P2PEditor(tiny, SOURCE, TARGET, P2POptions(blend_map="noise"))
    editor.prepare(tiny, inversions["spdinv"])
    assert editor.blend_layers == [] and editor.blends
    eps = torch.zeros(2, 4, 8, 8)
    eps[1, :, 3, 3] = 0.5
    for i in range(2):
        editor.guide(i, 0, None, eps, torch.ones(2, 1, 1, 1))
    assert torch.allclose(editor.noise_difference[0, 0, 3, 3], torch.tensor(1.0))
    z = torch.stack([torch.zeros(4, 8, 8), torch.ones(4, 8, 8)])
    blended = editor.local_blend(z)
    mask = editor.mask[0, 0]
    assert mask.sum() == 9 and mask[2:5, 2:5].all()
    assert torch.equal(blended[1, :, mask.bool()], z[1, :, mask.bool()])
    assert torch.equal(blended[1, :, ~mask.bool()], z[0, :, ~mask.bool()])


def test_local_blend_noise_map_in_a_whole_edit(tiny, inversions):
    """Without blend words, blend_map 'noise' still blends: the edit reports a mask that covers part
    of the frame (range-normalised, so its weakest cell is always out and its strongest in)."""
    result = edit(tiny, None, SOURCE, TARGET, inversions["ddim"], "p2p", blend_map="noise")
    mask = result.mask[0, 0].bool()
    assert 0 < mask.sum() < mask.numel() and torch.isfinite(result.edited).all()


def test_engines_pick_the_official_layers_on_an_sd_shaped_unet(tiny, inversions):
    """SD 1.x topology (narrow channels): 16 transformer blocks, latent 64, cross-attention at 64/32/16."""
    from types import SimpleNamespace

    from spdinv.editing.masactrl import MasaCtrlEditor, MasaCtrlOptions
    from spdinv.editing.pnp import PnPEditor, PnPOptions
    from spdinv.testing import sd15_layout_unet

    unet = sd15_layout_unet()
    model = SimpleNamespace(unet=unet, device=torch.device("cpu"))
    inversion = SimpleNamespace(schedule=SimpleNamespace(num_steps=50), trajectory=torch.zeros(51, 4, 64, 64),
                                z_T=torch.zeros(1, 4, 64, 64))
    masa = MasaCtrlEditor(MasaCtrlOptions())
    masa.prepare(model, inversion)
    assert masa.start_step == 4 and len([l for l in masa.layers if not l.cross]) == 16
    assert {(l.block, l.depth) for l in masa.mutual} == {(2, 10), (2, 11), (2, 12), (3, 13), (3, 14), (3, 15)}
    pnp = PnPEditor(PnPOptions())
    pnp.prepare(model, inversion)
    assert [(l.block, l.attention) for l in pnp.qk_layers] == [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]
    assert pnp.resnet is unet.up_blocks[1].resnets[1] and (pnp.feature_steps, pnp.attention_steps) == (40, 25)
    p2p = P2PEditor(tiny, SOURCE, TARGET, P2POptions(blend="red blue"))
    p2p.prepare(model, inversion)
    assert [(l.place, l.block) for l in p2p.blend_layers] == [("down", 2)] * 2 + [("up", 1)] * 3  # SD's 16x16 maps
    assert {l.downscale for l in p2p.self_layers} == {2, 4, 8} and len(p2p.self_layers) == 11  # <= 32x32
    assert (p2p.cross_steps, p2p.self_steps, p2p.blend_start_step) == (40, 30, 10)


def test_word_positions_handle_multi_token_words_and_phrases(tiny):
    tokenizer = tiny.tokenizer
    prompt = "a zebra circle on a white background"
    zebra = word_positions(tokenizer, prompt, "zebra")
    assert len(zebra) > 1 and zebra == list(range(2, 2 + len(zebra)))  # unknown words split into letters
    assert word_positions(tokenizer, prompt, "circle") == [2 + len(zebra)]
    assert word_positions(tokenizer, prompt, "white background") == [len(zebra) + 5, len(zebra) + 6]
    assert word_positions(tokenizer, prompt, "Circle,") == [2 + len(zebra)]
    assert word_positions(tokenizer, prompt, "square") == []
    mapper, alphas = refinement_mapper([5, 6, 7], [5, 9, 6, 7], 10)
    # target 9 is new (alpha 0); the end token and padding align from the end of each prompt
    assert mapper.tolist() == [0, 1, 2, 2, 3, 4, 5, 6, 7, 8]
    assert alphas.tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("call, message", [
    (dict(blend="green blue"), "blend word 'green' is not in the source prompt"),
    (dict(blend="red green"), "blend word 'green' is not in the target prompt"),
    (dict(reweight_words=("red",)), "reweight word 'red' is not in the target prompt"),
    (dict(mode="replace", target="a blue circle"), "use refine"),
    (dict(cross_replace=1.5), r"cross_replace must be in \[0, 1\], got 1.5"),
    (dict(blend_threshold=0.0), r"blend_threshold must be in \(0, 1\)"),
    (dict(blend_norm="mean"), "unknown p2p blend_norm .mean.; valid: max, range"),
    (dict(blend_map="words"), "unknown p2p blend_map .words.; valid: attention, noise"),
    (dict(engine="masactrl", start_layer=-0.1), "start_layer must be in"),
    (dict(engine="pnp", feature_injection=2.0), "feature_injection must be in"),
    (dict(engine="nope"), "unknown engine 'nope'; valid: p2p, masactrl, pnp, none, rf_edit"),
    (dict(inversion="nope"), "unknown inversion method 'nope'; valid: ddim"),
    (dict(engine="none", blend="red blue"), "do not apply to engine 'none'"),
    (dict(guidance_scale=-1.0), "guidance_scale must be"),
    (dict(uncond="other"), "unknown uncond"),
    (dict(target="  "), "the target prompt is empty"),
])
def test_bad_input_raises_one_line_errors(tiny, image, call, message):
    call = dict(call)
    target = call.pop("target", TARGET)
    with pytest.raises(SpdinvError, match=message) as error:
        edit(tiny, image, SOURCE, target, call.pop("inversion", "ddim"), call.pop("engine", "p2p"), num_steps=2, **call)
    assert "\n" not in str(error.value)


def test_a_given_inversion_must_match_the_source_prompt(tiny, inversions):
    with pytest.raises(SpdinvError, match="another source prompt"):
        edit(tiny, None, "a small green star", TARGET, inversions["ddim"], "none")


# ---------------------------------------------------------------------------------------- the CLI


def edit_args(image, out, model, cache, *extra):
    return ["edit", str(image), "--source", SOURCE, "--target", TARGET, "--model", str(model), "--steps", "3",
            "--out", str(out), "--cache", str(cache), "--quiet", *extra]


def test_cli_edit_writes_everything_and_reuses_the_cached_inversion(tmp_path, tiny_dir, red_circle, capsys,
                                                                    monkeypatch):
    calls = []
    real_invert = spdinv.editing.cache.run_method
    monkeypatch.setattr(spdinv.editing.cache, "run_method", lambda *a, **k: calls.append(1) or real_invert(*a, **k))
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(edit_args(red_circle, out, tiny_dir, cache, "--blend", "red blue", "--K", "2")) == 0
    assert {p.name for p in out.iterdir()} == {"source.png", "edit.png", "reconstruction.png", "mask.png",
                                               "grid.png", "config.json", ".spdinv-manifest.json"}
    config = json.loads((out / "config.json").read_text())
    run = config["runs"][0]
    assert (run["inversion"], run["engine"], run["cache"]) == ("spdinv", "p2p", "cache miss")
    assert run["engine_options"]["blend"] == [["red"], ["blue"]] and run["inversion_options"] == {"K": 2}
    assert Image.open(out / "mask.png").size == (32, 32) and Image.open(out / "edit.png").size == (32, 32)
    grid = Image.open(out / "grid.png")
    assert grid.width > 4 * 192 and grid.height > 192
    assert "spdinv + p2p" in capsys.readouterr().out

    again = tmp_path / "again"
    assert main(edit_args(red_circle, again, tiny_dir, cache, "--engine", "masactrl", "--K", "2")) == 0
    assert json.loads((again / "config.json").read_text())["runs"][0]["cache"] == "cache hit"
    assert len(calls) == 1 and not (again / "mask.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_cli_edit_all_inversions_and_engines(tmp_path, tiny_dir, red_circle):
    out = tmp_path / "out"
    code = main(edit_args(red_circle, out, tiny_dir, tmp_path / "cache", "--inversion", "all", "--engine", "all",
                          "--blend", "red blue", "--no-cache", *FAST_FLAGS))
    assert code == 0 and not (tmp_path / "cache").exists()
    runs = json.loads((out / "config.json").read_text())["runs"]
    assert [(r["inversion"], r["engine"]) for r in runs] == [(m, e) for m in DIFFUSION_METHODS for e in UNET_ENGINES]
    assert {r["cache"] for r in runs} == {"not cached"}
    assert runs[0]["inversion_options"] == {} and {r["inversion_options"].get("K") for r in runs} == {None, 2}
    for m in DIFFUSION_METHODS:
        assert (out / f"edit-{m}-pnp.png").exists() and (out / f"mask-{m}-p2p.png").exists()
    assert Image.open(out / "grid.png").height > len(runs) * 192


def test_the_executable_flushes_its_output_before_its_fast_exit(tmp_path, tiny_dir, red_circle):
    """`python -m spdinv` (like the `spdinv` script) leaves through os._exit: piped stdout and
    stderr must still arrive whole, with the right exit status."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"OMP_NUM_THREADS": "1"}

    def spdinv_process(*args):
        return subprocess.run([sys.executable, "-m", "spdinv", *args], capture_output=True, text=True,
                              env=environment, timeout=300)

    out = tmp_path / "out"
    done = spdinv_process(*edit_args(red_circle, out, tiny_dir, tmp_path / "cache", "--inversion", "ddim"))
    assert done.returncode == 0, done.stderr
    assert "ddim + p2p: reconstruction PSNR" in done.stdout and done.stdout.endswith(" s\n")
    assert json.loads((out / "config.json").read_text())["runs"][0]["inversion"] == "ddim"
    failed = spdinv_process(*edit_args(red_circle, tmp_path / "bad", tiny_dir, tmp_path / "cache", "--blend", "green"))
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "'green'" in failed.stderr


@pytest.mark.parametrize("flags, message", [
    (["--blend", "green blue"], "blend word 'green' is not in the source prompt"),
    (["--p2p-mode", "replace", "--target", "a blue circle"], "use refine"),
    (["--cross-replace", "1.5"], "cross_replace must be in [0, 1]"),
    (["--engine", "nope"], "unknown engine 'nope'"),
    (["--inversion", "nope"], "unknown inversion method 'nope'"),
    (["--pin-source"], "--pin-source is a masactrl option"),
    (["--inversion", "ddim", "--K", "3"], "--K do(es) not apply to inversion ddim"),
    (["--cross-replace", "lots"], "expected a number"),
])
def test_cli_bad_input_exits_2_in_one_line_and_writes_nothing(tmp_path, tiny_dir, red_circle, capsys, flags, message):
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = main(edit_args(red_circle, out, tiny_dir, cache, *flags))
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() and not cache.exists()


def test_same_seed_same_machine_gives_identical_edits(tiny, image):
    """Reproducibility on one machine is exact (README, "Reproducibility"): the same computation
    in the same shapes rounds the same way."""
    runs = [edit(tiny, image, SOURCE, TARGET, "spdinv", "p2p", num_steps=3, seed=7, K=2, blend="red blue")
            for _ in range(2)]
    assert torch.equal(runs[0].edited, runs[1].edited) and torch.equal(runs[0].latents, runs[1].latents)
    assert torch.equal(runs[0].inversion.trajectory, runs[1].inversion.trajectory)


def test_edits_inverts_once_per_method_and_each_pair_is_the_edit(tiny, image, monkeypatch):
    import spdinv.editing
    from spdinv.editing import edits

    real_invert, calls = spdinv.editing.run_method, []
    monkeypatch.setattr(spdinv.editing, "run_method", lambda *a, **k: calls.append(a[3]) or real_invert(*a, **k))
    results = list(edits(tiny, image, SOURCE, TARGET, ["ddim", "spdinv"], ["none", "p2p"], num_steps=STEPS,
                         inversion_options={"spdinv": FAST["spdinv"]}, engine_options={"p2p": {"blend": "red blue"}}))
    assert calls == ["ddim", "spdinv"]  # one inversion per method, shared by both engines
    assert [(r.inversion.method, r.engine) for r in results] == [("ddim", "none"), ("ddim", "p2p"),
                                                                ("spdinv", "none"), ("spdinv", "p2p")]
    assert results[0].inversion is results[1].inversion and results[1].mask is not None
    single = edit(tiny, None, SOURCE, TARGET, results[3].inversion, "p2p", blend="red blue")
    assert torch.equal(single.latents, results[3].latents)  # the same computations in the same shapes
    with pytest.raises(SpdinvError, match="blend"):  # every engine's words are checked before any inversion
        next(edits(tiny, image, SOURCE, TARGET, ["ddim"], ["none", "p2p"], engine_options={"p2p": {"blend": "zebra"}}))
    assert calls == ["ddim", "spdinv"]


def test_a_preset_inverts_once_per_method_for_engines_under_one_source_prompt(tiny, image, monkeypatch):
    import spdinv.editing
    from spdinv.editing import edits

    real_invert, calls = spdinv.editing.run_method, []
    monkeypatch.setattr(spdinv.editing, "run_method", lambda *a, **k: calls.append((a[3], a[2])) or real_invert(*a, **k))
    results = list(edits(tiny, image, SOURCE, TARGET, ["ddim"], ["p2p", "masactrl", "pnp"],
                         num_steps=2, preset="pnpinv", engine_options={"p2p": {"blend": "red blue"}}))
    assert [r.engine for r in results] == ["p2p", "masactrl", "pnp"]
    # masactrl's protocol inverts under the empty prompt; pnp's script runs on SD's DDIM spacing (offset 1),
    # p2p's and masactrl's on their scripts' (offset 0), so pnp cannot reuse p2p's inversion
    assert calls == [("ddim", SOURCE), ("ddim", ""), ("ddim", SOURCE)]
    assert results[2].network_calls_by["invert"] > 0
    shared = list(edits(tiny, image, SOURCE, TARGET, ["ddim"], ["p2p", "p2p"], num_steps=2, preset="pnpinv",
                        engine_options={"p2p": {"blend": "red blue"}}))
    assert shared[0].inversion is shared[1].inversion and shared[1].network_calls_by["invert"] == 0
    assert calls[3:] == [("ddim", SOURCE)]  # one source prompt, one spacing: one inversion


def test_cli_edit_goes_through_the_library(tmp_path, tiny_dir, red_circle, monkeypatch):
    import spdinv.editing

    real_edits, seen = spdinv.editing.edits, []

    def recorded(model, image, source, target, inversions, engines, **kwargs):
        seen.append((inversions, engines))
        return real_edits(model, image, source, target, inversions, engines, **kwargs)

    monkeypatch.setattr(spdinv.editing, "edits", recorded)
    code = main(edit_args(red_circle, tmp_path / "out", tiny_dir, tmp_path / "cache", "--inversion", "ddim",
                          "--engine", "all", "--no-cache"))
    assert code == 0 and seen == [(["ddim"], UNET_ENGINES)]


@pytest.mark.parametrize("blend", [None, "red blue"])
def test_p2p_fused_self_attention_injection_agrees_with_the_probability_path(tiny, inversions, blend):
    """The target's self-attention injection by the fused kernel (softmax(q_src k_src^T) v_tgt, no
    maps materialised) against the same edit with every injected map materialised: same batch
    shapes, so only the kernels' rounding differs (measured: 3-6e-6 of the latents' largest magnitude on the
    tiny and the embedded model, 10 steps); a
    wrong row or a missed injection differs by 1e-2 or more. Tolerance: same_up_to_rounding (1e-4)."""
    latents = {}
    for fused in (True, False):
        editor = P2PEditor(tiny, SOURCE, TARGET, P2POptions(self_replace=1.0, self_replace_scale=1.0, blend=blend))
        editor.fused = fused
        latents[fused] = run_editor(tiny, inversions["spdinv"], TARGET, editor)[1]
    assert same_up_to_rounding(latents[True], latents[False])
    free = run_editor(tiny, inversions["spdinv"], TARGET, P2PEditor(tiny, SOURCE, TARGET, P2POptions(
        self_replace=0.0, blend=blend)))[1]
    assert not same_up_to_rounding(free[-1, 1], latents[True][-1, 1], relative=1e-3)  # the injection mattered


def test_names_background():
    prompt = "a large green triangle in the centre on a brown grid background"
    assert names_background(prompt, "brown") and names_background(prompt, "grid")
    assert names_background(prompt, "background") and names_background("a cat", "backdrop")
    assert not names_background(prompt, "green") and not names_background(prompt, "triangle")
    assert not names_background(prompt, "centre") and not names_background(prompt, "white")


def test_local_blend_words_naming_the_background_are_not_cut_by_range(tiny, inversions):
    """Issue 27: a background word's map is spread over the frame; 'range' cut a partial mask out of
    it and blended the rest from the source, so the old and the new background fought. Rows whose
    words name the background are scaled by their max (P2P's): with a floor of 0.8 of the max, the
    whole frame; an object word's row keeps 'range' (its peak)."""
    source, target = SOURCE.replace("white", "brown"), TARGET.replace("white", "black")

    def mask(blend: str, source_word: str, target_word: str) -> Tensor:
        editor = P2PEditor(tiny, source, target, P2POptions(blend=blend))
        editor.prepare(tiny, inversions["spdinv"])
        a, b = word_positions(tiny.tokenizer, source, source_word)[0], word_positions(tiny.tokenizer, target, target_word)[0]
        for layer in editor.blend_layers:
            maps = torch.full((2, 4, 64, tiny.tokenizer.model_max_length), 0.8)
            maps[:, :, 3 * 8 + 3, [a, b]] = 1.0
            editor._keep_blend_maps(layer, maps)
        editor.local_blend(torch.zeros(2, 4, 8, 8))
        return editor.mask[0, 0]

    assert mask("brown black", "brown", "black").sum() == 64
    assert mask("red blue", "red", "blue").sum() == 9
