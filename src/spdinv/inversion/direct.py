"""DirectInversion (Ju et al., ICLR 2024, "PnP Inversion: Boosting Diffusion-based Editing with 3
Lines of Code"): DDIM inversion, then, at every sampling step of the edit, the offset between the
inverted latent and the source branch's step is added back, so the source branch walks the
inverted trajectory exactly while the target branch edits freely.

The offset of a step is computed inside that step, from the source row of the edit's own UNet
batch, which is the same as resetting the source branch onto the trajectory (`Inversion.pin_source`).
Offsets recorded beforehand, in a batch of another shape (the inversion's batch of 2 against the
edit's 3 or 4 rows), do not cancel the edit's own step: the UNet rounds differently per batch shape
on most CPUs and every GPU, guidance 7.5 amplifies the mismatch, and over 50 steps the source
branch drifts into a blob. The official PnP-Inversion code computes its offsets with the edit's
full batch for this reason. So DirectInversion costs what DDIM inversion costs; its work happens
in the edit, at no extra UNet rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from torch import Tensor

from ..model import DiffusionModel
from ..schedule import Schedule
from .base import Inversion
from .ddim import ddim


@dataclass(frozen=True)
class DirectOptions:
    """DirectInversion has no options of its own: the source branch follows the trajectory
    whatever its guidance scale."""


def direct(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: Schedule,
           options: DirectOptions = DirectOptions(), *, diagnose: bool = True, progress: bool = True) -> Inversion:
    """DirectInversion: DDIM inversion whose source branch is pinned to the inverted trajectory."""
    inversion = ddim(model, z0, embedding, schedule, diagnose=diagnose, progress=progress)
    return replace(inversion, method="direct", settings=asdict(options), pin_source=True)
