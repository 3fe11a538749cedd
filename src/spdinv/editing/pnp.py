"""Plug-and-Play (Tumanyan et al., CVPR 2023): the source branch walks the inverted trajectory; its
residual-block features (decoder block 1, resnet 1, in diffusers naming) replace the target's for
the first `feature_injection` of the steps, and its self-attention queries and keys (decoder
blocks 1..3, whichever exist) replace the target's for the first `attention_injection`.

Decoder block 1 is the first up-block after the bottleneck level in every SD-shaped UNet (SD,
the embedded model, the tiny test UNet), so the same indices name the equivalent places. The
injected source features are those of its conditional row: the prompt it was inverted with, or
the empty prompt (`source_branch_prompt`), as PnPInversion's script.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..arguments import option
from ..errors import SpdinvError
from ..inversion.base import Inversion
from ..model import DiffusionModel
from .attention import AttentionLayer
from .base import Editor, FeatureHook, check_fraction
from .sampler import SOURCE, TARGET

SOURCE_BRANCH_PROMPTS = ("source", "empty")


@dataclass(frozen=True)
class PnPOptions:
    """feature_injection: fraction of the steps with residual-feature injection (0.8);
    attention_injection: fraction with self-attention Q/K injection (0.5); source_branch_prompt:
    the prompt of the source branch whose features are injected: 'source' (the prompt the image
    was inverted with) or 'empty' (PnPInversion's run_editing_pnp.py, pnp-diffusers)."""

    feature_injection: float = option(0.8, "fraction of steps with feature injection")
    attention_injection: float = option(0.5, "fraction of steps with Q/K injection")
    source_branch_prompt: str = option("source", "the PnP source branch's prompt: source (the inversion's) or empty "
                                       "(PnPInversion's script)", choices=SOURCE_BRANCH_PROMPTS)

    def __post_init__(self) -> None:
        check_fraction("pnp", "feature_injection", self.feature_injection)
        check_fraction("pnp", "attention_injection", self.attention_injection)
        if self.source_branch_prompt not in SOURCE_BRANCH_PROMPTS:
            raise SpdinvError(f"unknown pnp source_branch_prompt {self.source_branch_prompt!r}; valid: "
                              f"{', '.join(SOURCE_BRANCH_PROMPTS)}")


def injection_block(unet: torch.nn.Module, scale: float = 0.25) -> int:
    """The decoder block PnP injects in: SD's decoder block 1 runs at 1/4 of the latent's side, so
    the block whose resolution relative to the latent is nearest 1/4 (ties to the coarser)."""
    downscale = 2 ** sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))
    distances = []
    for index, block in enumerate(unet.up_blocks):
        distances.append((abs(math.log2(1.0 / downscale) - math.log2(scale)), index))
        if getattr(block, "upsamplers", None):
            downscale = max(1, downscale // 2)
    return min(distances)[1]


class PnPEditor(Editor):
    """PnP's conv and attention injection (register_conv_control / register_attention_control)."""

    pin_source = True

    def __init__(self, options: PnPOptions) -> None:
        super().__init__()
        self.options = options
        self.empty_source = options.source_branch_prompt == "empty"

    def prepare(self, model: DiffusionModel, inversion: Inversion) -> None:
        super().prepare(model, inversion)
        up = model.unet.up_blocks
        if len(up) < 2:
            raise SpdinvError("pnp needs a UNet with at least two decoder (up) blocks")
        self.feature_steps = int(self.options.feature_injection * self.num_steps)
        self.attention_steps = int(self.options.attention_injection * self.num_steps)
        block = injection_block(model.unet)
        self.resnet = up[block].resnets[min(1, len(up[block].resnets) - 1)]
        # PnP injects in up_blocks[1].attentions[1:] and every self-attention of the blocks after it.
        self.qk_layers = [layer for layer in self.layers if not layer.cross and layer.place == "up"
                          and layer.block >= block and not (layer.block == block and layer.attention == 0)]

    def processor_layers(self) -> list[AttentionLayer]:
        return self.qk_layers

    def edit_qkv(self, layer: AttentionLayer, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.step_index >= self.attention_steps:
            return q, k, v
        return self._source_into_target(q), self._source_into_target(k), v

    def _source_into_target(self, x: Tensor) -> Tensor:
        """x (one row per UNet batch row) with every target row replaced by the source's conditional row."""
        return x[self.rows.all_from(self.rows.cond(SOURCE), TARGET)]

    def feature_hooks(self, unet: torch.nn.Module) -> list[tuple[torch.nn.Module, FeatureHook]]:
        return [(self.resnet.conv2, self._inject_features)]

    def _inject_features(self, module: torch.nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        """Forward hook on the resnet's conv2, i.e. its residual branch before the skip is added."""
        if self.step_index >= self.feature_steps:
            return None
        return self._source_into_target(output)


def pnp_editor(model: DiffusionModel, source_prompt: str, target_prompt: str, options: PnPOptions) -> PnPEditor:
    return PnPEditor(options)
