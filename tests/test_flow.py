"""Rectified-flow families (SD3, SD3.5-medium-like, FLUX.1 dev and schnell) on tiny pipelines built
in memory and saved as diffusers folders: `load_model(folder)` samples as the stock pipeline does,
inverts through the same methods as the diffusion models, and the implicit Euler step's residual
bounds what sampling back loses."""

import math

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from spdinv.editing import edit
from spdinv.errors import SpdinvError
from spdinv.images import conform_image, to_tensor
from spdinv.inversion import invert
from spdinv.inversion.base import fixed_point_residual
from spdinv.inversion.solvers import SOLVERS
from spdinv.model import load_model
from spdinv.sampling import Branch, loop
from spdinv.schedule import FlowSchedule
from spdinv.testing import hand_drawn_square, tiny_flux_pipeline, tiny_sd3_pipeline

SOURCE = "a large purple square in the centre on a brown background"
TARGET = "a large green square in the centre on a brown background"
STEPS = 4

BUILDERS = {
    "sd3": lambda: tiny_sd3_pipeline(),
    "sd3-t5": lambda: tiny_sd3_pipeline(t5=True),
    "sd35-medium": lambda: tiny_sd3_pipeline(t5=True, dual_attention_layers=(0,)),
    "flux-dev": lambda: tiny_flux_pipeline(),
    "flux-schnell": lambda: tiny_flux_pipeline(guidance=False),
}
GUIDANCE = {"sd3": 5.0, "sd3-t5": 5.0, "sd35-medium": 4.5, "flux-dev": 3.5, "flux-schnell": 0.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny family saved as a diffusers folder (what load_model reads)."""
    root = tmp_path_factory.mktemp("flow-models")
    for name, build in BUILDERS.items():
        build().save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def models(folders):
    return {name: load_model(folders / name) for name in BUILDERS}


@pytest.fixture(scope="module")
def image():
    """A PIL-drawn square (not the world renderer's), 32x32 in [-1, 1]: the tiny models' size."""
    return to_tensor(conform_image(hand_drawn_square(), 32)[0])


def stock_latents(folder, noise: torch.Tensor, guidance: float) -> list[torch.Tensor]:
    """The stock pipeline's latent after every step, (1, C, h, w) (FLUX's unpacked)."""
    flux = (folder / "transformer" / "config.json").read_text().count("FluxTransformer2DModel") > 0
    absent = {} if flux or (folder / "text_encoder_3").is_dir() else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = (FluxPipeline if flux else StableDiffusion3Pipeline).from_pretrained(folder, **absent)
    pipe.set_progress_bar_config(disable=True)
    scale = pipe.vae_scale_factor
    side = noise.shape[-1] * scale
    latents = pipe._pack_latents(noise.clone(), *noise.shape) if flux else noise.clone()
    found = []
    pipe(SOURCE, latents=latents, height=side, width=side, num_inference_steps=STEPS, guidance_scale=guidance,
         output_type="latent", callback_on_step_end=lambda p, i, t, tensors: found.append(tensors["latents"]) or {})
    return [pipe._unpack_latents(x, side, side, scale) if flux else x for x in found]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sampling_equals_the_stock_pipeline(folders, models, name):
    """Same scheduler sigmas (SD3's shift, FLUX's dynamic shift from the token count), the same
    network calls (SD3: [uncond, cond] rows; FLUX: one row with the guidance input), the Euler
    step: every step's latent equal to 1e-5 (float32; the batch layouts are the same)."""
    model = models[name]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = stock_latents(folders / name, noise, GUIDANCE[name])
    uncond = model.encode_prompt("") if model.classifier_free else None
    ours = loop(model, model.schedule(STEPS, (8, 8)), noise, [Branch(model.encode_prompt(SOURCE), GUIDANCE[name],
                                                                     uncond)])
    assert len(expected) == STEPS
    for i, latent in enumerate(expected, start=1):
        torch.testing.assert_close(ours[i], latent, atol=1e-5, rtol=0)


def test_the_family_settings_reach_the_network(models):
    """T5 present or absent, dual attention layers, FLUX-dev's guidance input (schnell has none)."""
    assert models["sd3"].pipeline.text_encoder_3 is None and models["sd3-t5"].pipeline.text_encoder_3 is not None
    assert list(models["sd35-medium"].transformer.config.dual_attention_layers) == [0]
    assert isinstance(models["sd3"].schedule(STEPS), FlowSchedule)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for name, used in (("flux-dev", True), ("flux-schnell", False)):
        model, embedding = models[name], models[name].encode_prompt(SOURCE)
        low, high = model.eps(z, 500.0, embedding, 1.0), model.eps(z, 500.0, embedding, 4.0)
        assert (not torch.equal(low, high)) == used, name


def test_flux_shift_depends_on_the_image_size(models):
    """FLUX's dynamic shift mu grows with the token count: a larger image sits at higher sigmas."""
    small, large = models["flux-dev"].schedule(STEPS, (8, 8)), models["flux-dev"].schedule(STEPS, (64, 64))
    assert small.sigmas[0] == large.sigmas[0] == 0.0 and small.sigmas[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(small.sigmas[1:-1], large.sigmas[1:-1]))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_ddim_and_spdinv_invert_with_finite_diagnostics(models, image, name):
    """`ddim` is the explicit Euler inversion (v at the current point and time, one call a step);
    SPDInv's fixed point of the implicit step leaves a smaller residual at every step."""
    model = models[name]
    plain = invert(model, image, SOURCE, "ddim", STEPS, progress=False)
    fixed = invert(model, image, SOURCE, "spdinv", STEPS, progress=False, solver="anderson")
    for inversion in (plain, fixed):
        assert torch.isfinite(inversion.trajectory).all() and inversion.trajectory.shape == (STEPS + 1, 4, 8, 8)
        assert math.isfinite(inversion.noise_error) and math.isfinite(inversion.reconstruction_error)
        assert all(math.isfinite(s.residual_before) and math.isfinite(s.residual_after) for s in inversion.steps)
    assert plain.network_calls == STEPS
    assert fixed.noise_error <= plain.noise_error
    assert all(f.residual_after <= p.residual_after * (1 + 1e-6) for f, p in zip(fixed.steps, plain.steps))
    assert fixed.reconstruction_error < plain.reconstruction_error


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_runs_on_a_flow_model(models, image, solver):
    inversion = invert(models["sd3"], image, SOURCE, "spdinv", STEPS, progress=False, solver=solver, K=3)
    plain = invert(models["sd3"], image, SOURCE, "ddim", STEPS, progress=False)
    assert torch.isfinite(inversion.trajectory).all() and inversion.noise_error <= plain.noise_error


def test_a_zero_residual_makes_one_euler_step_return_the_previous_latent(models, image):
    """z_k = z_{k-1} + (s_k - s_{k-1}) v(z_k) rearranges to z_{k-1} = z_k + (s_{k-1} - s_k) v(z_k):
    the forward Euler step from z_k misses z_{k-1} by exactly the residual f(z_k) - z_k. So a
    one-step inversion reconstructs with error = its residual, and a converged one reconstructs."""
    model = models["flux-dev"]
    inversion = invert(model, image, SOURCE, "ddim", STEPS, progress=False)
    schedule, trajectory, embedding = inversion.schedule, inversion.trajectory, inversion.prompt_embedding
    for k in range(1, STEPS + 1):
        z_k = trajectory[k : k + 1]
        back = schedule.sample_step(k, z_k, model.eps(z_k, schedule.timesteps[k - 1], embedding))
        miss = float((back - trajectory[k - 1 : k]).pow(2).mean())
        residual = fixed_point_residual(model, schedule, k, trajectory[k - 1 : k], z_k, embedding)
        assert miss == pytest.approx(residual, rel=1e-4), k
    one = invert(model, image, SOURCE, "ddim", 1, progress=False)
    assert one.reconstruction_error == pytest.approx(one.noise_error, rel=1e-4)
    tight = invert(model, image, SOURCE, "aidi", STEPS, progress=False, iterations=30, tol=1e-13)
    assert max(s.residual_after for s in tight.steps) < 1e-11
    assert tight.reconstruction_error < 1e-9 < plain_error(model, image)


def plain_error(model, image) -> float:
    return invert(model, image, SOURCE, "ddim", STEPS, progress=False).reconstruction_error


def test_converged_steps_share_the_next_guess_row(models, image):
    """On a flow, the next plain step evaluates v(z_t, t), the row f(guess) already evaluated: a
    step that keeps its guess costs one row, and the count says so."""
    model = models["sd3"]
    rows = []
    hook = model.transformer.register_forward_pre_hook(lambda module, args, kwargs: rows.append(
        kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        inversion = invert(model, image, SOURCE, "spdinv", STEPS, progress=False, diagnose=False, delta=1.0)
    finally:
        hook.remove()
    assert all(s.iterations == 0 for s in inversion.steps)
    assert inversion.network_calls == sum(rows) == STEPS + 1  # step 1's guess, then f(guess) per step


@pytest.mark.parametrize("method, options", [("spdinv", dict(solver="anderson", delta=1e-12, K=2)),
                                             ("spdinv", dict(solver="gradient", lr=1e-2, delta=1e-12, K=2)),
                                             ("aidi", dict(iterations=2, tol=1e-12))])
def test_iterating_steps_hand_their_results_velocity_to_the_next_guess(models, image, monkeypatch, method, options):
    """On a flow the next plain step evaluates v(z_k, t_k), which the solver evaluated when it measured
    the residual of the iterate it returns: the next guess costs no row. Against the inversion that
    evaluates every guess itself (no look-ahead): the same steps, one row fewer per step but the last."""
    import functools
    import sys

    from spdinv.inversion.base import fixed_point_inversion

    def run(look_ahead: bool):
        module = sys.modules[f"spdinv.inversion.{method}"]
        monkeypatch.setattr(module, "fixed_point_inversion", functools.partial(fixed_point_inversion,
                                                                               look_ahead=look_ahead))
        rows = []
        hook = models["sd3"].transformer.register_forward_pre_hook(lambda module, args, kwargs: rows.append(
            kwargs["hidden_states"].shape[0]), with_kwargs=True)
        try:
            return invert(models["sd3"], image, SOURCE, method, STEPS, progress=False, diagnose=False, **options), rows
        finally:
            hook.remove()

    (alone, alone_rows), (ahead, ahead_rows) = run(False), run(True)
    assert all(s.iterations > 0 for s in ahead.steps)  # every step iterates (delta 1e-12)
    assert [s.iterations for s in ahead.steps] == [s.iterations for s in alone.steps]
    # the same one-row evaluations in the same order; a tolerance, not bit-equality, in case a
    # kernel differs between calls (measured: equal)
    torch.testing.assert_close(ahead.trajectory, alone.trajectory, rtol=0, atol=1e-6)
    assert alone.network_calls == sum(alone_rows) and ahead.network_calls == sum(ahead_rows)
    assert alone.network_calls - ahead.network_calls == STEPS - 1


def test_sampling_back_and_editing_with_engine_none(models, image):
    """Reconstruction and `edit(..., engine="none")` on a flow model; DirectInversion's pin works."""
    model = models["sd3-t5"]
    result = edit(model, image, SOURCE, TARGET, "direct", "none", num_steps=STEPS, guidance_scale=4.0)
    assert torch.isfinite(result.edited).all() and result.edited.shape == (1, 3, 32, 32)
    torch.testing.assert_close(result.latents[-1, :1], result.inversion.z_0, atol=1e-5, rtol=0)
    flux = edit(models["flux-dev"], image, SOURCE, TARGET, "spdinv", "none", num_steps=STEPS, solver="anderson")
    assert torch.isfinite(flux.edited).all()


@pytest.mark.parametrize("engine", ["pnp"])  # p2p, masactrl, rf_edit: tests/test_flow_editing.py
def test_attention_engines_are_refused_in_one_line(models, image, engine):
    with pytest.raises(SpdinvError, match=f"engine {engine} does not support rectified-flow transformers") as error:
        edit(models["sd3"], image, SOURCE, TARGET, "ddim", engine, num_steps=STEPS)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method", ["null_text", "negative_prompt"])
def test_unconditional_methods_are_refused_on_flux_and_run_on_sd3(models, image, method):
    with pytest.raises(SpdinvError, match="FLUX.1") as error:
        invert(models["flux-dev"], image, SOURCE, method, STEPS, progress=False)
    assert "\n" not in str(error.value) and "classifier-free" in str(error.value)
    options = {"inner_steps": 1} if method == "null_text" else {}
    inversion = invert(models["sd3"], image, SOURCE, method, STEPS, progress=False, **options)
    assert torch.isfinite(inversion.trajectory).all() and math.isfinite(inversion.reconstruction_error)


def test_a_saved_flux_inversion_loads_back_with_its_schedule(models, image, tmp_path):
    """The schedule depends on the latent size (FLUX's shift): loading rebuilds it from the trajectory."""
    from spdinv.export import load_inversion, save_inversion

    model = models["flux-schnell"]
    inversion = invert(model, image, SOURCE, "ddim", STEPS, progress=False)
    save_inversion(inversion, tmp_path)
    loaded = load_inversion(tmp_path, model)
    assert loaded.schedule == inversion.schedule and torch.equal(loaded.trajectory, inversion.trajectory)


def test_an_image_of_broken_patches_is_refused_in_one_line(models):
    """FLUX packs 2x2 latent patches: a side that is not a whole number of them is a one-line error."""
    with pytest.raises(SpdinvError, match=r"multiples of 8 pixels, got 36x32"):
        invert(models["flux-dev"], torch.zeros(1, 3, 32, 36), SOURCE, "ddim", STEPS, progress=False)


def test_shapes_world_flow_is_a_name(folders, monkeypatch, tmp_path):
    """`--model shapes-world-flow` resolves to the package's asset folder; absent, one line says so."""
    from spdinv import model as model_module

    monkeypatch.setitem(model_module.NAMED_MODELS, "shapes-world-flow", tmp_path / "absent")
    with pytest.raises(SpdinvError, match="shapes-world-flow model is missing") as error:
        load_model("shapes-world-flow")
    assert "\n" not in str(error.value)
    monkeypatch.setitem(model_module.NAMED_MODELS, "shapes-world-flow", folders / "sd3")
    assert load_model("shapes-world-flow").family.name.startswith("Stable Diffusion 3")


def test_the_command_line_inverts_and_edits_a_drawn_image_on_a_flow_model(folders, tmp_path, capsys):
    from spdinv.cli import main

    png = tmp_path / "square.png"
    hand_drawn_square().save(png)
    common = ["--model", str(folders / "sd3"), "--steps", "3", "--quiet"]
    assert main(["invert", str(png), "--prompt", SOURCE, "--method", "spdinv", "--solver", "anderson",
                 "--out", str(tmp_path / "inverted"), *common]) == 0
    assert (tmp_path / "inverted" / "reconstruction.png").is_file()
    edit_args = ["edit", str(png), "--source", SOURCE, "--target", TARGET, "--inversion", "ddim", "--no-cache", *common]
    assert main([*edit_args, "--engine", "none", "--out", str(tmp_path / "edited")]) == 0
    capsys.readouterr()
    assert main([*edit_args, "--engine", "pnp", "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "engine pnp does not support rectified-flow transformers" in err
    assert not (tmp_path / "refused").exists()


def test_the_demo_offers_the_flow_engines_on_a_flow_model(models, tmp_path):
    """The page of a flow model lists the engines of its family (and the examples that use them); edits run."""
    from spdinv.demo.app import build_app
    from spdinv.demo.session import DemoSession, EditRequest
    from spdinv.editing.cache import InversionCache

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    hand_drawn_square().save(uploads / "square.png")
    session = DemoSession(models["sd3"], InversionCache(tmp_path / "cache"), [uploads], workdir=tmp_path / "work")
    try:
        app = build_app(session)
        dropdown = next(block for block in app.blocks.values() if getattr(block, "elem_id", None) == "engine")
        assert [choice[1] for choice in dropdown.choices] == ["p2p", "masactrl", "none", "rf_edit"]
        result = session.edit(EditRequest(uploads / "square.png", SOURCE, TARGET, ["ddim"], ["masactrl", "none"],
                                          steps=2))
        assert [run.engine for run in result.runs] == ["masactrl", "none"]
    finally:
        session.close()


def test_latents_carry_the_vae_shift_and_scale(models):
    """SD3 / FLUX latents: z = (x - shift_factor) * scaling_factor, decoded as the pipelines do."""
    model = models["sd3"]
    vae, z = model.vae, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
        torch.testing.assert_close(model.decode(z), expected, atol=1e-6, rtol=0)
        mean = vae.encode(expected).latent_dist.mean
    torch.testing.assert_close(model.encode_image(expected), (mean - vae.config.shift_factor) * vae.config.scaling_factor,
                               atol=1e-6, rtol=0)


def test_the_inversion_cache_keeps_flow_inversions(models, image, tmp_path):
    """Stored with the schedule's key and the transformer's fingerprint, checked on load, then a hit."""
    from spdinv.editing.cache import InversionCache

    cache = InversionCache(tmp_path / "cache")
    first = edit(models["flux-dev"], image, SOURCE, TARGET, "ddim", "none", num_steps=2, cache=cache)
    again = edit(models["flux-dev"], image, SOURCE, TARGET, "ddim", "none", num_steps=2, cache=cache)
    assert (first.cache_hit, again.cache_hit, cache.dropped) == (False, True, 0)
    assert torch.equal(first.inversion.trajectory, again.inversion.trajectory)
