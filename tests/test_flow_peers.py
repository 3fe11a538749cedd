"""The rectified-flow peer inversions (RF-Solver, FireFlow, Uni-Inv): their step rules on a linear
velocity field whose exact flow is known (order of accuracy, network calls), and the methods on a
tiny SD3 model (invert, reconstruct with their own samplers, finite diagnostics)."""

import math

import pytest
import torch

from spdinv.inversion.fireflow import fireflow_step
from spdinv.inversion.rf_solver import rf_solver_step
from spdinv.inversion.uni_inv import uni_inv_step

DIM = 6


class LinearField:
    """v(z, sigma) = A z + sigma b + c (float64), its calls counted; the exact flow from sigma0 to
    sigma1 is the matrix exponential of the augmented system y = (z, sigma, 1)."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.a = 0.5 * torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
        self.b = torch.randn(DIM, generator=generator, dtype=torch.float64)
        self.c = torch.randn(DIM, generator=generator, dtype=torch.float64)
        self.calls = 0

    def __call__(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls += 1
        return z @ self.a.T + sigma * self.b + self.c

    def exact(self, z: torch.Tensor, sigma0: float, sigma1: float) -> torch.Tensor:
        m = torch.zeros(DIM + 2, DIM + 2, dtype=torch.float64)
        m[:DIM, :DIM], m[:DIM, DIM], m[:DIM, DIM + 1], m[DIM, DIM + 1] = self.a, self.b, self.c, 1.0
        y = torch.cat([z, torch.tensor([sigma0, 1.0], dtype=torch.float64)])
        return (torch.linalg.matrix_exp(m * (sigma1 - sigma0)) @ y)[:DIM]


def euler(field, z, sigmas):
    for s, s_next in zip(sigmas, sigmas[1:]):
        z = z + (s_next - s) * field(z, s)
    return z


def rf_solver(field, z, sigmas):
    for s, s_next in zip(sigmas, sigmas[1:]):
        z = rf_solver_step(field, z, s, s_next)
    return z


def fireflow(field, z, sigmas):
    reused = None
    for s, s_next in zip(sigmas, sigmas[1:]):
        z, reused, _ = fireflow_step(field, z, s, s_next, reused)
    return z


def uni_inv(field, z, sigmas):
    previous = field(z, sigmas[0])
    for s, s_next in zip(sigmas, sigmas[1:]):
        z, previous = uni_inv_step(field, z, s, s_next, previous)
    return z


RULES = {"euler": (euler, 1, lambda n: n), "rf_solver": (rf_solver, 2, lambda n: 2 * n),
         "fireflow": (fireflow, 2, lambda n: n + 1), "uni_inv": (uni_inv, 1, lambda n: n + 1)}


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("direction", ["invert", "sample"])
def test_order_of_accuracy_and_calls_on_a_linear_field(name, direction):
    """Doubling the steps divides the error by ~2^order: 2 for Euler and Uni-Inv (one Picard step of
    implicit Euler: first order), 4 for RF-Solver and FireFlow (second order). Measured ratios are
    1.96-2.0 and 3.85-4.0 at these step counts; the bounds leave room for the pre-asymptotic range."""
    rule, order, calls_of = RULES[name]
    field = LinearField()
    z0 = torch.randn(DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for n in (16, 32, 64):
        sigmas = [i / n for i in range(n + 1)]
        if direction == "sample":
            sigmas = sigmas[::-1]
        field.calls = 0
        z = rule(field, z0, sigmas)
        assert field.calls == calls_of(n)
        errors.append(float((z - field.exact(z0, sigmas[0], sigmas[-1])).norm()))
    for coarse, fine in zip(errors, errors[1:]):
        assert 2**order * 0.85 < coarse / fine < 2**order * 1.15


def test_rf_solver_step_is_the_explicit_midpoint_rule():
    """h v + h^2/2 (v_mid - v)/(h/2) = h v_mid: the official Taylor form is the midpoint rule (to rounding)."""
    field = LinearField()
    z = torch.randn(DIM, dtype=torch.float64)
    h = 0.1
    midpoint = z + h * field(z + h / 2 * field(z, 0.3), 0.3 + h / 2)
    assert torch.allclose(rf_solver_step(field, z, 0.3, 0.3 + h), midpoint, rtol=0, atol=1e-12)


def test_fireflow_reuses_the_previous_midpoint_velocity():
    field = LinearField()
    z = torch.randn(DIM, dtype=torch.float64)
    _, v_mid, first_calls = fireflow_step(field, z, 0.0, 0.1, None)
    field.calls = 0
    z_next, _, calls = fireflow_step(field, z, 0.1, 0.2, v_mid)
    assert (first_calls, calls, field.calls) == (2, 1, 1)
    assert torch.allclose(z_next, z + 0.1 * field(z + 0.05 * v_mid, 0.15), rtol=0, atol=1e-12)


def test_uni_inv_is_one_picard_step_of_implicit_euler_from_the_previous_velocity_guess():
    field = LinearField()
    z_prev, v_prev = torch.randn(DIM, dtype=torch.float64), torch.randn(DIM, dtype=torch.float64)
    z, v = uni_inv_step(field, z_prev, 0.2, 0.3, v_prev)
    guess = z_prev + 0.1 * v_prev
    assert torch.allclose(v, field(guess, 0.3), rtol=0, atol=1e-12)
    assert torch.allclose(z, z_prev + 0.1 * field(guess, 0.3), rtol=0, atol=1e-12)
    assert not math.isclose(float((z - z_prev - 0.1 * field(z, 0.3)).norm()), 0.0, abs_tol=1e-9)


# --- the methods on tiny flow models ---------------------------------------------------------------------------

PROMPT = "a large red circle in the centre on a white background"
FLOW_STEPS = 6
FLOW_METHODS = {"ddim": {}, "spdinv": dict(solver="anderson", K=4), "rf_solver": {}, "fireflow": {}, "uni_inv": {}}
# Inversion calls and sampling calls for N steps (spdinv's depend on convergence: checked apart).
CALLS = {"ddim": (lambda n: n, lambda n: n), "rf_solver": (lambda n: 2 * n, lambda n: 2 * n),
         "fireflow": (lambda n: n + 1, lambda n: n + 1), "uni_inv": (lambda n: n + 1, lambda n: n)}


@pytest.fixture(scope="module")
def sd3():
    from spdinv.model import from_pipeline
    from spdinv.testing import tiny_sd3_pipeline

    return from_pipeline(tiny_sd3_pipeline(), name="tiny-sd3")


@pytest.fixture(scope="module")
def flux():
    from spdinv.model import from_pipeline
    from spdinv.testing import tiny_flux_pipeline

    return from_pipeline(tiny_flux_pipeline(), name="tiny-flux")


@pytest.fixture(scope="module")
def circle(red_circle):
    """The red circle at the tiny models' 32x32 (a tensor in [-1, 1]: FLUX's default size would be 512)."""
    from PIL import Image

    from spdinv.images import to_tensor

    return to_tensor(Image.open(red_circle).convert("RGB").resize((32, 32)))


class CountCalls:
    """Counts the rows-batches the denoiser runs (one forward = one call) while installed."""

    def __init__(self, model):
        self.module, self.calls, self.handle = model.denoiser, 0, None

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("method", list(FLOW_METHODS))
def test_every_flow_method_inverts_and_reconstructs_with_finite_diagnostics(family, method, request, circle):
    from spdinv.inversion import invert, reconstruct

    model = request.getfixturevalue(family)
    with CountCalls(model) as inverting:
        inversion = invert(model, circle, PROMPT, method, FLOW_STEPS, progress=False, diagnose=False,
                           **FLOW_METHODS[method])
    assert inversion.trajectory.shape[0] == FLOW_STEPS + 1 and torch.isfinite(inversion.trajectory).all()
    with CountCalls(model) as sampling:
        recon = reconstruct(model, inversion, circle)
    if method in CALLS:
        inversion_calls, sampling_calls = CALLS[method]
        assert inverting.calls == inversion.network_calls == inversion_calls(FLOW_STEPS)
        assert sampling.calls == sampling_calls(FLOW_STEPS)
    diagnosed = invert(model, circle, PROMPT, method, FLOW_STEPS, progress=False, **FLOW_METHODS[method])
    values = [diagnosed.noise_error, diagnosed.reconstruction_error, recon.psnr]
    values += [s.residual_after for s in diagnosed.steps] + [s.residual_before for s in diagnosed.steps]
    assert all(math.isfinite(v) for v in values)


def test_second_order_peers_reconstruct_better_with_their_own_sampler(sd3, circle):
    """Sampled back with their own rule, RF-Solver's and FireFlow's inversions return closer to z_0
    than with Euler (the mismatch a user would get by reconstructing them with the default sampler)."""
    from spdinv.inversion import invert, reconstruct_latent

    for method in ("rf_solver", "fireflow"):
        inversion = invert(sd3, circle, PROMPT, method, FLOW_STEPS, progress=False, diagnose=False)
        own = float((reconstruct_latent(sd3, inversion) - inversion.z_0).pow(2).mean())
        inversion.sampler = None
        euler = float((reconstruct_latent(sd3, inversion) - inversion.z_0).pow(2).mean())
        assert own < euler / 4, (method, own, euler)


def test_a_saved_flow_inversion_keeps_its_sampler(sd3, circle, tmp_path):
    from spdinv.export import load_inversion, save_inversion
    from spdinv.inversion import invert, reconstruct_latent

    inversion = invert(sd3, circle, PROMPT, "fireflow", FLOW_STEPS, progress=False, diagnose=False)
    save_inversion(inversion, tmp_path)
    loaded = load_inversion(tmp_path, sd3)
    assert loaded.sampler is inversion.sampler
    assert torch.allclose(reconstruct_latent(sd3, loaded), reconstruct_latent(sd3, inversion), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["rf_solver", "fireflow", "uni_inv"])
def test_flow_peers_refuse_diffusion_models_in_one_line(tiny, circle, method):
    from spdinv.errors import SpdinvError
    from spdinv.inversion import invert

    with pytest.raises(SpdinvError, match=f"{method} inverts rectified-flow models") as error:
        invert(tiny, circle, PROMPT, method, 4, progress=False)
    assert "\n" not in str(error.value)


def test_inversion_all_means_the_methods_that_run_on_the_family(tiny, sd3, flux):
    from spdinv.inversion import METHODS, applies

    flow_peers = {"rf_solver", "fireflow", "uni_inv", "flowedit"}
    assert {m for m in METHODS if applies(tiny, m)} == set(METHODS) - flow_peers
    assert {m for m in METHODS if applies(sd3, m)} == set(METHODS)
    assert {m for m in METHODS if applies(flux, m)} == set(METHODS) - {"null_text", "negative_prompt"}
