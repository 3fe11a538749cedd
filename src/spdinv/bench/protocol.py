"""The scoring protocol: what image of an edit the metrics see, and how it is saved.

- `pie-bench`: PIE-Bench's editing scripts save each result as a JPEG (PIL's defaults: quality 75,
  4:2:0 chroma subsampling) and its evaluator scores what it reads back; we do the same round trip in
  memory. The default for the real PIE-Bench. (The official scripts save the edit as the last panel of
  a wider picture; with 512-pixel panels the JPEG blocks line up, so only the chroma upsampling of the
  panel's first column can differ from encoding the edit alone, as we do: measured on a 512-px photo,
  90 pixels of that column by at most 2 levels, 0.0002 dB of PSNR.)
- `lossless`: the edit as generated. The default for `spdinv world export` folders.

`--save-images` writes the exact file whose decoded pixels were scored: the JPEG bytes themselves
(`<id>.jpg`, PIE-Bench's layout) or a PNG, so re-scoring the saved images reproduces the CSV.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import SpdinvError

PROTOCOLS = {
    "pie-bench": "each edit scored after a JPEG quality-75 round trip, as PIE-Bench's scripts save and read it",
    "lossless": "each edit scored as generated (no JPEG)",
}
JPEG_QUALITY = 75
JPEG_SUBSAMPLING = "4:2:0"  # PIL's default at quality 75, written out
# the structure-distance resize each protocol uses unless --structure-resize says otherwise
DEFAULT_STRUCTURE_RESIZE = {"pie-bench": "official", "lossless": "antialias"}


@dataclass(frozen=True)
class ScoredEdit:
    """The edit as the metrics see it, and the bytes of a file that decodes to exactly that."""

    image: Image.Image
    protocol: str
    jpeg: bytes | None = None

    def file_bytes(self) -> bytes:
        if self.jpeg is not None:
            return self.jpeg
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


def check_protocol(name: str) -> str:
    if name not in PROTOCOLS:
        raise SpdinvError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    return name


def default_protocol(has_ground_truth: bool) -> str:
    """pie-bench for the real PIE-Bench, lossless for world exports (which carry ground truth)."""
    return "lossless" if has_ground_truth else "pie-bench"


def scored_edit(edited: Image.Image, protocol: str) -> ScoredEdit:
    """The edit (RGB) under the protocol."""
    edited = edited.convert("RGB")
    if check_protocol(protocol) == "lossless":
        return ScoredEdit(edited, protocol)
    buffer = io.BytesIO()
    edited.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    jpeg = buffer.getvalue()
    with Image.open(io.BytesIO(jpeg)) as decoded:
        return ScoredEdit(decoded.convert("RGB"), protocol, jpeg)


def saved_name(image_path: Path, protocol: str) -> str:
    """The file name a saved edit gets: the item's name with .jpg (pie-bench) or .png (lossless)."""
    return Path(image_path).stem + (".jpg" if protocol == "pie-bench" else ".png")
