"""LPIPS (SqueezeNet variant, v0.1) without torchvision: the metric PIE-Bench's evaluator computes with
torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`.

The SqueezeNet 1.1 feature layers are plain torch.nn modules named as in torchvision, so torchvision's
ImageNet weights file (`squeezenet1_1-b8a52dc0.pth`, a state dict) loads into them as it is; the seven
linear layers are LPIPS v0.1's, which torchmetrics ships inside its package (`lpips_models/squeeze.pth`,
the same tensors as the `lpips` package's `weights/v0.1/squeeze.pth`). Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import Unavailable, first_line

BACKBONE_FILE = "squeezenet1_1-b8a52dc0.pth"  # torchvision's SqueezeNet 1.1 ImageNet weights, as torch hub caches them
# LPIPS' input scaling (inputs in [-1, 1] -> roughly ImageNet-normalised)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# the seven feature taps of LPIPS' SqueezeNet: after features[0:2], [2:5], [5:8], [8:10], [10], [11], [12]
SLICE_ENDS = (2, 5, 8, 10, 11, 12, 13)
CHANNELS = (64, 128, 256, 384, 384, 512, 512)


class Fire(nn.Module):
    """SqueezeNet's fire module (torchvision's attribute names)."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


def squeezenet1_1_features() -> nn.Sequential:
    """torchvision's `squeezenet1_1().features`, layer for layer (so its state-dict keys match)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
    )


class Lpips(nn.Module):
    """LPIPS distance of image batches in [-1, 1]: per tap, unit-normalise the features over channels,
    square their difference, weight the channels (1x1 conv), average over space; sum over taps."""

    def __init__(self, features: nn.Sequential, linear_weights: list[Tensor]):
        super().__init__()
        self.features = features
        self.linear = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in linear_weights])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def taps(self, x: Tensor) -> list[Tensor]:
        x = (x - self.shift) / self.scale
        outputs, start = [], 0
        for end in SLICE_ENDS:
            for layer in self.features[start:end]:
                x = layer(x)
            outputs.append(x)
            start = end
        return outputs

    @staticmethod
    def _unit(features: Tensor, eps: float = 1e-8) -> Tensor:
        return features / torch.sqrt(eps + (features ** 2).sum(dim=1, keepdim=True))

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """(N,) distances of a and b, both (N, 3, H, W) in [-1, 1]."""
        total = 0
        for fa, fb, weight in zip(self.taps(a), self.taps(b), self.linear):
            difference = (self._unit(fa) - self._unit(fb)) ** 2
            total = total + nn.functional.conv2d(difference, weight).mean(dim=(2, 3))
        return total[:, 0]


def linear_weights_file() -> Path:
    """LPIPS v0.1's SqueezeNet linear layers, as torchmetrics ships them."""
    import torchmetrics.functional.image.lpips as tm_lpips

    return Path(tm_lpips.__file__).parent / "lpips_models" / "squeeze.pth"


def hub_backbone_file() -> Path:
    """Where torch hub (and so torchvision) caches the SqueezeNet 1.1 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILE


def load_lpips_model(backbone: str | Path | None = None) -> Lpips:
    """LPIPS with the SqueezeNet weights from `backbone` (a torchvision state-dict file) or from torch
    hub's cache. Any problem with either weights file is a one-line Unavailable."""
    path = Path(backbone) if backbone is not None else hub_backbone_file()
    if not path.is_file():
        hint = "" if backbone is not None else " (or pass --lpips-backbone FILE)"
        raise Unavailable(f"SqueezeNet 1.1 weights not found at {path}{hint}")
    features = squeezenet1_1_features()
    state = _read_state_dict(path)
    prefixed = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    try:
        features.load_state_dict(prefixed)
    except RuntimeError as error:
        raise Unavailable(f"{path} is not torchvision's SqueezeNet 1.1 state dict "
                               f"({first_line(error)[:160]})") from None
    linear = _read_state_dict(linear_weights_file())
    weights = [linear.get(f"lin{i}.model.1.weight") for i in range(len(CHANNELS))]
    if any(w is None or tuple(w.shape) != (1, c, 1, 1) for w, c in zip(weights, CHANNELS)):
        raise Unavailable(f"{linear_weights_file()} does not hold LPIPS' SqueezeNet linear layers")
    return Lpips(features, weights)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is "unavailable", in one line
        raise Unavailable(f"cannot read {path} ({type(error).__name__}: {first_line(error)[:120]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise Unavailable(f"{path} is not a state dict of tensors")
    return state
