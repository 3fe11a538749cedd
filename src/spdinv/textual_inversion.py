"""Textual inversion: learn a concept word's embedding from one image on the frozen model.

The placeholder's vectors are the only trainable values; the loss is the diffusion loss (the
predicted noise against the added noise, at uniformly drawn training timesteps) of the image's
latent under a prompt that contains the placeholder (Gal et al. 2022; diffusers'
textual_inversion example, one image, no augmentation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm

from .concepts import Concept, check_word, mentions
from .errors import SpdinvError
from .images import conform_image, to_tensor
from .model import DiffusionModel


@dataclass
class LearnOptions:
    steps: int = 150
    learning_rate: float = 0.02
    batch: int = 4  # timesteps drawn per step
    seed: int = 0


@dataclass
class LearnResult:
    concept: Concept
    losses: list[float]  # per step


def initial_vector(model: DiffusionModel, word: str) -> torch.Tensor:
    """The mean input embedding of the tokens the word is spelled with (1, width)."""
    ids = model.tokenizer(word, add_special_tokens=False).input_ids
    return model.text_encoder.get_input_embeddings().weight[ids].detach().float().mean(0, keepdim=True).cpu()


def check_learn_prompt(prompt: str, word: str) -> None:
    if not mentions(prompt, word):
        raise SpdinvError(f"the prompt {prompt!r} does not contain the concept word {word!r} as a word")


def learn_concept(model: DiffusionModel, image: Image.Image, prompt: str, word: str = "S",
                  options: LearnOptions = LearnOptions(), *, progress: bool = True) -> LearnResult:
    check_word(word)
    check_learn_prompt(prompt, word)
    if options.steps < 1 or options.batch < 1 or not options.learning_rate > 0:
        raise SpdinvError("steps and batch must be at least 1 and the learning rate positive")
    z0 = model.encode_image(to_tensor(conform_image(image, model.image_size)[0]))
    generator = torch.Generator().manual_seed(options.seed)
    vectors = initial_vector(model, word).to(model.device).requires_grad_(True)
    learner = model.with_concept(Concept(word, vectors))  # holds `vectors` itself: updates show through
    optimiser = torch.optim.Adam([vectors], lr=options.learning_rate)
    train_steps = len(model.alphas_cumprod)
    losses = []
    for _ in tqdm(range(options.steps), desc="learning concept", disable=not progress, leave=False):
        timesteps = torch.randint(0, train_steps, (options.batch,), generator=generator)
        noise = torch.randn((options.batch, *z0.shape[1:]), generator=generator).to(z0)
        abar = model.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1).to(z0)
        noisy = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        embedding = learner.encode_prompts_differentiable([prompt])
        loss = torch.nn.functional.mse_loss(learner.eps(noisy, timesteps.tolist(), embedding), noise)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return LearnResult(Concept(word, vectors.detach().cpu().clone()), losses)
