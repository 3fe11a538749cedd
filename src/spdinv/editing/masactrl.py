"""MasaCtrl (Cao et al., ICCV 2023): mutual self-attention. From a start step and a start layer on,
the target branch's self-attention keeps its own queries but reads the source branch's keys and
values, separately in the unconditional and conditional halves; cross-attention is untouched.

SD's setting, step 4 of 50 and transformer layer 10 of 16 (the decoder's finer levels), is
expressed as fractions of the steps and of the UNet's self-attention layers in depth order, so
smaller UNets get the equivalent layers.

On a flow transformer (SD3 / SD3.5 / FLUX: joint attention) the same fractions pick the attention
modules in forward order, and in them the target's rows read the source's *image* keys and values
(the image-key block of the joint attention); the text keys and values stay the target's own, so
the target prompt still steers through the text block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..arguments import option
from ..errors import SpdinvError
from ..inversion.base import Inversion
from ..model import DiffusionModel
from .attention import AttentionLayer
from .joint import JointLayer, TokenLayout
from .base import Editor, check_fraction, round_half_up
from .sampler import SOURCE, TARGET


@dataclass(frozen=True)
class MasaCtrlOptions:
    """start_step: fraction of the steps before mutual self-attention starts (SD: 4/50 = 0.08);
    start_layer: fraction of the self-attention layers, in depth order, before it starts (SD:
    10/16 = 0.625); pin_source: walk the source branch along the inverted trajectory."""

    start_step: float = option(0.08, "fraction of steps before mutual attention")
    start_layer: float = option(0.625, "fraction of self-attention layers before it")
    pin_source: bool = option(False, "pin the source branch to the trajectory")

    def __post_init__(self) -> None:
        check_fraction("masactrl", "start_step", self.start_step)
        check_fraction("masactrl", "start_layer", self.start_layer)
        if not isinstance(self.pin_source, bool):
            raise SpdinvError(f"masactrl option pin_source must be true or false, got {self.pin_source!r}")


class MasaCtrlEditor(Editor):
    """MutualSelfAttentionControl: target queries against the source's keys and values."""

    every_uncond = True  # the target's unconditional row reads the source's unconditional row

    def __init__(self, options: MasaCtrlOptions) -> None:
        super().__init__()
        self.options = options
        self.pin_source = options.pin_source

    def prepare(self, model: DiffusionModel, inversion: Inversion) -> None:
        super().prepare(model, inversion)
        self.start_step = round_half_up(self.options.start_step * self.num_steps)
        selfs = [layer for layer in self.layers if not layer.cross]
        start = round_half_up(self.options.start_layer * len(selfs))
        self.mutual = [layer for layer in selfs if layer.depth >= start]

    def processor_layers(self) -> list[AttentionLayer] | list[JointLayer]:
        return self.mutual

    def edit_joint_qkv(self, layer: JointLayer, q: Tensor, k: Tensor, v: Tensor,
                       layout: TokenLayout) -> tuple[Tensor, Tensor, Tensor]:
        if self.step_index < self.start_step:
            return q, k, v
        rows = self.rows.same_kind_from(SOURCE, TARGET)
        k, v = k.clone(), v.clone()
        k[:, :, layout.image] = k[rows][:, :, layout.image]
        v[:, :, layout.image] = v[rows][:, :, layout.image]
        return q, k, v

    def edit_qkv(self, layer: AttentionLayer, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.step_index < self.start_step:
            return q, k, v
        rows = self.rows.same_kind_from(SOURCE, TARGET)  # the target's rows take its source row's keys, values
        return q, k[rows], v[rows]


def masactrl_editor(model: DiffusionModel, source_prompt: str, target_prompt: str,
                    options: MasaCtrlOptions) -> MasaCtrlEditor:
    return MasaCtrlEditor(options)
