"""What the rectified-flow inversions (RF-Solver, FireFlow, Uni-Inv) share: the velocity field of a
flow model as a function of (z, sigma), and the refusal of a denoising-diffusion schedule."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import SpdinvError
from ..model import DiffusionModel
from ..sampling import Sampler
from ..schedule import Schedule
from .base import Inversion, StepResult, noise_error, run_inversion

Velocity = Callable[[Tensor, float], Tensor]  # v(z, sigma) of the flow ODE dz/dsigma = v


def require_flow(schedule: Schedule, method: str) -> None:
    """A one-line refusal unless the schedule is a rectified flow's (the network predicts a velocity)."""
    if getattr(schedule, "output", "eps") != "velocity":
        raise SpdinvError(f"{method} inverts rectified-flow models (SD3, SD3.5, FLUX); this is a denoising-diffusion "
                          "model: use ddim, spdinv or another diffusion inversion")


def timestep_scale(schedule: Schedule) -> float:
    """The network's timestep per unit sigma (num_train_timesteps: diffusers passes sigma * 1000)."""
    k = max(range(1, schedule.num_steps + 1), key=schedule.sigma)
    return float(schedule.timesteps[k - 1]) / schedule.sigma(k)


def velocity_field(model: DiffusionModel, schedule: Schedule, embedding: Tensor) -> Velocity:
    """v(z, sigma) under the prompt `embedding` at guidance 1 (the inversions' setting), any sigma in
    [0, 1] (the midpoints of RF-Solver and FireFlow lie between the schedule's sigmas)."""
    scale = timestep_scale(schedule)

    def velocity(z: Tensor, sigma: float) -> Tensor:
        return model.eps(z, sigma * scale, embedding)

    return velocity


def sigmas_of_sampling_step(schedule: Schedule, k: int) -> tuple[float, float]:
    """(sigma_k, sigma_{k-1}): sampling takes latent k to latent k-1."""
    return schedule.sigma(k), schedule.sigma(k - 1)


def flow_inversion(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: Schedule, method: str,
                   make_solve: Callable[[Velocity], Callable[[Tensor, int], StepResult]], *,
                   sampler: Sampler | None = None, diagnose: bool = True, progress: bool = True) -> Inversion:
    """The loop of a flow inversion whose step is an explicit rule: `make_solve(velocity)` gives the
    per-step `solve(z_prev, k) -> StepResult` (its calls counted), run without gradients; the
    Inversion carries the `sampler` its reconstruction and edits use (None: Euler)."""
    require_flow(schedule, method)
    solve = torch.no_grad()(make_solve(velocity_field(model, schedule, embedding)))
    trajectory, steps = run_inversion(model, z0, embedding, schedule, solve, method=method, diagnose=diagnose,
                                      progress=progress)
    return Inversion(method, trajectory, schedule, embedding, steps, sampler=sampler,
                     noise_error=noise_error(steps) if diagnose else None)
