"""Sampling from z_T (DDIM, or Euler on a rectified flow: the schedule's step): a batch of
branches with per-branch classifier-free guidance and
per-step hooks (guided-diffusion style: `step` does one step, `loop` runs them all). It knows
nothing of inversions: `spdinv.inversion.reconstruction` samples one back (one branch), editing
(`spdinv.editing`) samples [source, target]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .model import DiffusionModel
from .prediction import guided
from .schedule import Schedule


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


@dataclass(frozen=True)
class Row:
    """One row of the UNet batch: the branch it samples and whether it is its conditional row."""

    branch: int
    conditional: bool


@dataclass(frozen=True)
class BatchRows:
    """The rows of one UNet batch, in order: the unconditional rows of the branches that have one
    (in branch order), then every branch's conditional row. Engines find a row by name
    (`cond(branch)`, `uncond(branch)`), never by position."""

    rows: tuple[Row, ...]

    @classmethod
    def of(cls, uncond_branches: list[int], count: int) -> "BatchRows":
        """Unconditional rows for `uncond_branches`, then conditional rows for branches 0..count-1."""
        return cls(tuple(Row(b, False) for b in uncond_branches) + tuple(Row(b, True) for b in range(count)))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def _find(self, branch: int, conditional: bool) -> int | None:
        return next((i for i, row in enumerate(self.rows) if row == Row(branch, conditional)), None)

    def cond(self, branch: int) -> int:
        """The index of `branch`'s conditional row."""
        found = self._find(branch, True)
        if found is None:
            raise KeyError(f"no conditional row for branch {branch}")
        return found

    def uncond(self, branch: int) -> int | None:
        """The index of `branch`'s unconditional row; None when the batch has none for it."""
        return self._find(branch, False)

    @property
    def uncond_branches(self) -> list[int]:
        """The branches that have an unconditional row, in row order."""
        return [row.branch for row in self.rows if not row.conditional]

    def pair(self, first: int, second: int) -> slice | list[int]:
        """The conditional rows of two branches, as a slice (a view) when they are adjacent in that order."""
        a, b = self.cond(first), self.cond(second)
        return slice(a, b + 1) if b == a + 1 else [a, b]

    def same_kind_from(self, source: int, target: int) -> list[int]:
        """Row indices that give each of `target`'s rows the `source` row of the same kind
        (conditional or not; the source's conditional row where it has no unconditional one)."""
        def take(i: int, row: Row) -> int:
            if row.branch != target:
                return i
            found = self._find(source, row.conditional)
            return self.cond(source) if found is None else found

        return [take(i, row) for i, row in enumerate(self.rows)]

    def all_from(self, index: int, target: int) -> list[int]:
        """Row indices that give every one of `target`'s rows the row at `index`."""
        return [index if row.branch == target else i for i, row in enumerate(self.rows)]


class StepHooks:
    """Per-step callbacks of `step`: `begin_step` learns the UNet batch's rows (`BatchRows`);
    `guide` may replace classifier-free guidance (None keeps it); `end_step` sees, and may change,
    the latents after the DDIM step. Hooks that read every branch's unconditional row, guided or
    not, set `every_uncond`."""

    every_uncond: bool = False

    def begin_step(self, i: int, t: int, z: Tensor, rows: BatchRows) -> None:
        pass

    def guide(self, i: int, t: int, eps_uncond: Tensor | None, eps_cond: Tensor, scales: Tensor) -> Tensor | None:
        return None

    def end_step(self, i: int, t: int, z: Tensor) -> Tensor:
        return z


NO_HOOKS = StepHooks()

# The guided network output of every branch at (z, timestep): what a sampling rule calls.
Output = Callable[[Tensor, float], Tensor]
# A sampling rule's step from latent k to latent k-1: (schedule, k, z, output) -> z. A rule that
# needs more than the schedule's one-call step (RF-Solver's and FireFlow's samplers) is made fresh
# for each loop by a `Sampler` (it may keep state from step to step).
SamplingStep = Callable[..., Tensor]
Sampler = Callable[[], SamplingStep]


def batch_rows(branches: list[Branch], every_uncond: bool = False) -> BatchRows:
    """The rows of the UNet batch: the unconditional rows of the branches that need one, then
    every branch's conditional row. A branch at guidance scale 1, or pinned to a
    trajectory, needs no unconditional row (its guided step would be discarded); with
    `every_uncond`, once any branch needs one all get theirs."""
    uncond = [b for b, branch in enumerate(branches) if branch.needs_uncond]
    if uncond and every_uncond:
        uncond = list(range(len(branches)))
    return BatchRows.of(uncond, len(branches))


def predict(model: DiffusionModel, z: Tensor, t: int, branches: list[Branch], i: int,
            rows: BatchRows) -> tuple[Tensor | None, Tensor]:
    """(eps_uncond, eps_cond) of every branch from one UNet call on the batch `rows` (`batch_rows`).
    eps_uncond is None when the batch has no unconditional row; a branch without one gets its
    eps_cond there (scale 1, or a pin, ignores it)."""
    count = len(branches)
    guided_branches = rows.uncond_branches
    cond = torch.cat([b.embedding for b in branches])
    if not model.classifier_free:  # FLUX.1-dev: each branch's scale is the network's guidance input
        return None, model.eps(z, t, cond, torch.tensor([b.guidance_scale for b in branches]))
    if not guided_branches:
        return None, model.eps(z, t, cond)
    uncond = torch.cat([branches[b].uncond_at(i) for b in guided_branches])
    eps = model.eps(torch.cat([z[guided_branches], z]), t, torch.cat([uncond, cond]))  # the layout BatchRows names
    eps_cond = eps[[rows.cond(b) for b in range(count)]]
    eps_uncond = eps[[rows.uncond(b) for b in guided_branches]]
    if len(guided_branches) < count:
        eps_uncond = eps_cond.index_copy(0, torch.tensor(guided_branches, device=eps.device), eps_uncond)
    return eps_uncond, eps_cond


def step(model: DiffusionModel, schedule: Schedule, i: int, z: Tensor, branches: list[Branch],
         hooks: StepHooks = NO_HOOKS, rule: SamplingStep | None = None) -> Tensor:
    """Sampling step i (0 = the step from z_T) of every branch: the network's output (eps or v),
    guidance, the schedule's update (DDIM or Euler; or `rule`, a sampler's own step that may call
    the guided output more than once), pins, then the hooks' end_step."""
    k = schedule.num_steps - i
    t = schedule.timesteps[k - 1]
    # A model without classifier-free guidance (FLUX: distilled, an input of the network) has no unconditional rows.
    rows = batch_rows(branches, hooks.every_uncond) if model.classifier_free else BatchRows.of([], len(branches))
    hooks.begin_step(i, t, z, rows)
    scales = torch.tensor([b.guidance_scale for b in branches], dtype=z.dtype, device=z.device).view(-1, 1, 1, 1)

    def output(x: Tensor, time: float) -> Tensor:
        eps_uncond, eps_cond = predict(model, x, time, branches, i, rows)
        eps = hooks.guide(i, time, eps_uncond, eps_cond, scales)
        return guided(eps_uncond, eps_cond, scales) if eps is None else eps

    z = schedule.sample_step(k, z, output(z, t)) if rule is None else rule(schedule, k, z, output)
    latents = []
    for b, branch in enumerate(branches):
        latents.append(z[b : b + 1] if branch.pin is None else branch.pin[k - 1 : k].to(z))
    return hooks.end_step(i, t, torch.cat(latents))


@dataclass
class SampleStep:
    """What `loop_progressive` yields after sampling step `i` (0 = the step from z_T): the latents
    (B, C, H, W) and, when a preview was asked for at this step, their decoding (B, 3, H, W) in [-1, 1]."""

    i: int
    latents: Tensor
    preview: Tensor | None = None


def start_latents(model: DiffusionModel, z_T: Tensor, count: int) -> Tensor:
    """z_T once per branch, (count, C, H, W) in float32 on the model's device."""
    return z_T.to(model.device).float().expand(count, *z_T.shape[1:]).clone()


@torch.no_grad()
def loop_progressive(model: DiffusionModel, schedule: Schedule, z_T: Tensor, branches: list[Branch],
                     hooks: StepHooks = NO_HOOKS, *, preview_every: int = 0, progress: bool = False,
                     desc: str = "sample", sampler: Sampler | None = None) -> Iterator[SampleStep]:
    """Every sampling step from z_T for every branch, one at a time (guided-diffusion's
    `p_sample_loop_progressive`): a live preview or a memory-bound caller keeps only what it
    needs. With `preview_every` N > 0 every N-th step, and the last, carries its decoded images.
    `sampler` makes the sampling rule (None: the schedule's one-call step)."""
    z = start_latents(model, z_T, len(branches))
    n = schedule.num_steps
    rule = None if sampler is None else sampler()
    for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        z = step(model, schedule, i, z, branches, hooks, rule)
        wanted = preview_every > 0 and ((i + 1) % preview_every == 0 or i + 1 == n)
        yield SampleStep(i, z, model.decode(z) if wanted else None)


@torch.no_grad()
def loop(model: DiffusionModel, schedule: Schedule, z_T: Tensor, branches: list[Branch],
         hooks: StepHooks = NO_HOOKS, *, progress: bool = False, desc: str = "sample",
         sampler: Sampler | None = None) -> Tensor:
    """Every sampling step from z_T for every branch; returns the latents (n + 1, B, C, H, W) in
    sampling order (index 0: z_T, index n: the clean latents): `loop_progressive`, all kept."""
    latents = [start_latents(model, z_T, len(branches))]
    for sampled in loop_progressive(model, schedule, z_T, branches, hooks, progress=progress, desc=desc,
                                    sampler=sampler):
        latents.append(sampled.latents)
    return torch.stack(latents)
