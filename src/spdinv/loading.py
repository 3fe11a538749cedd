"""Building a diffusers pipeline from what a user has on disk, offline: a diffusers folder (or a
hub id already in the local cache), optionally one of its weight variants (fp16), or one
single-file checkpoint (.safetensors, or a pickled .ckpt) with a local diffusers folder of the
same family for its configuration. The family is read before anything heavy loads, so that an
unsupported model is refused in one line (families.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .errors import SpdinvError, first_line
from .families import FLUX, SD, SD3, SDXL, ModelFamily, family_of

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# diffusers' single-file model types (infer_diffusers_model_type) by prefix -> the pipeline class
# that model type belongs to, so that families.py names it.
_CHECKPOINT_PIPELINES = (
    ("inpainting", "StableDiffusionInpaintPipeline"), ("xl_inpaint", "StableDiffusionXLInpaintPipeline"),
    ("v1", "StableDiffusionPipeline"), ("v2", "StableDiffusionPipeline"), ("xl_base", "StableDiffusionXLPipeline"),
    ("xl_refiner", "StableDiffusionXLImg2ImgPipeline"), ("upscale", "StableDiffusionUpscalePipeline"),
    ("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline"), ("chroma", "ChromaPipeline"),
    ("stable_cascade", "StableCascadePipeline"),
)


class PickleCheckpointWarning(UserWarning):
    """A .ckpt-style checkpoint is a Python pickle: loading one from an untrusted source can run code."""


def pipeline_class(family: ModelFamily):
    import diffusers

    names = {SD: "StableDiffusionPipeline", SDXL: "StableDiffusionXLPipeline", SD3: "StableDiffusion3Pipeline",
             FLUX: "FluxPipeline"}
    return getattr(diffusers, names[family])


def _extra_arguments(family: ModelFamily) -> dict:
    return {"safety_checker": None, "requires_safety_checker": False} if family is SD else {}


def _index(source: str) -> dict:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(source, local_files_only=True)
    except (OSError, ValueError) as error:
        raise SpdinvError(f"cannot load model {source!r}: not a diffusers folder with a model_index.json, a hub id "
                          f"in the local cache, or a {'/'.join(SINGLE_FILE_SUFFIXES[:2])} checkpoint "
                          f"({first_line(error)})") from None


def folder_family(source: str) -> ModelFamily:
    """The family of a diffusers folder or cached hub id, from model_index.json's _class_name."""
    return family_of(_index(source).get("_class_name"), source)


def absent_components(index: dict) -> dict:
    """Components the folder saved as absent ([null, null], e.g. SD3 without T5: text_encoder_3),
    passed as None, as a user of the stock pipeline does (`text_encoder_3=None, tokenizer_3=None`)."""
    return {name: None for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value == [None, None]}


def load_folder(source: str, dtype: torch.dtype, variant: str | None = None):
    """The pipeline of a diffusers folder or cached hub id."""
    family = folder_family(source)
    absent = absent_components(_index(source)) if family.objective == "flow" else {}
    try:
        pipe = pipeline_class(family).from_pretrained(source, dtype=dtype, local_files_only=True,
                                                      variant=variant, **_extra_arguments(family), **absent)
    except (OSError, ValueError, TypeError) as error:
        hint = ""
        if variant is None and Path(source).is_dir() and any(Path(source).rglob("*.fp16.*")):
            hint = " (it holds fp16-variant weights: pass --variant fp16)"
        raise SpdinvError(f"cannot load model {source!r}: {first_line(error)}{hint}") from None
    return pipe


def checkpoint_family(checkpoint: dict, source: str) -> tuple[ModelFamily, str]:
    """(family, diffusers' model type) of a single-file checkpoint, from its tensor names."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    model_type = infer_diffusers_model_type(checkpoint)
    class_name = next((name for prefix, name in _CHECKPOINT_PIPELINES if model_type.startswith(prefix)), model_type)
    return family_of(class_name, source), model_type


def local_path(source: str) -> Path | None:
    """Where a model's files are on disk: the path itself, or a hub id's snapshot in the local cache."""
    from huggingface_hub import snapshot_download

    if Path(source).exists():
        return Path(source)
    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not a cached repo id (huggingface_hub raises several kinds)
        return None


def _cached_config(checkpoint: dict) -> str | None:
    """The local Hugging Face cache's copy of the diffusers configs diffusers would fetch for this
    checkpoint, or None (nothing is downloaded)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download

    repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    try:
        return snapshot_download(repo, local_files_only=True, allow_patterns=["*.json", "*.txt"])
    except Exception:  # not cached (huggingface_hub raises several kinds): the user must name a folder
        return None


def load_single_file(path: Path, dtype: torch.dtype, config: str | None = None):
    """The pipeline of a single-file checkpoint; `config` names a local diffusers folder of the
    same family (its configs, tokenizers and scheduler are used; its weights are not)."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise SpdinvError(f"cannot load model {str(path)!r}: a single-file checkpoint must be one of "
                          f"{', '.join(SINGLE_FILE_SUFFIXES)}")
    if path.suffix in PICKLE_SUFFIXES:
        warnings.warn(f"{path.name} is a pickle checkpoint (read with torch.load(weights_only=True), which limits "
                      "but does not remove the risk of running code it carries): load .ckpt files only from sources "
                      "you trust, prefer .safetensors", PickleCheckpointWarning, stacklevel=3)
    if config is not None and not Path(config).is_dir():
        raise SpdinvError(f"--config {config!r} is not a folder (expected a local diffusers model folder)")
    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as error:  # safetensors, torch.load and pickle each raise their own kinds
        raise SpdinvError(f"cannot read checkpoint {str(path)!r}: {first_line(error)}") from None
    family, model_type = checkpoint_family(checkpoint, str(path))
    if config is not None:
        if folder_family(config) is not family:
            raise SpdinvError(f"{path.name} is a {family.name} checkpoint ({model_type}) but --config {config} is a "
                              f"{folder_family(config).name} folder: pass a folder of the checkpoint's family")
    else:
        config = _cached_config(checkpoint)
        if config is None:
            raise SpdinvError(f"{path.name} is a {family.name} checkpoint ({model_type}) but the file carries no "
                              f"configuration and none is in the local cache: pass --config DIR, a local diffusers "
                              f"folder of the same family (its configs, tokenizer and scheduler are used)")
    del checkpoint  # diffusers reads the file again; do not hold two copies
    try:
        pipe = pipeline_class(family).from_single_file(str(path), config=str(config), dtype=dtype,
                                                       local_files_only=True, **_extra_arguments(family))
    except Exception as error:  # diffusers' converters raise KeyError, RuntimeError (shapes), ValueError, ...
        raise SpdinvError(f"cannot load {path.name} with the configuration of {config}: {first_line(error)}") from None
    return pipe
