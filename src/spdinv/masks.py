"""PIE-Bench's run-length mask format: a flat list [start, length, start, length, ...] over the
row-major H x W array, 1 = edit region."""

from __future__ import annotations

import numpy as np

from .errors import SpdinvError


def rle_encode(mask: np.ndarray) -> list[int]:
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    padded = np.concatenate([[False], flat, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def rle_decode(rle: list[int], size: int | tuple[int, int], official_border: bool = True) -> np.ndarray:
    """Decode to a uint8 (H, W) array. A run past the end of the frame is clipped there, as PIE-Bench's
    decoder does (see runs_past_frame). With `official_border`, set the first and last rows and columns
    to 1 as PIE-Bench's evaluator does."""
    height, width = (size, size) if isinstance(size, int) else size
    _check(rle)
    flat = np.zeros(height * width, dtype=np.uint8)
    for start, length in zip(rle[0::2], rle[1::2]):
        flat[start:start + length] = 1  # numpy clips the slice at the end of the frame
    mask = flat.reshape(height, width)
    if official_border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def runs_past_frame(rle: list[int], size: int | tuple[int, int]) -> int:
    """How many runs end past the H x W frame (and were clipped by rle_decode)."""
    height, width = (size, size) if isinstance(size, int) else size
    _check(rle)
    return sum(start + length > height * width for start, length in zip(rle[0::2], rle[1::2]))


def _check(rle) -> None:
    if not isinstance(rle, (list, tuple)) or len(rle) % 2 or not all(isinstance(v, int) and v >= 0 for v in rle):
        raise SpdinvError("malformed mask: expected a flat list of non-negative [start, length] pairs")
