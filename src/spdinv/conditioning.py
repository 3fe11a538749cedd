"""Text conditioning as one tensor per prompt, for SD and SDXL alike.

SD conditions its UNet on the text encoder's last hidden states (L tokens x D). SDXL also needs a
pooled text embedding (P values, from its second encoder) and "time ids" (original size, crop,
target size). Inversion, null-text optimisation, guidance and the engines handle one embedding
tensor per prompt (they concatenate, expand and optimise it), so SDXL's pooled embedding travels
*inside* that tensor: ceil(P / D) extra rows after the L token rows, zero-padded. Only the model's
UNet call unpacks it; the time ids follow from the latent's size (the image is conformed to the
model's size, uncropped, as the pipeline does by default)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pooled_rows(pooled_dim: int, width: int) -> int:
    return math.ceil(pooled_dim / width)


def pack(hidden: Tensor, pooled: Tensor) -> Tensor:
    """(B, L, D) token states and (B, P) pooled embedding -> (B, L + ceil(P/D), D)."""
    batch, _, width = hidden.shape
    rows = pooled_rows(pooled.shape[-1], width)
    padded = torch.zeros(batch, rows * width, dtype=hidden.dtype, device=hidden.device)
    padded[:, : pooled.shape[-1]] = pooled
    return torch.cat([hidden, padded.view(batch, rows, width)], dim=1)


def unpack(embedding: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """The inverse of `pack`: (token states (B, L, D), pooled (B, P))."""
    rows = pooled_rows(pooled_dim, embedding.shape[-1])
    return embedding[:, :-rows], embedding[:, -rows:].flatten(1)[:, :pooled_dim]


def sdxl_text_states(tokenizers: list, encoders: list, prompts: list[str], device) -> tuple[Tensor, Tensor]:
    """SDXL's prompt encoding (StableDiffusionXLPipeline.encode_prompt, no clip skip): every
    encoder's penultimate hidden states concatenated, the pooled embedding from the last encoder
    that has a projection. fp32."""
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True)
        if output[0].ndim == 2:
            pooled = output[0]
        states.append(output.hidden_states[-2])
    return torch.cat(states, dim=-1).float(), pooled.float()


def time_ids(height: int, width: int, batch: int, dtype: torch.dtype, device) -> Tensor:
    """SDXL's added time ids for an uncropped image shown at its own size: (original size, crop
    top-left, target size) = (h, w, 0, 0, h, w), one row per batch row."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).expand(batch, -1)
