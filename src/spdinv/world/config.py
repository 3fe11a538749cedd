"""Training settings of the shapes-world model, kept apart from the trainer so that listing them
as command-line options does not import the trainer and its diffusers / transformers classes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    seed: int = 0
    n_scenes: int = 20000
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 3600
    unet_batch: int = 32
    unet_lr: float = 6e-4
    unet_warmup: int = 200
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    checkpoint_every: int = 200
    threads: int = 1
    device: str = "cpu"  # e.g. cuda: the same seeded run (random draws stay on the CPU generator)


@dataclass
class FlowTrainConfig:
    """Training settings of the rectified-flow shapes-world model (`spdinv world train --flow`). The fields
    shared with TrainConfig have its names and defaults (one command line lists both); the flow model's
    own fields start with `flow_`. The VAE, text encoder and tokenizer come frozen from the shipped model."""

    seed: int = 0
    n_scenes: int = 20000
    flow_steps: int = 6000
    flow_batch: int = 32
    flow_lr: float = 1e-3
    flow_warmup: int = 200
    flow_layers: int = 4  # MMDiT blocks (SD3Transformer2DModel num_layers)
    flow_heads: int = 4
    flow_head_dim: int = 32
    flow_shift: float = 1.0  # FlowMatchEulerDiscreteScheduler's shift, used in training and in the scheduler
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    checkpoint_every: int = 200
    flow_export_every: int = 0  # also write the EMA weights to --out every N steps (0: only at the end)
    threads: int = 1
    device: str = "cpu"


# Fields whose change would make a checkpoint another run (the rest may change when a run is resumed).
FLOW_RUN_FIELDS = ("seed", "n_scenes", "flow_batch", "flow_lr", "flow_warmup", "flow_layers", "flow_heads",
                   "flow_head_dim", "flow_shift", "ema_decay", "caption_dropout")


@dataclass
class ConceptEncoderConfig:
    """Training settings of the concept encoder (`spdinv world train-concept-encoder`); the defaults are
    the shipped encoder's run."""

    seed: int = 0
    steps: int = 1500
    batch: int = 32
    learning_rate: float = 5e-4
    warmup: int = 100
    word_l1: float = 0.01  # ELITE's regulariser: word_l1 * mean |w| over every word
    w0_only: float = 0.5  # fraction of samples whose placeholder is w0 alone (else all words, ELITE's training)
    # Share of the noise-prediction target taken from the frozen model under the object's own words
    # (0: the sampled noise, ELITE's target; 1: distillation from the caption that names the object)
    teacher: float = 1.0
    # Weight of an auxiliary loss that reads the object's attributes (shape, colour, material, style) off the
    # image encoder's last features with a linear head used only in training; it stands in for the CLIP
    # pretraining ELITE's image encoder has and ours, trained from scratch, lacks
    attributes: float = 1.0
    # Fraction of the concept images shown in a random pose (rotation, scale, shift, shade of the object's
    # colour: concept_training.random_pose) rather than exactly as rendered
    augment: float = 0.0
    # Fraction of the concept images replaced by a randomised drawing of the identity (concept_drawing.
    # random_drawing: geometry, proportions, shades, fills, edges and backgrounds the renderer never makes)
    drawn: float = 0.0
    # A concept encoder (.safetensors) to start from instead of random weights ("": from scratch)
    start: str = ""
    # Weight of matching each concept image's words (rendered or drawn) to the `start` encoder's words for
    # the identity's rendered concept image (relative squared error: the squared error over the mean
    # squared target); it keeps a fine-tuned encoder's words where the shipped ones were
    word_teacher: float = 0.0
    # Weight of the noise-prediction term (0: the frozen UNet is not run at all)
    diffusion: float = 1.0
    checkpoint_every: int = 100
    threads: int = 1


# The value of each setting added after the first concept-encoder runs that trains as those runs did
# (a checkpoint without the setting resumes with it).
CONCEPT_ENCODER_SETTINGS_BEFORE = {"teacher": 0.0, "attributes": 0.0, "augment": 0.0, "drawn": 0.0, "start": "",
                                   "word_teacher": 0.0, "diffusion": 1.0}
