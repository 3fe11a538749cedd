"""Uni-Inv (Jiao et al., ICLR 2026, UniEdit-Flow): each inversion step predicts z_t with the
previous step's velocity, then steps from z_{t'} again with the velocity evaluated there (one Picard
step of the implicit Euler equation); followed from `denoise_uniinv` in DSL-Lab/UniEdit-Flow,
UniEdit-Flow_FLUX/src/flux/sampling.py and UniInvEulerScheduler.step in
UniEdit-Flow_diffusers/schedulers/UniInvEulerScheduler.py (N + 1 calls; sampled back with Euler)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..model import DiffusionModel
from ..schedule import Schedule
from .base import Inversion, StepResult
from .flow import Velocity, flow_inversion


def uni_inv_step(velocity: Velocity, z_prev: Tensor, sigma_prev: float, sigma: float,
                 v_prev: Tensor) -> tuple[Tensor, Tensor]:
    """One Uni-Inv step from sigma_prev up to sigma, 1 call: (z, v) with
    z~ = z_prev + h v_prev, v = v(z~, sigma), z = z_prev + h v; v is the next step's v_prev."""
    h = sigma - sigma_prev
    v = velocity(z_prev + h * v_prev, sigma)
    return z_prev + h * v, v


@dataclass(frozen=True)
class UniInvOptions:
    """Uni-Inv's official defaults: no zero initial velocity, the whole schedule inverted (alpha 1)."""


def uni_inv(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: Schedule,
            options: UniInvOptions = UniInvOptions(), *, diagnose: bool = True, progress: bool = True) -> Inversion:
    """Uni-Inv: v(z_0, 0) once, then one call a step (N + 1 in all); reconstructed by Euler sampling."""

    def make_solve(velocity: Velocity):
        previous: list[Tensor] = []  # the velocity of the step before

        def solve(z_prev: Tensor, k: int) -> StepResult:
            calls = 1
            if not previous:
                previous.append(velocity(z_prev, schedule.sigma(k - 1)))
                calls += 1
            latent, previous[0] = uni_inv_step(velocity, z_prev, schedule.sigma(k - 1), schedule.sigma(k),
                                               previous[0])
            return StepResult(latent=latent, network_calls=calls)

        return solve

    return flow_inversion(model, z0, embedding, schedule, "uni_inv", make_solve, diagnose=diagnose, progress=progress)
