"""Reading user images into the model's size, and converting between PIL and tensors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .errors import SpdinvError


def open_image(path: str | Path) -> Image.Image:
    """Read and decode an image file (as it is; `conform_image` fits it to a model)."""
    path = Path(path)
    if not path.exists():
        raise SpdinvError(f"image not found: {path}")
    if path.is_dir():
        raise SpdinvError(f"image path is a folder: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise SpdinvError(f"not a readable image: {path} ({type(error).__name__})") from None
    return image


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of the largest centred square: the crop conform_image makes."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def conform_image(image: Image.Image, size: int) -> tuple[Image.Image, list[str]]:
    """Convert to RGB, centre-crop to a square and resize to `size`, noting each change."""
    notices = []
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        image = flat
        notices.append("transparency composited on white")
    elif image.mode != "RGB":
        notices.append(f"converted from mode {image.mode} to RGB")
        image = image.convert("RGB")
    w, h = image.size
    if w != h:
        image = image.crop(centre_square(w, h))
        notices.append(f"centre-cropped {w}x{h} to {min(w, h)}x{min(w, h)}")
    if image.size != (size, size):
        notices.append(f"resized {image.size[0]}x{image.size[1]} to {size}x{size}")
        image = image.resize((size, size), Image.LANCZOS)
    return image, notices


def to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB -> float tensor (1, 3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def arrays_to_tensor(arrays: np.ndarray) -> Tensor:
    """uint8 images (B, H, W, 3) -> float tensor (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_pil(images: Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> list of PIL images."""
    arrays = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (data range 1 after mapping to [0, 1]); inf when equal.
    torchmetrics' peak_signal_noise_ratio computes the same (a test checks it), but importing
    torchmetrics costs `spdinv edit` about a second, so this one formula is written out here."""
    mse = float((((a.float() + 1) / 2 - (b.float() + 1) / 2) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
