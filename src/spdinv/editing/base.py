"""The Editor every engine builds per edit: its attention processors, feature hooks and per-step
hooks, installed on the UNet (or a flow transformer's joint attention) only for the duration of the sampling."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..inversion.base import Inversion
from ..model import DiffusionModel
from ..sampling import BatchRows, StepHooks
from .attention import AttentionEditor, AttentionLayer, EditingProcessor, attention_layers, forward_hooks, installed_processors
from .joint import JointEditingProcessor, JointEditor, JointLayer, joint_layers

FeatureHook = Callable[[torch.nn.Module, tuple, Tensor], Tensor | None]


def check_fraction(engine: str, name: str, value: float, low: float = 0.0, high: float = 1.0,
                   open_low: bool = False, open_high: bool = False) -> None:
    """Raise a one-line SpdinvError unless low <= value <= high (or strict where asked)."""
    from ..errors import SpdinvError

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise SpdinvError(f"{engine} option {name} must be in {interval}, got {value}")


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


class Editor(AttentionEditor, JointEditor, StepHooks):
    """One edit's engine state. `rows` (`spdinv.sampling.BatchRows`, set by `begin_step`) names
    the rows of the batch the UNet sees: each row's branch (SOURCE or TARGET) and whether it is
    conditional; with `every_uncond` both branches have an unconditional row whenever one is
    guided. `prepare` binds it to a model and an inversion before sampling."""

    pin_source: bool = False
    empty_source: bool = False  # the source branch's conditional row under the empty prompt

    def __init__(self) -> None:
        super().__init__()
        self.step_index = 0
        self.timestep = 0
        self.num_steps = 0
        self.latent_hw: tuple[int, int] = (0, 0)
        self.layers: list[AttentionLayer] | list[JointLayer] = []
        self.trajectory: Tensor | None = None

    def prepare(self, model: DiffusionModel, inversion: Inversion) -> None:
        self.layers = joint_layers(model.transformer) if model.unet is None else attention_layers(model.unet)
        self.num_steps = inversion.schedule.num_steps
        self.trajectory = inversion.trajectory.to(model.device)
        self.latent_hw = tuple(inversion.z_T.shape[-2:])

    def processor_layers(self) -> list[AttentionLayer] | list[JointLayer]:
        """The layers that get an EditingProcessor (the others keep theirs)."""
        return []

    def feature_hooks(self, unet: torch.nn.Module) -> list[tuple[torch.nn.Module, FeatureHook]]:
        return []

    @contextmanager
    def installed(self, unet: torch.nn.Module) -> Iterator[None]:
        """Processors and hooks in place for the body; the originals always come back."""
        processors = {layer.key: (JointEditingProcessor if isinstance(layer, JointLayer) else EditingProcessor)(layer, self)
                      for layer in self.processor_layers()}
        with installed_processors(unet, processors), forward_hooks(self.feature_hooks(unet)):
            yield

    def begin_step(self, i: int, t: int, z: Tensor, rows: BatchRows) -> None:
        self.step_index, self.timestep, self.latent_hw, self.rows = i, t, tuple(z.shape[-2:]), rows

    @property
    def mask(self) -> Tensor | None:
        """The edit-region mask the engine computed (LocalBlend), (1, 1, h, w) at latent size."""
        return None


class NoEditor(Editor):
    """`none`: plain regeneration from z_T with the target prompt (the baseline)."""


def no_editor(model: DiffusionModel, source_prompt: str, target_prompt: str, options: object) -> Editor:
    return NoEditor()
