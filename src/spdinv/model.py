"""load_model(): an SD 1.x/2.x or SDXL model seen through what inversion and editing need."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .concepts import Concept, ConceptTokenizer, check_width, injected
from .conditioning import pack, sdxl_text_states, time_ids, unpack
from .errors import SpdinvError
from .families import SD, SDXL, ModelFamily
from .images import Framing, fit_image
from .loading import SINGLE_FILE_SUFFIXES
from .prediction import PREDICTION_TYPES, eps_from_output, guided
from .schedule import DDIMSchedule, DDIMSettings, training_ddim_scheduler

EMBEDDED_MODEL = Path(__file__).parent / "assets" / "shapes-world"


@dataclass
class DiffusionModel:
    """Frozen SD components plus helpers: prompts, VAE encode/decode, eps(z, t, embedding).

    Whatever the network predicts (the scheduler config's `prediction_type`), `eps` returns the
    noise: it is the one place the network's output is read. The inversion schedule is DDIM on
    the model's training betas with `ddim` settings (SD's by default), whatever sampler the
    folder ships.

    SDXL (`text_encoder_2` set): prompts go through both encoders and the pooled embedding rides in
    the embedding tensor (conditioning.py); the empty prompt is all zeros when the pipeline's
    `force_zeros_for_empty_prompt` says so, as diffusers does for the unconditional branch."""

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
    family: ModelFamily = SD
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    force_zeros_for_empty_prompt: bool = False
    concept: Concept | None = None  # the placeholder word and its embeddings (concepts.py); set by with_concept
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """What both sides of an input image must be multiples of: the VAE's factor times 2 per
        UNet downsampling (SD 1.x/2.x: 8 x 8 = 64 px; SDXL: 8 x 4 = 32 px)."""
        downsamplings = sum(1 for block in self.unet.down_blocks if getattr(block, "downsamplers", None))
        return self.vae_scale_factor * 2**downsamplings

    def fit(self, image: Image.Image, framing: Framing | None = None) -> tuple[Image.Image, list[str]]:
        """`images.fit_image` for this model: (the image at the size it is inverted and edited at, notices)."""
        return fit_image(image, self.image_size, self.size_multiple, framing)

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

    @property
    def pooled_dim(self) -> int | None:
        """SDXL: the size of the pooled text embedding; None for SD."""
        return None if self.text_encoder_2 is None else int(self.text_encoder_2.config.projection_dim)

    def with_concept(self, concept: Concept | None) -> DiffusionModel:
        """The same frozen networks seen through a tokenizer in which `concept.word` stands for its
        embeddings (None: no concept); prompts are cached per model, so never across concepts."""
        base = self.tokenizer.base if isinstance(self.tokenizer, ConceptTokenizer) else self.tokenizer
        if concept is None:
            if self.concept is None:
                return self
            return dataclasses.replace(self, tokenizer=base, concept=None, _prompt_cache={})
        if self.text_encoder_2 is not None:
            raise SpdinvError("concept words are supported for SD 1.x/2.x models; SDXL's two-encoder "
                              "textual inversion is not")
        check_width(concept, self.text_encoder.get_input_embeddings().embedding_dim)
        tokenizer = ConceptTokenizer(base, concept.word, concept.vectors.shape[0])
        return dataclasses.replace(self, tokenizer=tokenizer, concept=concept, _prompt_cache={})

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str]) -> Tensor:
        """The conditioning of each prompt, (B, L, D) fp32 (SDXL: L token rows + the pooled rows);
        '' gives the unconditional embedding."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        missing = [p for p in prompts if p not in self._prompt_cache]
        if missing:
            self._prompt_cache.update(zip(missing, self._encode(missing)))
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def encode_prompts_differentiable(self, prompts: list[str]) -> Tensor:
        """Like `encode_prompt`, uncached and differentiable (in the concept's vectors too)."""
        return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> Tensor:
        if self.concept is not None:
            with injected(self.text_encoder, self.tokenizer.first_id, self.concept.vectors):
                return self.text_encoder(self.tokenize(prompts).to(self.device))[0].float()
        if self.text_encoder_2 is None:
            return self.text_encoder(self.tokenize(prompts).to(self.device))[0].float()
        hidden, pooled = sdxl_text_states([self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2],
                                          prompts, self.device)
        embedding = pack(hidden, pooled)
        if self.force_zeros_for_empty_prompt:
            embedding[[i for i, p in enumerate(prompts) if p == ""]] = 0
        return embedding

    def _vae_input(self, x: Tensor) -> Tensor:
        return x.to(self.device, self.vae.dtype)

    @torch.no_grad()
    def encode_image(self, image: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents: VAE posterior mean, normalised as the pipeline
        does (scaling factor; SDXL-style latents_mean/std when the VAE config has them)."""
        mean = self.vae.encode(self._vae_input(image)).latent_dist.mean.float()
        shift, spread = self._latent_statistics(mean)
        return (mean - shift) * self.latent_scale / spread

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, 3, H, W) in [-1, 1], fp32."""
        latents = latents.to(self.device).float()
        shift, spread = self._latent_statistics(latents)
        raw = latents * spread / self.latent_scale + shift
        return self.vae.decode(self._vae_input(raw)).sample.float().clamp(-1, 1)

    def _latent_statistics(self, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is None or std is None:
            return 0.0, 1.0
        shape = (1, -1, 1, 1)
        return torch.tensor(mean).view(shape).to(like), torch.tensor(std).view(shape).to(like)

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
        return guided(eps_uncond, eps_cond, guidance_scale)

    def _unet(self, z: Tensor, t: int | list[int], embedding: Tensor) -> Tensor:
        """The network's output converted to eps (fp32)."""
        timestep = torch.as_tensor(t, device=self.device)
        embedding, added = self._added_conditions(z, embedding.to(self.device, self.dtype))
        out = self.unet(z.to(self.device, self.dtype), timestep, encoder_hidden_states=embedding,
                        added_cond_kwargs=added)
        abar = self.alphas_cumprod.to(self.device)[timestep].float().reshape(-1, *[1] * (z.dim() - 1))
        return eps_from_output(out.sample.float(), z.to(self.device).float(), abar, self.prediction_type)


    def _added_conditions(self, z: Tensor, embedding: Tensor) -> tuple[Tensor, dict | None]:
        """(token states, SDXL's added conditions or None)."""
        if self.pooled_dim is None:
            return embedding, None
        hidden, pooled = unpack(embedding, self.pooled_dim)
        height, width = (side * self.vae_scale_factor for side in z.shape[-2:])
        return hidden, {"text_embeds": pooled, "time_ids": time_ids(height, width, z.shape[0], self.dtype, self.device)}


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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name_or_path: str | Path | None) -> str:
    """The embedded model's folder, an existing model folder, a single-file checkpoint, or a hub
    id; a path that does not exist is a one-line error here (not diffusers' hub-cache wording)."""
    if name_or_path is None:
        if not (EMBEDDED_MODEL / "model_index.json").exists():
            raise SpdinvError(f"the embedded model is missing from {EMBEDDED_MODEL}; reinstall spdinv or pass --model")
        return str(EMBEDDED_MODEL)
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SpdinvError(f"not a diffusers Stable Diffusion folder (no model_index.json): {path}")
        return str(path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise SpdinvError(f"the model path is a file but not a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint: {path}")
        return str(path)
    if not _HUB_ID.match(text) or ".." in text:
        raise SpdinvError(f"model path does not exist: {text}")
    return text


def resolve_dtype(dtype: torch.dtype | str, device: str | torch.device) -> torch.dtype:
    """'auto': float16 on CUDA, float32 elsewhere (float16 has no fast kernels on the CPU); a name
    ('float32', 'bfloat16', ...) or a torch.dtype as it is."""
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise SpdinvError(f"unknown dtype {dtype!r}; valid: auto, float32, float16, bfloat16")
        return getattr(torch, dtype)
    return dtype


def load_model(
    name_or_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "auto",
    *,
    variant: str | None = None,
    config: str | Path | None = None,
) -> DiffusionModel:
    """Load a model offline: a diffusers folder or cached hub id (`variant`: its weight variant, e.g.
    fp16), or a single-file checkpoint (`config`: a local diffusers folder of the same family);
    None = the embedded model. Weights are loaded in `dtype` ('auto': float16 on CUDA, float32
    elsewhere; a VAE that asks for it, SDXL's force_upcast, stays in float32). Unsupported families
    are refused."""
    from .loading import load_folder, load_single_file, local_path

    dtype = resolve_dtype(dtype, device)
    source = resolve_model(name_or_path)
    single_file = Path(source).is_file()
    if single_file and variant is not None:
        raise SpdinvError("--variant applies to diffusers folders; a single-file checkpoint has one set of weights")
    if not single_file and config is not None:
        raise SpdinvError(f"--config applies to single-file checkpoints; {source!r} is not a file")
    if single_file:
        pipe = load_single_file(Path(source), dtype, None if config is None else str(config))
    elif not Path(source).exists() and local_path(source) is None:
        raise SpdinvError(f"model not found: {source!r} is neither a folder nor a model in the Hugging Face "
                          "cache (nothing is downloaded)")
    else:
        pipe = load_folder(source, dtype, variant)
    # A single file's scheduler and configs come from --config: both are the model.
    files = "".join(files_fingerprint(path) for path in (local_path(source), config) if path is not None)
    return from_pipeline(pipe, name=source, device=device, files=files)


def from_pipeline(pipe, name: str = "in-memory", device: str | torch.device = "cpu", files: str = "") -> DiffusionModel:
    """Wrap an already built StableDiffusionPipeline or StableDiffusionXLPipeline (tests build tiny
    ones in memory). A VAE whose config asks for it (SDXL's force_upcast) runs in fp32."""
    device = torch.device(device)
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon") or "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise SpdinvError(f"{name}: unknown prediction_type {prediction_type!r} in its scheduler config; "
                          f"supported: {', '.join(PREDICTION_TYPES)}")
    xl = hasattr(pipe, "text_encoder_2")
    if xl and (pipe.text_encoder is None or pipe.text_encoder_2 is None):
        raise SpdinvError(f"{name}: an SDXL model without both text encoders (the SDXL refiner) is not supported")
    pipe = pipe.to(device)
    if getattr(pipe.vae.config, "force_upcast", False) and pipe.vae.dtype == torch.float16:
        pipe.vae.to(torch.float32)
    encoders = (pipe.text_encoder, pipe.text_encoder_2) if xl else (pipe.text_encoder,)
    for module in (pipe.vae, *encoders, pipe.unet):
        module.requires_grad_(False)
        module.eval()
    extra = dict(family=SDXL, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                 force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False))) if xl else {}
    return DiffusionModel(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=pipe.scheduler, name=name, device=device, dtype=pipe.unet.dtype, files=files, **extra,
    )
