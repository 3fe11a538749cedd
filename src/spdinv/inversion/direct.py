"""DirectInversion (Ju et al., ICLR 2024, "PnP Inversion: Boosting Diffusion-based Editing with 3
Lines of Code"): DDIM inversion, then, walking in sampling order from z_T, record per step the
offset between the inverted latent and the guided DDIM step from the source branch; adding it
back pins the source branch to the inverted trajectory while the target branch edits freely."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from ..errors import SpdinvError
from ..model import DiffusionModel
from ..schedule import DDIMSchedule, ddim_step
from .base import Inversion
from .ddim import ddim


@dataclass(frozen=True)
class DirectOptions:
    """guidance: the classifier-free guidance scale (against the empty prompt) the source branch is
    sampled with, >= 1; the offsets are computed for exactly that scale."""

    guidance: float = 7.5

    def __post_init__(self) -> None:
        if not math.isfinite(self.guidance) or not self.guidance >= 1:
            raise SpdinvError(f"guidance must be a finite number >= 1, got {self.guidance}")


@torch.no_grad()
def source_offsets(model: DiffusionModel, trajectory: Tensor, embedding: Tensor, schedule: DDIMSchedule,
                   guidance: float) -> tuple[Tensor, list[float]]:
    """Offsets (n, C, H, W) in sampling order, and the seconds each took. The source branch's
    guided step is computed exactly as `sampling.reconstruct_latent` computes it, so sampling with
    the offsets reproduces the trajectory up to float rounding."""
    n, null = schedule.num_steps, model.encode_prompt("")
    z = trajectory[n:]
    offsets, seconds = [], []
    for i in range(n):
        k = n - i
        start = time.perf_counter()
        eps = model.eps(z, schedule.timesteps[k - 1], embedding, guidance, null)
        stepped = ddim_step(z, eps, schedule.abar(k), schedule.abar(k - 1))
        offsets.append(trajectory[k - 1 : k] - stepped)
        z = stepped + offsets[-1]
        seconds.append(time.perf_counter() - start)
    return torch.cat(offsets), seconds


def direct(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: DDIMSchedule,
           options: DirectOptions = DirectOptions(), *, diagnose: bool = True, progress: bool = True) -> Inversion:
    """DirectInversion: DDIM inversion plus one guided step per timestep to record the source-branch offsets."""
    inversion = ddim(model, z0, embedding, schedule, diagnose=diagnose, progress=progress)
    offsets, seconds = source_offsets(model, inversion.trajectory, embedding, schedule, options.guidance)
    calls = 1 if options.guidance == 1 else 2  # a guided eps evaluates the UNet on two halves
    n = schedule.num_steps
    for i, spent in enumerate(seconds):
        report = inversion.steps[n - i - 1]  # the inversion step at the same timestep carries the cost
        report.seconds += spent
        report.network_calls += calls
    return replace(inversion, method="direct", settings=asdict(options), guidance_scale=options.guidance,
                   source_offsets=offsets)
