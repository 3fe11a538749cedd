"""Null-text inversion (Mokady et al., CVPR 2023): DDIM inversion at guidance 1, then, walking in
sampling order from z_T, optimise the unconditional ("null") embedding of each step with Adam so
that the guided DDIM step from the current latent lands on the inverted latent of the next step."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..arguments import option, positive_float
from ..errors import SpdinvError
from ..model import DiffusionModel
from ..prediction import guided
from ..schedule import Schedule
from .base import Inversion
from .ddim import ddim


@dataclass(frozen=True)
class NullTextOptions:
    """guidance: classifier-free guidance scale (>= 1); inner_steps: most Adam steps per timestep;
    Adam's step size at sampling step i is lr * (1 - lr_decay * i) (no optimisation once that
    reaches 0); a step stops early once its loss < early_stop + i * early_stop_growth.
    Defaults are the reference implementation's."""

    guidance: float = option(7.5, "classifier-free guidance scale, >= 1")
    inner_steps: int = option(10, "most Adam steps per timestep")
    lr: float = option(1e-2, "Adam's step size", parse=positive_float)
    lr_decay: float = option(1e-2, "lr at sampling step i is lr*(1 - lr_decay*i)")
    early_stop: float = option(1e-5, "stop a step once its loss < early_stop + i*growth")
    early_stop_growth: float = option(2e-5, "growth of that threshold per step")

    def __post_init__(self) -> None:
        if not math.isfinite(self.guidance) or not self.guidance >= 1:
            raise SpdinvError(f"guidance must be a finite number >= 1, got {self.guidance}")
        if not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise SpdinvError(f"inner_steps must be a non-negative integer, got {self.inner_steps}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise SpdinvError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.lr_decay < 1:
            raise SpdinvError(f"lr_decay must be in [0, 1), got {self.lr_decay}")
        for name in ("early_stop", "early_stop_growth"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise SpdinvError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class NullFit:
    """One timestep's fit: the null embedding to sample with and what finding it cost."""

    embedding: Tensor
    adam_steps: int
    forwards: int
    warning: str = ""


def fit_null(loss_of: Callable[[Tensor], Tensor], null: Tensor, lr: float, inner_steps: int,
             threshold: float) -> NullFit:
    """Up to `inner_steps` Adam steps on `loss_of(null)`. The loss is checked before stepping, so a
    met criterion keeps the measured embedding (the reference code steps once more, then checks
    the loss of the embedding before that step). A non-finite loss restores the initial embedding."""
    start = null.detach()
    null = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([null], lr=lr)
    forwards = adam_steps = 0
    for _ in range(inner_steps):
        loss = loss_of(null)
        forwards += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            return NullFit(start, adam_steps, forwards,
                           f"non-finite loss after {adam_steps} Adam steps; kept the step's initial null embedding")
        if value < threshold:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        adam_steps += 1
    return NullFit(null.detach(), adam_steps, forwards)


def null_step(model: DiffusionModel, schedule: Schedule, k: int, z: Tensor, target: Tensor,
              embedding: Tensor, null: Tensor, i: int, options: NullTextOptions) -> tuple[NullFit, Tensor]:
    """Sampling step i (latent k -> k-1): fit the null embedding so that the guided DDIM step from
    z lands on `target`, then take that step. The conditional eps is computed once, so each Adam
    step costs one forward and one backward of the unconditional half; the step costs two more."""
    t = schedule.timesteps[k - 1]
    with torch.no_grad():
        eps_cond = model.eps(z, t, embedding)

    def landing_error(candidate: Tensor) -> Tensor:
        eps = guided(model.eps(z, t, candidate), eps_cond, options.guidance)
        return F.mse_loss(schedule.sample_step(k, z, eps), target)

    lr = options.lr * (1 - options.lr_decay * i)
    threshold = options.early_stop + i * options.early_stop_growth
    fit = fit_null(landing_error, null, max(lr, 0.0), options.inner_steps if lr > 0 else 0, threshold)
    fit.forwards += 2
    with torch.no_grad():
        latent = schedule.sample_step(k, z, guided(model.eps(z, t, fit.embedding), eps_cond, options.guidance))
    return fit, latent


def null_text(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: Schedule,
              options: NullTextOptions = NullTextOptions(), *, diagnose: bool = True,
              progress: bool = True) -> Inversion:
    """Null-text inversion: DDIM inversion, then per-step Adam on the null embedding (frozen UNet)."""
    inversion = ddim(model, z0, embedding, schedule, diagnose=diagnose, progress=progress)
    n, trajectory = schedule.num_steps, inversion.trajectory
    z, null = trajectory[n:].to(model.device), model.encode_prompt("")
    nulls = []
    with torch.enable_grad():
        for i in tqdm(range(n), desc="null-text optimisation", disable=not progress, leave=False):
            k = n - i
            start = time.perf_counter()
            fit, z = null_step(model, schedule, k, z, trajectory[k - 1 : k].to(model.device), embedding, null, i,
                               options)
            report = inversion.steps[k - 1]  # the inversion step at the same timestep carries the cost
            report.seconds += time.perf_counter() - start
            report.iterations = report.gradient_calls = fit.adam_steps
            report.network_calls += fit.forwards
            report.warning = "; ".join(w for w in (report.warning, fit.warning) if w)
            null = fit.embedding
            nulls.append(null)
    return replace(inversion, method="null_text", settings=asdict(options), guidance_scale=options.guidance,
                   uncond_embeddings=torch.cat(nulls))
