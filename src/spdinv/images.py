"""Reading user images into a model's size (keeping their aspect ratio, a centre square, or a given
size), and converting between PIL and tensors."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .errors import SpdinvError


def open_image(path: str | Path) -> tuple[Image.Image, list[str]]:
    """Read and decode an image file into 8-bit RGB (`conform_image` fits it to a model), with a
    notice for each conversion and each warning the decoder gave (so no raw library warning
    reaches the terminal)."""
    path = Path(path)
    if not path.exists():
        raise SpdinvError(f"image not found: {path}")
    if path.is_dir():
        raise SpdinvError(f"image path is a folder: {path}")
    require_regular_file(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        except Image.DecompressionBombError as error:
            raise SpdinvError(f"image too large to decode: {path} ({error})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise SpdinvError(f"not a readable image: {path} ({type(error).__name__})") from None
        image, converted = to_rgb(image)  # a bad value range fails before any model loads
    return image, converted + _notices(caught)


def _notices(caught: list[warnings.WarningMessage]) -> list[str]:
    return list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of the largest centred square: the crop conform_image makes."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


@dataclass(frozen=True)
class Framing:
    """How an image is fitted to a model. By default its aspect ratio is kept and it is resized to
    about the model's native area (`aspect_size`); `crop`: the centre square at the native size
    (PIE-Bench's protocol, and spdinv's behaviour before); `size` (W, H): exactly that size, centre-
    cropped to its aspect ratio first (never stretched). Sides are multiples of the model's
    `size_multiple` (VAE factor x 2^UNet downsamplings)."""

    crop: bool = False
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.crop and self.size is not None:
            raise SpdinvError("--crop and --size exclude each other")
        if self.size is not None:
            ok = len(self.size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.size)
            if not ok:
                raise SpdinvError(f"size must be two positive integers (width, height), got {self.size!r}")


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H), positive integers."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise SpdinvError(f"size must be WIDTHxHEIGHT in pixels, e.g. 768x512, got {text!r}")
    return int(parts[0]), int(parts[1])


def aspect_size(width: int, height: int, side: int, multiple: int) -> tuple[int, int]:
    """The size an image of `width` x `height` is resized to: the area of a `side`^2 square, both
    sides multiples of `multiple`. Of the four sizes whose sides round the exactly scaled sides down
    or up, the one nearest the image's aspect ratio (then nearest the area); the image is centre-
    cropped to that aspect ratio first, which removes at most the rounding."""
    scale = side / math.sqrt(width * height)
    widths = {max(multiple, math.floor(width * scale / multiple) * multiple), math.ceil(width * scale / multiple) * multiple}
    heights = {max(multiple, math.floor(height * scale / multiple) * multiple), math.ceil(height * scale / multiple) * multiple}
    aspect = math.log(width / height)
    return min(((w, h) for w in widths for h in heights),
               key=lambda wh: (round(abs(math.log(wh[0] / wh[1]) - aspect), 9), abs(wh[0] * wh[1] - side * side), wh))


def centre_box(width: int, height: int, aspect: float) -> tuple[int, int, int, int]:
    """The largest centred (left, top, right, bottom) box of aspect ratio `aspect` (width / height)."""
    if width / height > aspect:
        new = max(1, round(height * aspect))
        left = (width - new) // 2
        return left, 0, left + new, height
    new = max(1, round(width / aspect))
    top = (height - new) // 2
    return 0, top, width, top + new


def fit_image(image: Image.Image, side: int, multiple: int, framing: Framing | None = None
              ) -> tuple[Image.Image, list[str]]:
    """Convert to 8-bit RGB and fit to a model whose native images are `side` px square and whose
    sides must be multiples of `multiple`, as `framing` says (default: keep the aspect ratio at
    about the native area), noting each change."""
    framing = framing or Framing()
    if framing.crop:
        return conform_image(image, side)
    if framing.size is not None and any(v % multiple for v in framing.size):
        w, h = framing.size
        near = "x".join(str(max(multiple, round(v / multiple) * multiple)) for v in (w, h))
        raise SpdinvError(f"size {w}x{h}: both sides must be multiples of {multiple} px for this model "
                          f"(e.g. {near})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, notices = to_rgb(image)
        w, h = image.size
        size = framing.size or aspect_size(w, h, side, multiple)
        box = centre_box(w, h, size[0] / size[1])
        if box != (0, 0, w, h):
            image = image.crop(box)
            notices.append(f"centre-cropped {w}x{h} to {image.size[0]}x{image.size[1]} (the aspect ratio of "
                           f"{size[0]}x{size[1]})")
        if image.size != size:
            notices.append(f"resized {image.size[0]}x{image.size[1]} to {size[0]}x{size[1]}")
            image = image.resize(size, Image.LANCZOS)
    return image, notices + _notices(caught)


def conform_image(image: Image.Image, size: int) -> tuple[Image.Image, list[str]]:
    """Convert to 8-bit RGB, centre-crop to a square and resize to `size`, noting each change."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, notices = to_rgb(image)
        w, h = image.size
        if w != h:
            image = image.crop(centre_square(w, h))
            notices.append(f"centre-cropped {w}x{h} to {min(w, h)}x{min(w, h)}")
        if image.size != (size, size):
            notices.append(f"resized {image.size[0]}x{image.size[1]} to {size}x{size}")
            image = image.resize((size, size), Image.LANCZOS)
    return image, notices + _notices(caught)


def to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """8-bit RGB: transparency composited on white; integer grey (16-bit files, mode I) scaled by the
    bit depth its values use, float grey by its range, [0, 1] or [0, 255] (PIL's own conversion
    clips them: all white or all black)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat, ["transparency composited on white"]
    if image.mode.startswith("I") or image.mode == "F":
        grey, scale = _deep_grey(image)
        return Image.fromarray(grey, mode="L").convert("RGB"), [f"converted {scale} to 8-bit RGB"]
    if image.mode != "RGB":
        try:
            return image.convert("RGB"), [f"converted from mode {image.mode} to RGB"]
        except ValueError:
            raise SpdinvError(f"cannot convert an image of mode {image.mode} to RGB") from None
    return image, []


def _deep_grey(image: Image.Image) -> tuple[np.ndarray, str]:
    """uint8 grey from a 16/32-bit integer or float image, and a description of the scaling."""
    values = np.asarray(image).astype(np.float64)
    if not np.isfinite(values).all():
        raise SpdinvError(f"the image (mode {image.mode}) has non-finite pixel values")
    low, high = float(values.min()), float(values.max())
    if image.mode == "F":
        if low >= 0 and high <= 1:
            full, what = 1.0, "float grey in [0, 1]"
        elif low >= 0 and high <= 255:
            full, what = 255.0, "float grey in [0, 255]"
        else:
            raise SpdinvError(f"float image with values in [{low:.4g}, {high:.4g}]; expected [0, 1] or [0, 255]")
    elif low < 0 or high > 65535:
        raise SpdinvError(f"integer image (mode {image.mode}) with values in [{low:.0f}, {high:.0f}]; "
                          "expected 16-bit values in [0, 65535]")
    else:  # 10-, 12- and 14-bit sensor data come in 16-bit files: the smallest depth holding the values
        bits = next(b for b in (8, 10, 12, 14, 16) if high <= 2**b - 1)
        full, what = 2.0**bits - 1, f"mode {image.mode} grey (values {low:.0f}-{high:.0f}, read as {bits}-bit)"
    return np.round(values / full * 255).clip(0, 255).astype(np.uint8), what


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


def psnr(a: Tensor, b: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """PSNR in dB of two images whose pixels span `value_range` ([-1, 1]: the model's, [0, 1]: the
    benchmark's), mapped to [0, 1] (data range 1); inf when equal. torchmetrics'
    peak_signal_noise_ratio computes the same (a test checks it), but importing torchmetrics costs
    `spdinv edit` about a second, so this one formula is written out here."""
    low, span = value_range[0], value_range[1] - value_range[0]
    mse = float((((a.float() - low) / span - (b.float() - low) / span) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def require_regular_file(path: str | Path, what: str = "image") -> None:
    """A one-line error when `path` exists but is not a regular file (a FIFO, a socket, a device):
    reading one would block forever or read something that is not a file's content."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # absent or unreadable: the caller's own check says so
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise SpdinvError(f"{what} path is {kind}, not a regular file: {path}")
