"""A port of PnPInversion's MasaCtrl editing script, for benchmarks/official_engines.py.

Follows cure-lab/PnPInversion `run_editing_masactrl.py` (`load_image`, `MasaCtrlEditor.__init__` and
`edit_image_ddim_MasaCtrl`), its `models/masactrl/diffuser_utils.py` (`MasaCtrlPipeline.next_step`,
`step`, `image2latent`, `__call__`, `invert`) and TencentARC/MasaCtrl's `masactrl/masactrl_utils.py`
(`AttentionBase`, `regiter_attention_editor_diffusers`) and `masactrl/masactrl.py`
(`MutualSelfAttentionControl`), which the script imports (PnPInversion's copies of the last two are not
in the stored index). Names and structure kept; patched only where the environment forces it:

- the pipeline is a plain class on the given model's VAE, tokenizer, text encoder and UNet (float32,
  CPU) instead of `StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")`; the
  scheduler is the script's own `DDIMScheduler(beta_start=0.00085, beta_end=0.012, "scaled_linear",
  clip_sample=False, set_alpha_to_one=False)` (the shipped model's betas; diffusers' default
  steps_offset 0, so timesteps 980 ... 0, not SD's 981 ... 1);
- sizes: the tokenizer's model_max_length (48) for 77, the model's image size for 512, its VAE's factor
  for 8 and `scaling_factor` for 0.18215; `unet.config.in_channels` for the deprecated `unet.in_channels`;
- einops is not installed: its `rearrange`s written as reshape / permute;
- MasaCtrl's layers: `MODEL_TYPE["SD"]` = 16 transformer layers, `start_layer` 10, become this UNet's
  count (`num_att_layers // 2`) and SD's fraction of it rounded half up (10/16 x 7 = 4.375 -> 4 on the
  shipped UNet), as spdinv's `start_layer` 0.625 does; on SD both give 10 of 16;
- the "direct synthesis" `image_fixed` (an unedited sample with the target prompt, only displayed),
  the prints and the written image grid are left out; the editor's `forward`s are removed afterwards.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


def _heads_to_batch(t, h):  # rearrange(t, 'b n (h d) -> (b h) n d', h=h)
    b, n, hd = t.shape
    return t.reshape(b, n, h, hd // h).permute(0, 2, 1, 3).reshape(b * h, n, hd // h)


def _batch_to_heads(t, h):  # rearrange(t, '(b h) n d -> b n (h d)', h=h)
    bh, n, d = t.shape
    return t.reshape(bh // h, h, n, d).permute(0, 2, 1, 3).reshape(bh // h, n, h * d)


class AttentionBase:
    def __init__(self):
        self.cur_step = 0
        self.num_att_layers = -1
        self.cur_att_layer = 0

    def after_step(self):
        pass

    def __call__(self, q, k, v, sim, attn, is_cross, place_in_unet, num_heads, **kwargs):
        out = self.forward(q, k, v, sim, attn, is_cross, place_in_unet, num_heads, **kwargs)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.after_step()
        return out

    def forward(self, q, k, v, sim, attn, is_cross, place_in_unet, num_heads, **kwargs):
        out = torch.einsum("b i j, b j d -> b i d", attn, v)
        return _batch_to_heads(out, num_heads)


class MutualSelfAttentionControl(AttentionBase):
    MODEL_TYPE = {"SD": 16, "SDXL": 70}

    def __init__(self, start_step=4, start_layer=10, layer_idx=None, step_idx=None, total_steps=50, model_type="SD",
                 total_layers=None):
        super().__init__()
        self.total_steps = total_steps
        self.total_layers = total_layers or self.MODEL_TYPE.get(model_type, 16)  # patch: the UNet's own count
        self.start_step = start_step
        self.start_layer = start_layer
        self.layer_idx = layer_idx if layer_idx is not None else list(range(start_layer, self.total_layers))
        self.step_idx = step_idx if step_idx is not None else list(range(start_step, total_steps))

    def attn_batch(self, q, k, v, sim, attn, is_cross, place_in_unet, num_heads, **kwargs):
        b = q.shape[0] // num_heads
        # rearrange(x, "(b h) n d -> h (b n) d", h=num_heads)
        q, k, v = (x.reshape(-1, num_heads, *x.shape[1:]).transpose(0, 1).reshape(num_heads, -1, x.shape[-1])
                   for x in (q, k, v))
        sim = torch.einsum("h i d, h j d -> h i j", q, k) * kwargs.get("scale")
        attn = sim.softmax(-1)
        out = torch.einsum("h i j, h j d -> h i d", attn, v)
        # rearrange(out, "h (b n) d -> b n (h d)", b=b)
        return out.reshape(num_heads, b, -1, out.shape[-1]).permute(1, 2, 0, 3).reshape(b, -1, num_heads * out.shape[-1])

    def forward(self, q, k, v, sim, attn, is_cross, place_in_unet, num_heads, **kwargs):
        if is_cross or self.cur_step not in self.step_idx or self.cur_att_layer // 2 not in self.layer_idx:
            return super().forward(q, k, v, sim, attn, is_cross, place_in_unet, num_heads, **kwargs)
        qu, qc = q.chunk(2)
        ku, kc = k.chunk(2)
        vu, vc = v.chunk(2)
        attnu, attnc = attn.chunk(2)
        out_u = self.attn_batch(qu, ku[:num_heads], vu[:num_heads], sim[:num_heads], attnu, is_cross, place_in_unet,
                                num_heads, **kwargs)
        out_c = self.attn_batch(qc, kc[:num_heads], vc[:num_heads], sim[:num_heads], attnc, is_cross, place_in_unet,
                                num_heads, **kwargs)
        return torch.cat([out_u, out_c], dim=0)


def regiter_attention_editor_diffusers(model, editor: AttentionBase):
    def ca_forward(self, place_in_unet):
        def forward(x, encoder_hidden_states=None, attention_mask=None, context=None, mask=None):
            if encoder_hidden_states is not None:
                context = encoder_hidden_states
            if attention_mask is not None:
                mask = attention_mask
            to_out = self.to_out[0] if isinstance(self.to_out, nn.modules.container.ModuleList) else self.to_out
            h = self.heads
            q = self.to_q(x)
            is_cross = context is not None
            context = context if is_cross else x
            k = self.to_k(context)
            v = self.to_v(context)
            q, k, v = (_heads_to_batch(t, h) for t in (q, k, v))
            sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
            if mask is not None:
                raise NotImplementedError("attention masks: SD passes none")  # the script's mask branch, unused
            attn = sim.softmax(dim=-1)
            out = editor(q, k, v, sim, attn, is_cross, place_in_unet, self.heads, scale=self.scale)
            return to_out(out)

        return forward

    def register_editor(net, count, place_in_unet):
        for name, subnet in net.named_children():
            if net.__class__.__name__ == "Attention":  # spatial Transformer layer
                net.forward = ca_forward(net, place_in_unet)
                return count + 1
            elif hasattr(net, "children"):
                count = register_editor(subnet, count, place_in_unet)
        return count

    cross_att_count = 0
    for net_name, net in model.unet.named_children():
        if "down" in net_name:
            cross_att_count += register_editor(net, 0, "down")
        elif "mid" in net_name:
            cross_att_count += register_editor(net, 0, "mid")
        elif "up" in net_name:
            cross_att_count += register_editor(net, 0, "up")
    editor.num_att_layers = cross_att_count


def unregister(unet):
    """Patch: remove the instance `forward`s regiter_attention_editor_diffusers installed."""
    for module in unet.modules():
        if "forward" in vars(module):
            del module.forward


class MasaCtrlPipeline:
    """The script's MasaCtrlPipeline (a StableDiffusionPipeline subclass) on in-memory components."""

    def __init__(self, model, scheduler):
        self.vae, self.tokenizer, self.text_encoder, self.unet = model.vae, model.tokenizer, model.text_encoder, model.unet
        self.scheduler = scheduler
        self.max_length = self.tokenizer.model_max_length  # 77 in the script
        self.factor = model.vae_scale_factor  # 8
        self.scaling = model.vae.config.scaling_factor  # 0.18215

    def next_step(self, model_output, timestep, x, eta=0.0):
        next_step = timestep
        timestep = min(timestep - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps, 999)
        alpha_prod_t = self.scheduler.alphas_cumprod[timestep] if timestep >= 0 else self.scheduler.final_alpha_cumprod
        alpha_prod_t_next = self.scheduler.alphas_cumprod[next_step]
        beta_prod_t = 1 - alpha_prod_t
        pred_x0 = (x - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        pred_dir = (1 - alpha_prod_t_next) ** 0.5 * model_output
        return alpha_prod_t_next ** 0.5 * pred_x0 + pred_dir, pred_x0

    def step(self, model_output, timestep, x, eta=0.0):
        prev_timestep = timestep - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        alpha_prod_t = self.scheduler.alphas_cumprod[timestep]
        alpha_prod_t_prev = (self.scheduler.alphas_cumprod[prev_timestep] if prev_timestep > 0
                             else self.scheduler.final_alpha_cumprod)
        beta_prod_t = 1 - alpha_prod_t
        pred_x0 = (x - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        pred_dir = (1 - alpha_prod_t_prev) ** 0.5 * model_output
        return alpha_prod_t_prev ** 0.5 * pred_x0 + pred_dir, pred_x0

    @torch.no_grad()
    def image2latent(self, image):
        return self.vae.encode(image)["latent_dist"].mean * self.scaling

    def _embed(self, prompts):
        text_input = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, return_tensors="pt")
        return self.text_encoder(text_input.input_ids)[0]

    @torch.no_grad()
    def __call__(self, prompt, batch_size=1, height=None, width=None, num_inference_steps=50, guidance_scale=7.5,
                 latents=None):
        """Returns the final latents (the script decodes them); neg_prompt, unconditioning,
        ref_intermediate_latents and noise_loss_list are None in edit_image_ddim_MasaCtrl."""
        height = width = height or self.unet.config.sample_size * self.factor
        if isinstance(prompt, list):
            batch_size = len(prompt)
        text_embeddings = self._embed(prompt)
        latents_shape = (batch_size, self.unet.config.in_channels, height // self.factor, width // self.factor)
        assert latents.shape == latents_shape
        if guidance_scale > 1.0:
            text_embeddings = torch.cat([self._embed([""] * batch_size), text_embeddings], dim=0)
        self.scheduler.set_timesteps(num_inference_steps)
        for i, t in enumerate(self.scheduler.timesteps):
            model_inputs = torch.cat([latents] * 2) if guidance_scale > 1.0 else latents
            noise_pred = self.unet(model_inputs, t, encoder_hidden_states=text_embeddings).sample
            if guidance_scale > 1.0:
                noise_pred_uncon, noise_pred_con = noise_pred.chunk(2, dim=0)
                noise_pred = noise_pred_uncon + guidance_scale * (noise_pred_con - noise_pred_uncon)
            latents, pred_x0 = self.step(noise_pred, t, latents)
        return latents

    @torch.no_grad()
    def invert(self, image, prompt, num_inference_steps=50, guidance_scale=7.5, return_intermediates=False):
        batch_size = image.shape[0]
        text_embeddings = self._embed(prompt)
        latents = self.image2latent(image)
        if guidance_scale > 1.0:
            text_embeddings = torch.cat([self._embed([""] * batch_size), text_embeddings], dim=0)
        self.scheduler.set_timesteps(num_inference_steps)
        latents_list = [latents]
        for i, t in enumerate(reversed(self.scheduler.timesteps)):
            model_inputs = torch.cat([latents] * 2) if guidance_scale > 1.0 else latents
            noise_pred = self.unet(model_inputs, t, encoder_hidden_states=text_embeddings).sample
            if guidance_scale > 1.0:
                noise_pred_uncon, noise_pred_con = noise_pred.chunk(2, dim=0)
                noise_pred = noise_pred_uncon + guidance_scale * (noise_pred_con - noise_pred_uncon)
            latents, pred_x0 = self.next_step(noise_pred, t, latents)
            latents_list.append(latents)
        return (latents, latents_list) if return_intermediates else (latents, latents_list[0])


def load_image(image: Image.Image, size: int):
    """The script's load_image (torchvision's read_image: uint8 CHW) to [-1, 1], interpolated to size."""
    array = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    image = array[:3].unsqueeze_(0).float() / 127.5 - 1.0
    return F.interpolate(image, (size, size))


def edit_image_ddim_MasaCtrl(model, image: Image.Image, prompt_src, prompt_tar, guidance_scale=7.5, step=4,
                             layper=10, num_ddim_steps=50, start_code=None, steps_offset=0):
    """MasaCtrlEditor.edit_image_ddim_MasaCtrl: (final [source, target] latents, inverted trajectory).
    `start_code` (1, C, h, w): start from this z_T instead of the script's own inversion; `steps_offset`
    1 (not the script's): SD's DDIM spacing, to measure what the spacing changes."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, **({"steps_offset": steps_offset} if steps_offset else {}))
    pipe = MasaCtrlPipeline(model, scheduler)
    pipe.scheduler.set_timesteps(num_ddim_steps)
    source_image = load_image(image, model.image_size)
    prompts = ["", prompt_tar]
    latents_list = None
    if start_code is None:
        start_code, latents_list = pipe.invert(source_image, "", guidance_scale=guidance_scale,
                                               num_inference_steps=num_ddim_steps, return_intermediates=True)
    start_code = start_code.expand(len(prompts), -1, -1, -1)
    editor = MutualSelfAttentionControl(step, layper, total_steps=num_ddim_steps)
    regiter_attention_editor_diffusers(pipe, editor)
    layers = editor.num_att_layers // 2  # patch: this UNet's transformer layers; SD's layper of 16 scaled to them
    start_layer = math.floor(layper / MutualSelfAttentionControl.MODEL_TYPE["SD"] * layers + 0.5)
    editor.layer_idx, editor.total_layers = list(range(start_layer, layers)), layers
    try:
        latents = pipe(prompts, latents=start_code, guidance_scale=guidance_scale, num_inference_steps=num_ddim_steps)
    finally:
        unregister(pipe.unet)
    return latents, latents_list
