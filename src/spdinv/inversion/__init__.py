"""Inversion methods. Each is a plain function

    method(model, z0, prompt_embedding, schedule, options, *, diagnose, progress) -> Inversion

registered by name in METHODS with its options dataclass; `invert()` is the one entry point.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import SpdinvError
from ..families import ModelFamily
from ..images import Framing, to_tensor
from ..inputs import check_prompt_tokens, check_seed, library_image
from ..model import DiffusionModel
from ..presets import inversion_settings, preset_model
from .base import Inversion, StepReport
from .aidi import AIDIOptions, aidi
from .ddim import DDIMOptions, ddim
from .direct import DirectOptions, direct
from .fireflow import FireFlowOptions, fireflow, fireflow_sampler
from .flowedit import FlowEditOptions, flowedit, sampler_from_settings
from .negative_prompt import NegativePromptOptions, negative_prompt
from .null_text import NullTextOptions, null_text
from .rf_solver import RFSolverOptions, rf_solver, rf_solver_sampler
from .uni_inv import UniInvOptions, uni_inv
from .reconstruction import (Reconstruction, measure_reconstruction, reconstruct, reconstruct_latent,
                             reconstruction_error, source_branch)
from .spdinv import SPDInvOptions, spdinv


@dataclass(frozen=True)
class Method:
    function: Callable[..., Inversion]
    options: type
    summary: str
    classifier_free: bool = False  # needs unconditional rows: refused on FLUX (distilled guidance, no such rows)
    sampler: Callable | None = None  # the sampling rule its reconstruction and edits use (None: the schedule's step)
    flow_only: bool = False  # a rectified-flow inversion: refused on diffusion models
    engine_free: bool = False  # edits by its own sampler (FlowEdit): engine `none` only
    sampler_from: Callable[[dict], Callable] | None = None  # its sampler from a saved inversion's settings

    def saved_sampler(self, settings: dict) -> Callable | None:
        """The sampler a saved inversion with these settings samples with."""
        return self.sampler_from(settings) if self.sampler_from is not None else self.sampler


METHODS: dict[str, Method] = {
    "ddim": Method(ddim, DDIMOptions, "plain DDIM inversion; explicit Euler on a rectified flow (1 call/step)"),
    "spdinv": Method(spdinv, SPDInvOptions, "SPDInv fixed-point search (default solver anderson; the paper's gradient descent: --solver gradient) "
                     "(ECCV 2024)"),
    "null_text": Method(null_text, NullTextOptions,
                        "null-text inversion, per-step Adam on the null embedding (CVPR 2023)", True),
    "negative_prompt": Method(negative_prompt, NegativePromptOptions,
                              "negative-prompt inversion, source prompt as the unconditional one (2023)", True),
    "direct": Method(direct, DirectOptions, "DirectInversion, source branch pinned to the trajectory (ICLR 2024)"),
    "aidi": Method(aidi, AIDIOptions, "AIDI fixed-point iteration with Anderson acceleration (ICCV 2023)"),
    "rf_solver": Method(rf_solver, RFSolverOptions, "RF-Solver second-order step, flow models only (2 calls/step; "
                        "samples with its own rule) (ICML 2025)", sampler=rf_solver_sampler, flow_only=True),
    "fireflow": Method(fireflow, FireFlowOptions, "FireFlow midpoint reusing the last velocity, flow models only "
                       "(N+1 calls; samples with its own rule) (ICML 2025)", sampler=fireflow_sampler, flow_only=True),
    "uni_inv": Method(uni_inv, UniInvOptions, "Uni-Inv, previous-velocity guess + one re-evaluation, flow models only "
                      "(N+1 calls) (UniEdit-Flow, ICLR 2026)", flow_only=True),
    "flowedit": Method(flowedit, FlowEditOptions, "FlowEdit, inversion-free: an ODE from the source image to the "
                       "edit, flow models only, engine none only (no inversion call; 1 call of both branches per "
                       "step in its window) (ICCV 2025)", flow_only=True, engine_free=True,
                       sampler_from=sampler_from_settings),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SpdinvError(f"unknown inversion method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def make_options(name: str, **options):
    """The method's options dataclass from keyword options; unknown names are an error."""
    method = get_method(name)
    fields = {f.name for f in dataclasses.fields(method.options)}
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise SpdinvError(f"option(s) {', '.join(unknown)} do not apply to {name}; its options: {valid}")
    return method.options(**options)


def options_for(method: str, given: object | dict | None = None, preset: str | None = None):
    """The method's options dataclass, made once at an entry point: a dataclass of the method's
    class as given (it sets every field), else the preset's settings overridden by the given dict's
    fields, checked (`make_options`)."""
    entry = get_method(method)
    if dataclasses.is_dataclass(given) and not isinstance(given, type):
        if not isinstance(given, entry.options):
            raise SpdinvError(f"{type(given).__name__} are not {method}'s options ({entry.options.__name__})")
        return given
    if given is not None and not isinstance(given, dict):
        raise SpdinvError(f"{method}'s options must be a dict or {entry.options.__name__}, got {type(given).__name__}")
    return make_options(method, **{**inversion_settings(preset, method), **(given or {})})


def check_prompt(prompt: str, what: str = "prompt", allow_empty: bool = False) -> str:
    if not isinstance(prompt, str) or not (prompt.strip() or allow_empty):
        raise SpdinvError(f"the {what} is empty")
    return prompt.strip()


def check_steps(num_steps, train_timesteps: int | None = None) -> int:
    """A positive integer, and at most one DDIM step per timestep the model's scheduler was trained with."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
        raise SpdinvError(f"steps must be a positive integer, got {num_steps}")
    if train_timesteps is not None and num_steps > train_timesteps:
        raise SpdinvError(f"--steps {num_steps} exceeds the {train_timesteps} timesteps the model's scheduler was "
                          "trained with")
    return num_steps


def check_family(model: DiffusionModel, method: str) -> None:
    """A method that optimises or replaces the unconditional embedding needs classifier-free guidance."""
    if get_method(method).classifier_free and not model.classifier_free:
        raise SpdinvError(f"{method} needs classifier-free guidance (an unconditional prompt), which a "
                          f"{model.family.name} model does not use (its guidance is distilled into the network)")


def applies(model: DiffusionModel, method: str) -> bool:
    """Whether the method runs on the model's family (`check_family` refuses it otherwise)."""
    return applies_to(model.family, method)


def applies_to(family: ModelFamily, method: str) -> bool:
    """Whether the method runs on models of this family: a classifier-free one needs unconditional
    rows (not FLUX), a flow-only one a rectified-flow objective."""
    entry = get_method(method)
    if entry.classifier_free and not family.classifier_free:
        return False
    return not entry.flow_only or family.objective == "flow"


def image_tensor(model: DiffusionModel, image: Image.Image | Tensor, framing: Framing | None = None) -> Tensor:
    """A PIL image (any mode or size; fitted to the model as `framing` says, by default at its own
    aspect ratio at about the model's native area) as (1, 3, H, W) in [-1, 1]; a tensor as given.
    Contiguous either way: the VAE's convolutions round a channels-last view differently."""
    if isinstance(image, Image.Image):
        image = to_tensor(model.fit(image, framing)[0])
    return image.contiguous()


def image_latent(model: DiffusionModel, image: Image.Image | Tensor, framing: Framing | None = None) -> Tensor:
    """Encode a PIL image (fitted as `image_tensor` says) or a (1, 3, H, W) tensor in [-1, 1] to z_0."""
    return model.encode_image(image_tensor(model, image, framing))


def invert(
    model: DiffusionModel,
    image: Image.Image | Tensor | str | Path | np.ndarray,
    prompt: str,
    method: str = "spdinv",
    num_steps: int = 50,
    *,
    seed: int = 0,
    diagnose: bool = True,
    progress: bool = True,
    preset: str | None = None,
    allow_empty_prompt: bool = False,
    framing: Framing | None = None,
    options: object | dict | None = None,
    **fields,
) -> Inversion:
    """Invert an image (a path, a PIL image, an (H, W, 3) array or a (1, 3, H, W) tensor in [-1, 1])
    under its source prompt with the named method; with `diagnose` the result carries per-step
    residuals, the noise error and the (latent) reconstruction error, whose UNet rows are counted in
    `diagnostic_calls` (`total_calls` = the method's + the diagnostics'). A PIL image is fitted to
    the model as `framing` says (`images.Framing`; default: its own aspect ratio at about the model's
    native area). The method's options: `options` (its dataclass, or a dict of fields) or keyword
    fields (e.g. K=10), over the settings of `preset` (spdinv.presets), which the given ones
    override, on the DDIM spacing of the preset's script. `allow_empty_prompt` accepts the empty prompt, which some official protocols invert
    under (PnPInversion's MasaCtrl script)."""
    if options is not None and fields:
        raise SpdinvError("give the inversion options as `options` or as keyword fields, not both")
    model = preset_model(model, preset)  # the DDIM spacing of the preset's script
    return run_method(model, image, prompt, method, num_steps, options_for(method, options or fields, preset),
                      seed=seed, diagnose=diagnose, progress=progress, allow_empty_prompt=allow_empty_prompt,
                      framing=framing)


def run_method(model: DiffusionModel, image, prompt: str, method: str, num_steps: int, options: object, *,
               seed: int = 0, diagnose: bool = True, progress: bool = True, allow_empty_prompt: bool = False,
               framing: Framing | None = None) -> Inversion:
    """`invert` with the method's options dataclass already made (`options_for`): not checked again."""
    prompt = check_prompt(prompt, allow_empty=allow_empty_prompt)
    if prompt:
        check_prompt_tokens(model.tokenizer, prompt)
    check_steps(num_steps, model.scheduler.config.num_train_timesteps)
    check_family(model, method)
    torch.manual_seed(check_seed(seed))
    source = image_tensor(model, library_image(image), framing)
    z0 = model.encode_image(source)
    schedule = model.schedule(num_steps, tuple(z0.shape[-2:]))
    inversion = get_method(method).function(model, z0, model.encode_prompt(prompt), schedule, options,
                                            diagnose=diagnose, progress=progress)
    inversion.settings = {"method": method, "steps": num_steps, "seed": seed, **dataclasses.asdict(options),
                          **inversion.settings}  # what a method resolved itself (FlowEdit's family defaults) wins
    inversion.source = source.detach()
    if diagnose:
        measure_reconstruction(model, inversion)
    return inversion


__all__ = ["Inversion", "StepReport", "METHODS", "Method", "applies", "applies_to", "invert", "run_method",
           "get_method", "make_options", "options_for", "reconstruct", "reconstruct_latent",
           "reconstruction_error", "Reconstruction", "source_branch"]
