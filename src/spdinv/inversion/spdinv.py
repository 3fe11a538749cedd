"""SPDInv (Li et al., ECCV 2024, "Source Prompt Disentangled Inversion"): each inversion step is
the fixed point z_t = f(z_t) = C1 z_{t-1} + C2 eps(z_t, t, c), found by gradient descent on
||f(z_t) - z_t||^2 from the DDIM guess."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..arguments import option, positive_float, positive_int
from ..errors import SpdinvError
from ..model import DiffusionModel
from ..schedule import DDIMSchedule
from .base import Inversion, ResidualTracker, StepResult, fixed_point_inversion

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class SPDInvOptions:
    """K: most gradient steps per timestep; lr: step size; delta: stop once the mean squared
    residual is below it; relative_delta (scale-aware, off by default): stop only once the residual
    is also below this fraction of the step's first (DDIM-guess) residual; optimizer: adamw (the
    paper's code, weight decay 0.01), adam or sgd."""

    K: int = option(25, "most gradient steps per timestep", parse=positive_int)
    lr: float = option(1e-3, "step size", parse=positive_float)
    delta: float = option(5e-6, "early-stop threshold on the mean squared residual", parse=positive_float)
    relative_delta: float | None = option(
        None, "also stop only below this fraction of each step's first residual (scale-aware; default off)",
        parse=positive_float)
    optimizer: str = option("adamw", "adamw, adam or sgd")

    def __post_init__(self) -> None:
        if not isinstance(self.K, int) or self.K <= 0:
            raise SpdinvError(f"K must be a positive integer, got {self.K}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise SpdinvError(f"lr must be > 0, got {self.lr}")
        if not self.delta > 0 or not math.isfinite(self.delta):
            raise SpdinvError(f"delta must be > 0, got {self.delta}")
        if self.relative_delta is not None and not 0 < self.relative_delta < 1:
            raise SpdinvError(f"relative_delta must be in (0, 1), got {self.relative_delta}")
        if self.optimizer not in OPTIMIZERS:
            raise SpdinvError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def solve_fixed_point(f, z_init: Tensor, options: SPDInvOptions, f_init: Tensor | None = None) -> StepResult:
    """Minimise mean((f(z) - z)^2) over z from z_init. Returns the best *measured* iterate, so the
    reported residual is that of the returned latent (the paper's code returns one unmeasured
    step later). A non-finite residual stops the search and falls back to the best iterate.
    `f_init`, f(z_init) when the caller has it (without a graph), is not evaluated again unless
    a gradient step needs its graph."""
    z = z_init.detach().float().clone().requires_grad_(True)
    optimizer = OPTIMIZERS[options.optimizer]([z], lr=options.lr)
    tracker, steps = ResidualTracker(best_latent=z_init.detach().float()), 0
    if f_init is not None:
        value = float(F.mse_loss(f_init.float(), z_init.float()))
        if not tracker.observe(value, z, steps) or converged(value, value, options):
            return tracker.result(steps)
    while True:
        residual = F.mse_loss(f(z), z)
        if steps == 0 and f_init is not None:
            tracker.calls += 1  # f(z_init) again, for its graph: measured already
        else:
            value = float(residual.detach())
            stop = not tracker.observe(value, z, steps) or converged(value, tracker.first_residual, options)
            if stop or steps == options.K:
                break
        optimizer.zero_grad(set_to_none=True)
        residual.backward()
        optimizer.step()
        steps += 1
    return tracker.result(steps, gradient_calls=steps)


def converged(residual: float, first_residual: float, options: SPDInvOptions) -> bool:
    """The paper's absolute test, and the relative one when asked for."""
    if options.relative_delta is not None and residual >= options.relative_delta * first_residual:
        return False
    return residual < options.delta


def spdinv(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: DDIMSchedule,
           options: SPDInvOptions = SPDInvOptions(), *, diagnose: bool = True, progress: bool = True) -> Inversion:
    """SPDInv: DDIM guess, then up to K gradient steps on the fixed-point residual (frozen UNet)."""

    def solver(f, guess: Tensor, f_guess: Tensor | None) -> StepResult:
        with torch.enable_grad():
            return solve_fixed_point(f, guess, options, f_guess)

    # The official code edits with the source prompt's embedding as the unconditional one; that is
    # negative-prompt inversion's ingredient, not SPDInv's, so it is the editor's explicit switch
    # (`uncond="source"`), not a property of this inversion.
    return fixed_point_inversion(model, z0, embedding, schedule, solver, method="spdinv", settings=asdict(options),
                                 diagnose=diagnose, progress=progress)
