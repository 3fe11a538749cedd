"""A diffusers SD 1.x or SDXL pipeline written as one checkpoint in the original (CompVis /
Stability) layout that community single-file checkpoints use: the inverse of diffusers'
single-file conversion (`diffusers.loaders.single_file_utils`), for tests of single-file loading."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_OPEN_CLIP_LAYER = (("self_attn", "attn"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"))


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(f".{old}.", f".{new}.")
    return key


def _block_key(blocks: str, index: int, kind: str, rest: list[str], slot: str | None = None) -> str:
    """A resnet (renamed layers) or attention (same names) of an original-layout UNet block."""
    slot = ("0." if kind == "resnets" else "1.") if slot is None else slot
    key = f"{blocks}.{index}.{slot}" + ".".join(rest)
    return _rename(key, _RESNET) if kind == "resnets" else key


def unet_key(key: str, unet) -> str:
    """A UNet2DConditionModel key in the original layout (what convert_ldm_unet_checkpoint reads)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"] | DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    if key in fixed:
        return fixed[key]
    per_block = unet.config.layers_per_block + 1
    parts = key.split(".")
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * per_block}.0.op." + ".".join(parts[5:])
        return _block_key("input_blocks", block * per_block + int(parts[3]) + 1, kind, parts[4:])
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


def vae_key(key: str, vae) -> str:
    """An AutoencoderKL key in the original layout (what convert_ldm_vae_checkpoint reads)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key]
    parts = key.split(".")
    if parts[1] == "mid_block":
        if parts[2] == "attentions":
            return _rename(f"{parts[0]}.mid.attn_1." + ".".join(parts[4:]), _VAE_ATTENTION)
        return _rename(f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:]), _VAE_RESNET)
    if parts[1] in ("down_blocks", "up_blocks"):
        down = parts[1] == "down_blocks"
        level = int(parts[2]) if down else len(vae.config.block_out_channels) - 1 - int(parts[2])
        where = f"{parts[0]}.{'down' if down else 'up'}.{level}"
        if parts[3] in ("downsamplers", "upsamplers"):
            return f"{where}.{'downsample' if down else 'upsample'}." + ".".join(parts[5:])
        return _rename(f"{where}.block.{parts[4]}." + ".".join(parts[5:]), _VAE_RESNET)
    raise KeyError(f"no original-layout name for VAE key {key}")


def open_clip_state(encoder, prefix: str) -> dict[str, Tensor]:
    """A CLIP text encoder in OpenCLIP's layout (SDXL's second encoder): fused q/k/v projections,
    a transposed text projection (what convert_open_clip_checkpoint reads)."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    for suffix in ("weight", "bias"):
        out[prefix + f"ln_final.{suffix}"] = state.pop(f"final_layer_norm.{suffix}")
    for layer in range(encoder.config.num_hidden_layers):
        head = f"encoder.layers.{layer}."
        for suffix in ("weight", "bias"):
            fused = torch.cat([state.pop(f"{head}self_attn.{p}_proj.{suffix}") for p in "qkv"])
            out[prefix + f"transformer.resblocks.{layer}.attn.in_proj_{suffix}"] = fused
    for key, tensor in state.items():
        out[prefix + "transformer." + _rename("." + key.replace("encoder.layers.", "resblocks."), _OPEN_CLIP_LAYER)[1:]] = tensor
    return out


def save_original_checkpoint(pipe, path: str | Path) -> None:
    """Save an SD 1.x or SDXL pipeline as one original-layout .safetensors checkpoint."""
    from safetensors.torch import save_file

    state = {"model.diffusion_model." + unet_key(k, pipe.unet): v for k, v in pipe.unet.state_dict().items()}
    for key, tensor in pipe.vae.state_dict().items():
        name = vae_key(key, pipe.vae)
        if ".mid.attn_1." in name and tensor.dim() == 2:  # the original VAE attention is 1x1 convolutions
            tensor = tensor[:, :, None, None]
        state["first_stage_model." + name] = tensor
    first = "conditioner.embedders.0.transformer.text_model." if hasattr(pipe, "text_encoder_2") else \
        "cond_stage_model.transformer.text_model."
    state.update({first + k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()})
    if hasattr(pipe, "text_encoder_2"):
        state.update(open_clip_state(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
