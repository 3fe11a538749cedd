"""The [source, target] edit sampler: both branches start from the inversion's z_T and are sampled
as one batch by `spdinv.sampling.loop` with per-branch guidance and per-step hooks.

The source branch consumes the inversion's side information exactly as a reconstruction does
(its guidance scale, per-step null embeddings, source-as-unconditional, DirectInversion's pin to
the trajectory), so it *is* the reconstruction; PnP (and MasaCtrl on request) pin it too. The
target branch shares the source's unconditional embedding(s), as the official null-text + P2P
and negative-prompt code do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..errors import SpdinvError
from ..inversion.base import Inversion
from ..model import DiffusionModel
from ..inversion.reconstruction import source_branch
from ..sampling import NO_HOOKS, Branch, StepHooks, loop, step

UNCOND_MODES = ("inversion", "source", "empty")
SOURCE, TARGET = 0, 1  # the edit's branches, [source, target]


@dataclass(frozen=True)
class SamplerOptions:
    """guidance_scale: the target branch's classifier-free guidance; source_guidance_scale: the
    source branch's (None: the inversion's own, so the source branch is its reconstruction);
    uncond: both branches' unconditional embedding: 'inversion' (what the inversion prescribes:
    per-step null embeddings, the source prompt for negative-prompt inversion, else
    the empty prompt), 'source' (the source prompt) or 'empty' (the empty prompt);
    negative_prompt: when given, the target branch's unconditional row is this prompt instead
    (diffusers' `negative_prompt`; PnPInversion's PnP script uses one), the source's stays `uncond`'s."""

    guidance_scale: float = 7.5
    source_guidance_scale: float | None = None
    uncond: str = "inversion"
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        for name in ("guidance_scale", "source_guidance_scale"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                raise SpdinvError(f"{name} must be a finite number >= 0, got {value}")
        if self.uncond not in UNCOND_MODES:
            raise SpdinvError(f"unknown uncond {self.uncond!r}; valid: {', '.join(UNCOND_MODES)}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise SpdinvError(f"negative_prompt must be a string, got {self.negative_prompt!r}")


def uncond_embedding(model: DiffusionModel, inversion: Inversion, mode: str = "inversion") -> Tensor:
    """The unconditional embedding(s) for `mode` (see SamplerOptions): (1, L, D) or (n, L, D)."""
    if mode == "source":
        return inversion.prompt_embedding.to(model.device)
    if mode == "empty":
        return model.encode_prompt("")
    return source_branch(model, inversion).uncond


def edit_branches(model: DiffusionModel, inversion: Inversion, target_prompt: str, options: SamplerOptions,
                  pin_source: bool = False, empty_source: bool = False) -> list[Branch]:
    """[source, target] for an edit; only the source can be pinned to the trajectory. With
    `empty_source` the source branch's conditional row is the empty prompt (PnPInversion's PnP
    script runs its source branch so), not the prompt the image was inverted with."""
    source = source_branch(model, inversion, options.source_guidance_scale, pin=pin_source)
    source.uncond = uncond_embedding(model, inversion, options.uncond)
    if empty_source:
        source.embedding = model.encode_prompt("")
    target_uncond = source.uncond if options.negative_prompt is None else model.encode_prompt(options.negative_prompt)
    target = Branch(model.encode_prompt(target_prompt), options.guidance_scale, target_uncond)
    return [source, target]


def sample_edit(model: DiffusionModel, inversion: Inversion, target_prompt: str, options: SamplerOptions,
                hooks: StepHooks = NO_HOOKS, *, pin_source: bool = False, empty_source: bool = False,
                progress: bool = False, desc: str = "edit") -> Tensor:
    """Latents (n + 1, 2, C, H, W) of [source, target] in sampling order."""
    branches = edit_branches(model, inversion, target_prompt, options, pin_source, empty_source)
    return loop(model, inversion.schedule, inversion.z_T, branches, hooks, progress=progress, desc=desc,
                sampler=inversion.sampler)



__all__ = ["SOURCE", "TARGET", "SamplerOptions", "Branch", "StepHooks", "NO_HOOKS", "uncond_embedding", "edit_branches", "sample_edit",
           "loop", "step"]
