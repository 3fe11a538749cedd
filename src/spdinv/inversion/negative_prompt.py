"""Negative-prompt inversion (Miyake et al. 2023): DDIM inversion, then sample with guidance
using the source prompt's embedding as the unconditional one, which approximates null-text
inversion's optimised embeddings at no optimisation cost."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from torch import Tensor

from ..arguments import option
from ..errors import SpdinvError
from ..model import DiffusionModel
from ..schedule import Schedule
from .base import Inversion
from .ddim import ddim


@dataclass(frozen=True)
class NegativePromptOptions:
    """guidance: the classifier-free guidance scale the inversion is sampled (edited) with, >= 1."""

    guidance: float = option(7.5, "classifier-free guidance scale, >= 1")

    def __post_init__(self) -> None:
        if not math.isfinite(self.guidance) or not self.guidance >= 1:
            raise SpdinvError(f"guidance must be a finite number >= 1, got {self.guidance}")


def negative_prompt(model: DiffusionModel, z0: Tensor, embedding: Tensor, schedule: Schedule,
                    options: NegativePromptOptions = NegativePromptOptions(), *, diagnose: bool = True,
                    progress: bool = True) -> Inversion:
    """Negative-prompt inversion: the DDIM trajectory, sampled with the source prompt as the negative one."""
    inversion = ddim(model, z0, embedding, schedule, diagnose=diagnose, progress=progress)
    return replace(inversion, method="negative_prompt", settings=asdict(options), guidance_scale=options.guidance,
                   source_as_uncond=True)
