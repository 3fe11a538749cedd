"""Train the embedded shapes-world model from scratch: VAE, then text encoder + UNet.

The result is a standard diffusers Stable Diffusion folder. Training is seeded and resumable:
a checkpoint is written every `checkpoint_every` steps into the work directory and a rerun with
the same arguments continues from it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import SpdinvError
from ..images import arrays_to_tensor
from ..outputs import atomic_file, staged_output
from ..schedule import SD_BETAS, sd_ddim_scheduler
from .captions import Phrasing, caption
from .config import TrainConfig
from .render import render_array
from .scene import random_scene
from .tokenizer import build_tokenizer, save_tokenizer, text_config_fields

log = logging.getLogger("spdinv.world.train")



def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
    )


def build_text_encoder(tokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(**text_config_fields(tokenizer), hidden_size=128, intermediate_size=512,
                            num_hidden_layers=3, num_attention_heads=4)
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
    )


RUN_SETTINGS = ("threads", "device", "checkpoint_every")  # how a run executes: may change on resume


def check_same_settings(saved: dict, given: dict, work_dir: Path) -> None:
    """A resumed run continues the saved one: every training setting must be the one it was started
    with, except that more UNet steps extend it."""
    differing = [k for k in given if k not in RUN_SETTINGS and saved.get(k) != given[k]
                 and not (k == "unet_steps" and isinstance(saved.get(k), int) and given[k] > saved[k])]
    if differing:
        key = differing[0]
        raise SpdinvError(f"{work_dir} holds a run started with other settings ({key}: {saved.get(key)!r} there, "
                          f"{given[key]!r} now); resume with the same settings or use another --work")


def resumed_schedule(optimizer: torch.optim.Optimizer, factor, step: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR positioned at `step`, so the next update uses factor(step) (setting last_epoch after
    construction would leave the first resumed update at factor(0)). A fresh optimizer's lr is the base."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)


def training_scenes(seed: int, n_scenes: int) -> list:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(n_scenes)]


def rendered_images(work_dir: Path, scenes: list, seed: int) -> torch.Tensor:
    """The scenes rendered, (N, 3, 64, 64) in [-1, 1], cached in `work_dir` (keyed by seed and count)."""
    cache = Path(work_dir) / f"images_seed{seed}_n{len(scenes)}.npy"
    if cache.exists():
        array = np.load(cache)
    else:
        t0 = time.time()
        array = np.stack([render_array(s) for s in scenes])
        np.save(cache, array)
        log.info("rendered %d scenes in %.0f s", len(scenes), time.time() - t0)
    return arrays_to_tensor(array)


@torch.no_grad()
def encode_posteriors(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std of every image (unscaled latents)."""
    means, stds = [], []
    for chunk in images.split(256):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class Trainer:
    def __init__(self, work_dir: Path, config: TrainConfig):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.tokenizer = build_tokenizer()
        self.vae = build_vae()
        self.text_encoder = build_text_encoder(self.tokenizer)
        self.unet = build_unet()
        self.device = torch.device(config.device)
        for module in (self.vae, self.text_encoder, self.unet):
            module.to(self.device)
        self.state = {"phase": "vae", "step": 0, "scaling_factor": None}

    # ---------------------------------------------------------------- data
    def scenes(self):
        return training_scenes(self.config.seed, self.config.n_scenes)

    def images(self, scenes) -> torch.Tensor:
        return rendered_images(self.work_dir, scenes, self.config.seed).to(self.device)

    # ---------------------------------------------------------------- checkpoints
    def _ckpt_path(self) -> Path:
        return self.work_dir / "checkpoint.pt"

    def save_checkpoint(self, extra: dict) -> None:
        payload = {"state": self.state, "config": asdict(self.config), "vae": self.vae.state_dict(),
                   "text_encoder": self.text_encoder.state_dict(), "unet": self.unet.state_dict(), **extra}
        with atomic_file(self._ckpt_path(), "wb") as handle:
            torch.save(payload, handle)

    def load_checkpoint(self) -> dict | None:
        """The checkpoint in the work folder (None when there is none), loaded into the networks; a
        damaged one, or one trained with other settings, is a one-line error."""
        path = self._ckpt_path()
        if not path.exists():
            return None
        try:
            payload = torch.load(path, weights_only=False, map_location=self.device)
            check_same_settings(payload["config"], asdict(self.config), self.work_dir)
        except SpdinvError:
            raise
        except Exception as error:  # noqa: BLE001 - truncated, zero bytes, not a checkpoint: all one message
            raise SpdinvError(f"{path} is damaged or not a world checkpoint ({type(error).__name__}); remove it to "
                              "start over") from None
        self.state = payload["state"]
        self.vae.load_state_dict(payload["vae"])
        self.text_encoder.load_state_dict(payload["text_encoder"])
        self.unet.load_state_dict(payload["unet"])
        log.info("resumed from %s at phase %s step %d", self._ckpt_path(), self.state["phase"], self.state["step"])
        return payload

    # ---------------------------------------------------------------- VAE
    def train_vae(self, images: torch.Tensor, resume: dict | None) -> None:
        cfg = self.config
        opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        if resume and "vae_opt" in resume:
            opt.load_state_dict(resume["vae_opt"])
        sched = resumed_schedule(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.vae_steps) / cfg.vae_steps)),
                                 self.state["step"])
        self.vae.train()
        t0 = time.time()
        while self.state["step"] < cfg.vae_steps:
            step = self.state["step"]
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen).to(self.device)
            grid = 64 // 4 - cfg.vae_crop // 4 + 1
            oy, ox = (torch.randint(0, grid, (2,), generator=gen) * 4).tolist()
            x = images[idx, :, oy:oy + cfg.vae_crop, ox:ox + cfg.vae_crop]
            posterior = self.vae.encode(x).latent_dist
            recon = self.vae.decode(posterior.sample(generator=gen)).sample  # CPU generator, any device
            recon_loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
            loss = recon_loss + cfg.vae_kl_weight * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            self.state["step"] = step + 1
            if (step + 1) % 50 == 0:
                psnr = 10 * math.log10(4.0 / F.mse_loss(recon, x).item())
                log.info("vae step %d loss %.5f psnr %.2f dB (%.2f s/step)", step + 1, loss.item(), psnr,
                         (time.time() - t0) / 50)
                t0 = time.time()
            if (step + 1) % cfg.checkpoint_every == 0:
                self.save_checkpoint({"vae_opt": opt.state_dict()})
        self.vae.eval()

    def encode_all(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_posteriors(self.vae, images)

    # ---------------------------------------------------------------- UNet + text encoder
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def train_unet(self, scenes, latent_mean, latent_std, resume: dict | None) -> tuple[EMAModel, dict]:
        """Train until unet_steps; returns the EMA and the optimizer/EMA state a later, longer run
        continues from."""
        cfg = self.config
        scale = self.state["scaling_factor"]
        noise_scheduler = DDPMScheduler(**SD_BETAS)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
        ema = EMAModel(params, decay=cfg.ema_decay)

        def resumable() -> dict:  # what a checkpoint needs beyond the weights to continue exactly
            return {"unet_opt": opt.state_dict(), "ema": ema.state_dict()}

        warm, warm_from = cfg.unet_warmup, 0
        if resume and "unet_opt" in resume:
            opt.load_state_dict(resume["unet_opt"])
            ema.load_state_dict(resume["ema"])
        elif self.state["step"]:  # an older checkpoint without optimizer state: a fresh optimizer warms up again
            warm_from = self.state["step"]
        sched = resumed_schedule(
            opt, lambda s: min(1.0, (s - warm_from + 1) / warm)
            * (0.55 + 0.45 * math.cos(math.pi * min(s, cfg.unet_steps) / cfg.unet_steps)),
            self.state["step"])
        self.unet.train()
        self.text_encoder.train()
        t0 = time.time()
        while self.state["step"] < cfg.unet_steps:
            step = self.state["step"]
            gen = torch.Generator().manual_seed(cfg.seed * 7_000_003 + step)
            rng = random.Random(cfg.seed * 7_000_003 + step)
            idx = torch.randint(0, len(scenes), (cfg.unet_batch,), generator=gen)
            texts = ["" if rng.random() < cfg.caption_dropout else caption(scenes[i], Phrasing.random(rng)) for i in idx.tolist()]
            on_device = idx.to(self.device)
            draw = torch.randn(latent_mean[on_device].shape, generator=gen).to(self.device)
            latents = (latent_mean[on_device] + latent_std[on_device] * draw) * scale
            noise = torch.randn(latents.shape, generator=gen).to(self.device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
            timesteps = timesteps.to(self.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            embedding = self.text_encoder(self.tokenize(texts).to(self.device))[0]
            prediction = self.unet(noisy, timesteps, embedding).sample
            loss = F.mse_loss(prediction, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            ema.step(params)
            self.state["step"] = step + 1
            if (step + 1) % 50 == 0:
                log.info("unet step %d loss %.5f lr %.2e (%.2f s/step)", step + 1, loss.item(), sched.get_last_lr()[0],
                         (time.time() - t0) / 50)
                t0 = time.time()
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.unet_steps:  # run() saves the last
                self.save_checkpoint(resumable())
        return ema, resumable()

    # ---------------------------------------------------------------- whole run
    def run(self, out_dir: Path) -> Path:
        resume = self.load_checkpoint()
        scenes = self.scenes()
        images = self.images(scenes)
        if self.state["phase"] == "vae":
            self.train_vae(images, resume)
        self.vae.eval()
        mean, std = self.encode_all(images)
        if self.state["phase"] == "vae":
            self.state.update(phase="unet", step=0, scaling_factor=float(1.0 / mean.std()))
            log.info("latent std %.4f -> scaling factor %.4f", float(mean.std()), self.state["scaling_factor"])
            self.save_checkpoint({})
            resume = None
        self.state["phase"] = "unet"  # also for checkpoints of older versions, which ended on "done"
        ema, continuation = self.train_unet(scenes, mean, std, resume)
        self.save_checkpoint(continuation)  # raw weights + optimizer + EMA: `--unet-steps M` (M > N) continues
        ema.copy_to(list(self.unet.parameters()) + list(self.text_encoder.parameters()))
        return self.save_pipeline(out_dir)

    def export_checkpoint(self, out_dir: Path) -> Path:
        """Save the latest checkpoint (with its EMA weights) as a pipeline without training further."""
        payload = self.load_checkpoint()
        if payload is None or self.state["scaling_factor"] is None:
            raise SpdinvError(f"no UNet-phase checkpoint in {self.work_dir}: the VAE phase is not finished")
        if "ema" in payload:
            params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
            ema = EMAModel(params, decay=self.config.ema_decay)
            ema.load_state_dict(payload["ema"])
            ema.copy_to(params)
        return self.save_pipeline(out_dir)

    def save_pipeline(self, out_dir: Path) -> Path:
        for module in (self.vae, self.text_encoder, self.unet):
            module.to("cpu")
        self.vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet.eval(),
            scheduler=sd_ddim_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        out_dir = Path(out_dir)
        with staged_output(out_dir) as stage:
            pipe.save_pretrained(stage, safe_serialization=True)
            save_tokenizer(self.tokenizer, stage / "tokenizer")
            (stage / "training.json").write_text(json.dumps({"config": asdict(self.config), "state": self.state},
                                                            indent=2))
        log.info("saved pipeline to %s", out_dir)
        return out_dir

