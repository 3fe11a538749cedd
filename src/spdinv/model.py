"""load_model(): an SD 1.x/2.x, SDXL, SD3 / SD3.5 or FLUX.1 model seen through what inversion and
editing need: one `eps` (the network's output the schedule steps with), prompts, VAE codes."""

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
from .families import FLUX, SD, SD3, SDXL, ModelFamily
from .images import Framing, fit_image
from .loading import SINGLE_FILE_SUFFIXES
from .prediction import PREDICTION_TYPES, eps_from_output, guided
from .schedule import DDIMSchedule, DDIMSettings, FlowSchedule, Schedule, training_ddim_scheduler

EMBEDDED_MODEL = Path(__file__).parent / "assets" / "shapes-world"
# Models shipped with the package, by name: `--model shapes-world-flow` (a name wins over a folder of that name).
NAMED_MODELS = {"shapes-world": EMBEDDED_MODEL,
                "shapes-world-flow": Path(__file__).parent / "assets" / "shapes-world-flow"}


@dataclass
class DiffusionModel:
    """Frozen SD components plus helpers: prompts, VAE encode/decode, eps(z, t, embedding).

    Whatever the network predicts (the scheduler config's `prediction_type`), `eps` returns the
    noise: it is the one place the network's output is read. The inversion schedule is DDIM on
    the model's training betas with `ddim` settings (SD's by default), whatever sampler the
    folder ships.

    SDXL (`text_encoder_2` set): prompts go through both encoders and the pooled embedding rides in
    the embedding tensor (conditioning.py); the empty prompt is all zeros when the pipeline's
    `force_zeros_for_empty_prompt` says so, as diffusers does for the unconditional branch.

    Rectified flow (SD3 / SD3.5, FLUX.1: `transformer` set, `unet` None): `eps` returns the
    velocity v and `schedule` is a `FlowSchedule` (Euler on the scheduler's shifted sigmas); prompts
    are the stock pipeline's `encode_prompt` (T5 present or not), the pooled embedding packed as for
    SDXL; FLUX's 2x2 latent packing happens inside the network call (trajectories stay (B, C, h, w)),
    and its guidance scale is the network's distilled-guidance input (no unconditional rows)."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module | None  # None for a rectified-flow transformer (`transformer`)
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
    transformer: torch.nn.Module | None = None  # SD3 / FLUX
    pipeline: object = None  # SD3 / FLUX: the stock pipeline, whose encode_prompt and packing helpers are used
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that predicts: the UNet, or the flow transformer."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def is_flow(self) -> bool:
        return self.family.objective == "flow"

    @property
    def classifier_free(self) -> bool:
        """Guided by unconditional rows (SD, SDXL, SD3); FLUX's guidance is an input of the network."""
        return self.family.classifier_free

    @property
    def image_size(self) -> int:
        if self.pipeline is not None:  # SD3: the transformer's sample size; FLUX: the pipeline's 128
            return int(self.pipeline.default_sample_size) * self.vae_scale_factor
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """What both sides of an input image must be multiples of: the VAE's factor times 2 per
        UNet downsampling (SD 1.x/2.x: 8 x 8 = 64 px; SDXL: 8 x 4 = 32 px); for a flow transformer
        the VAE's factor times its patch side (SD3 and FLUX: 8 x 2 = 16 px)."""
        if self.unet is None:
            return self.vae_scale_factor * self.patch
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
        """epsilon, v_prediction or sample: what the network outputs (prediction.py); velocity for flow."""
        if self.is_flow:
            return "velocity"
        return self.scheduler.config.get("prediction_type", "epsilon") or "epsilon"

    @cached_property
    def alphas_cumprod(self) -> Tensor:
        """The training schedule's cumulative alphas (float64), indexed by timestep."""
        return training_ddim_scheduler(self.scheduler.config).alphas_cumprod.to(torch.float64)

    def schedule(self, num_steps: int = 50, latent_size: tuple[int, int] | None = None) -> Schedule:
        """DDIM on the training betas, or the flow scheduler's Euler run as the stock pipeline makes it
        (whose shift may depend on the latent's (h, w); default: the model's image size)."""
        if not self.is_flow:
            return DDIMSchedule.from_training(self.scheduler.config, num_steps, self.ddim)
        h, w = latent_size or (self.image_size // self.vae_scale_factor,) * 2
        return FlowSchedule.like_pipeline(self.scheduler, num_steps, (h // self.patch) * (w // self.patch),
                                          flux=self.family is FLUX)

    @property
    def patch(self) -> int:
        """A flow transformer's patch side in latent pixels (FLUX packs 2x2; SD3: its patch_size); 1 for a UNet."""
        if not self.is_flow:
            return 1
        return 2 if self.family is FLUX else int(self.transformer.config.patch_size)

    def tokenize(self, prompts: list[str]) -> Tensor:
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids

    @property
    def pooled_dim(self) -> int | None:
        """SDXL, SD3, FLUX: the size of the pooled text embedding; None for SD."""
        if self.transformer is not None:
            return int(self.transformer.config.pooled_projection_dim)
        return None if self.text_encoder_2 is None else int(self.text_encoder_2.config.projection_dim)

    def with_concept(self, concept: Concept | None) -> DiffusionModel:
        """The same frozen networks seen through a tokenizer in which `concept.word` stands for its
        embeddings (None: no concept); prompts are cached per model, so never across concepts."""
        base = self.tokenizer.base if isinstance(self.tokenizer, ConceptTokenizer) else self.tokenizer
        if concept is None:
            if self.concept is None:
                return self
            return dataclasses.replace(self, tokenizer=base, concept=None, _prompt_cache={})
        if self.family is not SD:
            raise SpdinvError(f"concept words are supported for SD 1.x/2.x models, not {self.family.name} "
                              "(textual inversion into SDXL's, SD3's or FLUX's several text encoders is not implemented)")
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
        if self.is_flow:
            return self._encode_flow(prompts)
        hidden, pooled = sdxl_text_states([self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2],
                                          prompts, self.device)
        embedding = pack(hidden, pooled)
        if self.force_zeros_for_empty_prompt:
            embedding[[i for i, p in enumerate(prompts) if p == ""]] = 0
        return embedding

    def _encode_flow(self, prompts: list[str]) -> Tensor:
        """The stock pipeline's encode_prompt (SD3: both CLIPs and T5 or its zeros; FLUX: CLIP pooled,
        T5 tokens), the pooled embedding packed after the token states."""
        if self.family is SD3:
            hidden, _, pooled, _ = self.pipeline.encode_prompt(prompts, None, None, device=self.device,
                                                               do_classifier_free_guidance=False)
        else:
            hidden, pooled, _ = self.pipeline.encode_prompt(prompts, None, device=self.device)
        return pack(hidden.float(), pooled.float())

    def _vae_input(self, x: Tensor) -> Tensor:
        return x.to(self.device, self.vae.dtype)

    @torch.no_grad()
    def encode_image(self, image: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents: VAE posterior mean, normalised as the pipeline
        does (scaling factor; SDXL-style latents_mean/std when the VAE config has them; SD3 / FLUX: the
        shift factor). A flow transformer's patches (FLUX: 2x2 packing) need sides of whole patches."""
        multiple = self.patch * self.vae_scale_factor
        if self.is_flow and (image.shape[-1] % multiple or image.shape[-2] % multiple):
            raise SpdinvError(f"a {self.family.name} model needs image sides that are multiples of {multiple} "
                                  f"pixels, got {image.shape[-1]}x{image.shape[-2]}")
        mean = self.vae.encode(self._vae_input(image)).latent_dist.mean.float()
        shift, spread = self._latent_statistics(mean)
        return (mean - shift) * self.latent_scale / spread

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, 3, H, W) in [-1, 1], fp32."""
        latents = latents.to(self.device).float()
        shift, spread = self._latent_statistics(latents)
        raw = latents * spread / self.latent_scale + shift
        # One image at a time: a batch's full-resolution decoder activations set an edit's peak memory
        # (it decodes its source and target rows; docs/results.md, "Memory of the attention processors").
        images = [self.vae.decode(self._vae_input(one)).sample.float() for one in raw.split(1)]
        return torch.cat(images).clamp(-1, 1)

    def _latent_statistics(self, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        shift = getattr(self.vae.config, "shift_factor", None)  # SD3 / FLUX: z = (x - shift) * scaling
        if shift is not None:
            return float(shift), 1.0
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
        Differentiable in z. A flow model's output is its velocity (what its schedule steps with);
        FLUX takes `guidance_scale` (a number or one per row) as its distilled-guidance input."""
        batch = z.shape[0]
        embedding = embedding.expand(batch, -1, -1) if embedding.shape[0] == 1 else embedding
        if self.family is FLUX:
            return self._flux_velocity(z, t, embedding, guidance_scale)
        if guidance_scale == 1.0:
            return self._unet(z, t, embedding)
        if uncond_embedding is None:
            uncond_embedding = self.encode_prompt("")
        uncond_embedding = uncond_embedding.expand(batch, -1, -1) if uncond_embedding.shape[0] == 1 else uncond_embedding
        both = [*t, *t] if isinstance(t, (list, tuple)) else t
        eps_uncond, eps_cond = self._unet(torch.cat([z, z]), both, torch.cat([uncond_embedding, embedding])).chunk(2)
        return guided(eps_uncond, eps_cond, guidance_scale)

    def _unet(self, z: Tensor, t: int | list[int], embedding: Tensor) -> Tensor:
        """The network's output converted to eps (fp32); SD3: its velocity."""
        if self.family is SD3:
            return self._sd3_velocity(z, t, embedding)
        timestep = torch.as_tensor(t, device=self.device)
        embedding, added = self._added_conditions(z, embedding.to(self.device, self.dtype))
        out = self.unet(z.to(self.device, self.dtype), timestep, encoder_hidden_states=embedding,
                        added_cond_kwargs=added)
        abar = self.alphas_cumprod.to(self.device)[timestep].float().reshape(-1, *[1] * (z.dim() - 1))
        return eps_from_output(out.sample.float(), z.to(self.device).float(), abar, self.prediction_type)


    def _timesteps(self, t: float | list[float], batch: int) -> Tensor:
        """One float timestep per row, as the flow pipelines pass `t.expand(batch)`."""
        return torch.as_tensor(t, dtype=torch.float32, device=self.device).expand(batch).to(self.dtype)

    def _sd3_velocity(self, z: Tensor, t: float | list[float], embedding: Tensor) -> Tensor:
        """SD3Transformer2DModel's velocity (fp32); t = sigma * 1000, as StableDiffusion3Pipeline passes it."""
        hidden, pooled = unpack(embedding.to(self.device, self.dtype), self.pooled_dim)
        out = self.transformer(hidden_states=z.to(self.device, self.dtype), timestep=self._timesteps(t, z.shape[0]),
                               encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False)[0]
        return out.float()

    def _flux_velocity(self, z: Tensor, t: float | list[float], embedding: Tensor,
                       guidance: float | Tensor) -> Tensor:
        """FluxTransformer2DModel's velocity (fp32) on z (B, C, h, w), packed into 2x2 patches and back
        with FluxPipeline's own helpers; timestep / 1000 and the guidance input as FluxPipeline passes them
        (schnell: no guidance input)."""
        from diffusers import FluxPipeline

        batch, channels, h, w = z.shape
        packed = FluxPipeline._pack_latents(z.to(self.device, self.dtype), batch, channels, h, w)
        hidden, pooled = unpack(embedding.to(self.device, self.dtype), self.pooled_dim)
        if self.transformer.config.guidance_embeds:
            guidance = torch.as_tensor(guidance, dtype=torch.float32, device=self.device).expand(batch)
        else:
            guidance = None
        out = self.transformer(
            hidden_states=packed, timestep=self._timesteps(t, batch) / 1000, guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, self.device, self.dtype),
            return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor).float()

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
    """The embedded model's folder (None, or a name in NAMED_MODELS), an existing model folder, a
    single-file checkpoint, or a hub id; a path that does not exist is a one-line error here (not
    diffusers' hub-cache wording)."""
    if name_or_path is None or str(name_or_path) in NAMED_MODELS:
        name = "shapes-world" if name_or_path is None else str(name_or_path)
        folder = NAMED_MODELS[name]
        if not (folder / "model_index.json").exists():
            raise SpdinvError(f"the {name} model is missing from {folder}; reinstall spdinv or pass --model")
        return str(folder)
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
    """Wrap an already built pipeline of a supported family (tests build tiny ones in memory). A VAE
    whose config asks for it (SDXL's force_upcast) runs in fp32."""
    from .families import family_of

    device = torch.device(device)
    family = family_of(type(pipe).__name__, name)
    if family.objective == "flow":
        return _flow_model(pipe, family, name, device, files)
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon") or "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise SpdinvError(f"{name}: unknown prediction_type {prediction_type!r} in its scheduler config; "
                          f"supported: {', '.join(PREDICTION_TYPES)}")
    xl = family is SDXL
    if xl and (pipe.text_encoder is None or pipe.text_encoder_2 is None):
        raise SpdinvError(f"{name}: an SDXL model without both text encoders (the SDXL refiner) is not supported")
    pipe = pipe.to(device)
    if getattr(pipe.vae.config, "force_upcast", False) and pipe.vae.dtype == torch.float16:
        pipe.vae.to(torch.float32)
    encoders = (pipe.text_encoder, pipe.text_encoder_2) if xl else (pipe.text_encoder,)
    _freeze(pipe.vae, *encoders, pipe.unet)
    extra = dict(family=SDXL, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                 force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False))) if xl else {}
    return DiffusionModel(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=pipe.scheduler, name=name, device=device, dtype=pipe.unet.dtype, files=files, **extra,
    )


def _freeze(*modules: torch.nn.Module | None) -> None:
    for module in modules:
        if module is not None:
            module.requires_grad_(False)
            module.eval()


def _flow_model(pipe, family: ModelFamily, name: str, device: torch.device, files: str) -> DiffusionModel:
    """SD3 / SD3.5 (T5 `text_encoder_3` present or None) or FLUX.1 (dev: guidance input; schnell: none)."""
    if pipe.text_encoder is None or pipe.text_encoder_2 is None:
        raise SpdinvError(f"{name}: a {family.name} model without its text encoders is not supported")
    pipe = pipe.to(device)
    _freeze(pipe.vae, pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None), pipe.transformer)
    return DiffusionModel(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=None, scheduler=pipe.scheduler,
        name=name, device=device, dtype=pipe.transformer.dtype, files=files, family=family,
        text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, transformer=pipe.transformer, pipeline=pipe,
    )
