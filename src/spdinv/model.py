"""load_model(): a diffusers Stable Diffusion folder seen through what inversion and editing need."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from .errors import SpdinvError
from .prediction import PREDICTION_TYPES, eps_from_output
from .schedule import DDIMSchedule, DDIMSettings, training_ddim_scheduler

EMBEDDED_MODEL = Path(__file__).parent / "assets" / "shapes-world"


@dataclass
class DiffusionModel:
    """Frozen SD components plus helpers: prompts, VAE encode/decode, eps(z, t, embedding).

    Whatever the network predicts (the scheduler config's `prediction_type`), `eps` returns the
    noise: it is the one place the network's output is read. The inversion schedule is DDIM on
    the model's training betas with `ddim` settings (SD's by default), whatever sampler the
    folder ships."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    scheduler: object
    name: str
    device: torch.device
    dtype: torch.dtype
    ddim: DDIMSettings = DDIMSettings()
    files: str = ""  # files_fingerprint() of what it was loaded from; "" when built in memory
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        """epsilon, v_prediction or sample: what the network outputs (prediction.py)."""
        return self.scheduler.config.get("prediction_type", "epsilon") or "epsilon"

    @cached_property
    def alphas_cumprod(self) -> Tensor:
        """The training schedule's cumulative alphas (float64), indexed by timestep."""
        return training_ddim_scheduler(self.scheduler.config).alphas_cumprod.to(torch.float64)

    def schedule(self, num_steps: int = 50) -> DDIMSchedule:
        return DDIMSchedule.from_training(self.scheduler.config, num_steps, self.ddim)

    def tokenize(self, prompts: list[str]) -> Tensor:
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str]) -> Tensor:
        """Text-encoder hidden states (B, L, D) in fp32; '' gives the unconditional embedding."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        missing = [p for p in prompts if p not in self._prompt_cache]
        if missing:
            hidden = self.text_encoder(self.tokenize(missing).to(self.device))[0].float()
            self._prompt_cache.update(zip(missing, hidden))
        return torch.stack([self._prompt_cache[p] for p in prompts])

    @torch.no_grad()
    def encode_image(self, image: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents: VAE posterior mean times the scaling factor."""
        posterior = self.vae.encode(image.to(self.device, self.dtype)).latent_dist
        return posterior.mean.float() * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, 3, H, W) in [-1, 1], fp32."""
        return self.vae.decode(latents.to(self.device, self.dtype) / self.latent_scale).sample.float().clamp(-1, 1)

    def eps(
        self,
        z: Tensor,
        t: int | list[int],
        embedding: Tensor,
        guidance_scale: float = 1.0,
        uncond_embedding: Tensor | None = None,
    ) -> Tensor:
        """Predicted noise at timestep t (one for the batch, or one per row), fp32; with guidance > 1,
        classifier-free guidance against `uncond_embedding` (the empty prompt's when None).
        Differentiable in z."""
        batch = z.shape[0]
        embedding = embedding.expand(batch, -1, -1) if embedding.shape[0] == 1 else embedding
        if guidance_scale == 1.0:
            return self._unet(z, t, embedding)
        if uncond_embedding is None:
            uncond_embedding = self.encode_prompt("")
        uncond_embedding = uncond_embedding.expand(batch, -1, -1) if uncond_embedding.shape[0] == 1 else uncond_embedding
        both = [*t, *t] if isinstance(t, (list, tuple)) else t
        eps_uncond, eps_cond = self._unet(torch.cat([z, z]), both, torch.cat([uncond_embedding, embedding])).chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def _unet(self, z: Tensor, t: int | list[int], embedding: Tensor) -> Tensor:
        """The network's output converted to eps (fp32)."""
        timestep = torch.as_tensor(t, device=self.device)
        out = self.unet(z.to(self.device, self.dtype), timestep, encoder_hidden_states=embedding.to(self.device, self.dtype))
        abar = self.alphas_cumprod.to(self.device)[timestep].float().reshape(-1, *[1] * (z.dim() - 1))
        return eps_from_output(out.sample.float(), z.to(self.device).float(), abar, self.prediction_type)


def files_fingerprint(path: str | Path) -> str:
    """A hash of every file's relative path, size and modification time under `path` (a folder or
    one file), and of the JSON configs' contents: replacing weights or a scheduler config changes it."""
    import hashlib

    path = Path(path)
    if not path.exists():
        return ""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _resolve(name_or_path: str | Path | None) -> str:
    if name_or_path is None:
        if not (EMBEDDED_MODEL / "model_index.json").exists():
            raise SpdinvError(f"the embedded model is missing from {EMBEDDED_MODEL}; reinstall spdinv or pass --model")
        return str(EMBEDDED_MODEL)
    return str(name_or_path)


def load_model(
    name_or_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    variant: str | None = None,
    config: str | Path | None = None,
) -> DiffusionModel:
    """Load a model offline: a diffusers folder or cached hub id (`variant`: its weight variant, e.g.
    fp16), or a single-file checkpoint (`config`: a local diffusers folder of the same family);
    None = the embedded model. Weights are loaded in `dtype`. Unsupported families are refused."""
    from .loading import load_folder, load_single_file

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    source = _resolve(name_or_path)
    if Path(source).is_file():
        pipe, family = load_single_file(Path(source), dtype, None if config is None else str(config))
    else:
        pipe, family = load_folder(source, dtype, variant)
    return from_pipeline(pipe, name=source, device=device, files=files_fingerprint(source))


def from_pipeline(pipe, name: str = "in-memory", device: str | torch.device = "cpu", files: str = "") -> DiffusionModel:
    """Wrap an already built StableDiffusionPipeline (tests build tiny ones in memory)."""
    device = torch.device(device)
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon") or "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise SpdinvError(f"{name}: unknown prediction_type {prediction_type!r} in its scheduler config; "
                          f"supported: {', '.join(PREDICTION_TYPES)}")
    pipe = pipe.to(device)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
        module.eval()
    return DiffusionModel(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=pipe.scheduler, name=name, device=device, dtype=pipe.unet.dtype, files=files,
    )
