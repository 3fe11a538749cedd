"""FireFlow (Deng et al., ICML 2025, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic
Editing"): the modified midpoint step whose start velocity is the previous step's midpoint
velocity, second order at about one network call a step; followed from `denoise_fireflow` in
HolmesShuan/FireFlow, src/flux/sampling.py (N + 1 calls for N steps, the same rule for
inversion and for sampling)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..model import DiffusionModel
from ..sampling import Output, SamplingStep
from ..schedule import Schedule
from .base import Inversion, StepResult
from .flow import Velocity, flow_inversion, sigmas_of_sampling_step, timestep_scale


def fireflow_step(velocity: Velocity, z: Tensor, sigma: float, sigma_next: float,
                  reused: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """One FireFlow step from sigma to sigma_next (either direction): (z', v_mid, calls).
    `reused` is the previous step's midpoint velocity, taken as v(z, sigma) (None on the first
    step: evaluated, 2 calls; else 1)."""
    h = sigma_next - sigma
    v = velocity(z, sigma) if reused is None else reused
    v_mid = velocity(z + (h / 2) * v, sigma + h / 2)
    return z + h * v_mid, v_mid, 1 if reused is not None else 2


@dataclass(frozen=True)
class FireFlowOptions:
    """FireFlow has no options (its official inversion runs at guidance 1 under the source prompt)."""


def fireflow_sampler() -> SamplingStep:
    """FireFlow's sampler (the official code samples with the rule it inverts with): the first step
    2 calls, every later one 1 (the previous midpoint velocity, per branch and guided, is reused)."""
    reused: list[Tensor] = []

    def advance(schedule: Schedule, k: int, z: Tensor, output: Output) -> Tensor:
        sigma, sigma_next = sigmas_of_sampling_step(schedule, k)
        scale = timestep_scale(schedule)
        z, v_mid, _ = fireflow_step(lambda x, s: output(x, s * scale), z, sigma, sigma_next,
                                    reused[0] if reused else None)
        reused[:] = [v_mid]
        return z

    return advance


def fireflow(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: Schedule,
             options: FireFlowOptions = FireFlowOptions(), *, diagnose: bool = True,
             progress: bool = True) -> Inversion:
    """FireFlow inversion: N + 1 network calls for N steps."""

    def make_solve(velocity: Velocity):
        reused: list[Tensor] = []  # the previous step's midpoint velocity

        def solve(z_prev: Tensor, k: int) -> StepResult:
            latent, v_mid, calls = fireflow_step(velocity, z_prev, schedule.sigma(k - 1), schedule.sigma(k),
                                                 reused[0] if reused else None)
            reused[:] = [v_mid]
            return StepResult(latent=latent, network_calls=calls)

        return solve

    return flow_inversion(model, z0, embedding, schedule, "fireflow", make_solve, sampler=fireflow_sampler,
                          diagnose=diagnose, progress=progress)
