"""RF-Solver (Wang et al., ICML 2025, "Taming Rectified Flow for Inversion and Editing"): the
second-order Taylor step of the rectified-flow ODE dz/dsigma = v(z, sigma), the velocity's
derivative by a finite difference at the half step; followed from `denoise_rf_solver` in
wangjiangshan0725/RF-Solver-Edit, FLUX_Image_Edit/src/flux/sampling.py (2 network calls a step,
the same rule for inversion and for sampling)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..model import DiffusionModel
from ..sampling import Output, SamplingStep
from ..schedule import Schedule
from .base import Inversion, StepResult
from .flow import Velocity, flow_inversion, sigmas_of_sampling_step, timestep_scale


def rf_solver_step(velocity: Velocity, z: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One RF-Solver step from sigma to sigma_next (either direction), 2 calls:
    z' = z + h v + h^2/2 dv/dsigma, dv/dsigma ~ (v(z + h/2 v, sigma + h/2) - v) / (h/2)."""
    h = sigma_next - sigma
    v = velocity(z, sigma)
    v_mid = velocity(z + (h / 2) * v, sigma + h / 2)
    derivative = (v_mid - v) / (h / 2)
    return z + h * v + 0.5 * h**2 * derivative


@dataclass(frozen=True)
class RFSolverOptions:
    """RF-Solver has no options (its official inversion runs at guidance 1 under the source prompt)."""


def rf_solver_sampler() -> SamplingStep:
    """RF-Solver's sampler (the official code samples with the rule it inverts with): 2 calls a step."""

    def advance(schedule: Schedule, k: int, z: Tensor, output: Output) -> Tensor:
        sigma, sigma_next = sigmas_of_sampling_step(schedule, k)
        scale = timestep_scale(schedule)
        return rf_solver_step(lambda x, s: output(x, s * scale), z, sigma, sigma_next)

    return advance


def rf_solver(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: Schedule,
              options: RFSolverOptions = RFSolverOptions(), *, diagnose: bool = True,
              progress: bool = True) -> Inversion:
    """RF-Solver inversion: one second-order step per interval, 2 network calls each."""

    def make_solve(velocity: Velocity):
        def solve(z_prev: Tensor, k: int) -> StepResult:
            latent = rf_solver_step(velocity, z_prev, schedule.sigma(k - 1), schedule.sigma(k))
            return StepResult(latent=latent, network_calls=2)

        return solve

    return flow_inversion(model, z0, embedding, schedule, "rf_solver", make_solve, sampler=rf_solver_sampler,
                          diagnose=diagnose, progress=progress)
