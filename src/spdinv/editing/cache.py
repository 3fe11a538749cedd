"""An on-disk cache of inversions, so that trying several engines or target prompts on one image
inverts it once. Entries are `export.save_inversion` folders named by a hash of the image's
pixels, the model (name, a weight fingerprint, its files' sizes and times, its prediction type and
the inversion schedule), the prompt, the method, the steps, the seed
and the method's full settings; they are written to a temporary folder and renamed into place."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch import Tensor

from ..images import conform_image
from ..inversion import Inversion, check_steps, invert, make_options
from ..model import DiffusionModel

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """$SPDINV_CACHE, else $XDG_CACHE_HOME/spdinv/inversions, else ~/.cache/spdinv/inversions."""
    if os.environ.get("SPDINV_CACHE"):
        return Path(os.environ["SPDINV_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spdinv" / "inversions"


def model_fingerprint(model: DiffusionModel) -> str:
    """A hash of a few weight tensors: retraining or swapping a model under the same name changes it."""
    digest = hashlib.sha256()
    tensors = [model.unet.conv_in.weight, model.unet.conv_out.weight, model.unet.time_embedding.linear_1.weight,
               model.vae.encoder.conv_in.weight, model.vae.decoder.conv_out.weight,
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

    def key(self, model: DiffusionModel, image: Image.Image | Tensor, prompt: str, method: str, steps: int,
            seed: int, options: dict) -> str:
        settings = dataclasses.asdict(make_options(method, **options))
        schedule = model.schedule(check_steps(steps))
        payload = {"version": CACHE_VERSION, "model": model.name, "weights": model_fingerprint(model),
                   "files": model.files, "prediction_type": model.prediction_type,
                   "schedule": [schedule.timesteps, [float(schedule.abar(k)) for k in range(steps + 1)]],
                   "dtype": str(model.dtype), "prompt": prompt, "method": method, "steps": steps, "seed": seed,
                   "settings": settings}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
        digest.update(_image_bytes(model, image))
        return f"{method}-{digest.hexdigest()[:32]}"

    def load(self, key: str, model: DiffusionModel) -> Inversion | None:
        """The cached inversion, or None when absent or unreadable."""
        from ..export import load_inversion

        folder = self.root / key
        if not (folder / "trajectory.safetensors").is_file():
            return None
        try:
            return load_inversion(folder, model)
        except Exception:  # a damaged entry is a miss; it gets rewritten
            return None

    def store(self, key: str, inversion: Inversion) -> None:
        """Write the entry atomically (a temporary folder renamed into place); errors are not fatal."""
        from ..export import save_inversion

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        except OSError:
            return
        try:
            save_inversion(inversion, staging)
            final = self.root / key
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
        except OSError:
            pass  # another process won the race, or the disk is read-only: the cache is an optimisation
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def invert(self, model: DiffusionModel, image: Image.Image | Tensor, prompt: str, method: str, steps: int, *,
               seed: int = 0, progress: bool = False, **options) -> tuple[Inversion, bool]:
        """(inversion, whether it came from the cache)."""
        key = self.key(model, image, prompt, method, steps, seed, options)
        cached = self.load(key, model)
        if cached is not None:
            self.hits += 1
            return cached, True
        self.misses += 1
        inversion = invert(model, image, prompt, method, steps, seed=seed, diagnose=False, progress=progress, **options)
        self.store(key, inversion)
        return inversion, False


__all__ = ["InversionCache", "default_cache_dir", "model_fingerprint"]
