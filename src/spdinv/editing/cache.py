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
from ..images import Framing
from ..inversion import Inversion, check_steps, options_for, run_method
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


def _image_bytes(model: DiffusionModel, image: Image.Image | Tensor, framing: Framing | None) -> bytes:
    if isinstance(image, Image.Image):
        conformed = model.fit(image, framing)[0]
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
            seed: int, options: object, framing: Framing | None = None) -> str:
        """The entry's name; `options` is the method's options dataclass (every setting is keyed)."""
        settings = dataclasses.asdict(options)
        schedule = model.schedule(check_steps(steps))
        payload = {"version": CACHE_VERSION, "model": model.name, "weights": model_fingerprint(model),
                   "files": model.files, "prediction_type": model.prediction_type,
                   "schedule": schedule.key(),
                   "dtype": str(model.dtype), "prompt": prompt, "method": method, "steps": steps, "seed": seed,
                   "settings": settings}
        if model.concept is not None:
            payload["concept"] = model.concept.fingerprint
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
        digest.update(_image_bytes(model, image, framing))
        return f"{method}-{digest.hexdigest()[:32]}"

    def load(self, key: str, model: DiffusionModel, steps: int, latent_hw: tuple[int, int] | None = None
             ) -> Inversion | None:
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
            check_entry(inversion, model, steps, latent_hw)
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
        except (SpdinvError, OSError) as error:  # a full disk, a read-only cache: the edit goes on without it
            self.problem = str(error).splitlines()[0] if str(error) else type(error).__name__

    def invert(self, model: DiffusionModel, image: Image.Image | Tensor, prompt: str, method: str, steps: int, *,
               options: object | None = None, seed: int = 0, progress: bool = False, diagnose: bool = False,
               allow_empty_prompt: bool = False, framing: Framing | None = None) -> tuple[Inversion, bool]:
        """(inversion, whether it came from the cache); `options` is the method's options dataclass
        (None: its defaults); `diagnose` and `allow_empty_prompt` as invert() (not part of the key); a
        PIL image is fitted as `framing` says (`images.Framing`) and keyed at that size."""
        options = options_for(method) if options is None else options
        image, framing = fitted(model, image, framing)
        key = self.key(model, image, prompt, method, steps, seed, options, framing)
        cached = self.load(key, model, steps, latent_hw(model, image))
        if cached is not None:
            self.hits += 1
            return cached, True
        self.misses += 1
        inversion = run_method(model, image, prompt, method, steps, options, seed=seed, diagnose=diagnose,
                               progress=progress, allow_empty_prompt=allow_empty_prompt, framing=framing)
        self.store(key, inversion)
        return inversion, False


def _tensors(inversion: Inversion) -> list[Tensor]:
    side = inversion.uncond_embeddings
    return [inversion.trajectory, inversion.prompt_embedding, *([] if side is None else [side])]


def fitted(model: DiffusionModel, image: Image.Image | Tensor, framing: Framing | None
           ) -> tuple[Image.Image | Tensor, Framing | None]:
    """A PIL image fitted to the model once, with the framing that keeps it as it is."""
    if not isinstance(image, Image.Image):
        return image, framing
    image = model.fit(image, framing)[0]
    return image, Framing(size=image.size)


def latent_hw(model: DiffusionModel, image: Image.Image | Tensor) -> tuple[int, int]:
    height, width = (image.size[1], image.size[0]) if isinstance(image, Image.Image) else tuple(image.shape[-2:])
    return height // model.vae_scale_factor, width // model.vae_scale_factor


def check_entry(inversion: Inversion, model: DiffusionModel, steps: int,
                latent_hw: tuple[int, int] | None = None) -> None:
    """ValueError unless a loaded inversion has the model's latent and embedding shapes (latents of
    `latent_hw`, default the model's native size), `steps` steps, and finite values."""
    side = model.image_size // model.vae_scale_factor
    latent = (steps + 1, int(model.vae.config.latent_channels), *(latent_hw or (side, side)))
    if tuple(inversion.trajectory.shape) != latent:
        raise ValueError(f"trajectory {tuple(inversion.trajectory.shape)}, expected {latent}")
    config = model.denoiser.config  # the width of the text states the network attends to (SDXL: both encoders')
    if inversion.prompt_embedding.shape[-1] != config.get("cross_attention_dim", config.get("joint_attention_dim")):
        raise ValueError("prompt embedding of another width")
    if not all(bool(t.isfinite().all()) for t in _tensors(inversion)):
        raise ValueError("non-finite values")


__all__ = ["InversionCache", "check_entry", "default_cache_dir", "model_fingerprint"]
