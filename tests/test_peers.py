"""The peer inversions (null-text, negative-prompt, DirectInversion, AIDI) on the tiny model."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from spdinv.cli import main
from spdinv.errors import SpdinvError
from spdinv.export import load_inversion, save_inversion
from spdinv.inversion import METHODS, invert
from spdinv.inversion.aidi import AIDIOptions, solve_anderson
from spdinv.inversion.reconstruction import reconstruction_error, source_branch
from spdinv.inversion.solvers import anderson_update
from spdinv.sampling import Branch, loop
from spdinv.testing import DIFFUSION_METHODS

PROMPT = "a large red circle in the centre on a white background"
STEPS = 10
PEERS = ("null_text", "negative_prompt", "direct", "aidi")
# Small budgets so that every method runs in well under a second on the tiny model.
FAST = {"spdinv": dict(K=3), "null_text": dict(inner_steps=2), "aidi": dict(iterations=3)}
FAST_FLAGS = {"spdinv": ["--K", "3"], "null_text": ["--inner-steps", "2"], "aidi": ["--iterations", "3"]}


@pytest.fixture(scope="module")
def image(red_circle):
    from PIL import Image

    return Image.open(red_circle)


@pytest.fixture(scope="module")
def inversions(tiny, image):
    return {name: invert(tiny, image, PROMPT, name, STEPS, progress=False) for name in ("ddim", *PEERS)}


def test_null_text_reconstructs_better_than_ddim_at_the_same_guidance(tiny, inversions):
    ddim, nti = inversions["ddim"], inversions["null_text"]
    assert nti.guidance_scale == 7.5
    ddim_error = reconstruction_error(tiny, ddim, guidance_scale=7.5)  # '' as the unconditional prompt
    assert nti.reconstruction_error == pytest.approx(reconstruction_error(tiny, nti))
    assert nti.reconstruction_error < ddim_error / 1.5


def test_null_text_side_information_and_cost(tiny, inversions):
    nti = inversions["null_text"]
    null = tiny.encode_prompt("")
    assert nti.uncond_embeddings.shape == (STEPS, *null.shape[1:])
    assert not torch.equal(nti.uncond_embeddings[0], null[0])
    assert torch.equal(nti.trajectory, inversions["ddim"].trajectory)
    for step in nti.steps:
        assert 0 <= step.gradient_calls == step.iterations <= 10
        # DDIM step, conditional eps, one forward per Adam step (+1 when it stopped early), the advance
        assert step.iterations + 3 <= step.network_calls <= step.iterations + 4
    for module in (tiny.unet, tiny.text_encoder, tiny.vae):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())


def test_null_text_early_stop_keeps_the_measured_embedding(tiny, image):
    nti = invert(tiny, image, PROMPT, "null_text", 4, progress=False, early_stop=1e3)
    assert nti.gradient_calls == 0
    assert all(s.network_calls == 1 + 3 for s in nti.steps)
    assert torch.equal(nti.uncond_embeddings, tiny.encode_prompt("").expand(4, -1, -1))


def test_null_text_non_finite_loss_keeps_the_initial_embedding():
    from spdinv.inversion.null_text import fit_null

    losses = iter([1.0, 0.5, float("nan")])
    start = torch.zeros(1, 3, 2)
    fit = fit_null(lambda null: null.sum() * 0 + next(losses), start, lr=0.1, inner_steps=10, threshold=0.0)
    assert "non-finite" in fit.warning and fit.adam_steps == 2 and fit.forwards == 3
    assert torch.equal(fit.embedding, start)


def test_negative_prompt_samples_with_the_source_prompt_as_negative(tiny, inversions):
    npi, ddim = inversions["negative_prompt"], inversions["ddim"]
    assert npi.source_as_uncond and npi.guidance_scale == 7.5
    assert npi.network_calls == ddim.network_calls == STEPS
    # With the source prompt on both sides guidance cancels: exactly DDIM's guidance-1 reconstruction.
    assert npi.reconstruction_error == pytest.approx(ddim.reconstruction_error, rel=1e-4)


def test_direct_inversion_source_branch_walks_the_inverted_trajectory(tiny, inversions):
    direct, ddim = inversions["direct"], inversions["ddim"]
    assert direct.pin_source and torch.equal(direct.trajectory, ddim.trajectory)
    latents = loop(tiny, direct.schedule, direct.z_T, [source_branch(tiny, direct)])  # sampling order
    assert torch.equal(latents[:, 0].flip(0), direct.trajectory)  # exact by construction, in any batch
    drifting = loop(tiny, direct.schedule, direct.z_T, [Branch(direct.prompt_embedding, 7.5, tiny.encode_prompt(""))])
    assert (drifting[:, 0].flip(0) - direct.trajectory).abs().max() > 1e-3  # guided sampling alone would drift
    assert direct.network_calls == ddim.network_calls == STEPS  # its work happens inside the edit's steps


def test_aidi_reduces_the_residual_and_the_noise_error(inversions):
    ddim, aidi = inversions["ddim"], inversions["aidi"]
    for step in aidi.steps:
        assert step.residual_after <= step.residual_before
        # the guess, its evaluation, one per update; plus a look-ahead row the step could not use
        unused_look_ahead = step.network_calls == step.iterations + 3 and step.iterations > 0
        assert step.gradient_calls == 0 and (step.network_calls == step.iterations + 2 or unused_look_ahead)
        assert step.iterations == 10 or step.residual_after < 5e-6
    assert sum(s.residual_after for s in aidi.steps) < sum(s.residual_before for s in aidi.steps) / 5
    assert aidi.noise_error < ddim.noise_error / 5


def _linear_contraction(dim: int = 40, rate: float = 0.95):
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    matrix = (basis * torch.linspace(0, rate, dim, dtype=torch.float64)) @ basis.T
    offset = torch.randn(dim, generator=generator, dtype=torch.float64)
    return lambda z: (matrix @ z.double().flatten()).float().view(z.shape) + offset.float().view(z.shape)


def test_anderson_beats_plain_iteration_on_a_linear_contraction():
    f, start = _linear_contraction(), torch.zeros(1, 40)
    plain = solve_anderson(f, start, AIDIOptions(iterations=300, window=1, tol=1e-10))
    anderson = solve_anderson(f, start, AIDIOptions(iterations=300, window=5, tol=1e-10))
    assert anderson.residual_after < 1e-10 and plain.residual_after < 1e-10
    assert anderson.iterations < plain.iterations / 4


def test_window_one_is_a_damped_step():
    x, g = torch.randn(8), torch.randn(8)
    assert torch.equal(anderson_update([x], [g], 0.5), x + 0.5 * g)


def test_aidi_non_finite_residual_falls_back_to_best_iterate():
    calls = []

    def f(z):  # a nonlinear contraction until the fourth evaluation, then NaN
        calls.append(1)
        return 0.5 * torch.tanh(z) + 0.1 + (float("nan") if len(calls) >= 4 else 0.0)

    result = solve_anderson(f, torch.ones(1, 4, 2, 2), AIDIOptions(iterations=10))
    assert "non-finite" in result.warning
    assert math.isfinite(result.residual_after) and result.residual_after < result.residual_before
    assert torch.isfinite(result.latent).all()


@pytest.mark.parametrize("method", DIFFUSION_METHODS)
def test_every_method_round_trips_through_safetensors(tiny, image, tmp_path, method):
    inversion = invert(tiny, image, PROMPT, method, 3, progress=False, **FAST.get(method, {}))
    save_inversion(inversion, tmp_path)
    loaded = load_inversion(tmp_path, tiny)
    assert loaded.method == method and loaded.settings == inversion.settings
    assert torch.equal(loaded.trajectory, inversion.trajectory)
    assert (loaded.guidance_scale, loaded.source_as_uncond) == (inversion.guidance_scale, inversion.source_as_uncond)
    assert loaded.pin_source == inversion.pin_source == (method == "direct")
    for name in ("uncond_embeddings",):
        ours, theirs = getattr(inversion, name), getattr(loaded, name)
        assert (ours is None and theirs is None) or torch.equal(ours.cpu(), theirs)
    assert reconstruction_error(tiny, loaded) == pytest.approx(reconstruction_error(tiny, inversion), rel=1e-5)


SIDE_INFORMATION = {"null_text": ("uncond_embeddings", "7.5", "False"), "negative_prompt": (None, "7.5", "True"),
                    "direct": (None, "1.0", "False"), "aidi": (None, "1.0", "False")}


@pytest.mark.parametrize("method", PEERS)
def test_cli_writes_the_side_information(tiny_dir, red_circle, tmp_path, method):
    out = tmp_path / method
    argv = ["invert", str(red_circle), "--prompt", PROMPT, "--method", method, "--steps", "2", "--model",
            str(tiny_dir), "--quiet", "--out", str(out), *FAST_FLAGS.get(method, [])]
    assert main(argv) == 0
    side, guidance, source_as_uncond = SIDE_INFORMATION[method]
    with safe_open(out / "trajectory.safetensors", "pt") as handle:
        names, metadata = set(handle.keys()), handle.metadata()
    assert {"uncond_embeddings", "source_offsets"} & names == ({side} if side else set())
    assert metadata["pin_source"] == str(method == "direct")
    saved = (metadata["method"], metadata["guidance_scale"], metadata["source_as_uncond"])
    assert saved == (method, guidance, source_as_uncond)
    assert json.loads((out / "diagnostics.json").read_text())["method"] == method


def test_cli_help_lists_every_method_and_option(capsys):
    assert main(["invert", "--help"]) == 0
    text = capsys.readouterr().out
    for word in (*METHODS, "--guidance", "--inner-steps", "--window", "--damping", "--iterations", "--tol"):
        assert word in text


def test_cli_method_options_reach_the_method(tiny_dir, red_circle, tmp_path):
    common = ["--prompt", PROMPT, "--steps", "2", "--model", str(tiny_dir), "--quiet"]
    assert main(["invert", str(red_circle), *common, "--method", "aidi", "--iterations", "2", "--window", "3",
                 "--damping", "0.5", "--tol", "1e-7", "--out", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["iterations"], config["window"], config["damping"], config["tol"]) == (2, 3, 0.5, 1e-7)
    assert main(["invert", str(red_circle), *common, "--method", "negative_prompt", "--guidance", "3",
                 "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["guidance"] == 3.0


BAD_OPTIONS = [
    ("null_text", dict(inner_steps=-1)), ("null_text", dict(guidance=0.5)), ("null_text", dict(lr=0.0)),
    ("null_text", dict(lr_decay=1.0)), ("null_text", dict(early_stop=-1.0)),
    ("negative_prompt", dict(guidance=float("nan"))), ("direct", dict(guidance=0.9)),
    ("aidi", dict(window=0)), ("aidi", dict(damping=0.0)), ("aidi", dict(damping=1.5)),
    ("aidi", dict(iterations=-1)), ("aidi", dict(tol=0.0)), ("direct", dict(window=3)),
    ("aidi", dict(guidance=7.5)), ("negative_prompt", dict(inner_steps=2)),
]


@pytest.mark.parametrize("method,options", BAD_OPTIONS)
def test_bad_options_raise(tiny, image, method, options):
    with pytest.raises(SpdinvError) as error:
        invert(tiny, image, PROMPT, method, 2, progress=False, **options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("flags,message", [
    (["--method", "aidi", "--window", "0"], "window must be a positive integer"),
    (["--method", "aidi", "--damping", "2"], "damping must be in (0, 1]"),
    (["--method", "null_text", "--inner-steps", "-1"], "inner_steps must be a non-negative integer"),
    (["--method", "negative_prompt", "--guidance", "0.5"], "guidance must be a finite number >= 1"),
    (["--method", "direct", "--guidance", "7.5"], "do not apply to direct"),
    (["--method", "spdinv", "--guidance", "7.5"], "do not apply to spdinv"),
    (["--method", "ddim", "--window", "3"], "do not apply to ddim"),
])
def test_cli_bad_options_exit_2_in_one_line(red_circle, tmp_path, capsys, flags, message):
    code = main(["invert", str(red_circle), "--prompt", PROMPT, "--out", str(tmp_path / "x"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
