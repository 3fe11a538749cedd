"""A port of PnPInversion's Plug-and-Play editing script, for benchmarks/official_engines.py.

Follows cure-lab/PnPInversion `run_editing_pnp.py` (itself MichalGeyer/pnp-diffusers): `Preprocess`
(`encode_imgs`, `ddim_inversion`, `extract_latents`), `register_time`,
`register_attention_control_efficient`, `register_conv_control_efficient`, `PNP` (`get_text_embeds`,
`denoise_step`, `init_pnp`, `run_pnp`, `sample_loop`) and `edit_image_directinversion_PnP` (the
inverted trajectory as the source latents; spdinv follows this variant). Names and structure kept;
the injected `forward`s are installed as in the script (the current diffusers still calls
`attn1(x, encoder_hidden_states=None, attention_mask=None)` and `resnet(hidden_states, temb)`, so they
run unchanged) and removed afterwards. Patched only where the environment forces it:

- the models are the given in-memory components (a DiffusionModel's VAE, tokenizer, text encoder,
  UNet and scheduler config), float32 on the CPU, instead of `from_pretrained(model_key)` in float16
  on CUDA; no xformers; the CUDA autocast contexts are dropped (no-ops on the CPU);
- the image is resized to the model's image size (not 512; with PIL, torchvision's `T.Resize` /
  `T.ToTensor` written out: torchvision is not installed; the shipped example already has that size) and the VAE's `scaling_factor` replaces
  0.18215; `Preprocess.ddim_sample` (the reconstruction for display; the `ddim+pnp` variant's
  source latents) is not ported, nor are the image files the script writes;
- `sample_loop`'s `enumerate(self.scheduler.timesteps, desc="Sampling")` raises TypeError (a tqdm
  call whose `tqdm` was removed): `desc` dropped.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def register_time(model, t):
    conv_module = model.unet.up_blocks[1].resnets[1]
    setattr(conv_module, "t", t)
    down_res_dict = {0: [0, 1], 1: [0, 1], 2: [0, 1]}
    up_res_dict = {1: [0, 1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}
    for res in up_res_dict:
        for block in up_res_dict[res]:
            module = model.unet.up_blocks[res].attentions[block].transformer_blocks[0].attn1
            setattr(module, "t", t)
    for res in down_res_dict:
        for block in down_res_dict[res]:
            module = model.unet.down_blocks[res].attentions[block].transformer_blocks[0].attn1
            setattr(module, "t", t)
    module = model.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    setattr(module, "t", t)


def _inject_rows(x):
    """The script's in-place copy: rows [source | target uncond | target cond], the source's into both."""
    source_batch_size = int(x.shape[0] // 3)
    x[source_batch_size:2 * source_batch_size] = x[:source_batch_size]  # inject unconditional
    x[2 * source_batch_size:] = x[:source_batch_size]  # inject conditional


def sa_forward(self):
    """register_attention_control_efficient's `sa_forward` (self-attention with Q/K injection)."""
    to_out = self.to_out[0] if type(self.to_out) is torch.nn.modules.container.ModuleList else self.to_out

    def forward(x, encoder_hidden_states=None, attention_mask=None):
        batch_size, sequence_length, dim = x.shape
        h = self.heads
        is_cross = encoder_hidden_states is not None
        encoder_hidden_states = encoder_hidden_states if is_cross else x
        q = self.to_q(x)
        k = self.to_k(encoder_hidden_states)
        if not is_cross and self.injection_schedule is not None and (
                self.t in self.injection_schedule or self.t == 1000):
            _inject_rows(q)
            _inject_rows(k)
        q = self.head_to_batch_dim(q)
        k = self.head_to_batch_dim(k)
        v = self.head_to_batch_dim(self.to_v(encoder_hidden_states))
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        if attention_mask is not None:
            attention_mask = attention_mask.reshape(batch_size, -1)
            max_neg_value = -torch.finfo(sim.dtype).max
            attention_mask = attention_mask[:, None, :].repeat(h, 1, 1)
            sim.masked_fill_(~attention_mask, max_neg_value)
        attn = sim.softmax(dim=-1)
        out = self.batch_to_head_dim(torch.einsum("b i j, b j d -> b i d", attn, v))
        return to_out(out)

    return forward


def register_attention_control_efficient(model, injection_schedule):
    res_dict = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}  # decoder blocks 4-11: not the first of the lowest resolution
    for res in res_dict:
        for block in res_dict[res]:
            module = model.unet.up_blocks[res].attentions[block].transformer_blocks[0].attn1
            module.forward = sa_forward(module)
            setattr(module, "injection_schedule", injection_schedule)


def conv_forward(self):
    """register_conv_control_efficient's `conv_forward` (ResnetBlock2D with feature injection)."""
    def forward(input_tensor, temb):
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        if self.upsample is not None:
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)
        if temb is not None:
            temb = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        if temb is not None and self.time_embedding_norm == "default":
            hidden_states = hidden_states + temb
        hidden_states = self.norm2(hidden_states)
        if temb is not None and self.time_embedding_norm == "scale_shift":
            scale, shift = torch.chunk(temb, 2, dim=1)
            hidden_states = hidden_states * (1 + scale) + shift
        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))
        if self.injection_schedule is not None and (self.t in self.injection_schedule or self.t == 1000):
            _inject_rows(hidden_states)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor

    return forward


def register_conv_control_efficient(model, injection_schedule):
    conv_module = model.unet.up_blocks[1].resnets[1]
    conv_module.forward = conv_forward(conv_module)
    setattr(conv_module, "injection_schedule", injection_schedule)


def unregister(unet):
    """Patch: remove the instance `forward`s the registrations installed (the script never does)."""
    for module in unet.modules():
        if "forward" in vars(module):
            del module.forward
        for name in ("t", "injection_schedule"):
            if name in vars(module):
                delattr(module, name)


class Preprocess:
    """The script's Preprocess: VAE encoding and DDIM inversion under the source prompt."""

    def __init__(self, model):
        self.vae, self.tokenizer, self.text_encoder, self.unet = model.vae, model.tokenizer, model.text_encoder, model.unet
        self.scheduler = type(model.scheduler).from_config(model.scheduler.config)
        self.image_size, self.scaling = model.image_size, model.vae.config.scaling_factor

    @torch.no_grad()
    def get_text_embeds(self, prompt, negative_prompt):
        return get_text_embeds(self, prompt, negative_prompt)

    def load_img(self, image):
        image_pil = image.convert("RGB")  # T.Resize(512): the model's size (torchvision is not installed)
        if min(image_pil.size) != self.image_size:
            scale = self.image_size / min(image_pil.size)
            image_pil = image_pil.resize((round(image_pil.width * scale), round(image_pil.height * scale)),
                                         Image.BILINEAR)
        return torch.from_numpy(np.asarray(image_pil, dtype=np.float32) / 255).permute(2, 0, 1).unsqueeze(0)  # ToTensor

    @torch.no_grad()
    def encode_imgs(self, imgs):
        return self.vae.encode(2 * imgs - 1).latent_dist.mean * self.scaling

    @torch.no_grad()
    def ddim_inversion(self, cond, latent):
        latent_list = [latent]
        timesteps = reversed(self.scheduler.timesteps)
        for i, t in enumerate(timesteps):
            cond_batch = cond.repeat(latent.shape[0], 1, 1)
            alpha_prod_t = self.scheduler.alphas_cumprod[t]
            alpha_prod_t_prev = (self.scheduler.alphas_cumprod[timesteps[i - 1]] if i > 0
                                 else self.scheduler.final_alpha_cumprod)
            mu, mu_prev = alpha_prod_t ** 0.5, alpha_prod_t_prev ** 0.5
            sigma, sigma_prev = (1 - alpha_prod_t) ** 0.5, (1 - alpha_prod_t_prev) ** 0.5
            eps = self.unet(latent, t, encoder_hidden_states=cond_batch).sample
            pred_x0 = (latent - sigma_prev * eps) / mu_prev
            latent = mu * pred_x0 + sigma * eps
            latent_list.append(latent)
        return latent_list

    @torch.no_grad()
    def extract_latents(self, num_steps, image, inversion_prompt=""):
        """The inverted trajectory [z_0, ..., z_T] (the reconstruction is not ported)."""
        self.scheduler.set_timesteps(num_steps)
        cond = self.get_text_embeds(inversion_prompt, "")[1].unsqueeze(0)
        latent = self.encode_imgs(self.load_img(image))
        return self.ddim_inversion(cond, latent)


def get_text_embeds(self, prompt, negative_prompt, batch_size=1):
    """PNP.get_text_embeds (Preprocess's is the same with batch_size 1): [negative, prompt]."""
    text_input = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
    text_embeddings = self.text_encoder(text_input.input_ids)[0]
    uncond_input = self.tokenizer(negative_prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  return_tensors="pt")
    uncond_embeddings = self.text_encoder(uncond_input.input_ids)[0]
    return torch.cat([uncond_embeddings] * batch_size + [text_embeddings] * batch_size)


class PNP:
    """The script's PNP, on the given model's components."""

    def __init__(self, model, n_timesteps=50):
        self.vae, self.tokenizer, self.text_encoder, self.unet = model.vae, model.tokenizer, model.text_encoder, model.unet
        self.scheduler = type(model.scheduler).from_config(model.scheduler.config)
        self.scheduler.set_timesteps(n_timesteps)
        self.n_timesteps = n_timesteps

    @torch.no_grad()
    def get_text_embeds(self, prompt, negative_prompt, batch_size=1):
        return get_text_embeds(self, prompt, negative_prompt, batch_size)

    @torch.no_grad()
    def denoise_step(self, x, t, guidance_scale, noisy_latent):
        latent_model_input = torch.cat(([noisy_latent] + [x] * 2))
        register_time(self, t.item())
        text_embed_input = torch.cat([self.pnp_guidance_embeds, self.text_embeds], dim=0)
        noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=text_embed_input)["sample"]
        _, noise_pred_uncond, noise_pred_cond = noise_pred.chunk(3)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
        return self.scheduler.step(noise_pred, t, x)["prev_sample"]

    def init_pnp(self, conv_injection_t, qk_injection_t):
        self.qk_injection_timesteps = self.scheduler.timesteps[:qk_injection_t] if qk_injection_t >= 0 else []
        self.conv_injection_timesteps = self.scheduler.timesteps[:conv_injection_t] if conv_injection_t >= 0 else []
        register_attention_control_efficient(self, self.qk_injection_timesteps)
        register_conv_control_efficient(self, self.conv_injection_timesteps)

    def run_pnp(self, noisy_latent, target_prompt, guidance_scale=7.5, pnp_f_t=0.8, pnp_attn_t=0.5):
        """Returns the final edited latent (the script decodes it)."""
        self.eps = noisy_latent[-1]
        self.text_embeds = self.get_text_embeds(target_prompt, "ugly, blurry, black, low res, unrealistic")
        self.pnp_guidance_embeds = self.get_text_embeds("", "").chunk(2)[0]
        pnp_f_t = int(self.n_timesteps * pnp_f_t)
        pnp_attn_t = int(self.n_timesteps * pnp_attn_t)
        self.init_pnp(conv_injection_t=pnp_f_t, qk_injection_t=pnp_attn_t)
        try:
            return self.sample_loop(self.eps, guidance_scale, noisy_latent)
        finally:
            unregister(self.unet)

    def sample_loop(self, x, guidance_scale, noisy_latent):
        for i, t in enumerate(self.scheduler.timesteps):
            x = self.denoise_step(x, t, guidance_scale, noisy_latent[-1 - i])
        return x


def edit_image_directinversion_PnP(model, image: Image.Image, prompt_src, prompt_tar, guidance_scale=7.5,
                                   num_steps=50, inverted_x=None):
    """The script's directinversion+pnp path: (final edited latent, the inverted trajectory).
    `inverted_x` (z_0 ... z_T, a list or a (n + 1, 1, C, h, w) tensor): use this trajectory instead of
    the script's own inversion (to compare from the same trajectory)."""
    if inverted_x is None:
        inverted_x = Preprocess(model).extract_latents(num_steps=num_steps, image=image, inversion_prompt=prompt_src)
    latent = PNP(model, num_steps).run_pnp(list(inverted_x), prompt_tar, guidance_scale)
    return latent, inverted_x
