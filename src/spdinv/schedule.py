"""DDIM coefficients and step formulas as pure tensor functions (Song et al. 2021, eq. 12).

Notation of the SPDInv paper: an inversion step takes z_s (timestep s) to z_t (t > s),
    z_t = C1 * z_s + C2 * eps,   C1 = sqrt(abar_t / abar_s),
    C2 = sqrt(1 - abar_t) - sqrt(abar_t * (1 - abar_s) / abar_s),
and the sampling step is its algebraic inverse for the same eps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


def inversion_coefficients(abar_s: Tensor | float, abar_t: Tensor | float) -> tuple[Tensor, Tensor]:
    """(C1, C2) of the inversion step z_t = C1 z_s + C2 eps."""
    abar_s, abar_t = torch.as_tensor(abar_s, dtype=torch.float64), torch.as_tensor(abar_t, dtype=torch.float64)
    c1 = (abar_t / abar_s).sqrt()
    c2 = (1 - abar_t).sqrt() - (abar_t * (1 - abar_s) / abar_s).sqrt()
    return c1, c2


def predict_x0(z_t: Tensor, eps: Tensor, abar_t: Tensor | float) -> Tensor:
    abar_t = torch.as_tensor(abar_t, dtype=z_t.dtype, device=z_t.device)
    return (z_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def ddim_step(z_t: Tensor, eps: Tensor, abar_t: Tensor | float, abar_prev: Tensor | float) -> Tensor:
    """Deterministic DDIM sampling step (eta = 0) from z_t to the less noisy z_prev."""
    abar_prev = torch.as_tensor(abar_prev, dtype=z_t.dtype, device=z_t.device)
    return abar_prev.sqrt() * predict_x0(z_t, eps, abar_t) + (1 - abar_prev).sqrt() * eps


def ddim_inverse_step(z_s: Tensor, eps: Tensor, abar_s: Tensor | float, abar_t: Tensor | float) -> Tensor:
    """DDIM inversion step from z_s to the noisier z_t (t > s): C1 z_s + C2 eps."""
    c1, c2 = inversion_coefficients(abar_s, abar_t)
    return c1.to(z_s.dtype) * z_s + c2.to(z_s.dtype) * eps


@dataclass(frozen=True)
class DDIMSettings:
    """How an inversion's DDIM run spaces its steps; the defaults are SD's (the CompVis/diffusers
    DDIM settings): timesteps 1, 1 + 1000/n, ... ("leading", offset 1) and the clean latent at
    the training schedule's first cumulative alpha (not 1)."""

    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False


# The keys of a diffusers scheduler config that define the training noise schedule (the betas).
TRAINING_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr")


def training_ddim_scheduler(config, settings: DDIMSettings = DDIMSettings()):
    """A diffusers DDIMScheduler on the training betas of any scheduler config (PNDM, Euler,
    DPM-Solver, ...), with `settings` instead of whatever spacing the config carries."""
    from diffusers import DDIMScheduler

    training = {key: config[key] for key in TRAINING_KEYS if config.get(key) is not None}
    return DDIMScheduler(**training, clip_sample=False, **asdict(settings))


@dataclass(frozen=True)
class DDIMSchedule:
    """The timesteps of one DDIM run and their cumulative alphas.

    `timesteps` are in inversion order (ascending). Latent k of a trajectory sits at
    `abar(k)`: latent 0 is the clean latent (abar = `final_alpha_cumprod`), latent k >= 1 is at
    timestep `timesteps[k - 1]`.
    """

    timesteps: tuple[int, ...]
    alphas_cumprod: Tensor
    final_alpha_cumprod: float

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> "DDIMSchedule":
        """Build from a diffusers DDIM-style scheduler config (SD's betas, spacing, offset)."""
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(scheduler.config)
        ddim.set_timesteps(num_steps)
        timesteps = tuple(int(t) for t in reversed(ddim.timesteps.tolist()))
        return cls(timesteps, ddim.alphas_cumprod.to(torch.float64), float(ddim.final_alpha_cumprod))

    @classmethod
    def from_training(cls, config, num_steps: int, settings: DDIMSettings = DDIMSettings()) -> "DDIMSchedule":
        """The inversion schedule of a model: its training betas (from any scheduler config) with
        `settings` (SD's DDIM settings by default), whatever sampler the folder ships."""
        return cls.from_scheduler(training_ddim_scheduler(config, settings), num_steps)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def abar(self, k: int) -> Tensor:
        """Cumulative alpha of trajectory latent k (0 = clean)."""
        return torch.tensor(self.final_alpha_cumprod, dtype=torch.float64) if k == 0 else self.alphas_cumprod[self.timesteps[k - 1]]

    def coefficients(self, k: int) -> tuple[Tensor, Tensor]:
        """(C1, C2) of inversion step k (1-based): latent k-1 -> latent k."""
        return inversion_coefficients(self.abar(k - 1), self.abar(k))


Schedule = DDIMSchedule  # placeholder until the flow schedule is merged
