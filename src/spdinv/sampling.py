"""DDIM sampling from z_T: a batch of branches with per-branch classifier-free guidance and
per-step hooks (guided-diffusion style: `step` does one step, `loop` runs them all). One branch
with the source prompt is the reconstruction; editing (`spdinv.editing`) samples [source, target]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .images import psnr
from .inversion.base import Inversion
from .model import DiffusionModel
from .schedule import DDIMSchedule, ddim_step


def source_uncond(model: DiffusionModel, inversion: Inversion, i: int) -> Tensor:
    """The unconditional embedding the source branch uses at sampling step i: the method's
    per-step null embedding (null-text), the source prompt's (negative-prompt), else ''."""
    if inversion.uncond_embeddings is not None:
        return inversion.uncond_embeddings[i : i + 1]
    if inversion.source_as_uncond:
        return inversion.prompt_embedding
    return model.encode_prompt("")


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


def source_branch(model: DiffusionModel, inversion: Inversion, guidance_scale: float | None = None,
                  pin: bool = False) -> Branch:
    """The branch that samples the source image back as the inversion prescribes: its guidance
    scale, per-step null embeddings or source-as-unconditional, and the pin to the trajectory
    (DirectInversion, or `pin`)."""
    scale = inversion.guidance_scale if guidance_scale is None else guidance_scale
    if inversion.uncond_embeddings is not None:
        uncond = inversion.uncond_embeddings.to(model.device)
    else:
        uncond = source_uncond(model, inversion, 0).to(model.device)
    pinned = pin or inversion.pin_source
    return Branch(inversion.prompt_embedding.to(model.device), scale, uncond,
                  inversion.trajectory.to(model.device) if pinned else None)


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


def guided(eps_uncond: Tensor | None, eps_cond: Tensor, scales: Tensor) -> Tensor:
    """Classifier-free guidance per branch (scales: (B, 1, 1, 1)); scale 1 gives eps_cond exactly."""
    if eps_uncond is None:
        return eps_cond
    return torch.where(scales == 1.0, eps_cond, eps_uncond + scales * (eps_cond - eps_uncond))


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


def reconstruct_latent(model: DiffusionModel, inversion: Inversion, guidance_scale: float | None = None,
                       progress: bool = False) -> Tensor:
    """Sample z_0 back from z_T with the source prompt, using what the inversion prescribes
    (its guidance scale, null embeddings, pin): `loop` with one branch."""
    branch = source_branch(model, inversion, guidance_scale)
    return loop(model, inversion.schedule, inversion.z_T, [branch], progress=progress, desc="reconstruct")[-1]


def reconstruction_error(model: DiffusionModel, inversion: Inversion, **kwargs) -> float:
    """Mean squared latent error between z_0 and its reconstruction from z_T (the paper's D_Rec)."""
    return float((reconstruct_latent(model, inversion, **kwargs) - inversion.z_0.to(model.device)).pow(2).mean())


@dataclass
class Reconstruction:
    """The image sampled back from z_T and how far it is from the input (image space, [0, 1])."""

    image: Tensor
    psnr: float
    mse: float


def reconstruct(model: DiffusionModel, inversion: Inversion, source: Tensor | None = None, **kwargs) -> Reconstruction:
    """Decode the reconstruction; compare with `source` (1, 3, H, W) in [-1, 1], else with decode(z_0)."""
    image = model.decode(reconstruct_latent(model, inversion, **kwargs))
    reference = model.decode(inversion.z_0) if source is None else source.to(image)
    mse = float(((image - reference) / 2).pow(2).mean())
    return Reconstruction(image=image, psnr=psnr(image, reference), mse=mse)
