"""What the denoising network predicts, converted to the noise eps and the clean latent x0.

With z_t = sqrt(abar) x0 + sqrt(1 - abar) eps, a network trained for
    epsilon:       predicts eps
    v_prediction:  predicts v = sqrt(abar) eps - sqrt(1 - abar) x0   (Salimans & Ho 2022)
    sample:        predicts x0
and every one of them determines the other two given z_t; these are affine in the output, so
classifier-free guidance gives the same result before or after the conversion.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def eps_from_output(output: Tensor, z: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    """eps from the network's output at z_t; `abar` broadcasts against z (one per row, or one)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return abar.sqrt() * output + (1 - abar).sqrt() * z
    if prediction_type == "sample":
        return (z - abar.sqrt() * output) / (1 - abar).sqrt()
    raise ValueError(f"unknown prediction type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")



def guided(eps_uncond: Tensor | None, eps_cond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance eps_uncond + scale * (eps_cond - eps_uncond). `scale` is one number
    or one per row ((B, 1, 1, 1)); a row at scale 1 then gets eps_cond exactly, and no
    unconditional prediction (None) gives eps_cond."""
    if eps_uncond is None:
        return eps_cond
    mixed = eps_uncond + scale * (eps_cond - eps_uncond)
    return torch.where(scale == 1.0, eps_cond, mixed) if isinstance(scale, Tensor) else mixed
