"""An ELITE-style concept encoder for the embedded shapes-world model: one image of a world object
-> the concept word that stands for it (`load_concept_encoder().encode(image)` -> `Concept`).

The image encoder is a small ViT (transformers' `CLIPVisionModel`, trained here from scratch on
64x64 world images; no CLIP weights are involved). As in ELITE's global mapping network
(`spdinv.elite.GlobalMapper`), features are read at several depths (the last hidden state first,
then the outputs of `feature_layers`), and per depth an MLP maps the CLS token and another the
patch tokens (averaged): one 128-wide word per depth. The deepest, w0, is the concept's vector.

Convention for the concept image (`concept_image`): the object alone, large, in the centre, on a
plain gray background (no object colour is gray), as `spdinv.world.render` draws it; `encode`
repaints another plain background gray first (`on_concept_background`). The concept
word stands for the object's identity (shape, colour, material, style); size, position and
background stay words in the prompt: "a large S in the centre on a blue background".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..concepts import Concept, check_word
from ..elite import GlobalMapper, load_strictly, vision_features
from ..errors import SpdinvError
from .render import render
from .scene import BACKGROUNDS, COLOURS, MATERIALS, SHAPES, Scene, WorldObject

ENCODER_PATH = Path(__file__).resolve().parent.parent / "assets" / "concept-encoder.safetensors"
CONCEPT_BACKGROUND = "gray"
IMAGE_SIZE = 64
# Shape x colour pairs never shown to the encoder in training (any material and style): one per
# colour, each shape and colour still seen with other partners.
HELD_OUT_PAIRS = tuple((SHAPES[i % len(SHAPES)], colour) for i, colour in enumerate(COLOURS))


@dataclass(frozen=True)
class EncoderConfig:
    """The encoder's shape (saved next to its weights as JSON)."""

    patch_size: int = 8
    width: int = 96
    layers: int = 6
    heads: int = 4
    mlp_width: int = 192
    feature_layers: tuple[int, ...] = (2, 4)  # after the last hidden state, as ELITE's (4, 8, 12, 16)
    mapper_hidden: int = 128
    word_width: int = 128  # the text encoder's token-embedding width

    @property
    def levels(self) -> int:
        return 1 + len(self.feature_layers)

    @classmethod
    def from_dict(cls, settings: dict) -> "EncoderConfig":
        """The config as saved (JSON or a checkpoint: feature_layers may be a list)."""
        return cls(**{**settings, "feature_layers": tuple(settings["feature_layers"])})


def identities() -> list[WorldObject]:
    """Every object identity (shape x colour x material/style), large and in the centre."""
    looks = [("filled", m) for m in MATERIALS] + [("outlined", "plain")]
    return [WorldObject(shape, colour, "centre", "large", material, style)
            for shape in SHAPES for colour in COLOURS for style, material in looks]


def is_held_out(obj: WorldObject) -> bool:
    return (obj.shape, obj.colour) in HELD_OUT_PAIRS


def on_concept_background(image: Image.Image, tolerance: int = 30, border: int = 2,
                          plain_spread: float = 12.0) -> Image.Image:
    """The image with a plain background repainted in the concept background's gray: when the outer
    `border` pixels are plain (per-channel standard deviation at most `plain_spread`), every pixel within
    `tolerance` (per channel) of their median colour becomes gray. Any other image (and one already on
    gray) comes back unchanged.
    The encoder was trained on objects on gray only; it reads another plain background's colour into
    the concept."""
    pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    ring = np.concatenate([pixels[:border].reshape(-1, 3), pixels[-border:].reshape(-1, 3),
                           pixels[:, :border].reshape(-1, 3), pixels[:, -border:].reshape(-1, 3)])
    if ring.std(axis=0).max() > plain_spread:
        return image
    background = np.median(ring, axis=0)
    if np.abs(background - BACKGROUNDS[CONCEPT_BACKGROUND]).max() <= 2:  # already the concept background
        return image
    near = (np.abs(pixels - background) <= tolerance).all(axis=2)
    pixels[near] = BACKGROUNDS[CONCEPT_BACKGROUND]
    return Image.fromarray(pixels.astype(np.uint8))


def concept_image(obj: WorldObject) -> Image.Image:
    """The object as a concept image: alone, large, in the centre, on plain gray."""
    alone = WorldObject(obj.shape, obj.colour, "centre", "large", obj.material, obj.style)
    return render(Scene((alone,), background=CONCEPT_BACKGROUND))


class ConceptEncoder(nn.Module):
    """A ViT image encoder plus ELITE's multi-level global mapper (no key/value projections)."""

    def __init__(self, config: EncoderConfig = EncoderConfig()):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.config = config
        self.vision = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=config.width, intermediate_size=config.mlp_width, num_hidden_layers=config.layers,
            num_attention_heads=config.heads, image_size=IMAGE_SIZE, patch_size=config.patch_size))
        self.mapper = GlobalMapper(config.width, config.word_width, config.mapper_hidden, config.levels)
        # Start the words at the scale of the text encoder's token embeddings (mean |x| about 0.02),
        # not at a default Linear's (about 0.3), which the text encoder has never seen.
        with torch.no_grad():
            for name, module in self.mapper.named_children():
                last = module[-1]
                last.weight.mul_(0.05)
                last.bias.zero_()

    def features(self, pixels: Tensor) -> list[Tensor]:
        """Images (B, 3, 64, 64) in [-1, 1] -> the mapper's feature levels, each (B, 1 + patches, width)."""
        return vision_features(self.vision, pixels, self.config.feature_layers)

    def forward(self, pixels: Tensor) -> Tensor:
        """Images (B, 3, 64, 64) in [-1, 1] -> words (B, levels, word_width); word 0 is w0."""
        return self.mapper(self.features(pixels))

    @torch.no_grad()
    def encode(self, image: Image.Image, word: str = "S") -> Concept:
        """One image (any size: centre-cropped and resized to 64x64; a plain background repainted gray,
        `on_concept_background`) -> the concept w0 stands for."""
        from ..images import conform_image, to_tensor

        check_word(word)
        pixels = to_tensor(on_concept_background(conform_image(image, IMAGE_SIZE)[0]))
        device = next(self.parameters()).device
        return Concept(word, self(pixels.to(device))[0, :1].float().cpu())


def config_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_concept_encoder(encoder: ConceptEncoder, path: str | Path, extra: dict | None = None) -> Path:
    """Weights as safetensors and the config (plus `extra`, e.g. how it was trained) as JSON beside them."""
    from safetensors.torch import save

    from ..outputs import to_json, write_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
    write_atomically(config_path(path), to_json({"encoder": asdict(encoder.config), **(extra or {})}))
    return write_atomically(path, save(state))


def load_concept_encoder(path: str | Path | None = None) -> ConceptEncoder:
    """The encoder at `path` (a .safetensors with its .json beside it); None: the shipped one.
    A missing, corrupt or mismatched file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ENCODER_PATH if path is None else Path(path)
    if not path.is_file():
        raise SpdinvError(f"concept encoder not found: {path}")
    try:
        config = EncoderConfig.from_dict(json.loads(config_path(path).read_text())["encoder"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SpdinvError(f"{config_path(path)} is not a concept encoder config ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''})") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise SpdinvError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0]})") from None
    return load_strictly(ConceptEncoder(config), state, path, "a concept encoder of this shape", "the config")
