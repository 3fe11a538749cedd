"""PIE-Bench's metrics, as its evaluator defines them, plus the world's ground-truth metrics and the
inversion's own costs.

- structure_distance: DINO ViT-B/8, keys of the last block, cosine self-similarity matrix (tokens
  x tokens, CLS included) of the source and of the edit; MSE between the two. Whole image.
- psnr / lpips / mse / ssim: background preservation, on both images multiplied by (1 - mask)
  over the full frame; NaN when the mask covers everything.
- clip_whole / clip_edited: CLIPScore (100 max(cos, 0)) of the edit, and of the edit multiplied
  by the mask, against the target prompt.
- gt_psnr / gt_ssim: the edit multiplied by the mask against the rendered target multiplied by the
  mask (world export only); edit_accuracy: 1 when the attribute classifier reads the target scene
  from the edit.
- noise_error, reconstruction_error, network_calls, seconds: the inversion's; edit_seconds: the
  whole edit's wall time; edit_rows: every network row the edit's sampling evaluated.

Evaluation models load from local paths or hub ids with `local_files_only`; one that is absent
makes its metrics unavailable (reported once, in one line) and everything else still runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..errors import SpdinvError, Unavailable, first_line
from ..images import psnr

# metric name -> the evaluation model it needs (None: none)
METRICS: dict[str, str | None] = {
    "structure_distance": "dino",
    "psnr": None, "lpips": "lpips", "mse": None, "ssim": None,
    "clip_whole": "clip", "clip_edited": "clip",
    "gt_psnr": None, "gt_ssim": None, "edit_accuracy": "classifier",
    "noise_error": None, "reconstruction_error": None, "network_calls": None, "seconds": None, "edit_seconds": None,
    "edit_rows": None,
}
TIMING_METRICS = ("seconds", "edit_seconds")  # wall-clock: differ between otherwise identical runs
DEFAULT_DINO = "facebook/dino-vitb8"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
UNIT_RANGE = (0.0, 1.0)  # the benchmark scores images in [0, 1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_metrics(text: str | list[str] | None) -> list[str]:
    """Metric names from "a,b" or a list, in METRICS order; None or "all" = every metric."""
    if text is None or text == "all":
        return list(METRICS)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise SpdinvError(f"unknown metric {', '.join(unknown) or repr(text)}; valid: {', '.join(METRICS)}")
    return [n for n in METRICS if n in names]


# ---------------------------------------------------------------- image helpers


def to_unit(image: Image.Image) -> Tensor:
    """PIL RGB -> (1, 3, H, W) float in [0, 1] (via uint8, as the evaluator reads saved images)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def mask_tensor(mask: np.ndarray) -> Tensor:
    """(H, W) {0, 1} -> (1, 1, H, W) float."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]


# ---------------------------------------------------------------- pixel metrics (torchmetrics)


def mse(a: Tensor, b: Tensor) -> float:
    from torchmetrics.functional.regression import mean_squared_error

    return float(mean_squared_error(a.contiguous(), b.contiguous()))


# SSIM as PIE-Bench's evaluator computed it (torchmetrics <= 1.4.1): gaussian window 11, sigma 1.5,
# data range 1, and the mean taken over the map without its 5-pixel border (torchmetrics >= 1.4.2
# averages the whole, reflect-padded map instead: +0.3 to +2 on the x100 scale).
SSIM_VARIANT = "gaussian 11 / sigma 1.5, 5-px border of the SSIM map dropped (torchmetrics <= 1.4.1, as PIE-Bench)"
SSIM_KERNEL, SSIM_SIGMA = 11, 1.5


def ssim(a: Tensor, b: Tensor) -> float:
    """Mean SSIM of images in [0, 1] over the valid (unpadded) window positions: the official variant,
    computed here so that it does not change with the installed torchmetrics."""
    if min(a.shape[-2:]) < SSIM_KERNEL:
        raise SpdinvError(f"SSIM needs images of at least {SSIM_KERNEL}x{SSIM_KERNEL} pixels, got {tuple(a.shape[-2:])}")
    channels = a.shape[1]
    offsets = torch.arange(SSIM_KERNEL, dtype=torch.float32) - (SSIM_KERNEL - 1) / 2
    gauss = torch.exp(-((offsets / SSIM_SIGMA) ** 2) / 2)
    gauss = gauss / gauss.sum()
    kernel = torch.outer(gauss, gauss).expand(channels, 1, SSIM_KERNEL, SSIM_KERNEL).to(a)
    blur = lambda x: F.conv2d(x, kernel, groups=channels)  # noqa: E731 - no padding: the border is dropped
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    covariance = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * covariance + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def background_scores(source: Tensor, edited: Tensor, mask: Tensor,
                      lpips: Callable[[Tensor, Tensor], float] | None = None) -> dict[str, float]:
    """psnr, mse, ssim (and lpips when given) of both images multiplied by (1 - mask); NaN when
    the mask covers the whole frame (PIE-Bench's rule: such rows are skipped in averages)."""
    keep = 1.0 - mask
    if not keep.any():
        return {name: math.nan for name in ("psnr", "mse", "ssim", "lpips")}
    a, b = source * keep, edited * keep
    scores = {"psnr": psnr(a, b, UNIT_RANGE), "mse": mse(a, b), "ssim": ssim(a, b)}
    if lpips is not None:
        scores["lpips"] = lpips(a, b)
    return scores


def region_scores(edited: Tensor, target: Tensor, mask: Tensor) -> dict[str, float]:
    """gt_psnr and gt_ssim: the edit region (both images multiplied by the mask) against the truth."""
    if not mask.any():
        return {"gt_psnr": math.nan, "gt_ssim": math.nan}
    a, b = edited * mask, target * mask
    return {"gt_psnr": psnr(a, b, UNIT_RANGE), "gt_ssim": ssim(a, b)}


# ---------------------------------------------------------------- structure distance (DINO keys)


def cosine_self_similarity(tokens: Tensor, eps: float = 1e-8) -> Tensor:
    """(T, D) -> (T, T) cosine similarities, norms clamped at eps as in PIE-Bench's evaluator."""
    norms = tokens.norm(dim=-1, keepdim=True)
    return (tokens @ tokens.T) / (norms @ norms.T).clamp(min=eps)


def _last_key_projection(model: torch.nn.Module) -> torch.nn.Module:
    """The key projection of the ViT's last attention block (named k_proj or attention.key
    depending on the transformers version)."""
    keys = [m for name, m in model.named_modules() if name.endswith(("k_proj", "attention.key"))]
    if not keys:
        raise SpdinvError("the structure model has no attention key projections; is it a ViT?")
    return keys[-1]


STRUCTURE_RESIZES = {  # how the structure distance brings images to the ViT's size
    "official": False,  # bilinear without antialiasing: torchvision 0.13's tensor Resize, PIE-Bench's evaluator
    "antialias": True,  # bilinear with antialiasing: torchvision >= 0.17's default
}


class StructureDistance:
    """MSE between the DINO key self-similarity matrices of two images.

    `official_scale`: PIE-Bench's evaluator feeds pixel values in [0, 255] (it never divides by
    255) through the ImageNet normalisation; True reproduces its numbers, False uses [0, 1].
    `resize`: a STRUCTURE_RESIZES key."""

    def __init__(self, model: torch.nn.Module, official_scale: bool = True, resize: str = "official"):
        if resize not in STRUCTURE_RESIZES:
            raise SpdinvError(f"unknown structure resize {resize!r}; valid: {', '.join(STRUCTURE_RESIZES)}")
        self.model = model.eval().requires_grad_(False)
        self.size = int(model.config.image_size)
        self.official_scale = official_scale
        self.resize = resize
        self._key_projection = _last_key_projection(model)

    def _prepare(self, image01: Tensor) -> Tensor:
        pixels = image01 * 255.0 if self.official_scale else image01
        pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", align_corners=False,
                               antialias=STRUCTURE_RESIZES[self.resize])
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (pixels - mean) / std

    @torch.no_grad()
    def keys_self_similarity(self, image01: Tensor) -> Tensor:
        captured: list[Tensor] = []
        handle = self._key_projection.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            device = next(self.model.parameters()).device
            self.model(pixel_values=self._prepare(image01).to(device))
        finally:
            handle.remove()
        # (1, T, heads*d): the per-head keys concatenated, exactly what the evaluator builds
        return cosine_self_similarity(captured[-1][0].float().cpu())

    def __call__(self, source01: Tensor, edited01: Tensor) -> float:
        return float(F.mse_loss(self.keys_self_similarity(edited01), self.keys_self_similarity(source01)))


# ---------------------------------------------------------------- CLIP score


class _FeatureTensors(torch.nn.Module):
    """A CLIPModel whose get_image/text_features return the projected embeddings as tensors:
    transformers 5 returns output objects there, which torchmetrics (<= 1.9) cannot read."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return _embedding(self.model.get_text_features(*args, **kwargs))


def _embedding(output) -> Tensor:
    return output if isinstance(output, Tensor) else output.pooler_output


class ClipScorer:
    """torchmetrics' CLIPScore, 100 * max(cos(image, text), 0), with a model loaded by us."""

    def __init__(self, model: torch.nn.Module, processor):
        self.model = _FeatureTensors(model.eval().requires_grad_(False))
        self.processor = processor

    @torch.no_grad()
    def __call__(self, image01: Tensor, text: str) -> float:
        from torchmetrics.functional.multimodal import clip_score

        pixels = (image01[0] * 255).round().to(torch.uint8)
        device = next(self.model.parameters()).device
        return float(clip_score(pixels.to(device), text, model_name_or_path=lambda: (self.model, self.processor)))

    def whole_and_edited(self, edited01: Tensor, mask: Tensor, text: str) -> dict[str, float]:
        scores = {"clip_whole": self(edited01, text)}
        scores["clip_edited"] = self(edited01 * mask, text) if mask.any() else math.nan
        return scores


# ---------------------------------------------------------------- edit accuracy (world)


def scene_from_dict(data: dict):
    from ..world.scene import Scene, WorldObject

    return Scene(objects=tuple(WorldObject(**o) for o in data["objects"]), background=data["background"],
                 background_kind=data.get("background_kind", "plain"))


class EditJudge:
    """The attribute classifier as judge: 1.0 when it reads the target scene from the edit."""

    def __init__(self, classifier: torch.nn.Module):
        self.classifier = classifier

    def __call__(self, edited: Image.Image, target_scene: dict) -> float:
        from ..world.classifier import compare, read_scenes

        image = edited.convert("RGB")
        if image.size != (64, 64):
            image = image.resize((64, 64), Image.LANCZOS)
        pixels = to_unit(image) * 2 - 1
        reading = read_scenes(self.classifier, pixels)[0]
        return float(compare(reading, scene_from_dict(target_scene))["all"])


# ---------------------------------------------------------------- loading the evaluation models


@dataclass
class EvaluationModels:
    """Where the evaluation models come from: local folders or hub ids (local files only)."""

    dino: str | None = DEFAULT_DINO
    clip: str | None = DEFAULT_CLIP
    lpips_backbone: str | None = None  # SqueezeNet 1.1 weights file; None: torch hub's cache
    classifier: str | None = None  # None: the packaged attribute classifier
    device: str = "cpu"
    structure_resize: str = "official"  # a STRUCTURE_RESIZES key


def load_dino(name: str, device: str = "cpu", resize: str = "official") -> StructureDistance:
    from transformers import ViTModel

    try:
        model = ViTModel.from_pretrained(name, add_pooling_layer=False, local_files_only=True)
    except (OSError, ValueError) as error:
        raise Unavailable(f"DINO model {name!r} is neither a folder nor in the Hugging Face cache "
                          f"(pass --dino PATH; {first_line(error)[:120]})") from None
    return StructureDistance(model.to(device), resize=resize)


def clip_image_processor_class():
    """The PIL/numpy CLIP image processor (PIL bicubic resize), pinned: the paper's transformers 4.x
    used it, and transformers 5 would pick its torchvision backend whenever torchvision is importable
    (pixel values differ by up to 0.015). It is `CLIPImageProcessorPil` in transformers 5 and
    `CLIPImageProcessor` in 4.x."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def load_clip(name: str, device: str = "cpu") -> ClipScorer:
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(name, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(name, local_files_only=True)
        processor.image_processor = clip_image_processor_class().from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as error:
        raise Unavailable(f"CLIP model {name!r} is neither a folder nor in the Hugging Face cache "
                          f"(pass --clip PATH; {first_line(error)[:120]})") from None
    return ClipScorer(model.to(device), processor)


def load_lpips(backbone: str | None, device: str = "cpu") -> Callable[[Tensor, Tensor], float]:
    """LPIPS (SqueezeNet, inputs in [-1, 1]) as PIE-Bench's torchmetrics computes it, built without
    torchvision (see bench/lpips.py); the SqueezeNet weights come from `backbone` or torch hub's cache,
    never from the network."""
    from .lpips import load_lpips_model

    model = load_lpips_model(backbone).to(device)

    def lpips(a01: Tensor, b01: Tensor) -> float:
        return float(model(a01.to(device) * 2 - 1, b01.to(device) * 2 - 1).mean())

    return lpips


def load_judge(path: str | None) -> EditJudge:
    from ..world.classifier import CLASSIFIER_PATH, load_classifier

    path = Path(path) if path else CLASSIFIER_PATH
    if not path.is_file():
        raise Unavailable(f"the attribute classifier is not at {path}")
    return EditJudge(load_classifier(path))


# ---------------------------------------------------------------- the evaluator


@dataclass
class Sample:
    """One edit to score. Images are PIL at the dataset's resolution; mask (H, W) in {0, 1}."""

    source: Image.Image
    edited: Image.Image
    mask: np.ndarray
    target_prompt: str
    target: Image.Image | None = None
    target_scene: dict | None = None
    inversion: object | None = None  # spdinv.inversion.Inversion
    edit_seconds: float = math.nan
    edit_rows: float = math.nan  # network rows the edit evaluated (FlowEdit's whole cost: it inverts nothing)


@dataclass
class Evaluator:
    """Scores samples on the chosen metrics; models for metrics nobody asked for are not loaded."""

    metrics: list[str]
    models: EvaluationModels = field(default_factory=EvaluationModels)
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> reason
    notices: list[str] = field(default_factory=list)  # one line per absent evaluation model

    def __post_init__(self) -> None:
        self.metrics = parse_metrics(self.metrics)
        needed = {METRICS[m] for m in self.metrics} - {None}
        loaders = {
            "dino": lambda: (load_dino(self.models.dino, self.models.device, self.models.structure_resize)
                             if self.models.dino else None),
            "clip": lambda: load_clip(self.models.clip, self.models.device) if self.models.clip else None,
            "lpips": lambda: load_lpips(self.models.lpips_backbone, self.models.device),
            "classifier": lambda: load_judge(self.models.classifier),
        }
        self._scorers: dict[str, object] = {}
        for kind in sorted(needed):
            try:
                scorer = loaders[kind]()
                if scorer is None:
                    raise Unavailable(f"switched off (--{kind} none)")
                self._scorers[kind] = scorer
            except Unavailable as reason:
                names = [m for m in self.metrics if METRICS[m] == kind]
                self.unavailable.update({m: str(reason) for m in names})
                self.notices.append(f"{', '.join(names)} unavailable: {reason}")

    def evaluate(self, sample: Sample) -> dict[str, float]:
        """{metric: value} for every chosen metric; NaN where it does not apply or is unavailable."""
        source, edited = to_unit(sample.source), to_unit(sample.edited)
        if edited.shape != source.shape:
            raise SpdinvError(f"edited image is {tuple(edited.shape[2:])}, source {tuple(source.shape[2:])}")
        mask = mask_tensor(sample.mask)
        wanted = set(self.metrics) - set(self.unavailable)
        scores: dict[str, float] = {}
        if wanted & {"psnr", "mse", "ssim", "lpips"}:
            scores.update(background_scores(source, edited, mask, self._scorers.get("lpips")))
        if "structure_distance" in wanted:
            scores["structure_distance"] = self._scorers["dino"](source, edited)
        if wanted & {"clip_whole", "clip_edited"}:
            scores.update(self._scorers["clip"].whole_and_edited(edited, mask, sample.target_prompt))
        if wanted & {"gt_psnr", "gt_ssim"} and sample.target is not None:
            scores.update(region_scores(edited, to_unit(sample.target.resize(sample.source.size)), mask))
        if "edit_accuracy" in wanted and sample.target_scene is not None:
            scores["edit_accuracy"] = self._scorers["classifier"](sample.edited, sample.target_scene)
        scores.update(inversion_costs(sample.inversion))
        scores["edit_seconds"] = sample.edit_seconds
        scores["edit_rows"] = sample.edit_rows
        return {m: float(scores.get(m, math.nan)) if m in wanted else math.nan for m in self.metrics}


def inversion_costs(inversion) -> dict[str, float]:
    if inversion is None:
        return {}
    return {
        "noise_error": _or_nan(inversion.noise_error),
        "reconstruction_error": _or_nan(inversion.reconstruction_error),
        "network_calls": float(inversion.network_calls),
        "seconds": float(inversion.seconds),
    }


def _or_nan(value) -> float:
    return math.nan if value is None else float(value)
