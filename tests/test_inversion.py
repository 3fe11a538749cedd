import functools
import math
import sys

import pytest
import torch

from spdinv.errors import SpdinvError
from spdinv.inversion import METHODS, invert
from spdinv.inversion.base import fixed_point_inversion
from spdinv.inversion.solvers import SOLVERS, anderson_mixing, gmres
from spdinv.inversion.spdinv import SPDInvOptions, solve_fixed_point
from spdinv.inversion.reconstruction import reconstruct
from spdinv.testing import same_up_to_rounding, unet_batch_sizes

PROMPT = "a large red circle in the centre on a white background"


@pytest.fixture(scope="module")
def image(red_circle):
    from PIL import Image

    return Image.open(red_circle)


@pytest.fixture(scope="module")
def pair(tiny, image):
    """DDIM and SPDInv (a K large enough to converge on the tiny model) on the same image."""
    ddim = invert(tiny, image, PROMPT, "ddim", 10, progress=False)
    spd = invert(tiny, image, PROMPT, "spdinv", 10, progress=False, K=200, lr=1e-2, solver="gradient")
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


@pytest.mark.parametrize("method, options", [("spdinv", dict(K=5, lr=1e-2, delta=1e-3, solver="gradient")),
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
    # the same DDIM steps, but SPDInv evaluates them in batches of two rows and DDIM in batches of
    # one: they agree up to batch-shape rounding (measured 1.5e-5 of the latents' magnitude at 1 and
    # 2 threads under the suite's 1e-6 rounding), not bit for bit (see same_up_to_rounding)
    assert same_up_to_rounding(spd.trajectory, ddim.trajectory)
    assert calls == [1] + [2] * 9 + [1]  # step 1's guess, nine guess+next rows, step 10's residual
    assert spd.network_calls == 20


def test_relative_delta_asks_each_step_to_cut_its_own_residual(tiny, image):
    """Scale-aware stopping: a step stops only below delta *and* below relative_delta x its first
    residual, so steps whose DDIM guess is already under the absolute delta still iterate."""
    absolute = invert(tiny, image, PROMPT, "spdinv", 10, progress=False, K=200, lr=1e-2, delta=1.0,
                      solver="gradient")
    relative = invert(tiny, image, PROMPT, "spdinv", 10, progress=False, K=200, lr=1e-2, delta=1.0, relative_delta=0.1,
                      solver="gradient")
    assert all(s.iterations == 0 for s in absolute.steps)  # delta 1.0: every guess passes at once
    assert sum(s.iterations for s in relative.steps) > 0
    for step in relative.steps:
        assert step.iterations == 200 or step.residual_after < 0.1 * step.residual_before
    assert relative.noise_error < absolute.noise_error


def test_default_settings_are_the_papers(tiny, image):
    inv = invert(tiny, image, PROMPT, "spdinv", 3, progress=False, solver="gradient")
    assert {k: inv.settings[k] for k in ("K", "lr", "delta", "optimizer")} == dict(K=25, lr=1e-3, delta=5e-6, optimizer="adamw")
    assert all(s.iterations <= 25 for s in inv.steps)


def test_no_unet_parameter_receives_gradients(tiny, image):
    invert(tiny, image, PROMPT, "spdinv", 3, progress=False, K=5, solver="gradient")
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
    inv = invert(tiny, image, PROMPT, "spdinv", 4, progress=False, K=20, lr=lr, optimizer=optimizer, solver="gradient")
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


# ---------------------------------------------------------------- the solvers behind `solver`


@pytest.mark.parametrize("solver, delta, solved", [("anderson", 1e-6, 9), ("hybrid", 1e-6, 8),
                                                   ("newton_krylov", 1e-6, 9), ("polyak", 1e-4, 9)])
def test_each_solver_converges_on_the_tiny_model(tiny, image, pair, solver, delta, solved):
    """Steps below delta, far below the DDIM guesses' residuals (~2e-3 on average). The tiny random
    model's step 2 (first residual ~7e-3) is one none of them solves in K = 25, and the hybrid
    also misses the last step (2e-5) where its gradient fallback cost the mixing its progress
    (measured); Polyak's gradient steps are slower than the others, hence its looser delta."""
    inv = invert(tiny, image, PROMPT, "spdinv", 10, progress=False, solver=solver, delta=delta)
    assert inv.settings["solver"] == solver
    assert sum(s.residual_after < delta for s in inv.steps) >= solved, [s.residual_after for s in inv.steps]
    assert all(s.residual_after <= s.residual_before for s in inv.steps)
    assert inv.noise_error < pair[0].noise_error / 10
    assert (inv.gradient_calls > 0) == (solver in ("polyak", "newton_krylov", "hybrid"))


def test_anderson_is_the_default_and_gradient_stays_the_papers_solver(tiny, image):
    """The default solver is `anderson` (issue 28: the same fixed point at a lower cost) and gives
    exactly what naming it gives; `gradient` is the paper's (AdamW, lr 1e-3, K 25), one option away."""
    default = invert(tiny, image, PROMPT, "spdinv", 3, progress=False)
    named = invert(tiny, image, PROMPT, "spdinv", 3, progress=False, solver="anderson")
    assert default.settings["solver"] == "anderson" and SPDInvOptions().solver == "anderson"
    assert torch.equal(default.trajectory, named.trajectory)
    assert default.gradient_calls == 0
    paper = invert(tiny, image, PROMPT, "spdinv", 3, progress=False, solver="gradient", optimizer="adamw")
    assert paper.settings["solver"] == "gradient" and paper.gradient_calls == sum(s.iterations for s in paper.steps)


def contraction(z):
    """f(z) = 0.5 z + 1: fixed point 2 everywhere."""
    return 0.5 * z + 1.0


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_solvers_return_the_best_measured_iterate(solver):
    start = torch.zeros(1, 4, 2, 2)
    result = solve_fixed_point(contraction, start, SPDInvOptions(K=3, lr=0.5, delta=1e-30, optimizer="sgd", solver=solver))
    measured = float((contraction(result.latent) - result.latent).pow(2).mean())
    assert math.isclose(result.residual_after, measured, rel_tol=1e-5, abs_tol=1e-12)
    assert result.residual_before == pytest.approx(1.0) and result.residual_after < result.residual_before


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_keeps_the_best_iterate_on_a_non_finite_residual(solver):
    nan_from = 6 if solver == "newton_krylov" else 3  # its 2nd to 4th calls are the first Newton step's JVPs
    calls = []

    slopes = torch.tensor([0.5, 0.4, 0.3, 0.2]).view(1, 4, 1, 1)  # not solved exactly by one Polyak step

    def f(z):  # a contraction until call nan_from, then NaN
        calls.append(1)
        return slopes * z + (float("nan") if len(calls) >= nan_from else 1.0)

    z0 = torch.zeros(1, 4, 2, 2)
    result = solve_fixed_point(f, z0, SPDInvOptions(K=10, lr=0.5, optimizer="sgd", solver=solver))
    assert "non-finite" in result.warning
    assert math.isfinite(result.residual_after) and result.residual_after < result.residual_before
    assert torch.isfinite(result.latent).all()


def test_the_safeguard_takes_a_gradient_step_where_the_iteration_diverges():
    """On f(z) = -3 z + 4 (fixed point 1, slope -3) plain iteration (window 1) diverges; with the
    safeguard, two residuals above the best send it a Polyak step from the best iterate, which is
    exact on this linear map."""
    def f(z):
        return -3.0 * z + 4.0

    def run(safeguard: bool):
        return anderson_mixing(f, torch.zeros(1, 1, 2, 2), None, updates=10, window=1, damping=1.0,
                               done=lambda value, first: value < 1e-12, safeguard=safeguard)

    plain, guarded = run(False), run(True)
    assert plain.residual_after == plain.residual_before == 16.0 and plain.gradient_calls == 0
    assert guarded.gradient_calls == 1 and guarded.residual_after < 1e-12
    assert torch.allclose(guarded.latent, torch.ones(1, 1, 2, 2), atol=1e-6)


def test_the_ddim_guess_is_one_iteration_from_the_previous_latent(tiny, image):
    """What anderson and hybrid start their history with: z_guess = f(z_prev), to rounding (the
    guess and f use the same coefficients, one as tensors, one as floats)."""
    from spdinv.inversion import image_latent
    from spdinv.inversion.base import ddim_guess, fixed_point_map
    from spdinv.inversion.solvers import ddim_iterate

    schedule, embedding = tiny.schedule(10), tiny.encode_prompt(PROMPT)
    z_prev = image_latent(tiny, image)
    f = fixed_point_map(tiny, schedule, 3, z_prev, embedding)
    guess = ddim_guess(tiny, schedule, 3, z_prev, embedding)
    earlier, residual = ddim_iterate(f, guess)
    assert earlier is z_prev
    with torch.no_grad():
        assert torch.allclose(residual, f(z_prev) - z_prev, rtol=0, atol=1e-5)
    assert ddim_iterate(contraction, guess) is None


def test_gmres_solves_a_small_linear_system():
    matrix = torch.tensor([[2.0, 0.5, 0.0], [0.1, 1.5, 0.2], [0.0, 0.3, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x, used = gmres(lambda v: matrix @ v, b, 3)
    assert used == 3 and torch.allclose(matrix @ x, b, atol=1e-10)


def test_unknown_solver_is_a_one_line_error(tiny, image):
    with pytest.raises(SpdinvError, match="unknown solver 'nope'; valid: gradient, anderson"):
        invert(tiny, image, PROMPT, "spdinv", 3, solver="nope")
