"""Tiny randomly initialised pipelines built in memory (no downloads), the way diffusers' own fast
tests build theirs: SD, SDXL, SD3 / SD3.5 (T5 present or not) and FLUX.1 (dev, schnell). For tests
and quick experiments."""

from __future__ import annotations

import math
import random
import string
import zlib
from contextlib import contextmanager
from typing import Iterator

import torch
from PIL import Image, ImageDraw
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from torch import Tensor
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel,
                          T5TokenizerFast)

from .editing import ENGINES
from .inversion import METHODS
from .model import DiffusionModel, from_pipeline
from .world.tokenizer import build_tokenizer, text_config_fields
from .schedule import sd_ddim_scheduler

# What runs on the tiny SD / SDXL test models (UNets, denoising diffusion): rf_edit shares a flow
# transformer's joint-attention values; the flow-only methods invert rectified-flow models.
UNET_ENGINES = [e for e in ENGINES if e != "rf_edit"]
DIFFUSION_METHODS = [m for m in METHODS if not METHODS[m].flow_only]


def tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD's DDIM scheduler for a network trained to predict `prediction_type`."""
    return DDIMScheduler.from_config(sd_ddim_scheduler().config, prediction_type=prediction_type)


def tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """32x32 images, 8x8x4 latents, two UNet levels with cross-attention, a 2-layer CLIP encoder;
    `prediction_type` v_prediction makes it an SD 2.x v model (same weights, another objective)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config_fields(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=tiny_scheduler(prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_xl_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionXLPipeline:
    """A tiny SDXL with SDXL's layout (after diffusers' own fast tests): a first level without
    attention, two transformer layers per attention block, two CLIP encoders (32 + 48 -> 80 wide
    token states, a 32-dim pooled projection), added time ids, an upcast VAE and zeros for the
    empty prompt. 32x32 images, 8x8x4 latents."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = dict(**text_config_fields(tokenizer), intermediate_size=37, num_attention_heads=4, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(**config, hidden_size=32, num_hidden_layers=3))
    # SDXL's second encoder is wider and deeper than the first (diffusers tells an SDXL checkpoint by its 10th layer).
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config, hidden_size=48, num_hidden_layers=10,
                                                                projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=80, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, scaling_factor=0.13025, force_upcast=True,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=tiny_scheduler(prediction_type), force_zeros_for_empty_prompt=True,
    )


def tiny_t5(seed: int = 0, width: int = 32) -> tuple[T5TokenizerFast, T5EncoderModel]:
    """A Unigram T5 tokenizer over the shapes world's words (letters for anything else) and a
    2-layer T5 encoder `width` wide."""
    from .world.captions import vocabulary

    torch.manual_seed(seed)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in vocabulary()]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + "\u2581"]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_ff=37, d_kv=8, num_layers=2,
                                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    return tokenizer, encoder


def tiny_flow_vae() -> AutoencoderKL:
    """The SD3 / FLUX VAE's layout at toy size: 4 latent channels, a shift factor, no quant convs; x4."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1,
        norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )


def _clip_config(tokenizer, hidden: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(**text_config_fields(tokenizer), hidden_size=hidden, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu", **extra)


def tiny_sd3_pipeline(seed: int = 0, *, t5: bool = False, dual_attention_layers: tuple[int, ...] = (),
                      shift: float = 3.0) -> StableDiffusion3Pipeline:
    """A tiny SD3 (SD3.5-medium-like with `dual_attention_layers` and qk RMS norm): two CLIP encoders
    with projections (16 + 16 wide, pooled 32), T5 (32 wide) or none, a 2-layer MMDiT on 8x8x4
    latents (patch 2), FlowMatchEulerDiscreteScheduler with `shift`. 32x32 images."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, 16, projection_dim=16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, 16, projection_dim=16))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, dual_attention_layers=dual_attention_layers,
        qk_norm="rms_norm" if dual_attention_layers else None,
    )
    tokenizer_3, text_encoder_3 = tiny_t5(seed) if t5 else (None, None)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=tiny_flow_vae(),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def tiny_flux_pipeline(seed: int = 0, *, guidance: bool = True) -> FluxPipeline:
    """A tiny FLUX.1: dev-like (`guidance`: a distilled-guidance input) or schnell-like (none); a CLIP
    encoder for the pooled embedding (32), T5 for the tokens (32 wide), one double and one single
    block on 2x2-packed 8x8x4 latents, FLUX's scheduler (dynamic shift). 32x32 images."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 32))
    tokenizer_2, text_encoder_2 = tiny_t5(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0 if guidance else 1.0, use_dynamic_shifting=guidance,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_flow_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    return pipe


def tiny_model(seed: int = 0) -> DiffusionModel:
    return from_pipeline(tiny_pipeline(seed), name=f"tiny-{seed}")


def sd15_layout_unet(seed: int = 0) -> UNet2DConditionModel:
    """A random UNet with SD 1.x's block layout at tiny widths: 64x64 latent, three cross-attention
    down blocks and up blocks of two (down) or three (up) transformer blocks each, 16 of each kind
    of attention, cross-attention at 64, 32 and 16 tokens a side: the layers the official engines name."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=64, block_out_channels=(16, 16, 32, 32), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=4, norm_num_groups=8)


@contextmanager
def unet_batch_sizes(unet: torch.nn.Module) -> Iterator[list[int]]:
    """The batch size of every UNet call made inside the block, in order."""
    sizes: list[int] = []
    hook = unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        hook.remove()


@contextmanager
def shape_dependent_unet_rounding(relative: float = 1e-6) -> Iterator[None]:
    """Inside the block, every UNet2DConditionModel's (and SD3 / FLUX transformer's) output is
    multiplied by (1 + relative * n), where n ~ N(0, 1) is a fixed pattern chosen by the output's
    shape alone.

    Real hardware rounds the same UNet differently for different batch shapes (CPU vector
    kernels, cuDNN/cuBLAS algorithm choice per shape), at about 1e-7..1e-6 relative; it rounds a
    repeated computation of one shape identically. This reproduces both on any machine, so code
    that only works when a batch of 2 and a batch of 4 agree bit for bit fails everywhere, not
    only on another CPU. Gradients flow through the factor."""
    from torch.nn.modules.module import register_module_forward_hook

    patterns: dict[tuple[int, ...], Tensor] = {}

    def pattern(shape: torch.Size) -> Tensor:
        key = tuple(shape)
        if key not in patterns:
            seed = zlib.crc32(repr(key).encode())
            patterns[key] = torch.randn(key, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return patterns[key]

    def perturb(module: torch.nn.Module, args: tuple, output):
        if not isinstance(module, (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel)):
            return None
        sample = output[0] if isinstance(output, tuple) else output.sample
        factor = (1 + relative * pattern(sample.shape)).to(sample.device, sample.dtype)
        sample = sample * factor
        return (sample, *output[1:]) if isinstance(output, tuple) else type(output)(sample=sample)

    handle = register_module_forward_hook(perturb)
    try:
        yield
    finally:
        handle.remove()


def same_up_to_rounding(actual: Tensor, expected: Tensor, relative: float = 1e-4) -> bool:
    """Whether two results of differently shaped computations agree: the largest difference at
    most `relative` of the largest magnitude. Under shape_dependent_unet_rounding(1e-6), a 6-step
    edit on the tiny model at guidance 7.5 differs by about 1e-5 of the latents' magnitude between
    batch layouts (real CPUs measured 2-4e-5 absolute on latents near 4); a row taken from the
    wrong branch differs by 1e-2 or more. 1e-4 sits between the two."""
    scale = max(float(actual.abs().max()), float(expected.abs().max()), 1e-12)
    return float((actual - expected).abs().max()) <= relative * scale


def hand_drawn_object(shape: str, rgb: tuple[int, int, int], background: tuple[int, int, int],
                      rng: random.Random) -> Image.Image:
    """One filled shape drawn with PIL's plain (aliased) primitives on a 64x64 plain background, with
    geometry of its own rather than the world renderer's: a random size (radius 10.5-14.5 px; the
    world's large objects have 12.5), centre offset (up to 3 px), rotation (up to 20 degrees),
    per-vertex jitter (1.5 px) and a shade of `rgb` moved by up to 20 per channel. For measuring
    encoders on images the world renderer did not draw."""
    image = Image.new("RGB", (64, 64), background)
    cx, cy = 32 + rng.uniform(-3, 3), 32 + rng.uniform(-3, 3)
    r, turn = rng.uniform(10.5, 14.5), math.radians(rng.uniform(-20, 20))
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in rgb)

    def points(corners: list[tuple[float, float]]) -> list[tuple[float, float]]:  # unit offsets -> pixels
        return [(cx + r * (x * math.cos(turn) - y * math.sin(turn)) + rng.uniform(-1.5, 1.5),
                 cy + r * (x * math.sin(turn) + y * math.cos(turn)) + rng.uniform(-1.5, 1.5)) for x, y in corners]

    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    draw = ImageDraw.Draw(image)
    if shape == "circle":
        aspect = rng.uniform(0.9, 1.1)
        draw.ellipse((cx - r * aspect, cy - r / aspect, cx + r * aspect, cy + r / aspect), fill=fill)
    elif shape == "square":
        draw.polygon(points([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]), fill=fill)
    elif shape == "triangle":
        draw.polygon(points([(0, -1), (0.95, 0.75), (-0.95, 0.75)]), fill=fill)
    elif shape == "hexagon":
        draw.polygon(points(ring(6, 0.95, math.pi / 6)), fill=fill)
    elif shape == "star":
        inner = rng.uniform(0.38, 0.55)
        spikes = zip(ring(5, 1.05, -math.pi / 2), ring(5, inner, -math.pi / 2 + math.pi / 5))
        draw.polygon(points([p for pair in spikes for p in pair]), fill=fill)
    elif shape == "heart":  # two lobes and a point, as a child draws it
        lobe = 0.5 * r
        for side in (-1, 1):
            lx, ly = cx + side * lobe * 0.95, cy - 0.35 * r
            draw.ellipse((lx - lobe, ly - lobe, lx + lobe, ly + lobe), fill=fill)
        draw.polygon([(cx - 1.42 * lobe, cy - 0.15 * r), (cx + 1.42 * lobe, cy - 0.15 * r), (cx, cy + 0.95 * r)],
                     fill=fill)
    else:
        raise ValueError(f"no drawing for shape {shape!r}")
    return image


def hand_drawn_square() -> Image.Image:
    """A large purple square on a brown background drawn with PIL (64x64), off the shapes world's
    grid and palette: other shades, an off-centre square. Not an image the world renderer draws."""
    image = Image.new("RGB", (64, 64), (120, 72, 40))
    ImageDraw.Draw(image).rectangle((17, 15, 47, 45), fill=(140, 50, 170))
    return image
