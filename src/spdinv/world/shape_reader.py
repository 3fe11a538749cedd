"""A shape reader for concept images the world renderer did not draw (issue 26): a small CNN that reads
the object's shape in a canonical frame, and the concept word made from what it reads.

The concept encoder's ViT, trained on the world's renders, keeps colour but not the shape of a drawn
object (linear probes read it in 27-44% of drawings; docs/model-card.md). This reader is trained on the
randomised training drawer (`spdinv.world.concept_drawing.random_drawing`) and world renders, on every
image put first in a canonical frame (`canonical`: plain background repainted gray, the object's bounding
box scaled to 26 px on its long side and centred). Its word for an image (`read_concept`) is the shipped
encoder's own w0 for the render of an identity: the shape the reader reads, with the colour, material and
style of the identity whose render's w0 is nearest (cosine) to the encoder's w0 of the image (the encoder
keeps colour on drawings).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..concepts import Concept, check_word
from ..errors import SpdinvError
from .concept_encoder import (BACKGROUNDS, CONCEPT_BACKGROUND, IMAGE_SIZE, ConceptEncoder, concept_image, identities,
                              on_concept_background)
from .scene import SHAPES, WorldObject

READER_PATH = Path(__file__).resolve().parent.parent / "assets" / "shape-reader.safetensors"
GRAY = np.array(BACKGROUNDS[CONCEPT_BACKGROUND])


@dataclass(frozen=True)
class ReaderConfig:
    """The reader's shape (saved beside its weights as JSON)."""

    widths: tuple[int, ...] = (32, 64, 64, 128, 128)
    strides: tuple[int, ...] = (2, 2, 1, 2, 1)
    frame_side: float = 26.0  # the canonical frame's bounding-box side, px

    @classmethod
    def from_dict(cls, settings: dict) -> "ReaderConfig":
        return cls(tuple(settings["widths"]), tuple(settings["strides"]), float(settings["frame_side"]))


def canonical(image: Image.Image, side: float = 26.0) -> Image.Image:
    """The object (pixels more than 24 per channel from gray, after the plain background is repainted gray)
    scaled to `side` px on its bounding box's long side and centred on gray, 64x64."""
    image = on_concept_background(image.convert("RGB"))
    mask = np.abs(np.asarray(image).astype(int) - GRAY).max(2) > 24
    if not mask.any():
        return image
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    scale = side / max(x1 - x0, y1 - y0)
    w, h = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    out = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(c) for c in GRAY))
    half = IMAGE_SIZE // 2
    out.paste(image.crop((x0, y0, x1, y1)).resize((w, h), Image.LANCZOS), (half - w // 2, half - h // 2))
    return out


class ShapeReader(nn.Module):
    """3x3 convolutions (GroupNorm, SiLU), global average pooling, a linear head to the world's shapes."""

    def __init__(self, config: ReaderConfig = ReaderConfig()):
        super().__init__()
        self.config = config
        blocks, cin = [], 3
        for width, stride in zip(config.widths, config.strides):
            blocks += [nn.Conv2d(cin, width, 3, stride, 1), nn.GroupNorm(8, width), nn.SiLU()]
            cin = width
        self.body = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, len(SHAPES))

    def forward(self, pixels: Tensor) -> Tensor:
        """Canonical-frame images (B, 3, 64, 64) in [-1, 1] -> shape logits (B, len(SHAPES))."""
        return self.head(self.body(pixels))

    def frame(self, image: Image.Image) -> Tensor:
        """One image (any size: centre-cropped and resized to 64x64) -> its canonical frame as (1, 3, 64, 64)."""
        from ..images import conform_image, to_tensor

        return to_tensor(canonical(conform_image(image, IMAGE_SIZE)[0], self.config.frame_side))

    @torch.no_grad()
    def read(self, image: Image.Image) -> str:
        """The shape the reader reads in one image."""
        return SHAPES[int(self(self.frame(image)).argmax(1))]


def save_shape_reader(reader: ShapeReader, path: str | Path, extra: dict | None = None) -> Path:
    """Weights as float16 safetensors (the asset is small) and the config (plus `extra`) as JSON beside them."""
    from safetensors.torch import save

    from ..outputs import to_json, write_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().cpu().contiguous() for k, v in reader.state_dict().items()}
    write_atomically(path.with_suffix(".json"), to_json({"reader": asdict(reader.config), **(extra or {})}))
    return write_atomically(path, save(state))


def load_shape_reader(path: str | Path | None = None) -> ShapeReader:
    """The reader at `path` (a .safetensors with its .json beside it); None: the shipped one. A missing,
    corrupt or mismatched file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..elite import load_strictly

    path = READER_PATH if path is None else Path(path)
    if not path.is_file():
        raise SpdinvError(f"shape reader not found: {path}")
    try:
        config = ReaderConfig.from_dict(json.loads(path.with_suffix(".json").read_text())["reader"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SpdinvError(f"{path.with_suffix('.json')} is not a shape reader config ({type(error).__name__})") from None
    try:
        state = {k: v.float() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise SpdinvError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0]})") from None
    return load_strictly(ShapeReader(config), state, path, "a shape reader of this shape", "the config").eval()


@lru_cache(maxsize=4)
def identity_words(encoder: ConceptEncoder) -> tuple[list[WorldObject], Tensor]:
    """Every identity and the encoder's w0 for its concept render, (identities, (N, width)); each encoded
    alone by `encoder.encode`, so that a world render's word is the one the encoder alone gives it."""
    objects = identities()
    return objects, torch.cat([encoder.encode(concept_image(o)).vectors for o in objects])


def read_identity(encoder: ConceptEncoder, reader: ShapeReader, image: Image.Image) -> tuple[WorldObject, Tensor]:
    """(the identity read in `image`, the encoder's w0 of its render): the shape the reader reads, with the
    colour, material and style of the identity whose render's w0 is nearest (cosine) to the encoder's w0 of
    the image."""
    objects, words = identity_words(encoder)
    seen = encoder.encode(image).vectors[0]
    nearest = objects[int(torch.nn.functional.cosine_similarity(words, seen[None], dim=1).argmax())]
    read = replace(nearest, shape=reader.read(image))
    index = objects.index(read)
    return read, words[index]


def read_concept(encoder: ConceptEncoder, reader: ShapeReader, image: Image.Image, word: str = "S") -> Concept:
    """The concept for `image`: the encoder's w0 of the render of the identity `read_identity` reads."""
    check_word(word)
    return Concept(word, read_identity(encoder, reader, image)[1][None].clone())
