"""Train the rectified-flow shapes-world model: a small MMDiT (SD3's transformer) from scratch, shipped as a
stock diffusers `StableDiffusion3Pipeline` folder.

Objective (SD3, Esser et al. 2024, eqs. 1-3 with the rectified-flow path): x_t = (1 - t) x_0 + t eps,
the network predicts v = eps - x_0 (MSE), t drawn logit-normal(0, 1) (SD3's `logit_normal` sampling) and then
shifted as `FlowMatchEulerDiscreteScheduler(shift)` shifts its sigmas: t <- s t / (1 + (s - 1) t).

Frozen parts come from the shipped UNet model (`assets/shapes-world`): its VAE (with `shift_factor` 0, which
SD3's pipeline needs) and its trained text encoder, as SD3's two CLIP encoders (`text_encoders`). The
conditioning is what `StableDiffusion3Pipeline.encode_prompt` produces: the trainer calls it. Without T5 that
pipeline appends `max_sequence_length` (default 256) zero rows to the CLIP tokens; these are identical tokens
through every block, so training feeds one of them and adds log(256) to its attention logit
(`RepeatedTokenJointAttnProcessor`), which is the same function three times cheaper; the shipped folder runs
with the stock processor and the pipeline's defaults.

Seeded (every step's draws come from generators seeded by seed and step) and resumable (a checkpoint every
`checkpoint_every` steps in the work folder; a rerun continues from it).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import SpdinvError
from ..outputs import atomic_file, staged_output
from .captions import Phrasing, caption
from .config import FLOW_RUN_FIELDS, FlowTrainConfig
from .tokenizer import save_tokenizer
from .train import encode_posteriors, rendered_images, resumed_schedule, training_scenes

log = logging.getLogger("spdinv.world.flow_train")

SOURCE = Path(__file__).resolve().parent.parent / "assets" / "shapes-world"
ZERO_TOKENS = 256  # the zero rows StableDiffusion3Pipeline appends without T5 (its max_sequence_length default)
STEP_SEED = 5_000_011  # step s of a run with seed k draws from generators seeded k * STEP_SEED + s


class RepeatedTokenJointAttnProcessor:
    """diffusers' `JointAttnProcessor2_0` for the context whose last token stands for `repeats` identical
    tokens: identical tokens have identical keys and values, so softmax over them equals one token whose
    logit is raised by log(repeats); and identical queries give identical outputs."""

    def __init__(self, repeats: int):
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attn.norm_q is not None or attn.norm_added_q is not None or encoder_hidden_states is None:
            raise ValueError("RepeatedTokenJointAttnProcessor supports joint attention without qk-norm only")
        batch, n_image = hidden_states.shape[:2]

        def heads(projected: torch.Tensor) -> torch.Tensor:
            return projected.view(batch, -1, attn.heads, projected.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (torch.cat([heads(image(hidden_states)), heads(text(encoder_hidden_states))], dim=2)
                             for image, text in ((attn.to_q, attn.add_q_proj), (attn.to_k, attn.add_k_proj),
                                                 (attn.to_v, attn.add_v_proj)))
        bias = torch.zeros(key.shape[2], dtype=query.dtype, device=query.device)
        bias[-1] = self.log_repeats
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.expand(query.shape[2], -1))
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[3]).to(query.dtype)
        image_out, text_out = out[:, :n_image], out[:, n_image:]
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


def with_projection(trained: CLIPTextModel, identity_layers: int) -> CLIPTextModelWithProjection:
    """The trained encoder as a CLIPTextModelWithProjection with `identity_layers` more layers that pass their
    input through (zero attention output and MLP output projections) and an identity text projection."""
    config = copy.deepcopy(trained.config)
    config.num_hidden_layers += identity_layers
    config.projection_dim = config.hidden_size
    config.architectures = ["CLIPTextModelWithProjection"]
    encoder = CLIPTextModelWithProjection(config)
    missing, unexpected = encoder.text_model.load_state_dict(trained.state_dict(), strict=False)
    assert not unexpected and all(".layers." in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in encoder.text_model.encoder.layers[trained.config.num_hidden_layers:]:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        encoder.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return encoder.eval().requires_grad_(False)


def text_encoders(source: Path = SOURCE) -> tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection]:
    """SD3 reads each CLIP's penultimate hidden state (and the projected pooled output). The first encoder is the
    shipped 3-layer encoder plus one identity layer, so its penultimate state is the trained encoder's output
    (before the final LayerNorm, which the MMDiT's own norms make up for); the second is the shipped encoder
    itself, whose penultimate state is its layer 2: the MMDiT reads both depths, concatenated (width 256)."""
    trained = CLIPTextModel.from_pretrained(source / "text_encoder", local_files_only=True)
    return with_projection(trained, 1), with_projection(trained, 0)


def build_transformer(config: FlowTrainConfig, text_width: int) -> SD3Transformer2DModel:
    width = config.flow_heads * config.flow_head_dim
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=config.flow_layers,
        attention_head_dim=config.flow_head_dim, num_attention_heads=config.flow_heads,
        joint_attention_dim=2 * text_width, caption_projection_dim=width, pooled_projection_dim=2 * text_width,
        pos_embed_max_size=16,  # 8x8 patches at 64x64; up to 128x128 images
    )


def build_pipeline(config: FlowTrainConfig, source: Path = SOURCE) -> StableDiffusion3Pipeline:
    vae = AutoencoderKL.from_pretrained(source / "vae", local_files_only=True).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer", local_files_only=True)
    first, second = text_encoders(source)
    return StableDiffusion3Pipeline(
        transformer=build_transformer(config, first.config.hidden_size),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=config.flow_shift), vae=vae,
        text_encoder=first, tokenizer=tokenizer, text_encoder_2=second, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's static shift of a sigma."""
    return shift * t / (1 + (shift - 1) * t)


class FlowTrainer:
    def __init__(self, work_dir: Path, config: FlowTrainConfig, source: Path = SOURCE):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.device = torch.device(config.device)
        self.pipe = build_pipeline(config, source).to(self.device)
        self.transformer = self.pipe.transformer
        self.params = list(self.transformer.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=config.flow_lr, weight_decay=0.01)
        self.ema = EMAModel(self.params, decay=config.ema_decay)
        self.step = 0

    # ---------------------------------------------------------------- data
    def latents(self) -> tuple[list, torch.Tensor, torch.Tensor]:
        """The training scenes and their VAE posteriors (mean, std), cached in the work folder."""
        scenes = training_scenes(self.config.seed, self.config.n_scenes)
        cache = self.work_dir / f"latents_seed{self.config.seed}_n{self.config.n_scenes}.pt"
        if cache.exists():
            mean, std = torch.load(cache)
        else:
            mean, std = encode_posteriors(self.pipe.vae.cpu(), rendered_images(self.work_dir, scenes, self.config.seed))
            with atomic_file(cache, "wb") as handle:
                torch.save((mean, std), handle)
            self.pipe.vae.to(self.device)
        return scenes, mean.to(self.device), std.to(self.device)

    @torch.no_grad()
    def condition(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stock pipeline's prompt embeddings with one zero row standing for its ZERO_TOKENS."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None,
                                                        device=self.device, do_classifier_free_guidance=False,
                                                        max_sequence_length=1)
        return embeds, pooled

    # ---------------------------------------------------------------- checkpoints
    def _ckpt_path(self) -> Path:
        return self.work_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        payload = {"step": self.step, "config": asdict(self.config), "transformer": self.transformer.state_dict(),
                   "opt": self.opt.state_dict(), "ema": self.ema.state_dict()}
        with atomic_file(self._ckpt_path(), "wb") as handle:
            torch.save(payload, handle)

    def resume(self) -> bool:
        if not self._ckpt_path().exists():
            return False
        payload = torch.load(self._ckpt_path(), weights_only=False, map_location=self.device)
        changed = [f for f in FLOW_RUN_FIELDS if payload["config"][f] != getattr(self.config, f)]
        if changed:
            raise SpdinvError(f"the checkpoint in {self.work_dir} is another run (it differs in "
                              f"{', '.join('--' + f.replace('_', '-') for f in changed)}); use another --work")
        self.transformer.load_state_dict(payload["transformer"])
        self.opt.load_state_dict(payload["opt"])
        self.ema.load_state_dict(payload["ema"])
        self.step = payload["step"]
        log.info("resumed from %s at step %d", self._ckpt_path(), self.step)
        return True

    # ---------------------------------------------------------------- training
    def batch(self, scenes, mean: torch.Tensor, std: torch.Tensor) -> dict[str, torch.Tensor]:
        """Step `self.step`'s inputs and target, drawn from generators seeded by seed and step."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed * STEP_SEED + self.step)
        idx = torch.randint(0, len(scenes), (cfg.flow_batch,), generator=gen)
        dropped = torch.rand(cfg.flow_batch, generator=gen) < cfg.caption_dropout
        phrasings = torch.randint(0, 2**31 - 1, (cfg.flow_batch,), generator=gen).tolist()
        texts = ["" if drop else caption(scenes[i], Phrasing.random(random.Random(seed)))
                 for i, drop, seed in zip(idx.tolist(), dropped.tolist(), phrasings)]
        on_device = idx.to(self.device)
        draw = torch.randn(mean[on_device].shape, generator=gen).to(self.device)
        x0 = (mean[on_device] + std[on_device] * draw) * self.pipe.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        t = shifted(torch.sigmoid(torch.randn(cfg.flow_batch, generator=gen)), cfg.flow_shift).to(self.device)
        sigma = t.view(-1, 1, 1, 1)
        embeds, pooled = self.condition(texts)
        return {"x_t": (1 - sigma) * x0 + sigma * noise, "timestep": t * 1000, "embeds": embeds, "pooled": pooled,
                "target": noise - x0}

    def train(self, out_dir: Path | None = None) -> None:
        cfg = self.config
        scenes, mean, std = self.latents()
        factor = lambda s: (min(1.0, (s + 1) / cfg.flow_warmup)  # noqa: E731
                            * (0.55 + 0.45 * math.cos(math.pi * min(s, cfg.flow_steps) / cfg.flow_steps)))
        sched = resumed_schedule(self.opt, factor, self.step)
        self.transformer.set_attn_processor(RepeatedTokenJointAttnProcessor(ZERO_TOKENS))
        self.transformer.train()
        t0, losses = time.time(), []
        while self.step < cfg.flow_steps:
            b = self.batch(scenes, mean, std)
            prediction = self.transformer(b["x_t"], encoder_hidden_states=b["embeds"], pooled_projections=b["pooled"],
                                          timestep=b["timestep"]).sample
            loss = F.mse_loss(prediction, b["target"])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            sched.step()
            self.ema.step(self.params)
            self.step += 1
            losses.append(loss.item())
            if self.step % 50 == 0 or self.step == cfg.flow_steps:
                rate = (time.time() - t0) / len(losses)
                log.info("flow step %d/%d loss %.4f lr %.2e (%.2f s/step, %.0f min left)", self.step, cfg.flow_steps,
                         sum(losses) / len(losses), sched.get_last_lr()[0], rate,
                         rate * (cfg.flow_steps - self.step) / 60)
                t0, losses = time.time(), []
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.flow_steps:
                self.save_checkpoint()
            if out_dir is not None and cfg.flow_export_every and self.step % cfg.flow_export_every == 0 \
                    and self.step < cfg.flow_steps:  # the caller saves the last
                self.save_pipeline(out_dir)

    # ---------------------------------------------------------------- export
    def save_pipeline(self, out_dir: Path) -> Path:
        """The EMA weights, with the stock attention processors, as a StableDiffusion3Pipeline folder."""
        transformer = copy.deepcopy(self.transformer).to("cpu").eval()
        self.ema.copy_to(transformer.parameters())
        transformer.set_attn_processor(JointAttnProcessor2_0())
        pipe = StableDiffusion3Pipeline(**{**self.pipe.components, "transformer": transformer})
        pipe.to("cpu")
        with staged_output(Path(out_dir)) as stage:
            pipe.save_pretrained(stage, safe_serialization=True)
            for name in ("tokenizer", "tokenizer_2"):
                save_tokenizer(self.pipe.tokenizer, stage / name)
            (stage / "training.json").write_text(json.dumps({"config": asdict(self.config), "step": self.step},
                                                            indent=2))
        self.pipe.to(self.device)
        log.info("saved pipeline (EMA weights, step %d) to %s", self.step, out_dir)
        return Path(out_dir)

    def run(self, out_dir: Path) -> Path:
        self.resume()
        self.train(out_dir)
        return self.save_pipeline(out_dir)
