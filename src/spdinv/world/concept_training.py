"""Training the concept encoder (concept_encoder.py) with the diffusion loss on the frozen model.

A sample is one object identity (not a held-out shape x colour pair): the encoder sees its concept
image (alone, large, centre, on gray) and maps it to words; the target is a scene holding the same
object in another context (random background and kind, position and size, 0-2 other objects), and
its caption names the object by the placeholder ("a small S on the left and a red circle on the
right on a blue background"). Loss: the frozen UNet's noise-prediction MSE on the target's latent
under that caption, plus ELITE's `word_l1` * mean |w| over the words. As in ELITE's training, the
placeholder becomes all the levels' words in a row; in a `w0_only` fraction of the samples it is w0
alone, which is how the concept is used at generation (a deviation from ELITE, which only ever
trains all words and generates with w0).

Two further deviations, both on by default because ELITE's recipe alone gave an encoder that carried
colour but not shape (docs/model-card.md, "Concept encoder"):
- `teacher`: the noise prediction's target moves from the sampled noise to the frozen model's own
  prediction under the same caption naming the object in words (distillation: the same expected
  gradient, without the sampled noise's variance);
- `attributes`: linear read-outs of shape, colour, material and style from the image encoder's last
  features, trained with cross-entropy and dropped afterwards, stand in for the CLIP pretraining that
  ELITE's image encoder brings and this one, trained from scratch, lacks.

Seeded and resumable: every step draws from generators seeded by (seed, step), and a checkpoint
(encoder, optimizer, losses) is written every `checkpoint_every` steps; a rerun continues from it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..concepts import ConceptTokenizer, injected
from ..errors import SpdinvError
from ..images import to_tensor
from ..model import DiffusionModel, load_model
from ..outputs import atomic_file
from .captions import Phrasing, caption
from .concept_drawing import random_drawing
from .concept_encoder import (CONCEPT_BACKGROUND, HELD_OUT_PAIRS, ConceptEncoder, EncoderConfig, concept_image,
                              identities, is_held_out, load_concept_encoder, save_concept_encoder)
from .config import CONCEPT_ENCODER_SETTINGS_BEFORE, ConceptEncoderConfig
from .render import render
from .scene import (BACKGROUND_KINDS, BACKGROUNDS, COLOURS, MATERIALS, POSITIONS, SHAPES, SIDE_POSITIONS, SIZES, STYLES,
                    Scene, WorldObject, random_object)
from .train import resumed_schedule

log = logging.getLogger("spdinv.world.concept_training")
WORD = "S"
RESULT_NAME = "concept-encoder.safetensors"
ATTRIBUTE_VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "material": MATERIALS, "style": STYLES}


class AttributeHead(nn.Module):
    """Linear read-outs of an object's attributes from the image encoder's last features (CLS and the
    mean of the patches), used only by the training's auxiliary loss (`ConceptEncoderConfig.attributes`)."""

    def __init__(self, width: int):
        super().__init__()
        self.read = nn.ModuleDict({name: nn.Linear(2 * width, len(values)) for name, values in ATTRIBUTE_VALUES.items()})

    def loss(self, last: Tensor, labels: dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy over the attributes; `last` is (B, 1 + patches, width)."""
        pooled = torch.cat([last[:, 0], last[:, 1:].mean(1)], dim=1)
        return sum(F.cross_entropy(read(pooled), labels[name]) for name, read in self.read.items()) / len(self.read)


def target_scene(rng: random.Random, obj: WorldObject) -> tuple[Scene, int]:
    """A scene holding `obj` (at a random position and size) among 0-2 random objects, and its index."""
    background = rng.choice([b for b in BACKGROUNDS if b != obj.colour])
    kind = "grid" if rng.random() < 0.25 else BACKGROUND_KINDS[0]
    count = rng.choices((1, 2, 3), weights=(0.4, 0.35, 0.25))[0]
    positions = [rng.choice(list(POSITIONS))] if count == 1 else rng.sample(SIDE_POSITIONS, count)
    placed = replace(obj, position=positions[0], size=rng.choice(SIZES))
    objects = [random_object(rng, p, background) for p in positions[1:]]
    index = rng.randrange(count)
    objects.insert(index, placed)
    return Scene(tuple(objects), background, kind), index


def posed(pixels: Tensor, poses: Tensor, background: tuple[int, int, int]) -> Tensor:
    """Concept images (B, 3, H, W) in [-1, 1] on a plain `background`, each moved by its pose row
    (rotation in degrees, scale, shift x and y in pixels, then an RGB shift of the object's colour in
    [-1, 1] units): the variety of a user's picture, which the fixed renders lack. The background stays
    plain (the sampling grid repeats the border)."""
    angle, scale = torch.deg2rad(poses[:, 0]), poses[:, 1]
    side = pixels.shape[-1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = -2 * poses[:, 2:4] / side  # output -> input coordinates, in grid units
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)
    moved = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    plain = torch.tensor(background, dtype=pixels.dtype).view(1, 3, 1, 1) / 127.5 - 1
    object_share = ((moved - plain).abs().amax(1, keepdim=True) * 8).clamp(0, 1)  # 1 inside, 0 on the background
    return (moved + object_share * poses[:, 4:7].view(-1, 3, 1, 1).to(pixels)).clamp(-1, 1)


def random_pose(rng: random.Random) -> list[float]:
    """One pose for `posed`: rotation +-20 degrees, scale 0.85-1.15, shift +-3 px, colour +-20/255 per channel."""
    return [rng.uniform(-20, 20), rng.uniform(0.85, 1.15), rng.uniform(-3, 3), rng.uniform(-3, 3),
            *(rng.uniform(-20, 20) / 127.5 for _ in range(3))]


IDENTITY_POSE = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def encoder_from_checkpoint(path: str | Path) -> ConceptEncoder:
    """The encoder of a training checkpoint (`checkpoint.pt` in a train-concept-encoder folder), for
    measuring a run part-way."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    encoder = ConceptEncoder(EncoderConfig.from_dict(payload["encoder_config"]))
    encoder.load_state_dict(payload["encoder"])
    return encoder.eval()


class ConceptEncoderTrainer:
    def __init__(self, work: Path, config: ConceptEncoderConfig, model: DiffusionModel | None = None,
                 encoder_config: EncoderConfig = EncoderConfig()):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.config = config
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.model = load_model() if model is None else model
        start = load_concept_encoder(config.start) if config.start else None
        encoder_config = encoder_config if start is None else start.config
        self.encoder = ConceptEncoder(encoder_config)
        if start is not None:
            self.encoder.load_state_dict(start.state_dict())
        width = self.model.text_encoder.get_input_embeddings().embedding_dim
        if encoder_config.word_width != width:
            raise SpdinvError(f"the encoder makes {encoder_config.word_width}-wide words; the model's text encoder "
                              f"takes {width}")
        self.tokenizer = ConceptTokenizer(self.model.tokenizer, WORD, encoder_config.levels)
        self.objects = [o for o in identities() if not is_held_out(o)]
        self.concept_pixels = torch.cat([to_tensor(concept_image(o)) for o in self.objects])
        self.teacher_words = self.start_words(start)
        self.labels = {name: torch.tensor([values.index(getattr(o, name)) for o in self.objects])
                       for name, values in ATTRIBUTE_VALUES.items()}
        self.head = AttributeHead(encoder_config.width)
        self.trained = [*self.encoder.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.AdamW(self.trained, lr=config.learning_rate, weight_decay=0.01)
        self.step = 0
        self.losses: list[float] = []

    def start_words(self, start: ConceptEncoder | None) -> Tensor | None:
        """The start encoder's words for each training identity's rendered concept image, (N, levels, width),
        when `word_teacher` keeps the words there."""
        if self.config.word_teacher == 0:
            return None
        if start is None:
            raise SpdinvError("--word-teacher needs --start (the encoder whose words it keeps)")
        with torch.no_grad():
            return start.eval()(self.concept_pixels.to(self.model.device)).float().cpu()

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.work / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        payload = {"step": self.step, "losses": self.losses, "config": asdict(self.config),
                   "encoder_config": asdict(self.encoder.config), "encoder": self.encoder.state_dict(),
                   "attribute_head": self.head.state_dict(),
                   "optimizer": self.optimizer.state_dict()}
        with atomic_file(self.checkpoint_path, "wb") as handle:
            torch.save(payload, handle)

    def resume(self) -> bool:
        """Continue from the work folder's checkpoint, if any (made with the same settings but --steps)."""
        if not self.checkpoint_path.is_file():
            return False
        payload = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        ours = {**asdict(self.config), "steps": None, "checkpoint_every": None, "threads": None}
        theirs = {**CONCEPT_ENCODER_SETTINGS_BEFORE, **payload["config"],
                  "steps": None, "checkpoint_every": None, "threads": None}
        if ours != theirs or payload["encoder_config"] != asdict(self.encoder.config):
            changed = sorted(k for k in ours if ours[k] != theirs.get(k)) or ["the encoder's shape"]
            raise SpdinvError(f"{self.checkpoint_path} was made with other settings ({', '.join(changed)}); "
                              "use another --out or the same settings")
        self.encoder.load_state_dict(payload["encoder"])
        if "attribute_head" in payload:
            self.head.load_state_dict(payload["attribute_head"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step, self.losses = payload["step"], payload["losses"]
        log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        return True

    # ---------------------------------------------------------------- one step
    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor, list[str], list[str], torch.Generator]:
        """(the objects' indices, their concept images' poses, target latents, captions with S, the same
        captions naming the object in words, the step's generator)."""
        cfg = self.config
        rng = random.Random(cfg.seed * 1_000_003 + step)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        chosen = [rng.randrange(len(self.objects)) for _ in range(cfg.batch)]
        scenes, prompts, worded = [], [], []
        for index in chosen:
            scene, position = target_scene(rng, self.objects[index])
            phrasing = Phrasing.random(rng)
            prompt = caption(scene, phrasing, {position: WORD})
            if rng.random() < cfg.w0_only:  # w0 alone: its token spelled out (the tokenizer expands only the word)
                prompt = prompt.replace(f" {WORD} ", f" {self.tokenizer.tokens[0]} ")
            scenes.append(scene)
            prompts.append(prompt)
            worded.append(caption(scene, phrasing))
        poses = torch.tensor([random_pose(rng) if rng.random() < cfg.augment else IDENTITY_POSE for _ in chosen])
        latents = None  # no UNet term: the targets are not rendered
        if cfg.diffusion > 0:
            latents = self.model.encode_image(torch.cat([to_tensor(render(s)) for s in scenes]))
        return torch.tensor(chosen), poses, latents, prompts, worded, generator

    def concept_batch(self, step: int, chosen: Tensor, poses: Tensor) -> Tensor:
        """The chosen identities' concept images (B, 3, 64, 64): rendered, posed (`augment`), and a `drawn`
        fraction replaced by randomised drawings (their own seeded draws: runs without them are unchanged)."""
        cfg = self.config
        pixels = self.concept_pixels[chosen]
        if cfg.augment > 0:
            pixels = posed(pixels, poses, BACKGROUNDS[CONCEPT_BACKGROUND])
        if cfg.drawn > 0:
            rng = random.Random(f"drawn {cfg.seed} {step}")
            for row, index in enumerate(chosen.tolist()):
                if rng.random() < cfg.drawn:
                    pixels[row] = to_tensor(random_drawing(self.objects[index], rng))[0]
        return pixels

    @torch.no_grad()
    def target(self, noisy: Tensor, timesteps: list[int], noise: Tensor, worded: list[str]) -> Tensor:
        """What the noise prediction under S is pulled to: the sampled noise, moved by `teacher` towards the
        frozen model's own prediction under the caption that names the object in words (a distillation
        target: same mean as the noise given the image, without its variance)."""
        if self.config.teacher == 0:
            return noise
        taught = self.model.eps(noisy, timesteps, self.model.encode_prompts_differentiable(worded))
        return torch.lerp(noise, taught.to(noise.dtype), self.config.teacher)

    def loss(self, step: int) -> tuple[torch.Tensor, float]:
        """(the step's loss, the part logged: the diffusion term, or the word-teacher term when the UNet
        is not run)."""
        cfg = self.config
        chosen, poses, latents, prompts, worded, generator = self.batch(step)
        features = self.encoder.features(self.concept_batch(step, chosen, poses).to(self.model.device))
        words = self.encoder.mapper(features)
        total, logged = cfg.word_l1 * words.abs().mean(), 0.0
        if cfg.diffusion > 0:
            diffusion = self.diffusion_loss(words, latents, prompts, worded, generator)
            total, logged = total + cfg.diffusion * diffusion, float(diffusion.detach())
        if cfg.attributes > 0:
            labels = {name: values[chosen].to(self.model.device) for name, values in self.labels.items()}
            total = total + cfg.attributes * self.head.loss(features[0], labels)
        if cfg.word_teacher > 0:
            target = self.teacher_words[chosen].to(words)
            kept = (words - target).square().mean() / target.square().mean()
            total = total + cfg.word_teacher * kept
            logged = logged if cfg.diffusion > 0 else float(kept.detach())
        return total, logged

    def diffusion_loss(self, words: Tensor, latents: Tensor, prompts: list[str], worded: list[str],
                       generator: torch.Generator) -> Tensor:
        """The frozen UNet's noise-prediction error on the target latents under the captions with S."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.model.device)
        with injected(self.model.text_encoder, self.tokenizer.first_id, words):
            embedding = self.model.text_encoder(ids)[0].float()
        timesteps = torch.randint(0, len(self.model.alphas_cumprod), (len(prompts),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        abar = self.model.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1).to(latents)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        target = self.target(noisy, timesteps.tolist(), noise, worded)
        return F.mse_loss(self.model.eps(noisy, timesteps.tolist(), embedding), target)

    # ---------------------------------------------------------------- the run
    def train(self, progress: bool = True, log_every: int = 25, until: int | None = None) -> None:
        """Train to `config.steps` (or stop early at step `until`, as an interrupted run would)."""
        cfg = self.config
        end = cfg.steps if until is None else min(until, cfg.steps)
        schedule = resumed_schedule(
            self.optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))), self.step)
        self.encoder.train()
        started, since = time.time(), self.step
        bar = tqdm(total=cfg.steps, initial=self.step, desc="concept encoder", disable=not progress)
        while self.step < end:
            loss, diffusion = self.loss(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
            self.optimizer.step()
            schedule.step()
            self.step += 1
            self.losses.append(diffusion)
            bar.update(1)
            bar.set_postfix(loss=f"{diffusion:.4f}")
            if self.step % log_every == 0:
                recent = self.losses[-log_every:]
                log.info("step %d loss %.5f (mean of %d) lr %.2e, %.2f s/step", self.step,
                         sum(recent) / len(recent), len(recent), schedule.get_last_lr()[0],
                         (time.time() - started) / (self.step - since))
            if self.step % cfg.checkpoint_every == 0 or self.step == end:
                self.save_checkpoint()
        bar.close()
        self.encoder.eval()

    def save_result(self, out: Path) -> Path:
        window = min(100, len(self.losses))
        logged = "diffusion" if self.config.diffusion > 0 else "word_teacher"  # what `loss` logs
        first, last = self.losses[:window], self.losses[-window:]
        extra = {"training": asdict(self.config), "steps_done": self.step, "held_out_pairs": HELD_OUT_PAIRS,
                 "concept_image": "the object alone, large, centre, on plain gray (concept_encoder.concept_image)",
                 f"{logged}_loss_first_100": sum(first) / max(1, len(first)),
                 f"{logged}_loss_last_100": sum(last) / max(1, len(last))}
        return save_concept_encoder(self.encoder, Path(out) / RESULT_NAME, extra)
