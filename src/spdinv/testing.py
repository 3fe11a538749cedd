"""A tiny randomly initialised Stable Diffusion pipeline built in memory (no downloads), the way
diffusers' own fast tests build theirs. For tests and quick experiments."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .model import DiffusionModel, from_pipeline
from .world.tokenizer import build_tokenizer
from .world.train import sd_ddim_scheduler


def tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD's DDIM scheduler for a network trained to predict `prediction_type`."""
    return DDIMScheduler.from_config(sd_ddim_scheduler().config, prediction_type=prediction_type)


def tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """32x32 images, 8x8x4 latents, two UNet levels with cross-attention, a 2-layer CLIP encoder;
    `prediction_type` v_prediction makes it an SD 2.x v model (same weights, another objective)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
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
    attention, two transformer layers per attention block, two CLIP encoders (32 + 32 -> 64 wide
    token states, a 32-dim pooled projection), added time ids, an upcast VAE and zeros for the
    empty prompt. 32x32 images, 8x8x4 latents."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=16,
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


def tiny_model(seed: int = 0) -> DiffusionModel:
    return from_pipeline(tiny_pipeline(seed), name=f"tiny-{seed}")


@contextmanager
def unet_batch_sizes(unet: torch.nn.Module) -> Iterator[list[int]]:
    """The batch size of every UNet call made inside the block, in order."""
    sizes: list[int] = []
    hook = unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        hook.remove()


_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION_TO_LDM = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(f".{old}.", f".{new}.")
    return key


def _block_key(blocks: str, index: int, kind: str, rest: list[str], slot: str | None = None) -> str:
    """A resnet (renamed layers) or attention (same names) of an original-layout UNet block."""
    slot = ("0." if kind == "resnets" else "1.") if slot is None else slot
    key = f"{blocks}.{index}.{slot}" + ".".join(rest)
    return _rename(key, _RESNET_TO_LDM) if kind == "resnets" else key


def _unet_key_to_ldm(key: str, unet) -> str:
    """A diffusers UNet2DConditionModel key in the original (CompVis) layout, the inverse of what
    diffusers' convert_ldm_unet_checkpoint reads."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in fixed:
        return fixed[key]
    per_block = unet.config.layers_per_block + 1
    parts = key.split(".")
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * per_block}.0.op." + ".".join(parts[5:])
        index = block * per_block + int(parts[3]) + 1
        return _block_key("input_blocks", index, kind, parts[4:])
    if parts[0] == "mid_block":
        index = 2 * int(parts[2]) if parts[1] == "resnets" else 1
        return _block_key("middle_block", index, parts[1], parts[3:], slot="")
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            slot = 2 if getattr(unet.up_blocks[block], "attentions", None) else 1
            return f"output_blocks.{block * per_block + per_block - 1}.{slot}." + ".".join(parts[4:])
        return _block_key("output_blocks", block * per_block + int(parts[3]), kind, parts[4:])
    raise KeyError(f"no original-layout name for UNet key {key}")


def _vae_key_to_ldm(key: str, vae) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key]
    parts = key.split(".")
    levels = len(vae.config.block_out_channels)
    if parts[1] == "mid_block":
        if parts[2] == "attentions":
            return _rename(f"{parts[0]}.mid.attn_1." + ".".join(parts[4:]), _VAE_ATTENTION_TO_LDM)
        return _rename(f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:]), (("conv_shortcut", "nin_shortcut"),))
    if parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
        where = "down" if parts[1] == "down_blocks" else "up"
        if parts[3] in ("downsamplers", "upsamplers"):
            return f"{parts[0]}.{where}.{level}.{'downsample' if where == 'down' else 'upsample'}." + ".".join(parts[5:])
        return _rename(f"{parts[0]}.{where}.{level}.block.{parts[4]}." + ".".join(parts[5:]), (("conv_shortcut", "nin_shortcut"),))
    raise KeyError(f"no original-layout name for VAE key {key}")


def save_ldm_checkpoint(pipe: StableDiffusionPipeline, path) -> None:
    """Save an SD 1.x pipeline as one original-layout (CompVis/A1111) .safetensors checkpoint: what
    community checkpoints look like, for single-file loading tests."""
    from safetensors.torch import save_file

    state = {}
    for key, tensor in pipe.unet.state_dict().items():
        state["model.diffusion_model." + _unet_key_to_ldm(key, pipe.unet)] = tensor
    for key, tensor in pipe.vae.state_dict().items():
        ldm = _vae_key_to_ldm(key, pipe.vae)
        if ".mid.attn_1." in ldm and tensor.dim() == 2:  # the original VAE attention is 1x1 convolutions
            tensor = tensor[:, :, None, None]
        state["first_stage_model." + ldm] = tensor
    for key, tensor in pipe.text_encoder.state_dict().items():
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = tensor
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
