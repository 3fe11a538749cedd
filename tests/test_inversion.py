import functools
import math
import sys

import pytest
import torch

from spdinv.errors import SpdinvError
from spdinv.inversion import METHODS, invert
from spdinv.inversion.base import fixed_point_inversion
from spdinv.inversion.spdinv import SPDInvOptions, solve_fixed_point
from spdinv.inversion.reconstruction import reconstruct
from spdinv.testing import unet_batch_sizes

PROMPT = "a large red circle in the centre on a white background"


@pytest.fixture(scope="module")
def image(red_circle):
    from PIL import Image

    return Image.open(red_circle)


@pytest.fixture(scope="module")
def pair(tiny, image):
    """DDIM and SPDInv (a K large enough to converge on the tiny model) on the same image."""
    ddim = invert(tiny, image, PROMPT, "ddim", 10, progress=False)
    spd = invert(tiny, image, PROMPT, "spdinv", 10, progress=False, K=200, lr=1e-2)
    return ddim, spd


def test_spdinv_residual_reaches_delta_where_K_allows(pair):
    _, spd = pair
    delta, K = spd.settings["delta"], spd.settings["K"]
    converged = [s for s in spd.steps if s.iterations < K]
    assert len(converged) >= len(spd.steps) // 2
    for step in converged:
        assert step.residual_after < delta
    for step in spd.steps:
        assert step.residual_after <= step.residual_before + 1e-12


def test_spdinv_noise_error_below_ddim(pair):
    ddim, spd = pair
    assert spd.noise_error < ddim.noise_error / 10
    assert spd.network_calls > ddim.network_calls == 10
    assert spd.gradient_calls == sum(s.iterations for s in spd.steps)


@pytest.mark.parametrize("method, options", [("spdinv", dict(K=5, lr=1e-2, delta=1e-3)),
                                             ("aidi", dict(iterations=3, tol=8e-4))])
def test_looking_ahead_gives_the_same_inversion_in_fewer_unet_calls(tiny, image, monkeypatch, method, options):
    """A step after one that kept its DDIM guess evaluates f(guess) and the next step's DDIM noise in
    one UNet call of two rows; the inversion is the one evaluating them one by one gives."""
    def run(look_ahead: bool):
        module = sys.modules[f"spdinv.inversion.{method}"]
        monkeypatch.setattr(module, "fixed_point_inversion", functools.partial(fixed_point_inversion, look_ahead=look_ahead))
        with unet_batch_sizes(tiny.unet) as calls:
            return invert(tiny, image, PROMPT, method, 10, progress=False, diagnose=False, **options), calls

    (alone, alone_calls), (ahead, ahead_calls) = run(False), run(True)
    iterations = [s.iterations for s in alone.steps]
    assert 0 < iterations[1:].count(0) < 9  # kept and iterated steps both follow kept ones
    assert [s.iterations for s in ahead.steps] == iterations
    # equal up to rounding: CPU convolutions take another kernel for two rows than for one
    assert torch.allclose(ahead.trajectory, alone.trajectory, rtol=0, atol=5e-5)
    assert set(alone_calls) == {1} and 2 in ahead_calls and len(ahead_calls) < len(alone_calls)
    assert ahead.network_calls == sum(ahead_calls)  # rows evaluated, each counted once
    assert alone.network_calls == sum(alone_calls)


def test_an_inversion_whose_guesses_all_pass_is_ddim_at_one_unet_call_a_step(tiny, image):
    ddim = invert(tiny, image, PROMPT, "ddim", 10, progress=False)
    with unet_batch_sizes(tiny.unet) as calls:
        spd = invert(tiny, image, PROMPT, "spdinv", 10, progress=False, delta=1.0, diagnose=False)
    assert torch.allclose(spd.trajectory, ddim.trajectory, rtol=0, atol=1e-5)
    assert calls == [1] + [2] * 9 + [1]  # step 1's guess, nine guess+next rows, step 10's residual
    assert spd.network_calls == 20


def test_relative_delta_asks_each_step_to_cut_its_own_residual(tiny, image):
    """Scale-aware stopping: a step stops only below delta *and* below relative_delta x its first
    residual, so steps whose DDIM guess is already under the absolute delta still iterate."""
    absolute = invert(tiny, image, PROMPT, "spdinv", 10, progress=False, K=200, lr=1e-2, delta=1.0)
    relative = invert(tiny, image, PROMPT, "spdinv", 10, progress=False, K=200, lr=1e-2, delta=1.0, relative_delta=0.1)
    assert all(s.iterations == 0 for s in absolute.steps)  # delta 1.0: every guess passes at once
    assert sum(s.iterations for s in relative.steps) > 0
    for step in relative.steps:
        assert step.iterations == 200 or step.residual_after < 0.1 * step.residual_before
    assert relative.noise_error < absolute.noise_error


def test_default_settings_are_the_papers(tiny, image):
    inv = invert(tiny, image, PROMPT, "spdinv", 3, progress=False)
    assert {k: inv.settings[k] for k in ("K", "lr", "delta", "optimizer")} == dict(K=25, lr=1e-3, delta=5e-6, optimizer="adamw")
    assert all(s.iterations <= 25 for s in inv.steps)


def test_no_unet_parameter_receives_gradients(tiny, image):
    invert(tiny, image, PROMPT, "spdinv", 3, progress=False, K=5)
    for module in (tiny.unet, tiny.text_encoder, tiny.vae):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())


def test_same_seed_same_output(tiny, image):
    a = invert(tiny, image, PROMPT, "spdinv", 4, progress=False, seed=3, K=5)
    b = invert(tiny, image, PROMPT, "spdinv", 4, progress=False, seed=3, K=5)
    assert torch.equal(a.trajectory, b.trajectory)
    assert [s.residual_after for s in a.steps] == [s.residual_after for s in b.steps]


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_optimizers_reduce_the_residual(tiny, image, optimizer):
    lr = 0.5 if optimizer == "sgd" else 1e-2
    inv = invert(tiny, image, PROMPT, "spdinv", 4, progress=False, K=20, lr=lr, optimizer=optimizer)
    assert sum(s.residual_after for s in inv.steps) < sum(s.residual_before for s in inv.steps)


def test_non_finite_residual_falls_back_to_best_iterate():
    calls = []

    def f(z):  # a fine map until the third evaluation, then NaN
        calls.append(1)
        return 0.5 * z + (float("nan") if len(calls) >= 3 else 0.0)

    z0 = torch.ones(1, 4, 2, 2)
    result = solve_fixed_point(f, z0, SPDInvOptions(K=10, lr=0.1, optimizer="sgd"))
    assert "non-finite" in result.warning
    assert math.isfinite(result.residual_after)
    assert result.residual_after < result.residual_before
    assert torch.isfinite(result.latent).all()


def test_low_precision_model_optimises_in_fp32(image):
    from spdinv.testing import tiny_pipeline
    from spdinv.model import from_pipeline

    model = from_pipeline(tiny_pipeline().to(torch.bfloat16))
    inv = invert(model, image, PROMPT, "spdinv", 3, progress=False, K=5)
    assert inv.trajectory.dtype == torch.float32
    assert all(math.isfinite(s.residual_after) for s in inv.steps)


def test_reconstruction_reports_psnr(tiny, image, pair):
    from spdinv.images import to_tensor

    ddim, spd = pair
    assert spd.reconstruction_error < ddim.reconstruction_error
    recon = reconstruct(tiny, spd, to_tensor(image.resize((32, 32))))
    assert recon.image.shape == (1, 3, 32, 32) and recon.psnr > 0 and recon.mse >= 0


def test_registry_and_bad_options(tiny, image):
    assert {"ddim", "spdinv"} <= set(METHODS)
    with pytest.raises(SpdinvError, match="valid: ddim, spdinv"):
        invert(tiny, image, PROMPT, "nope", 3)
    for bad in (dict(K=0), dict(lr=0.0), dict(delta=-1.0), dict(optimizer="rmsprop"), dict(relative_delta=1.0)):
        with pytest.raises(SpdinvError):
            invert(tiny, image, PROMPT, "spdinv", 3, **bad)
    with pytest.raises(SpdinvError, match="steps"):
        invert(tiny, image, PROMPT, "ddim", 0)
    with pytest.raises(SpdinvError, match="empty"):
        invert(tiny, image, "  ", "ddim", 3)
