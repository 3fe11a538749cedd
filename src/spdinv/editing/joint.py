"""Attention-processor plumbing for the joint attention of flow transformers (SD3 / SD3.5's
`JointAttnProcessor2_0`, FLUX.1's `FluxAttnProcessor`): text and image tokens attend in one
softmax, so an engine edits blocks of one (B, heads, N, N) map rather than separate self- and
cross-attention layers.

Layers are found from the transformer's module tree in forward order: SD3's `transformer_blocks.i.attn`
("joint": image then text tokens), SD3.5's `transformer_blocks.i.attn2` ("image": image tokens
only), FLUX's `transformer_blocks.i.attn` ("joint": text then image tokens) and
`single_transformer_blocks.i.attn` ("single": one stream, text then image tokens). An engine sees
q, k, v of the whole sequence and a `TokenLayout` naming the image and text slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .sampler import SOURCE, TARGET

KINDS = ("joint", "single", "image")


@dataclass(frozen=True)
class JointLayer:
    """One attention module of a flow transformer: its module path, kind (KINDS), whether the text
    tokens come first (FLUX) and its place among all such modules in forward order (`depth` of `count`).
    `cross` is False: a joint layer is no UNet cross-attention layer."""

    name: str
    kind: str
    text_first: bool
    depth: int
    count: int
    cross: bool = False

    @property
    def key(self) -> str:
        return f"{self.name}.processor"

    @property
    def has_text(self) -> bool:
        return self.kind != "image"


@dataclass(frozen=True)
class TokenLayout:
    """Where the image and the text tokens sit in one layer's sequence."""

    image: slice
    text: slice

    @classmethod
    def of(cls, layer: JointLayer, image_tokens: int, text_tokens: int) -> "TokenLayout":
        if not layer.has_text:
            return cls(slice(0, image_tokens), slice(image_tokens, image_tokens))
        if layer.text_first:
            return cls(slice(text_tokens, text_tokens + image_tokens), slice(0, text_tokens))
        return cls(slice(0, image_tokens), slice(image_tokens, image_tokens + text_tokens))


def joint_layers(transformer: torch.nn.Module) -> list[JointLayer]:
    """Every attention module of an SD3Transformer2DModel or FluxTransformer2DModel, in forward order."""
    flux = hasattr(transformer, "single_transformer_blocks")
    found = []
    for name, module in transformer.named_modules():
        if not hasattr(module, "processor") or not name.endswith(("attn", "attn2")):
            continue
        kind = "image" if name.endswith("attn2") else "single" if name.startswith("single_") else "joint"
        found.append((name, kind))
    return [JointLayer(name, kind, flux, depth, len(found)) for depth, (name, kind) in enumerate(found)]


class JointEditor:
    """What an engine does inside joint attention: rewrite q, k, v (B, heads, N, d) of the whole
    sequence, and/or the softmax maps of the conditional [source, target] rows (2, heads, N, N).
    `text_tokens` is learnt from the last layer that saw the text stream (FLUX's single blocks
    are not told it); `rows` names the batch's rows (set every step by `begin_step`)."""

    text_tokens: int = 0

    def edit_joint_qkv(self, layer: JointLayer, q: Tensor, k: Tensor, v: Tensor,
                       layout: TokenLayout) -> tuple[Tensor, Tensor, Tensor]:
        return q, k, v

    def wants_joint_probs(self, layer: JointLayer) -> bool:
        return False

    def edit_joint_probs(self, layer: JointLayer, probs: Tensor, layout: TokenLayout) -> bool:
        """Edit the target's row of `probs` in place; True when it changed."""
        return False


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The fused kernel every joint processor calls (one name, so a test can watch it)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, heads, inner // heads).transpose(1, 2)


def _sd3_qkv(attn, hidden: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """JointAttnProcessor2_0's projections and norms, image tokens then text tokens."""
    q, k, v = (_heads(proj(hidden), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
    q = q if attn.norm_q is None else attn.norm_q(q)
    k = k if attn.norm_k is None else attn.norm_k(k)
    if context is None:
        return q, k, v
    cq, ck, cv = (_heads(proj(context), attn.heads) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    cq = cq if attn.norm_added_q is None else attn.norm_added_q(cq)
    ck = ck if attn.norm_added_k is None else attn.norm_added_k(ck)
    return torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)


def _flux_qkv(attn, hidden: Tensor, context: Tensor | None, rotary) -> tuple[Tensor, Tensor, Tensor]:
    """FluxAttnProcessor's projections, norms and rotary embedding, text tokens then image tokens."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, v, cq, ck, cv = _get_qkv_projections(attn, hidden, context)
    q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if context is not None and attn.added_kv_proj_dim is not None:
        cq, ck, cv = (x.unflatten(-1, (-1, attn.head_dim)) for x in (cq, ck, cv))
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
    if rotary is not None:
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class JointEditingProcessor:
    """The computation of `JointAttnProcessor2_0` (SD3) or `FluxAttnProcessor` (FLUX), with a
    `JointEditor` rewriting q, k, v and, when it asks for them, the conditional rows' maps."""

    def __init__(self, layer: JointLayer, editor: JointEditor) -> None:
        self.layer = layer
        self.editor = editor

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb=None, *args, **kwargs):
        layer, editor = self.layer, self.editor
        if encoder_hidden_states is not None:
            editor.text_tokens = encoder_hidden_states.shape[1]
        if layer.text_first:
            q, k, v = _flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        else:
            q, k, v = _sd3_qkv(attn, hidden_states, encoder_hidden_states)
        text = 0 if layer.kind == "image" else editor.text_tokens
        layout = TokenLayout.of(layer, q.shape[2] - text, text)
        q, k, v = editor.edit_joint_qkv(layer, q, k, v, layout)
        out = attention(q, k, v, attention_mask)
        if editor.wants_joint_probs(layer):
            out = self._edited_output(q, k, v, out, layout)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        return self._project(attn, out, hidden_states, encoder_hidden_states)

    def _edited_output(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, layout: TokenLayout) -> Tensor:
        """Only the conditional [source, target] rows' maps are materialised and only an edited
        target row is recomputed from them: every other row keeps the fused kernel's numerics."""
        rows = self.editor.rows
        pair, target = rows.pair(SOURCE, TARGET), rows.cond(TARGET)
        probs = ((q[pair].float() @ k[pair].float().transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
        if self.editor.edit_joint_probs(self.layer, probs, layout):
            out = out.clone()
            out[target] = (probs[TARGET] @ v[target].float()).to(out.dtype)
        return out

    def _project(self, attn, out: Tensor, hidden_states: Tensor, context: Tensor | None):
        """The stock processors' output projections: (image, text) for SD3, (image, text) for FLUX's
        dual blocks, the whole stream for FLUX's single blocks and SD3.5's image-only attention."""
        if context is None:
            if self.layer.text_first:  # FLUX single block: the block's own proj_out follows
                return out
            return attn.to_out[1](attn.to_out[0](out))
        text = context.shape[1]
        if self.layer.text_first:
            context_out, image_out = out[:, :text], out[:, text:]
        else:
            image_out, context_out = out[:, : hidden_states.shape[1]], out[:, hidden_states.shape[1]:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        if not getattr(attn, "context_pre_only", False) and getattr(attn, "to_add_out", None) is not None:
            context_out = attn.to_add_out(context_out.contiguous())
        return image_out, context_out
