"""FlowEdit (Kulikov et al., ICCV 2025, "FlowEdit: Inversion-Free Text-Based Editing Using
Pre-Trained Flow Models"): no inversion at all. An ODE is integrated directly from the source image
to the edit: at each step a fresh noise draws z_src = (1 - sigma) x_src + sigma eps, the edit's
counterpart z_tar = z_edit + z_src - x_src, and z_edit moves by (sigma' - sigma) times the average
over `n_avg` draws of v(z_tar, target) - v(z_src, source), for the steps with k <= n_max only; the
last n_min steps sample the target regularly (SDEdit-style) from z_edit + (noised x_src - x_src).

Followed from `FlowEditSD3` / `FlowEditFLUX` in fallenshock/FlowEdit's FlowEdit_utils.py (read from
the copy in netita/FlowEdit; the official repository's stored listing holds only its data):
defaults SD3: 50 steps, n_max 15, source guidance 3.5, target 13.5; FLUX: 28 steps, n_max 24,
source guidance 1.5, target 5.5; n_min 0, n_avg 1. Here n_max and n_min are fractions of the steps
(15/50 and 24/28 by default) so that 8 or 15 steps keep the official proportion. (That copy's SD3
regular phase steps by (t_im1 - t_im1), i.e. not at all; its FLUX one by (t_im1 - t_i), used here.)

It plugs in as an inversion method so that every interface selects it like one (`--inversion
flowedit`, engine `none` only): its "inversion" costs no network call and keeps x_src at every
step (z_T = x_src); its sampler is the FlowEdit ODE on the [source, target] batch, whose source row
stays x_src (so the reconstruction is the VAE round trip) and whose target row is z_edit. Each
sampling step inside the window calls the network n_avg times on both branches' rows (every row
is counted by the caller).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
import torch
from torch import Tensor

from ..arguments import option
from ..errors import SpdinvError
from ..families import FLUX
from ..model import DiffusionModel
from ..sampling import Output, Sampler, SamplingStep
from ..schedule import Schedule
from .base import Inversion, StepReport
from .flow import require_flow

SOURCE_ROW, TARGET_ROW = 0, 1  # the edit's [source, target] rows (editing.sampler's SOURCE, TARGET)
OFFICIAL_N_MAX = {"SD3": 15 / 50, "FLUX.1": 24 / 28}
OFFICIAL_SOURCE_GUIDANCE = {"SD3": 3.5, "FLUX.1": 1.5}  # the inversion's guidance: the source branch's by default



@dataclass(frozen=True)
class FlowEditOptions:
    """n_max: fraction of the steps (the last ones, nearest the image) that FlowEdit integrates
    (default: the official 15/50 on SD3, 24/28 on FLUX); n_min: fraction of the last steps sampled
    regularly instead; n_avg: noise draws averaged per step. The source velocity's guidance is the
    source branch's (`source_guidance_scale`, --source-guidance; default the official 3.5 on SD3, 1.5
    on FLUX), the target's the edit's guidance scale."""

    n_max: float | None = option(None, "fraction of the steps FlowEdit integrates (default 15/50 on SD3, 24/28 on "
                                 "FLUX)")
    n_min: float = option(0.0, "fraction of the last steps sampled regularly (SDEdit-style)")
    n_avg: int = option(1, "noise draws averaged per FlowEdit step")

    def __post_init__(self) -> None:
        for name in ("n_max", "n_min"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not 0 <= value <= 1):
                raise SpdinvError(f"flowedit option {name} must be in [0, 1], got {value}")
        if self.n_max is not None and self.n_min > self.n_max:
            raise SpdinvError(f"flowedit option n_min ({self.n_min}) exceeds n_max ({self.n_max})")
        if isinstance(self.n_avg, bool) or not isinstance(self.n_avg, int) or self.n_avg < 1:
            raise SpdinvError(f"flowedit option n_avg must be a positive integer, got {self.n_avg}")

    def resolved(self, family: str) -> "FlowEditOptions":
        """n_max at the family's official default (OFFICIAL_N_MAX's key) when None."""
        return self if self.n_max is not None else replace(self, n_max=OFFICIAL_N_MAX[family])


def _steps(fraction: float, n: int) -> int:
    """A fraction of n steps as a count, halves rounded up (15 steps x 0.3 -> 5)."""
    return int(math.floor(fraction * n + 0.5))


def flowedit_sampler(n_max: float = 15 / 50, n_min: float = 0.0, n_avg: int = 1, noise_seed: int = 0) -> Sampler:
    """The FlowEdit ODE as a sampling rule (see the module doc); `noise_seed` seeds its noise draws
    (the same draws for every loop it makes)."""

    def make() -> SamplingStep:
        generator = torch.Generator().manual_seed(noise_seed)
        state: dict[str, int] = {}

        def advance(schedule: Schedule, k: int, z: Tensor, output: Output) -> Tensor:
            n = schedule.num_steps
            if z.shape[0] < 2 or k > _steps(n_max, n):  # the reconstruction, or before the window: x_src stays
                return z
            sigma, sigma_next, t = schedule.sigma(k), schedule.sigma(k - 1), schedule.timesteps[k - 1]
            x_src, z = z[SOURCE_ROW : SOURCE_ROW + 1], z.clone()
            noise = lambda: torch.randn(x_src.shape, generator=generator).to(x_src)  # noqa: E731
            if k <= _steps(n_min, n):  # regular sampling of the target for the last n_min steps
                if "regular" not in state:
                    state["regular"] = k
                    z[TARGET_ROW] += (sigma * noise() + (1 - sigma) * x_src - x_src)[0]
                z[TARGET_ROW] += (sigma_next - sigma) * output(z, t)[TARGET_ROW]
                return z
            delta = torch.zeros_like(x_src)
            for _ in range(n_avg):
                z_src = (1 - sigma) * x_src + sigma * noise()
                z_tar = z[TARGET_ROW : TARGET_ROW + 1] + z_src - x_src
                v = output(torch.cat([z_src, z_tar]), t)
                delta += (v[TARGET_ROW] - v[SOURCE_ROW]) / n_avg
            z[TARGET_ROW] += (sigma_next - sigma) * delta[0]
            return z

        return advance

    return make


SAMPLER_SETTINGS = ("n_max", "n_min", "n_avg", "noise_seed")


def sampler_from_settings(settings: dict) -> Sampler:
    """The sampler of a saved flowedit "inversion", from its settings (resolved options, noise seed)."""
    return flowedit_sampler(**{k: settings[k] for k in SAMPLER_SETTINGS})


def flowedit(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: Schedule,
             options: FlowEditOptions = FlowEditOptions(), *, diagnose: bool = True, progress: bool = True) -> Inversion:
    """No network call: the trajectory is x_src at every step and the sampler edits (see the module doc).
    The noise seed is drawn from torch's generator (`invert` seeds it); the resolved options and it
    are the inversion's settings, so a saved one samples back the same."""
    require_flow(schedule, "flowedit")
    family = "FLUX.1" if model.family is FLUX else "SD3"
    o = options.resolved(family)
    noise_seed = int(torch.randint(0, 2**31 - 1, (1,)))
    n = schedule.num_steps
    steps = [StepReport(index=k, timestep=float(schedule.timesteps[k - 1]), residual_before=0.0, residual_after=0.0,
                        network_calls=0) for k in range(1, n + 1)]
    trajectory = z0.detach().float().expand(n + 1, *z0.shape[1:]).clone()
    inversion = Inversion("flowedit", trajectory, schedule, embedding, steps, guidance_scale=OFFICIAL_SOURCE_GUIDANCE[family],
                          sampler=flowedit_sampler(o.n_max, o.n_min, o.n_avg, noise_seed),
                          noise_error=0.0 if diagnose else None)
    inversion.settings = {**asdict(o), "noise_seed": noise_seed}
    return inversion
