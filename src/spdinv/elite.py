"""ELITE's global mapping network (Wei et al., ICCV 2023) with the official checkpoint's layout.

Image features are taken at five depths of a CLIP vision model (the last hidden state and the
outputs of layers 4, 8, 12 and 16); for each depth an MLP maps the CLS token and another maps
every patch token, and the word is their sum (the patch MLP's output averaged over patches).
Only the first word (the deepest features'), w0, is used at generation; it becomes a `Concept`.

`global_mapper.pt` also holds ELITE's trained key/value projections, one pair per UNet
cross-attention, as `{module path with dots as underscores}_to_k/_to_v` (bias-free Linear), so the
module registers one pair per cross-attention of the given UNet and the file loads strictly;
`projections_installed` switches them on (the official SPDInv-ELITE script drops them). Not
run on the real SD 1.4 / CLIP ViT-L/14 weights here (none are available offline)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .concepts import Concept, read_pickle
from .errors import SpdinvError

FEATURE_LAYERS = (4, 8, 12, 16)  # hidden_states indices used after the last hidden state


def _mlp(input_dim: int, hidden: int, output_dim: int) -> nn.Sequential:
    # Indices 0, 1, 3, 4, 6 carry weights: the official keys mapping_i.{0,1,3,4,6}.{weight,bias}.
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, output_dim))


def cross_attention_shapes(unet: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Each cross-attention's module path -> (context width, key width, value width)."""
    shapes = {}
    for name, module in unet.named_modules():
        if getattr(module, "is_cross_attention", False) and hasattr(module, "to_k"):
            shapes[name] = (module.to_k.in_features, module.to_k.out_features, module.to_v.out_features)
    return shapes


class GlobalMapper(nn.Module):
    """mapping_{i} (CLS) and mapping_patch_{i} (patches) for each of `levels` feature depths, plus
    the per-cross-attention key/value projections (`attention`: path -> shapes)."""

    def __init__(self, input_dim: int = 1024, output_dim: int = 768, hidden: int = 1024, levels: int = 5,
                 attention: dict[str, tuple[int, int, int]] | None = None):
        super().__init__()
        self.levels = levels
        for i in range(levels):
            self.add_module(f"mapping_{i}", _mlp(input_dim, hidden, output_dim))
            self.add_module(f"mapping_patch_{i}", _mlp(input_dim, hidden, output_dim))
        for name, (context, keys, values) in (attention or {}).items():
            self.add_module(f"{name.replace('.', '_')}_to_k", nn.Linear(context, keys, bias=False))
            self.add_module(f"{name.replace('.', '_')}_to_v", nn.Linear(context, values, bias=False))

    @classmethod
    def for_unet(cls, unet: nn.Module, input_dim: int = 1024, hidden: int = 1024) -> GlobalMapper:
        shapes = cross_attention_shapes(unet)
        output_dim = next(iter(shapes.values()))[0] if shapes else 768
        return cls(input_dim, output_dim, hidden, attention=shapes)

    def forward(self, features: list[Tensor]) -> Tensor:
        """`levels` tensors (B, 1 + patches, input_dim) -> words (B, levels, output_dim)."""
        words = [getattr(self, f"mapping_{i}")(level[:, :1])
                 + getattr(self, f"mapping_patch_{i}")(level[:, 1:]).mean(dim=1, keepdim=True)
                 for i, level in enumerate(features)]
        return torch.cat(words, dim=1)

    def projections(self, name: str) -> tuple[nn.Linear, nn.Linear]:
        """The trained (to_k, to_v) for the cross-attention at module path `name`."""
        key = name.replace(".", "_")
        return getattr(self, f"{key}_to_k"), getattr(self, f"{key}_to_v")


@contextmanager
def projections_installed(unet: nn.Module, mapper: GlobalMapper) -> Iterator[None]:
    """While inside, every cross-attention computes its keys and values with ELITE's trained
    projections (for every text condition, the unconditional one included, as ELITE does). The
    modules are swapped, not the processors, so any processor (diffusers' or an engine's
    `EditingProcessor`) uses them; the originals are put back on exit."""
    originals = {}
    try:
        for name, module in unet.named_modules():
            if getattr(module, "is_cross_attention", False) and hasattr(module, "to_k"):
                to_k, to_v = mapper.projections(name)
                originals[name] = module, module.to_k, module.to_v
                module.to_k, module.to_v = to_k.to(module.to_k.weight), to_v.to(module.to_v.weight)
        yield
    finally:
        for module, to_k, to_v in originals.values():
            module.to_k, module.to_v = to_k, to_v


def vision_features(image_encoder: nn.Module, pixels: Tensor, layers: tuple[int, ...] = FEATURE_LAYERS) -> list[Tensor]:
    """ELITE's feature levels from a CLIPVisionModel: the last hidden state, then the hidden states
    after each of `layers` (ELITE's: 4, 8, 12 and 16). `pixels` are what the encoder was trained on
    (ELITE: CLIP-normalised (B, 3, 224, 224))."""
    output = image_encoder(pixels, output_hidden_states=True)
    if len(output.hidden_states) <= max(layers):
        raise SpdinvError(f"the image encoder has {len(output.hidden_states) - 1} layers; ELITE reads layer "
                          f"{max(layers)}")
    return [output.last_hidden_state, *(output.hidden_states[i] for i in layers)]


def load_global_mapper(path: str | Path, unet: nn.Module, input_dim: int = 1024, hidden: int | None = None) -> GlobalMapper:
    """`global_mapper.pt` (a plain state dict) for `unet` and an image encoder `input_dim` wide,
    loaded strictly; `hidden` (the MLPs' width, ELITE's 1024) is read from the file when None.
    Wrong keys or shapes are a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise SpdinvError(f"concept encoder checkpoint not found: {path}")
    state = read_pickle(path, "checkpoint")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SpdinvError(f"{path} is not a state dict of tensors")
    if hidden is None:
        first = state.get("mapping_0.0.weight")
        hidden = int(first.shape[0]) if first is not None and first.dim() == 2 else 1024
    mapper = GlobalMapper.for_unet(unet, input_dim, hidden)
    expected = mapper.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SpdinvError(f"{path} is not an ELITE global mapper for this model: {len(missing)} keys missing "
                          f"(first: {missing[:1]}), {len(unexpected)} unexpected (first: {unexpected[:1]})")
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise SpdinvError(f"{path}: {wrong[0]} is {tuple(state[wrong[0]].shape)}, this model needs "
                          f"{tuple(expected[wrong[0]].shape)}")
    mapper.load_state_dict(state, strict=True)
    return mapper.eval().requires_grad_(False)


@torch.no_grad()
def encode_concept(mapper: GlobalMapper, image_encoder: nn.Module, pixels: Tensor, word: str = "S") -> Concept:
    """One image (1, 3, 224, 224, CLIP-normalised) -> the concept w0 stands for."""
    words = mapper(vision_features(image_encoder, pixels))
    return Concept(word, words[0, :1].float().cpu())


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(image, size: int = 224) -> Tensor:
    """CLIP's preprocessing of a PIL image: the shorter side resized to `size` (bicubic), a centre
    crop to size x size, RGB in [0, 1] normalised by CLIP's mean and std -> (1, 3, size, size)."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    scale = size / min(image.size)
    resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                           Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
    return (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def load_image_encoder(path: str | Path) -> nn.Module:
    """A CLIPVisionModel from a local folder (a CLIP vision or full CLIP model, e.g.
    openai/clip-vit-large-patch14 as saved by transformers); nothing is downloaded."""
    from transformers import CLIPVisionModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise SpdinvError(f"--image-encoder must be a local CLIP model folder with a config.json: {path}")
    try:
        encoder = CLIPVisionModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpdinvError(f"{path} is not a loadable CLIP vision model ({message[:200]})") from None
    return encoder.eval().requires_grad_(False)
