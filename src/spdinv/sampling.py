"""DDIM sampling from z_T: a batch of branches with per-branch classifier-free guidance and
per-step hooks (guided-diffusion style: `step` does one step, `loop` runs them all). It knows
nothing of inversions: `spdinv.inversion.reconstruction` samples one back (one branch), editing
(`spdinv.editing`) samples [source, target]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .model import DiffusionModel
from .prediction import guided
from .schedule import DDIMSchedule, ddim_step


@dataclass
class Branch:
    """One image being sampled. `uncond` is (1, L, D) or one embedding per sampling step (n, L, D);
    with `pin` (an inverted trajectory, latent 0 = clean) the latent is reset onto the trajectory
    after each step: the step's own offset to the trajectory is added, whatever the batch rounded."""

    embedding: Tensor
    guidance_scale: float = 1.0
    uncond: Tensor | None = None
    pin: Tensor | None = None

    @property
    def needs_uncond(self) -> bool:
        """Guidance would use an unconditional row (a pinned branch discards its own step)."""
        return self.guidance_scale != 1.0 and self.pin is None

    def uncond_at(self, i: int) -> Tensor:
        if self.uncond is None:
            raise ValueError("a guided branch needs an unconditional embedding")
        return self.uncond[i : i + 1] if self.uncond.shape[0] > 1 else self.uncond


class StepHooks:
    """Per-step callbacks of `step`: `begin_step` learns the UNet batch's rows (see `batch_rows`);
    `guide` may replace classifier-free guidance (None keeps it); `end_step` sees, and may change,
    the latents after the DDIM step. Hooks that read every branch's unconditional row, guided or
    not, set `every_uncond`."""

    every_uncond: bool = False

    def begin_step(self, i: int, t: int, z: Tensor, rows: list[int]) -> None:
        pass

    def guide(self, i: int, t: int, eps_uncond: Tensor | None, eps_cond: Tensor, scales: Tensor) -> Tensor | None:
        return None

    def end_step(self, i: int, t: int, z: Tensor) -> Tensor:
        return z


NO_HOOKS = StepHooks()


def batch_rows(branches: list[Branch], every_uncond: bool = False) -> list[int]:
    """The branch of each row of the UNet batch: the unconditional rows of the branches that need
    one, then every branch's conditional row. A branch at guidance scale 1, or pinned to a
    trajectory, needs no unconditional row (its guided step would be discarded); with
    `every_uncond`, once any branch needs one all get theirs."""
    uncond = [b for b, branch in enumerate(branches) if branch.needs_uncond]
    if uncond and every_uncond:
        uncond = list(range(len(branches)))
    return uncond + list(range(len(branches)))


def predict(model: DiffusionModel, z: Tensor, t: int, branches: list[Branch], i: int,
            rows: list[int]) -> tuple[Tensor | None, Tensor]:
    """(eps_uncond, eps_cond) of every branch from one UNet call on the batch `rows` (`batch_rows`).
    eps_uncond is None when the batch has no unconditional row; a branch without one gets its
    eps_cond there (scale 1, or a pin, ignores it)."""
    count = len(branches)
    uncond_rows = rows[:-count]
    cond = torch.cat([b.embedding for b in branches])
    if not uncond_rows:
        return None, model.eps(z, t, cond)
    uncond = torch.cat([branches[b].uncond_at(i) for b in uncond_rows])
    eps = model.eps(torch.cat([z[uncond_rows], z]), t, torch.cat([uncond, cond]))
    eps_uncond, eps_cond = eps[:-count], eps[-count:]
    if len(uncond_rows) < count:
        eps_uncond = eps_cond.index_copy(0, torch.tensor(uncond_rows, device=eps.device), eps_uncond)
    return eps_uncond, eps_cond


def step(model: DiffusionModel, schedule: DDIMSchedule, i: int, z: Tensor, branches: list[Branch],
         hooks: StepHooks = NO_HOOKS) -> Tensor:
    """DDIM sampling step i (0 = the step from z_T) of every branch: eps, guidance, the DDIM
    update, pins, then the hooks' end_step."""
    k = schedule.num_steps - i
    t = schedule.timesteps[k - 1]
    rows = batch_rows(branches, hooks.every_uncond)
    hooks.begin_step(i, t, z, rows)
    eps_uncond, eps_cond = predict(model, z, t, branches, i, rows)
    scales = torch.tensor([b.guidance_scale for b in branches], dtype=z.dtype, device=z.device).view(-1, 1, 1, 1)
    eps = hooks.guide(i, t, eps_uncond, eps_cond, scales)
    if eps is None:
        eps = guided(eps_uncond, eps_cond, scales)
    z = ddim_step(z, eps, schedule.abar(k), schedule.abar(k - 1))
    rows = []
    for b, branch in enumerate(branches):
        rows.append(z[b : b + 1] if branch.pin is None else branch.pin[k - 1 : k].to(z))
    return hooks.end_step(i, t, torch.cat(rows))


@torch.no_grad()
def loop(model: DiffusionModel, schedule: DDIMSchedule, z_T: Tensor, branches: list[Branch],
         hooks: StepHooks = NO_HOOKS, *, progress: bool = False, desc: str = "sample") -> Tensor:
    """Every sampling step from z_T for every branch; returns the latents (n + 1, B, C, H, W) in
    sampling order (index 0: z_T, index n: the clean latents)."""
    z = z_T.to(model.device).float().expand(len(branches), *z_T.shape[1:]).clone()
    latents = [z]
    for i in tqdm(range(schedule.num_steps), desc=desc, disable=not progress, leave=False):
        z = step(model, schedule, i, z, branches, hooks)
        latents.append(z)
    return torch.stack(latents)
