"""Which concept encoder encodes a concept image (`EncoderChoice`), and encoding with it (`encode_with`):
spdinv's shapes-world encoder, with or without its shape reader (issue 26), or ELITE's global mapper."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SpdinvError
from .concept_encoder import load_concept_encoder
from .shape_reader import load_shape_reader, read_concept


@dataclass(frozen=True)
class EncoderChoice:
    """Which concept encoder encodes a concept image (`encode_with`): `kind` "world" (spdinv's
    .safetensors) or "elite" (ELITE's global mapper with its CLIP image encoder). A world encoder may read
    the shape with a shape reader (`spdinv.world.shape_reader.read_concept`, issue 26)."""

    kind: str
    path: Path | None  # None: the shipped world encoder
    image_encoder: Path | None = None
    shape_reader: bool = False
    reader_path: Path | None = None  # None: the shipped shape reader


def encode_with(choice: EncoderChoice, model, image, word: str):
    """(the concept `image` encodes to, ELITE's mapper or None). `model` (may be None for the world
    encoder) is the model the concept is for."""
    from ..concepts import check_width

    if choice.kind == "world":
        encoder = load_concept_encoder(choice.path)
        if choice.shape_reader:
            concept = read_concept(encoder, load_shape_reader(choice.reader_path), image, word)
        else:
            concept = encoder.encode(image, word)
        if model is not None:
            check_width(concept, model.text_encoder.get_input_embeddings().embedding_dim,
                        f"the concept encoder {choice.path or '(shipped, for the embedded model)'}")
        return concept, None
    from ..elite import clip_pixels, encode_concept, load_global_mapper, load_image_encoder

    if model.text_encoder_2 is not None:
        raise SpdinvError("ELITE's global mapper is for SD 1.x models; this is an SDXL model")
    image_encoder = load_image_encoder(choice.image_encoder).to(model.device)
    mapper = load_global_mapper(choice.path, model.unet, input_dim=int(image_encoder.config.hidden_size))
    pixels = clip_pixels(image, int(image_encoder.config.image_size)).to(model.device, image_encoder.dtype)
    return encode_concept(mapper.to(model.device), image_encoder, pixels, word), mapper
