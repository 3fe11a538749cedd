"""What the library's entry points (`invert`, `edit`, `edits`) accept, checked in one line each:
the image (a path, a PIL image, a numpy array or a (1, 3, H, W) tensor in [-1, 1]), the seed, and
prompts that the tokenizer reads as nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from .arguments import MAX_SEED
from .errors import SpdinvError
from .images import open_image

IMAGE_KINDS = "a path, a PIL image, an (H, W, 3) numpy array or a (1, 3, H, W) tensor in [-1, 1]"
RANGE_SLACK = 1e-3  # a [-1, 1] tensor computed in float may overshoot its ends by rounding


def library_image(image) -> Image.Image | Tensor:
    """`image` as a PIL image (from a path or an array) or a checked (1, 3, H, W) float tensor."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        return open_image(image)[0]
    if isinstance(image, np.ndarray):
        return _array_image(image)
    if isinstance(image, Tensor):
        return _checked_tensor(image)
    raise SpdinvError(f"the image must be {IMAGE_KINDS}; got {'None' if image is None else type(image).__name__}")


def _array_image(array: np.ndarray) -> Image.Image:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) (alpha composited by open's rules), or floats in [0, 1]."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise SpdinvError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
            raise SpdinvError(f"an image array must hold numbers; got {array.dtype}")
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise SpdinvError("the image array holds NaN or inf")
        if np.issubdtype(array.dtype, np.floating) and values.min() >= 0 and values.max() <= 1:
            values = values * 255
        elif values.min() < 0 or values.max() > 255:
            raise SpdinvError(f"image array values in [{values.min():.4g}, {values.max():.4g}]; expected 0-255 "
                              "(integers) or [0, 1] (floats)")
        array = np.round(values).astype(np.uint8)
    image = Image.fromarray(array)
    return _flatten_alpha(image) if image.mode == "RGBA" else image.convert("RGB")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    flat = Image.new("RGB", image.size, (255, 255, 255))
    flat.paste(image, mask=image.getchannel("A"))
    return flat


def _checked_tensor(tensor: Tensor) -> Tensor:
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.shape[0] != 1 or tensor.shape[1] != 3:
        raise SpdinvError(f"an image tensor must be (1, 3, H, W) (RGB); got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise SpdinvError(f"an image tensor must be float in [-1, 1]; got {str(tensor.dtype).removeprefix('torch.')}")
    if not bool(tensor.isfinite().all()):
        raise SpdinvError("the image tensor holds NaN or inf")
    low, high = float(tensor.min()), float(tensor.max())
    if low < -1 - RANGE_SLACK or high > 1 + RANGE_SLACK:
        hint = " (0-255 values: pass x / 127.5 - 1)" if high > 2 else " ([0, 1] values: pass x * 2 - 1)" if low >= 0 else ""
        raise SpdinvError(f"image tensor values in [{low:.4g}, {high:.4g}]; expected [-1, 1]{hint}")
    return tensor.clamp(-1, 1)


def check_seed(seed) -> int:
    """An integer seed torch's generators take: 0 to 2**63 - 1."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise SpdinvError(f"the seed must be an integer in [0, 2**63 - 1]; got {seed!r}"[:120])
    return int(seed)


def _unknown_id(tokenizer) -> int | None:
    return getattr(tokenizer, "unk_token_id", None)


def unread_pieces(tokenizer, prompt: str) -> list[str]:
    """The whitespace-separated pieces of `prompt` of which the tokenizer reads some characters as its
    unknown token (the embedded model's tokenizer reads emoji and zero-width spaces so)."""
    unknown = _unknown_id(tokenizer)
    if unknown is None:
        return []
    return [piece for piece in dict.fromkeys(prompt.split())
            if unknown in tokenizer(piece, add_special_tokens=False).input_ids]


def check_prompt_tokens(tokenizer, prompt: str, what: str = "prompt") -> None:
    """Refuse a prompt the tokenizer reads as nothing: no token, or only its unknown token."""
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
    specials = set(getattr(tokenizer, "all_special_ids", [])) - {_unknown_id(tokenizer)}
    known = [i for i in ids if i not in specials and i != _unknown_id(tokenizer)]
    if not known:
        shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        raise SpdinvError(f"the {what} {shown!r} has no word the model's tokenizer reads (it would be an empty prompt)")


__all__ = ["IMAGE_KINDS", "library_image", "check_seed", "check_prompt_tokens", "unread_pieces"]
