"""Plain DDIM inversion (Song et al. 2021; as used by Prompt-to-Prompt): eps at (z_{t-1}, t). On a
rectified flow the same method is the explicit Euler inversion, v at (z_{t-1}, sigma_{t-1}) (the
"vanilla" inversion of RF-Solver's and FireFlow's code): `schedule.guess_timestep`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..model import DiffusionModel
from ..schedule import Schedule
from .base import Inversion, StepResult, ddim_guess, noise_error, run_inversion


@dataclass(frozen=True)
class DDIMOptions:
    """DDIM inversion has no options."""


def ddim(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: Schedule,
         options: DDIMOptions = DDIMOptions(), *, diagnose: bool = True, progress: bool = True) -> Inversion:
    """DDIM (or explicit Euler) inversion: one network call per step, source prompt, guidance 1."""

    def solve(z_prev: Tensor, k: int) -> StepResult:
        return StepResult(latent=ddim_guess(model, schedule, k, z_prev, embedding))

    trajectory, steps = run_inversion(model, z0, embedding, schedule, solve, method="ddim", diagnose=diagnose,
                                      progress=progress)
    return Inversion("ddim", trajectory, schedule, embedding, steps,
                     noise_error=noise_error(steps) if diagnose else None)
