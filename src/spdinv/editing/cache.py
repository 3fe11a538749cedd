"""An on-disk cache of inversions, so that trying several engines or target prompts on one image
inverts it once. Entries are `export.save_inversion` folders named by a hash of the image's
pixels, the model (name, a weight fingerprint, its files' sizes and times, its prediction type and
the inversion schedule), the prompt, the method, the steps, the seed and the method's full
settings; they are written all-or-nothing with a manifest of checksums (spdinv.outputs) and
checked when read."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch import Tensor

from ..errors import SpdinvError
from ..images import conform_image
from ..inversion import Inversion, check_steps, invert, make_options
from ..model import DiffusionModel
from ..outputs import check_manifest, check_output_dir, staged_output

CACHE_VERSION = 2  # 2: entries carry a manifest of checksums; DirectInversion pins instead of storing offsets


def default_cache_dir() -> Path:
    """$SPDINV_CACHE, else $XDG_CACHE_HOME/spdinv/inversions, else ~/.cache/spdinv/inversions."""
    if os.environ.get("SPDINV_CACHE"):
        return Path(os.environ["SPDINV_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spdinv" / "inversions"


def model_fingerprint(model: DiffusionModel) -> str:
    """A hash of a few weight tensors: retraining or swapping a model under the same name changes it."""
    digest = hashlib.sha256()
    if model.unet is not None:
        tensors = [model.unet.conv_in.weight, model.unet.conv_out.weight, model.unet.time_embedding.linear_1.weight]
    else:  # a flow transformer: its first and last parameters (patch embedding, output projection)
        parameters = list(model.transformer.parameters())
        tensors = [parameters[0], parameters[-1]]
    tensors += [model.vae.encoder.conv_in.weight, model.vae.decoder.conv_out.weight,
                model.text_encoder.get_input_embeddings().weight[:256]]
    if model.text_encoder_2 is not None:  # SDXL's second encoder
        tensors.append(model.text_encoder_2.get_input_embeddings().weight[:256])
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _image_bytes(model: DiffusionModel, image: Image.Image | Tensor) -> bytes:
    if isinstance(image, Image.Image):
        conformed = conform_image(image, model.image_size)[0]
        return f"{conformed.size}".encode() + conformed.tobytes()
    return f"{tuple(image.shape)}".encode() + image.detach().float().cpu().contiguous().numpy().tobytes()


@dataclass
class InversionCache:
    """Inversions on disk under `root`; counts its hits and misses."""

    root: Path
    hits: int = 0
    misses: int = 0
    dropped: int = 0  # damaged entries removed
    problem: str | None = None  # why the last store failed

    def key(self, model: DiffusionModel, image: Image.Image | Tensor, prompt: str, method: str, steps: int,
            seed: int, options: dict) -> str:
        settings = dataclasses.asdict(make_options(method, **options))
        schedule = model.schedule(check_steps(steps))
        payload = {"version": CACHE_VERSION, "model": model.name, "weights": model_fingerprint(model),
                   "files": model.files, "prediction_type": model.prediction_type,
                   "schedule": schedule.key(),
                   "dtype": str(model.dtype), "prompt": prompt, "method": method, "steps": steps, "seed": seed,
                   "settings": settings}
        if model.concept is not None:
            payload["concept"] = model.concept.fingerprint
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
        digest.update(_image_bytes(model, image))
        return f"{method}-{digest.hexdigest()[:32]}"

    def load(self, key: str, model: DiffusionModel, steps: int) -> Inversion | None:
        """The cached inversion, or None when absent. An entry whose files differ from their
        checksums, or whose tensors are not finite or not of the model's shapes, is removed (a miss:
        it is computed and stored again)."""
        from ..export import load_inversion

        folder = self.root / key
        if not folder.is_dir():
            return None
        try:
            problems = check_manifest(folder)
            if problems:
                raise ValueError(problems[0])
            inversion = load_inversion(folder, model)
            check_entry(inversion, model, steps)
        except Exception:  # noqa: BLE001 - whatever is wrong with an entry, it is dropped
            shutil.rmtree(folder, ignore_errors=True)
            self.dropped += 1
            return None
        return inversion

    def unusable(self) -> str | None:
        """Why the cache folder cannot be written (a file, read-only, ...), or None."""
        try:
            check_output_dir(self.root, "cache")
        except SpdinvError as error:
            return str(error)
        return None

    def store(self, key: str, inversion: Inversion) -> None:
        """Write the entry all-or-nothing (spdinv.outputs: staged, renamed into place, with a
        manifest of checksums); a non-finite inversion is not stored; a failure is not fatal (the
        cache is an optimisation) but kept in `problem`."""
        from ..export import save_inversion

        if not all(bool(t.isfinite().all()) for t in _tensors(inversion)):
            return
        try:
            with staged_output(self.root / key) as staging:
                save_inversion(inversion, staging)
        except SpdinvError as error:
            self.problem = str(error)

    def invert(self, model: DiffusionModel, image: Image.Image | Tensor, prompt: str, method: str, steps: int, *,
               seed: int = 0, progress: bool = False, diagnose: bool = False, **options) -> tuple[Inversion, bool]:
        """(inversion, whether it came from the cache); `diagnose` as invert() (not part of the key)."""
        key = self.key(model, image, prompt, method, steps, seed, options)
        cached = self.load(key, model, steps)
        if cached is not None:
            self.hits += 1
            return cached, True
        self.misses += 1
        inversion = invert(model, image, prompt, method, steps, seed=seed, diagnose=diagnose, progress=progress,
                           **options)
        self.store(key, inversion)
        return inversion, False


@dataclass
class LastInversion:
    """The most recent inversion, in memory: a benchmark edits one image with every engine in turn,
    so each method inverts an image once. The same `invert` as InversionCache; `diagnose` (here,
    or per call) asks the inversions for their diagnostics."""

    diagnose: bool = False
    hits: int = 0
    misses: int = 0
    _last: tuple[tuple, Inversion] | None = None

    def invert(self, model: DiffusionModel, image: Image.Image | Tensor, prompt: str, method: str, steps: int, *,
               seed: int = 0, progress: bool = False, diagnose: bool = False, **options) -> tuple[Inversion, bool]:
        """(inversion, whether it was the last one computed)."""
        diagnose = diagnose or self.diagnose
        key = (id(model), None if model.concept is None else model.concept.fingerprint,
               hashlib.sha256(_image_bytes(model, image)).hexdigest(), prompt, method, steps, seed,
               json.dumps(options, sort_keys=True, default=str), diagnose)
        if self._last is not None and self._last[0] == key:
            self.hits += 1
            return self._last[1], True
        from .. import inversion as methods  # looked up at call time, so a patched `invert` is the one called

        self.misses += 1
        inversion = methods.invert(model, image, prompt, method, steps, seed=seed, diagnose=diagnose,
                                   progress=progress, **options)
        self._last = key, inversion
        return inversion, False


def _tensors(inversion: Inversion) -> list[Tensor]:
    side = inversion.uncond_embeddings
    return [inversion.trajectory, inversion.prompt_embedding, *([] if side is None else [side])]


def check_entry(inversion: Inversion, model: DiffusionModel, steps: int) -> None:
    """ValueError unless a loaded inversion has the model's latent and embedding shapes, `steps`
    steps, and finite values."""
    side = model.image_size // model.vae_scale_factor
    latent = (steps + 1, int(model.vae.config.latent_channels), side, side)
    if model.is_flow:  # a flow model inverts any size of whole patches (FLUX: the schedule follows the size)
        h, w = inversion.trajectory.shape[-2:]
        latent = latent[:2] + ((h, w) if h % model.patch == 0 == w % model.patch else (side, side))
    if tuple(inversion.trajectory.shape) != latent:
        raise ValueError(f"trajectory {tuple(inversion.trajectory.shape)}, expected {latent}")
    config = model.denoiser.config  # the width of the text states the network attends to (SDXL: both encoders')
    if inversion.prompt_embedding.shape[-1] != config.get("cross_attention_dim", config.get("joint_attention_dim")):
        raise ValueError("prompt embedding of another width")
    if not all(bool(t.isfinite().all()) for t in _tensors(inversion)):
        raise ValueError("non-finite values")


__all__ = ["InversionCache", "check_entry", "default_cache_dir", "model_fingerprint"]
