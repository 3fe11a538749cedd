"""Attention-processor plumbing shared by the editing engines (Prompt-to-Prompt, MasaCtrl, PnP).

Layers are located from the UNet's module tree (down blocks, mid block, up blocks, in the order
the forward pass visits them), never from the order of `unet.attn_processors`, and their
spatial resolution is expressed relative to the latent so that engines written for SD's 64x64
latents choose the equivalent layers on smaller UNets.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor

from ..sampling import BatchRows
from .sampler import SOURCE, TARGET


@dataclass(frozen=True)
class AttentionLayer:
    """One diffusers `Attention` module of the UNet and where it sits.

    `downscale` is latent side / layer side (1: the latent's own resolution, 2: half of it, ...);
    `depth` is the layer's position among the UNet's layers of the same kind (self or cross) in
    forward order, `count` how many there are (SD 1.x: 16 of each)."""

    name: str
    place: str
    block: int
    attention: int
    cross: bool
    downscale: int
    depth: int
    count: int

    @property
    def key(self) -> str:
        """Its key in `unet.attn_processors`."""
        return f"{self.name}.processor"

    @property
    def scale(self) -> float:
        """Side length relative to the latent's (1.0, 0.5, 0.25, ...)."""
        return 1.0 / self.downscale

    def size(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Spatial size of this layer's tokens for a latent of `latent_hw` (stride-2 convs round up)."""
        h, w = latent_hw
        for _ in range(int(math.log2(self.downscale))):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w


def _block_attentions(prefix: str, block: torch.nn.Module, place: str, index: int, downscale: int) -> list[dict]:
    found = []
    for path, module in block.named_modules():
        if isinstance(module, Attention):
            parts = path.split(".")
            attention = int(parts[1]) if parts[0] == "attentions" and len(parts) > 1 and parts[1].isdigit() else 0
            found.append(dict(name=f"{prefix}.{path}", place=place, block=index, attention=attention,
                              cross=bool(module.is_cross_attention), downscale=downscale))
    return found


def attention_layers(unet: torch.nn.Module) -> list[AttentionLayer]:
    """Every attention layer of a diffusers UNet2DConditionModel, in forward (depth) order, with its
    resolution found from the number of down/up-samplers before it."""
    found, downscale = [], 1
    for b, block in enumerate(unet.down_blocks):
        found += _block_attentions(f"down_blocks.{b}", block, "down", b, downscale)
        if getattr(block, "downsamplers", None):
            downscale *= 2
    if getattr(unet, "mid_block", None) is not None:
        found += _block_attentions("mid_block", unet.mid_block, "mid", 0, downscale)
    for b, block in enumerate(unet.up_blocks):
        found += _block_attentions(f"up_blocks.{b}", block, "up", b, downscale)
        if getattr(block, "upsamplers", None):
            downscale = max(1, downscale // 2)
    counts = {kind: sum(1 for f in found if f["cross"] == kind) for kind in (False, True)}
    seen = {False: 0, True: 0}
    layers = []
    for f in found:
        layers.append(AttentionLayer(**f, depth=seen[f["cross"]], count=counts[f["cross"]]))
        seen[f["cross"]] += 1
    return layers


def nearest_scale(layers: list[AttentionLayer], scale: float) -> list[AttentionLayer]:
    """The layers whose resolution (relative to the latent) is closest to `scale`; ties go to the
    coarser resolution."""
    if not layers:
        return []
    distance = {layer.downscale: abs(math.log2(layer.scale) - math.log2(scale)) for layer in layers}
    best = min(distance, key=lambda d: (round(distance[d], 9), -d))
    return [layer for layer in layers if layer.downscale == best]


class AttentionEditor:
    """What an engine does inside attention: rewrite q, k, v (B, heads, N, d), and/or the softmax
    maps of the conditional [source, target] rows (2, heads, Nq, Nk). `rows` names the batch's
    rows (`spdinv.sampling.BatchRows`, updated every step). With `record`, the conditional maps
    each probability-editing layer used last are kept in `recorded`.

    Maps are materialised only where `wants_probs` says so; an edit that gives the target the
    source's maps unchanged (P2P's self-attention injection) says `target_reads_source` instead
    and is computed by the fused kernel, softmax(q_src k_src^T) v_tgt, without materialising them
    (a 64x64 self-attention layer of SDXL at 1024 px would hold 2 x 10 x 4096^2 floats, 1.25 GiB).
    `fused = False` sends those through the probability path too (tests compare the two)."""

    record: bool = False
    fused: bool = True

    def __init__(self) -> None:
        self.recorded: dict[str, Tensor] = {}
        self.rows = BatchRows.of([], 2)

    def edit_qkv(self, layer: AttentionLayer, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return q, k, v

    def wants_probs(self, layer: AttentionLayer) -> bool:
        return False

    def edit_probs(self, layer: AttentionLayer, probs: Tensor) -> bool:
        """Edit the target's row of `probs` in place; True when it changed."""
        return False

    def target_reads_source(self, layer: AttentionLayer) -> bool:
        """Whether the conditional target row takes the conditional source row's maps unchanged
        (then `edit_probs` must do the same on the probability path)."""
        return False

    def needs_probs(self, layer: AttentionLayer) -> bool:
        """Whether this layer's maps are materialised at this step."""
        if self.record or self.wants_probs(layer):
            return True
        return not self.fused and self.target_reads_source(layer)


class EditingProcessor:
    """A diffusers attention processor (the computation of `AttnProcessor2_0`) that lets an
    `AttentionEditor` rewrite q, k, v and, when it asks for them, the attention maps."""

    def __init__(self, layer: AttentionLayer, editor: AttentionEditor) -> None:
        self.layer = layer
        self.editor = editor

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        context_length = tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        q = _split_heads(attn.to_q(hidden_states), attn.heads)
        k = _split_heads(attn.to_k(encoder_hidden_states), attn.heads)
        v = _split_heads(attn.to_v(encoder_hidden_states), attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        q, k, v = self.editor.edit_qkv(self.layer, q, k, v)
        # As AttnProcessor2_0: the kernel's default scale unless the layer has another one.
        scale = None if math.isclose(attn.scale, q.shape[-1] ** -0.5) else attn.scale
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=scale)
        if self.editor.needs_probs(self.layer):
            out = self._edited_by_probs(attn, q, k, v, out, attention_mask)
        elif self.editor.target_reads_source(self.layer):
            out = self._target_reads_source(q, k, v, out, attention_mask, scale)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(q.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _target_reads_source(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, mask: Tensor | None,
                             scale: float | None) -> Tensor:
        """out with the conditional target row recomputed as softmax(q_src k_src^T) v_tgt by the fused kernel."""
        rows = self.editor.rows
        source, target = rows.cond(SOURCE), rows.cond(TARGET)
        keep = slice(source, source + 1)
        mask = None if mask is None else mask[keep]
        out = out.clone()
        out[target] = F.scaled_dot_product_attention(q[keep], k[keep], v[target : target + 1], attn_mask=mask,
                                                     scale=scale)[0].to(out.dtype)
        return out

    def _edited_by_probs(self, attn: Attention, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         attention_mask: Tensor | None) -> Tensor:
        """Only the conditional [source, target] rows are materialised, and only an edited target
        row is recomputed from its maps: every other row keeps the fused kernel's numerics, so the
        source branch matches an unedited pass bit for bit."""
        rows = self.editor.rows
        pair, target = rows.pair(SOURCE, TARGET), rows.cond(TARGET)
        mask = None if attention_mask is None else attention_mask[pair]
        probs = _attention_probs(attn, q[pair], k[pair], mask)
        if self.editor.edit_probs(self.layer, probs):
            out = out.clone()
            out[target] = (probs[TARGET] @ v[target]).to(out.dtype)
        if self.editor.record:
            self.editor.recorded[self.layer.name] = probs.detach().float().cpu()
        return out


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, heads, inner // heads).transpose(1, 2)


def _attention_probs(attn: Attention, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T * scale [+ mask]) with diffusers' upcasting rules, in q's dtype."""
    dtype = q.dtype
    if attn.upcast_attention:
        q, k = q.float(), k.float()
    scores = (q @ k.transpose(-1, -2)) * attn.scale
    if mask is not None:
        scores = scores + mask
    if attn.upcast_softmax:
        scores = scores.float()
    return scores.softmax(dim=-1).to(dtype)


@contextmanager
def installed_processors(unet: torch.nn.Module, processors: Mapping[str, object]) -> Iterator[None]:
    """Install `processors` (keyed like `unet.attn_processors`) on some layers and always put the
    original processor objects back, even when the body raises."""
    originals = dict(unet.attn_processors)
    unknown = sorted(set(processors) - set(originals))
    if unknown:
        raise KeyError(f"no attention layer {unknown[0]!r} in this UNet")
    try:
        unet.set_attn_processor({**originals, **processors})
        yield
    finally:
        unet.set_attn_processor(dict(originals))


@contextmanager
def forward_hooks(hooks: list[tuple[torch.nn.Module, object]]) -> Iterator[None]:
    """Register forward hooks (module, hook(module, inputs, output)) and always remove them."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
