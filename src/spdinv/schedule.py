"""The step of each model family in one coefficient form, as pure tensor functions.

Notation of the SPDInv paper: an inversion step takes latent k-1 to latent k (noisier),
    z_k = C1 * z_{k-1} + C2 * out(z, t, c),
and the sampling step is its algebraic inverse for the same network output `out`.
- Denoising diffusion (`DDIMSchedule`, Song et al. 2021, eq. 12): out = eps, C1 = sqrt(abar_k / abar_{k-1}),
  C2 = sqrt(1 - abar_k) - sqrt(abar_k * (1 - abar_{k-1}) / abar_{k-1}).
- Rectified flow (`FlowSchedule`, SD3 / FLUX): out = the velocity v, C1 = 1, C2 = sigma_k - sigma_{k-1}
  (x_sigma = (1 - sigma) x_0 + sigma eps, v = eps - x_0; sampling is the Euler step).
Both classes offer the same interface (see `FlowSchedule`), which inversion and sampling use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
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

    output = "eps"

    def inverse_step(self, k: int, z_prev: Tensor, eps: Tensor) -> Tensor:
        """C1 z_{k-1} + C2 eps."""
        return ddim_inverse_step(z_prev, eps, self.abar(k - 1), self.abar(k))

    def sample_step(self, k: int, z: Tensor, eps: Tensor) -> Tensor:
        """The DDIM step (eta = 0) from latent k to latent k-1."""
        return ddim_step(z, eps, self.abar(k), self.abar(k - 1))

    def guess_timestep(self, k: int) -> int:
        """t_k: DDIM inversion evaluates eps(z_{k-1}, t_k) in place of eps(z_k, t_k)."""
        return self.timesteps[k - 1]

    def key(self) -> list:
        return [list(self.timesteps), [float(self.abar(k)) for k in range(self.num_steps + 1)]]


@dataclass(frozen=True)
class FlowSchedule:
    """The sigmas of one rectified-flow Euler run (SD3, SD3.5, FLUX.1): the diffusion schedule's twin.

    The interface both schedules share (what `sampling`, `inversion.base` and the methods use):
      - `timesteps[k - 1]`: the network's timestep at latent k (k = 1..n; ascending, inversion order);
        for a flow model sigma_k * num_train_timesteps, as the diffusers scheduler passes it.
      - `num_steps`; `coefficients(k)` -> (C1, C2) of inversion step k (latent k-1 -> latent k),
        z_k = C1 z_{k-1} + C2 out(z_k, timesteps[k - 1], c): the implicit equation SPDInv solves.
      - `inverse_step(k, z_prev, out)` = C1 z_prev + C2 out (the explicit step once `out` is given);
        `sample_step(k, z_k, out)` -> z_{k-1}, its algebraic inverse (DDIM's step / the Euler step).
      - `guess_timestep(k)`: where the plain (explicit) inversion evaluates the network, at z_{k-1}:
        DDIM at t_k (eps(z_{k-1}, t_k) for eps(z_k, t_k)); flow at sigma_{k-1}, the explicit Euler step
        z_k = z_{k-1} + (sigma_k - sigma_{k-1}) v(z_{k-1}, sigma_{k-1}) (RF-Solver's and FireFlow's
        "vanilla" inversion).
      - `output`: what the network's output is read as ("eps" or "velocity"); `key()`: a JSON-able identity.
    Here latent 0 is clean (sigma 0) and latent k sits at `sigma(k)`; sampling step i (0 = from z_T) takes
    latent n - i to n - i - 1: z_{k-1} = z_k + (sigma_{k-1} - sigma_k) v(z_k, sigma_k) (Euler, as
    FlowMatchEulerDiscreteScheduler.step)."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]  # latent k's sigma, k = 0..n; sigmas[0] = 0 (the clean latent)
    output = "velocity"

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, *, sigmas: list[float] | None = None,
                       mu: float | None = None) -> "FlowSchedule":
        """The run a diffusers FlowMatchEulerDiscreteScheduler makes of `num_steps` steps (its shift
        included; `sigmas` and `mu` as the pipeline passes them: FLUX's linspace and dynamic shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        flow = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        flow.set_timesteps(None if sigmas is not None else num_steps, sigmas=sigmas, mu=mu)
        timesteps = tuple(float(t) for t in reversed(flow.timesteps.tolist()))
        return cls(timesteps, tuple(float(s) for s in reversed(flow.sigmas.tolist())))

    @classmethod
    def like_pipeline(cls, scheduler, num_steps: int, image_tokens: int, *, flux: bool) -> "FlowSchedule":
        """The run StableDiffusion3Pipeline (flux False) or FluxPipeline (flux True) makes for an image
        of `image_tokens` transformer tokens: FLUX's sigmas linspace(1, 1/n, n) and its dynamic shift
        mu = calculate_shift(tokens) (diffusers' own function); SD3's mu only when its scheduler
        shifts dynamically (else its static `shift`)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        mu = None
        if flux or config.get("use_dynamic_shifting"):
            mu = calculate_shift(image_tokens, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15 if flux else 1.16))
        linear = flux and not config.get("use_flow_sigmas")
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps) if linear else None
        return cls.from_scheduler(scheduler, num_steps, sigmas=sigmas, mu=mu)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def sigma(self, k: int) -> float:
        return self.sigmas[k]

    def coefficients(self, k: int) -> tuple[Tensor, Tensor]:
        """(C1, C2) = (1, sigma_k - sigma_{k-1}) of inversion step k (implicit Euler)."""
        return torch.tensor(1.0, dtype=torch.float64), torch.tensor(self.sigmas[k] - self.sigmas[k - 1],
                                                                   dtype=torch.float64)

    def inverse_step(self, k: int, z_prev: Tensor, velocity: Tensor) -> Tensor:
        return z_prev + (self.sigmas[k] - self.sigmas[k - 1]) * velocity

    def sample_step(self, k: int, z: Tensor, velocity: Tensor) -> Tensor:
        """The Euler step from latent k to latent k-1."""
        return z + (self.sigmas[k - 1] - self.sigmas[k]) * velocity

    def guess_timestep(self, k: int) -> float:
        """sigma_{k-1} * num_train_timesteps: explicit Euler evaluates v at the current point and time."""
        return 0.0 if k == 1 else self.timesteps[k - 2]

    def key(self) -> list:
        return ["flow", list(self.timesteps), list(self.sigmas)]


Schedule = DDIMSchedule | FlowSchedule
