"""The fixed-point solvers behind SPDInv's `solver` option (spdinv.inversion.solvers)."""

import math

import pytest
import torch

from spdinv.errors import SpdinvError
from spdinv.inversion import invert
from spdinv.inversion.solvers import SOLVERS, anderson_mixing, gmres
from spdinv.inversion.spdinv import SPDInvOptions, solve_fixed_point

PROMPT = "a large red circle in the centre on a white background"


@pytest.fixture(scope="module")
def image(red_circle):
    from PIL import Image

    return Image.open(red_circle)


@pytest.fixture(scope="module")
def ddim(tiny, image):
    return invert(tiny, image, PROMPT, "ddim", 10, progress=False)


@pytest.mark.parametrize("solver, delta, solved", [("anderson", 1e-6, 9), ("hybrid", 1e-6, 8),
                                                   ("newton_krylov", 1e-6, 9), ("polyak", 1e-4, 9)])
def test_each_solver_converges_on_the_tiny_model(tiny, image, ddim, solver, delta, solved):
    """Steps below delta, far below the DDIM guesses' residuals (~2e-3 on average). The tiny random
    model's step 2 (first residual ~7e-3) is one none of them solves in K = 25, and the hybrid
    also misses the last step (2e-5) where its gradient fallback cost the mixing its progress
    (measured); Polyak's gradient steps are slower than the others, hence its looser delta."""
    inv = invert(tiny, image, PROMPT, "spdinv", 10, progress=False, solver=solver, delta=delta)
    assert inv.settings["solver"] == solver
    assert sum(s.residual_after < delta for s in inv.steps) >= solved, [s.residual_after for s in inv.steps]
    assert all(s.residual_after <= s.residual_before for s in inv.steps)
    assert inv.noise_error < ddim.noise_error / 10
    assert (inv.gradient_calls > 0) == (solver in ("polyak", "newton_krylov", "hybrid"))


def test_gradient_stays_the_papers_solver(tiny, image):
    """The default solver is `gradient` and gives exactly what naming it gives (AdamW, lr 1e-3, K 25)."""
    default = invert(tiny, image, PROMPT, "spdinv", 3, progress=False)
    named = invert(tiny, image, PROMPT, "spdinv", 3, progress=False, solver="gradient", optimizer="adamw")
    assert default.settings["solver"] == "gradient" and SPDInvOptions().solver == "gradient"
    assert torch.equal(default.trajectory, named.trajectory)
    assert [s.iterations for s in default.steps] == [s.iterations for s in named.steps]
    assert default.gradient_calls == sum(s.iterations for s in default.steps)


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
def test_non_finite_residual_falls_back_to_the_best_iterate(solver):
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
    from spdinv.inversion.solvers import ddim_step

    schedule, embedding = tiny.schedule(10), tiny.encode_prompt(PROMPT)
    z_prev = image_latent(tiny, image)
    f = fixed_point_map(tiny, schedule, 3, z_prev, embedding)
    guess = ddim_guess(tiny, schedule, 3, z_prev, embedding)
    earlier, residual = ddim_step(f, guess)
    assert earlier is z_prev
    with torch.no_grad():
        assert torch.allclose(residual, f(z_prev) - z_prev, rtol=0, atol=1e-5)
    assert ddim_step(contraction, guess) is None


def test_gmres_solves_a_small_linear_system():
    matrix = torch.tensor([[2.0, 0.5, 0.0], [0.1, 1.5, 0.2], [0.0, 0.3, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x, used = gmres(lambda v: matrix @ v, b, 3)
    assert used == 3 and torch.allclose(matrix @ x, b, atol=1e-10)


def test_unknown_solver_is_a_one_line_error(tiny, image):
    with pytest.raises(SpdinvError, match="unknown solver 'nope'; valid: gradient, anderson"):
        invert(tiny, image, PROMPT, "spdinv", 3, solver="nope")
