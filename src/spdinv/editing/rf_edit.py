"""RF-Solver-Edit's value sharing (Wang et al., ICML 2025), the editing scheme FireFlow builds on:
during the first `inject` sampling steps, the target's attention in the later blocks uses the
source's values.

Followed from wangjiangshan0725/RF-Solver-Edit, FLUX_Image_Edit/src/flux/modules/layers.py
(`SingleStreamBlock.forward`: `if info['inject'] and info['id'] > 19: ... v = info['feature'][...]`)
and src/flux/sampling.py (`inject_list = [True] * inject_step + [False] * (N - inject_step)`): on
FLUX the whole value tensor (text and image tokens) of single-stream blocks 20..37 of 38 is
replaced, during the first `inject` steps (the run scripts: 3 of 25). Here the fractions carry
over to any depth: `start_layer` 20/38 of the single-stream blocks (FLUX) or of the joint blocks
(SD3 / SD3.5, which have no single-stream blocks; there only the image tokens' values are shared,
the text values stay the target prompt's).

One deviation, stated: the official code stores the values during the *inversion* pass (keyed by
the timestep the sampler will use next) and reads them back while editing; here they come from the
source branch of the [source, target] batch at the same step (the reconstruction, sampled with
the target in one batch), so an inversion computed once (or cached) serves every engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..arguments import option
from ..errors import SpdinvError
from ..inversion.base import Inversion
from ..model import DiffusionModel
from .base import Editor, check_fraction, round_half_up
from .joint import JointLayer, TokenLayout
from .sampler import SOURCE, TARGET


@dataclass(frozen=True)
class RFEditOptions:
    """inject: fraction of the sampling steps, from the first, during which values are shared (the
    official scripts: 3 of 25 = 0.12); start_layer: fraction of the single-stream blocks (FLUX) or
    joint blocks (SD3) before sharing starts (official: block 20 of 38)."""

    inject: float = option(0.12, "fraction of the first steps with shared values")
    start_layer: float = option(20 / 38, "fraction of the (single-stream) blocks before value sharing starts",
                                flag="--rf-start-layer")

    def __post_init__(self) -> None:
        check_fraction("rf_edit", "inject", self.inject)
        check_fraction("rf_edit", "start_layer", self.start_layer)


class RFEditEditor(Editor):
    """The target's rows take the source's values in the chosen blocks and steps."""

    every_uncond = True  # on SD3 the target's unconditional row reads the source's unconditional row

    def __init__(self, options: RFEditOptions) -> None:
        super().__init__()
        self.options = options

    def prepare(self, model: DiffusionModel, inversion: Inversion) -> None:
        super().prepare(model, inversion)
        self.inject_steps = round_half_up(self.options.inject * self.num_steps)
        singles = [layer for layer in self.layers if layer.kind == "single"]
        blocks = singles or [layer for layer in self.layers if layer.kind == "joint"]
        start = round_half_up(self.options.start_layer * len(blocks))
        self.shared = blocks[start:]

    def processor_layers(self) -> list[JointLayer]:
        return self.shared if self.inject_steps > 0 else []

    def edit_joint_qkv(self, layer: JointLayer, q: Tensor, k: Tensor, v: Tensor,
                       layout: TokenLayout) -> tuple[Tensor, Tensor, Tensor]:
        if self.step_index >= self.inject_steps:
            return q, k, v
        rows = self.rows.same_kind_from(SOURCE, TARGET)
        if layer.kind == "single":  # the official: the whole value tensor of a single-stream block
            return q, k, v[rows]
        v = v.clone()
        v[:, :, layout.image] = v[rows][:, :, layout.image]
        return q, k, v


def rf_edit_editor(model: DiffusionModel, source_prompt: str, target_prompt: str,
                   options: RFEditOptions) -> RFEditEditor:
    if model.unet is not None:
        raise SpdinvError("engine rf_edit shares the values of a flow transformer's joint attention; "
                          f"{model.family.name} has a UNet (use p2p, masactrl or pnp)")
    return RFEditEditor(options)
