"""Fidelity to the official code (issue 28): LocalBlend reads the edited maps, SPDInv's and
null-text's stop rules, ProxEdit's pull-back rows, presets, the negative prompt and PnP's source
prompt, the default solver."""

import pytest
import torch
from PIL import Image

from spdinv.editing import run_editor
from spdinv.editing.p2p import P2PEditor, P2POptions
from spdinv.inversion import invert
from spdinv.testing import same_up_to_rounding

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"
STEPS = 6


@pytest.fixture(scope="module")
def image(red_circle):
    return Image.open(red_circle).convert("RGB")


@pytest.fixture(scope="module")
def ddim(tiny, image):
    return invert(tiny, image, SOURCE, "ddim", STEPS, progress=False, diagnose=False)


# ---------------------------------------------------------------- LocalBlend's map store


class Snapshots(P2PEditor):
    """A P2P editor that keeps, after every step, LocalBlend's summed maps and the maps each blend
    layer used (`recorded`: the conditional maps after the edit)."""

    def end_step(self, i, t, z):
        self.snapshots.append(({k: v.clone() for k, v in self.maps.items()},
                               {k: self.recorded[k].clone() for k in self.blend_names}))
        return super().end_step(i, t, z)


def test_local_blend_sums_the_edited_maps_at_every_step(tiny, ddim):
    """The official AttentionStore keeps a view of each map that the edit then overwrites, so
    LocalBlend sums the *edited* target maps at every step (not only the first)."""
    editor = Snapshots(tiny, SOURCE, TARGET, P2POptions(blend="red blue"))
    editor.snapshots, editor.record = [], True
    run_editor(tiny, ddim, TARGET, editor)
    assert editor.cross_steps >= 2
    (sum0, used0), (sum1, used1) = editor.snapshots[:2]
    def words(used):  # what LocalBlend keeps of a map: the blend words' attention summed over tokens and heads
        return torch.einsum("bhqk,bk->bq", used.float(), editor.blend_alpha)

    for name in editor.blend_names:
        assert torch.allclose(sum0[name], words(used0[name]), atol=1e-6)  # float32 sums of a few maps <= 2
        assert torch.allclose(sum1[name], words(used0[name]) + words(used1[name]), atol=1e-6)
        assert not torch.allclose(used1[name][1], used1[name][0])  # the target row was reweighted (x2 on 'blue')


def test_local_blend_stores_the_same_maps_in_float16_as_in_float32(tiny, ddim):
    """The store sums the edited maps in float32 whatever the model's dtype. Maps are in [0, 1] and
    the reweight doubles one word, so float16 rounding (half an ulp at 2: 2^-10) bounds each
    element's error by 1e-3; the store sums the blend words' elements over 4 heads, 8 at most."""
    torch.manual_seed(0)
    stored = {}
    for dtype in (torch.float32, torch.float16):
        editor = P2PEditor(tiny, SOURCE, TARGET, P2POptions(blend="red blue"))
        editor.prepare(tiny, ddim)
        generator = torch.Generator().manual_seed(1)
        for layer in editor.blend_layers:
            h, w = layer.size(editor.latent_hw)
            logits = torch.randn(2, 4, h * w, tiny.tokenizer.model_max_length, generator=generator)
            editor.edit_probs(layer, logits.softmax(-1).to(dtype))
        stored[dtype] = editor.maps
    for name, maps in stored[torch.float32].items():
        assert stored[torch.float16][name].dtype == torch.float32
        assert torch.allclose(stored[torch.float16][name], maps, atol=8e-3, rtol=0)


# ---------------------------------------------------------------- stop rules


@pytest.mark.parametrize("rule, updates", [("measured", 0), ("official", 1)])
def test_spdinv_stop_rules_where_the_ddim_guess_already_meets_delta(tiny, image, ddim, rule, updates):
    """delta 1e3 is met by every DDIM guess: the measured rule keeps the guess (0 updates, the DDIM
    trajectory); the official one (P2P/SPDInv.py's SPD_loop) always takes one AdamW step first."""
    inv = invert(tiny, image, SOURCE, "spdinv", STEPS, progress=False, solver="gradient", delta=1e3, stop_rule=rule)
    assert [s.iterations for s in inv.steps] == [updates] * STEPS
    assert [s.gradient_calls for s in inv.steps] == [updates] * STEPS
    if rule == "measured":  # the guesses, up to the batch-shape rounding conftest injects
        assert same_up_to_rounding(inv.trajectory, ddim.trajectory)
    else:  # one AdamW step of lr 1e-3 moves (almost) every element by about 1e-3
        assert (inv.trajectory[1:] - ddim.trajectory[1:]).abs().amax() > 5e-4


def test_spdinv_official_stop_rule_runs_k_updates_when_delta_is_never_met(tiny, image):
    inv = invert(tiny, image, SOURCE, "spdinv", 3, progress=False, solver="gradient", K=4, delta=1e-30,
                 stop_rule="official")
    assert [s.iterations for s in inv.steps] == [4, 4, 4]
    assert all(s.residual_after == s.residual_after for s in inv.steps)  # measured afterwards (diagnose)


@pytest.mark.parametrize("rule, updates", [("measured", 0), ("official", 1)])
def test_null_text_stop_rules_where_the_first_loss_already_meets_the_threshold(tiny, image, rule, updates):
    inv = invert(tiny, image, SOURCE, "null_text", STEPS, progress=False, early_stop=1e3, stop_rule=rule)
    assert [s.iterations for s in inv.steps] == [updates] * STEPS


def test_official_stop_rule_needs_a_descent_solver(tiny, image):
    from spdinv.errors import SpdinvError

    with pytest.raises(SpdinvError, match="stop_rule official is the gradient loop's"):
        invert(tiny, image, SOURCE, "spdinv", 3, progress=False, solver="anderson", stop_rule="official")


# ---------------------------------------------------------------- ProxEdit's pull-back


@pytest.mark.parametrize("pull", ["target", "both"])
def test_prox_pull_both_puts_the_source_row_back_on_the_trajectory(tiny, ddim, pull):
    """Under uncond = source the source row's guidance difference is 0, so its 'keep' mask is all
    ones: with prox_pull 'both' (the official code) the source branch is replaced by the inverted
    latent at every step below prox_timestep; with 'target' it stays the reconstruction."""
    from spdinv.editing import edit

    result = edit(tiny, None, SOURCE, TARGET, ddim, "p2p", uncond="source", prox=True, prox_timestep=1000,
                  prox_pull=pull)
    on_trajectory = torch.allclose(result.latents[1:, 0], ddim.trajectory.flip(0)[1:].to(result.latents), atol=1e-6)
    assert on_trajectory == (pull == "both")


# ---------------------------------------------------------------- presets


def test_spdinv_official_preset_is_its_explicit_options_and_explicit_options_override_it(tiny, image):
    from spdinv.editing import edit
    from spdinv.presets import PRESETS, preset_model

    preset = PRESETS["spdinv-official"]
    fast = dict(K=2, num_steps=3, blend="red blue")
    by_name = edit(tiny, image, SOURCE, TARGET, "spdinv", "p2p", preset="spdinv-official", **fast)
    script_spacing = preset_model(tiny, "spdinv-official", "p2p")  # the script's DDIMScheduler: steps_offset 0
    spelled = edit(script_spacing, image, SOURCE, TARGET, "spdinv", "p2p", **{**preset.inversion["spdinv"],
                                                                               **preset.engines["p2p"], **fast})
    assert torch.equal(by_name.latents, spelled.latents)
    assert by_name.inversion.settings["solver"] == "gradient" and by_name.inversion.settings["stop_rule"] == "official"
    assert by_name.inversion.settings["K"] == 2  # explicit beats the preset's 25
    assert (by_name.options["prox_pull"], by_name.options["blend_norm"], by_name.sampler["uncond"]) == (
        "both", "max", "source")
    overridden = edit(tiny, None, SOURCE, TARGET, by_name.inversion, "p2p", preset="spdinv-official",
                      cross_replace=0.5, uncond="empty", num_steps=3, blend="red blue")
    assert overridden.options["cross_replace"] == 0.5 and overridden.sampler["uncond"] == "empty"
    assert overridden.options["prox_pull"] == "both"


def test_invert_takes_a_preset(tiny, image):
    inv = invert(tiny, image, SOURCE, "spdinv", 2, progress=False, preset="spdinv-official", K=2)
    assert (inv.settings["solver"], inv.settings["stop_rule"], inv.settings["K"]) == ("gradient", "official", 2)
    assert all(1 <= s.iterations <= 2 for s in inv.steps)  # the official rule: at least one update
    nti = invert(tiny, image, SOURCE, "null_text", 2, progress=False, preset="pnpinv", inner_steps=1)
    assert nti.settings["stop_rule"] == "official" and nti.settings["inner_steps"] == 1


def test_pnpinv_masactrl_inverts_and_samples_the_source_under_the_empty_prompt(tiny, image):
    from spdinv.editing import edit
    from spdinv.presets import preset_model

    result = edit(tiny, image, SOURCE, TARGET, "ddim", "masactrl", preset="pnpinv", num_steps=3)
    assert torch.equal(result.inversion.prompt_embedding.to(tiny.device), tiny.encode_prompt(""))
    expected = invert(preset_model(tiny, "pnpinv", "masactrl"), image, "", "ddim", 3, progress=False,
                      allow_empty_prompt=True)
    assert same_up_to_rounding(result.inversion.trajectory, expected.trajectory)
    assert result.options["start_step"] == 0.08 and result.sampler["guidance_scale"] == 7.5


def test_an_empty_prompt_stays_an_error_without_a_protocol_that_uses_it(tiny, image):
    from spdinv.editing import edit
    from spdinv.errors import SpdinvError

    with pytest.raises(SpdinvError, match="the source prompt is empty"):
        edit(tiny, image, "", TARGET, "ddim", "masactrl", num_steps=2)
    with pytest.raises(SpdinvError, match="the target prompt is empty"):
        edit(tiny, image, SOURCE, " ", "ddim", "masactrl", preset="pnpinv", num_steps=2)
    with pytest.raises(SpdinvError, match="the prompt is empty"):
        invert(tiny, image, "", "ddim", 2, progress=False)


def test_a_preset_without_a_script_for_the_engine_is_an_error(tiny, image):
    from spdinv.editing import edit
    from spdinv.errors import SpdinvError

    with pytest.raises(SpdinvError, match="preset 'spdinv-official' has no settings for engine 'pnp'"):
        edit(tiny, image, SOURCE, TARGET, "ddim", "pnp", preset="spdinv-official", num_steps=2)
    with pytest.raises(SpdinvError, match="unknown preset 'nope'; valid: spdinv-official, pnpinv"):
        edit(tiny, image, SOURCE, TARGET, "ddim", "p2p", preset="nope", num_steps=2)


# ---------------------------------------------------------------- PnP's prompts


def test_negative_prompt_and_pnps_empty_source_branch(tiny, ddim):
    """The target's unconditional row is the negative prompt, the source's stays `uncond`'s; PnP's
    source branch can run under the empty prompt (PnPInversion's script)."""
    from spdinv.editing.sampler import SamplerOptions, edit_branches

    options = SamplerOptions(negative_prompt="ugly, blurry")
    source, target = edit_branches(tiny, ddim, TARGET, options, pin_source=True, empty_source=True)
    assert torch.equal(target.uncond, tiny.encode_prompt("ugly, blurry"))
    assert torch.equal(source.uncond, tiny.encode_prompt(""))
    assert torch.equal(source.embedding, tiny.encode_prompt(""))
    plain_source, plain_target = edit_branches(tiny, ddim, TARGET, SamplerOptions())
    assert torch.equal(plain_target.uncond, plain_source.uncond)
    assert torch.equal(plain_source.embedding, ddim.prompt_embedding.to(tiny.device))


def test_pnpinv_pnp_sets_both_prompts_as_the_official_script(tiny, ddim):
    from spdinv.editing import edit
    from spdinv.presets import PNP_NEGATIVE_PROMPT

    official = edit(tiny, None, SOURCE, TARGET, ddim, "pnp", preset="pnpinv")
    assert official.sampler["negative_prompt"] == PNP_NEGATIVE_PROMPT == "ugly, blurry, black, low res, unrealistic"
    assert official.options["source_branch_prompt"] == "empty"
    ours = edit(tiny, None, SOURCE, TARGET, ddim, "pnp")
    assert not torch.allclose(official.latents[-1, 1], ours.latents[-1, 1], atol=1e-4)
    assert torch.equal(official.latents[:, 0], ours.latents[:, 0])  # the source is pinned to the trajectory either way


# ---------------------------------------------------------------- the command line


def cli_edit(image, out, model, *extra):
    return ["edit", str(image), "--source", SOURCE, "--target", TARGET, "--model", str(model), "--steps", "2",
            "--out", str(out), "--no-cache", "--quiet", *extra]


def test_cli_preset_with_explicit_flags_over_it(tmp_path, tiny_dir, red_circle, capsys):
    import json

    from spdinv.cli import main

    out = tmp_path / "official"
    assert main(cli_edit(red_circle, out, tiny_dir, "--preset", "spdinv-official", "--blend", "red blue", "--K", "2",
                         "--cross-replace", "0.5")) == 0
    run = json.loads((out / "config.json").read_text())["runs"][0]
    assert run["engine_options"]["cross_replace"] == 0.5 and run["engine_options"]["prox_pull"] == "both"
    assert run["sampler"]["uncond"] == "source"
    assert (run["inversion_settings"]["solver"], run["inversion_settings"]["stop_rule"]) == ("gradient", "official")
    out = tmp_path / "pnpinv"
    assert main(cli_edit(red_circle, out, tiny_dir, "--inversion", "ddim", "--engine", "all", "--preset", "pnpinv",
                         "--blend", "red blue", "--negative-prompt", "grey")) == 2
    assert "preset 'pnpinv' has no settings for engine 'none'" in capsys.readouterr().err
    assert main(cli_edit(red_circle, out, tiny_dir, "--inversion", "ddim", "--engine", "pnp", "--preset", "pnpinv",
                         "--negative-prompt", "grey", "--stop-rule", "official")) == 2  # a flag ddim does not have
    assert main(cli_edit(red_circle, out, tiny_dir, "--inversion", "ddim", "--engine", "pnp", "--preset", "pnpinv",
                         "--negative-prompt", "grey")) == 0
    run = json.loads((out / "config.json").read_text())["runs"][0]
    assert run["sampler"]["negative_prompt"] == "grey" and run["engine_options"]["source_branch_prompt"] == "empty"


def test_edit_help_lists_what_each_preset_sets(capsys):
    from spdinv.cli import main

    assert main(["edit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("--preset {spdinv-official,pnpinv}", "stop_rule=official", "prox_pull=both",
                     "negative_prompt=ugly, blurry, black, low res, unrealistic", "masactrl: start_step=0.08",
                     "--stop-rule", "--negative-prompt", "--prox-pull", "--source-branch-prompt"):
        assert fragment in text, fragment


def test_demo_and_bench_take_a_preset(tiny, red_circle, tmp_path):
    """The demo's options JSON names a preset (the session applies it, under the options given); the
    benchmark's edit function passes BenchOptions.preset to edit()."""
    from spdinv.bench.datasets import BenchItem
    from spdinv.bench.runner import EditRequest as BenchRequest, SpdinvEdit
    from spdinv.demo.session import DemoSession, EditRequest
    from spdinv.editing import edit

    session = DemoSession(tiny, cache=None, allowed=[red_circle.parent], workdir=tmp_path / "demo")
    request = EditRequest(red_circle, SOURCE, TARGET, ["ddim"], ["p2p"], blend="red blue", steps=2,
                          options={"cross_replace": 0.5}, preset="spdinv-official")
    result = session.edit(request)
    import json

    run = json.loads((result.folder / "config.json").read_text())["runs"][0]
    assert run["engine_options"]["prox_pull"] == "both" and run["engine_options"]["cross_replace"] == 0.5
    assert run["sampler"]["uncond"] == "source"
    item = BenchItem("0", red_circle, SOURCE, TARGET, TARGET, ("blue",), "", "0", "red", "blue", ())
    image = Image.open(red_circle).convert("RGB").resize((32, 32))
    outcome = SpdinvEdit()(BenchRequest(tiny, image, item, "ddim", "pnp", 2, 0, {}, {}, False, "pnpinv"))
    assert outcome.edited.size == (32, 32)
    official = edit(tiny, image, SOURCE, TARGET, "ddim", "pnp", num_steps=2, preset="pnpinv")
    assert outcome.edited.tobytes() == official.pil()[0].tobytes()


def test_pnp_injects_where_pnpinversions_script_does_on_an_sd15_layout_unet():
    """run_editing_pnp.py: Q/K in up_blocks.1.attentions.{1,2} and up_blocks.{2,3}.attentions.{0,1,2}
    for the first 25 of 50 steps, up_blocks.1.resnets.1's residual features for the first 40, into
    every target row (unconditional and conditional) from the source row."""
    from types import SimpleNamespace

    from spdinv.editing.pnp import PnPEditor, PnPOptions
    from spdinv.sampling import BatchRows
    from spdinv.testing import sd15_layout_unet

    unet = sd15_layout_unet()
    model = SimpleNamespace(unet=unet, device=torch.device("cpu"))
    inversion = SimpleNamespace(schedule=SimpleNamespace(num_steps=50), trajectory=torch.zeros(51, 4, 64, 64),
                                z_T=torch.zeros(1, 4, 64, 64))
    editor = PnPEditor(PnPOptions())
    editor.prepare(model, inversion)
    expected = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1"
                for b, a in [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]]
    assert [layer.name for layer in editor.qk_layers] == expected
    assert [module for module, _ in editor.feature_hooks(unet)] == [unet.up_blocks[1].resnets[1].conv2]
    editor.rows = BatchRows.of([1], 2)  # [target uncond, source cond, target cond]
    q = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 8)
    for step, injected in [(0, True), (24, True), (25, False)]:
        editor.step_index = step
        out, _, _ = editor.edit_qkv(editor.qk_layers[0], q, q, q)
        assert torch.equal(out[:, 0, 0, 0], torch.tensor([1.0, 1.0, 1.0] if injected else [0.0, 1.0, 2.0]))
    features = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 4)
    for step, injected in [(39, True), (40, False)]:
        editor.step_index = step
        out = editor._inject_features(None, (), features)
        assert (out is not None) == injected and (out is None or torch.equal(out[:, 0, 0, 0], torch.ones(3)))


def test_cli_invert_takes_a_preset(tmp_path, tiny_dir, red_circle):
    import json

    from spdinv.cli import main

    out = tmp_path / "inv"
    assert main(["invert", str(red_circle), "--prompt", SOURCE, "--model", str(tiny_dir), "--steps", "2", "--K", "2",
                 "--preset", "spdinv-official", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["solver"], config["stop_rule"], config["K"]) == ("gradient", "official", 2)


@pytest.mark.parametrize("threshold, partial", [(0.3, False), (0.995, True)])
def test_spdinv_official_preset_edits_as_the_ported_official_script(tiny, ddim, threshold, partial):
    """benchmarks/official_p2p.py ports the official SPDInv P2P edit (its controller, LocalBlend on the
    edited maps, the ProxEdit step pulling both rows); from the same trajectory the preset gives its
    output up to the rounding of differently shaped batches (the port runs 4 rows, spdinv 3 or 4)."""
    import sys
    from pathlib import Path

    from spdinv.editing import edit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from official_p2p import official_p2p

    inv = ddim  # any trajectory: the port edits from the one it is given
    scheduler = type(tiny.scheduler).from_config(tiny.scheduler.config)
    scheduler.set_timesteps(STEPS)
    ours = edit(tiny, None, SOURCE, TARGET, inv, "p2p", preset="spdinv-official", blend="red blue",
                blend_threshold=threshold, prox_timestep=1000)
    port = official_p2p(tiny, inv.trajectory, [SOURCE, TARGET], [int(t) for t in scheduler.timesteps],
                        blend=(("red",), ("blue",)), threshold=threshold, recon_t=1000)
    assert same_up_to_rounding(ours.latents[-1], port)
    assert (0 < ours.mask.mean() < 1) == partial  # at 0.995 LocalBlend keeps a third of the frame here


# ---------------------------------------------------------------- PnPInversion's scripts, ported


def _benchmarks_on_path() -> None:
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)


@pytest.fixture(scope="module")
def small_image(image, tiny):
    """The example at the tiny model's own size, so neither side resizes (their resamplers differ)."""
    return image.resize((tiny.image_size, tiny.image_size), Image.BICUBIC)


def test_presets_run_on_the_ddim_spacing_of_their_scripts(tiny, small_image):
    """The scripts that build their own DDIMScheduler (SPDInv's P2P script, PnPInversion's P2P and MasaCtrl)
    get diffusers' default steps_offset 0 (timesteps 0, 1000/n, ...); PnPInversion's PnP script loads SD's
    scheduler config (offset 1), as spdinv's default does."""
    from spdinv.editing import edit

    def first_timestep(result):
        return result.inversion.schedule.timesteps[0]

    assert invert(tiny, small_image, SOURCE, "ddim", STEPS, progress=False, diagnose=False).schedule.timesteps[0] == 1
    assert invert(tiny, small_image, SOURCE, "spdinv", STEPS, progress=False, diagnose=False, K=1,
                  preset="spdinv-official").schedule.timesteps[0] == 0
    assert first_timestep(edit(tiny, small_image, SOURCE, TARGET, "ddim", "p2p", num_steps=2, preset="pnpinv")) == 0
    assert first_timestep(edit(tiny, small_image, SOURCE, TARGET, "ddim", "masactrl", num_steps=2,
                               preset="pnpinv")) == 0
    assert first_timestep(edit(tiny, small_image, SOURCE, TARGET, "ddim", "pnp", num_steps=2, preset="pnpinv")) == 1
    assert tiny.ddim.steps_offset == 1  # the model itself is left as it was


def test_pnpinv_pnp_edits_as_the_ported_pnp_script_on_an_sd15_layout_unet(tiny, small_image):
    """benchmarks/official_pnp.py ports run_editing_pnp.py, which names SD 1.5's layers by index; on a
    tiny SD 1.5-layout UNet, from the same DDIM trajectory, `pnpinv` gives its output up to the rounding
    of differently ordered rows; spdinv's own prompts (source prompt, no negative prompt) do not."""
    _benchmarks_on_path()
    from official_engines import sd15_layout_model
    from official_pnp import edit_image_directinversion_PnP

    from spdinv.editing import edit

    model = sd15_layout_model(tiny)
    ddim = invert(model, small_image, SOURCE, "ddim", STEPS, progress=False, diagnose=False)
    port, _ = edit_image_directinversion_PnP(model, small_image, SOURCE, TARGET, num_steps=STEPS,
                                             inverted_x=list(ddim.trajectory.unsqueeze(1)))
    preset = edit(model, None, SOURCE, TARGET, ddim, "pnp", num_steps=STEPS, preset="pnpinv")
    assert same_up_to_rounding(preset.latents[-1, 1:], port)
    plain = edit(model, None, SOURCE, TARGET, ddim, "pnp", num_steps=STEPS)
    assert not same_up_to_rounding(plain.latents[-1, 1:], port, relative=1e-2)
    assert not any(hasattr(module, "injection_schedule") for module in model.unet.modules())  # the port cleaned up


def test_pnpinv_masactrl_edits_as_the_ported_masactrl_script(tiny, small_image):
    """benchmarks/official_masactrl.py ports run_editing_masactrl.py (empty source prompt, its own DDIM
    inversion and scheduler): end to end, `pnpinv` gives its output; on SD's timesteps it would not."""
    _benchmarks_on_path()
    from official_masactrl import edit_image_ddim_MasaCtrl

    from spdinv.editing import edit
    from spdinv.editing.base import round_half_up

    step = round_half_up(4 / 50 * STEPS)
    port, _ = edit_image_ddim_MasaCtrl(tiny, small_image, SOURCE, TARGET, step=step, num_ddim_steps=STEPS)
    preset = edit(tiny, small_image, SOURCE, TARGET, "ddim", "masactrl", num_steps=STEPS, preset="pnpinv")
    assert same_up_to_rounding(preset.latents[-1], port)
    sd_spacing, _ = edit_image_ddim_MasaCtrl(tiny, small_image, SOURCE, TARGET, step=step, num_ddim_steps=STEPS,
                                             steps_offset=1)
    assert not same_up_to_rounding(sd_spacing, port, relative=1e-3)


def test_pnpinv_direct_p2p_edits_as_the_ported_directinversion_script(tiny, small_image):
    """benchmarks/official_direct_p2p.py ports run_editing_p2p.py's directinversion+p2p (offsets on the
    source row, refine + reweight x2 + LocalBlend, cross 0.4, self 0.6): end to end, `pnpinv` gives its
    output; spdinv's default cross-replace (0.8) does not."""
    _benchmarks_on_path()
    from official_direct_p2p import edit_image_directinversion

    from spdinv.editing import edit

    port, _ = edit_image_directinversion(tiny, small_image, SOURCE, TARGET, ["circle", "circle"],
                                         num_ddim_steps=STEPS)
    preset = edit(tiny, small_image, SOURCE, TARGET, "direct", "p2p", num_steps=STEPS, preset="pnpinv",
                  blend="circle circle")
    assert same_up_to_rounding(preset.latents[-1], port)
    plain = edit(tiny, small_image, SOURCE, TARGET, "direct", "p2p", num_steps=STEPS, blend="circle circle")
    assert not same_up_to_rounding(plain.latents[-1], port, relative=1e-2)
