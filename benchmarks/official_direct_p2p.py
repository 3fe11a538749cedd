"""A port of PnPInversion's DirectInversion + Prompt-to-Prompt edit, for benchmarks/official_engines.py.

Follows cure-lab/PnPInversion `run_editing_p2p.py` (its arguments: guidance 7.5, cross_replace_steps
0.4, self_replace_steps 0.6, blend_word ((w0,), (w1,)), eq_params {"words": (w1,), "values": (2,)}),
`models/p2p_editor.py` (`P2PEditor.__init__`, `edit_image_directinversion`), `models/p2p/inversion.py`
(`DirectInversion`: `prev_step`, `next_step`, `get_noise_pred_single`, `init_prompt`, `ddim_loop`,
`ddim_inversion`, `offset_calculate`, `invert`), `models/p2p/p2p_guidance_forward.py`
(`direct_inversion_p2p_guidance_diffusion_step`, `direct_inversion_p2p_guidance_forward`),
`models/p2p/scheduler_dev.py` (`DDIMSchedulerDev.step`, its eta = 0 epsilon path) and `utils/utils.py`
(`load_512`, `image2latent`, `init_latent`). The controller, `models/p2p/attention_control.py`
(`make_controller` -> `AttentionReweight` over `AttentionRefine` with `LocalBlend`, `AttentionStore`,
`register_attention_control`), is the same code as leeruibin/SPDInv's `utils/control_utils.py`, whose
port `benchmarks/official_p2p.py` (`Controller`, `OfficialProcessor`) is reused, with its patches
(the diffusers attention-processor API for `CrossAttention.forward`; 77 tokens -> the tokenizer's 48;
LATENT_SIZE and the 16x16 LocalBlend maps and the 32**2 self-replace bound mapped to this model's sizes).
Further patches: the models are the given in-memory components, float32 on the CPU; the image is the
model's size (not 512) and the VAE's `scaling_factor` replaces 0.18215; the scheduler is the script's own
`DDIMSchedulerDev(beta_start=0.00085, beta_end=0.012, "scaled_linear", clip_sample=False,
set_alpha_to_one=False)` (the shipped model's betas; diffusers' default steps_offset 0, so timesteps
980 ... 0, not SD's 981 ... 1); the reconstruction pass before the edit (an AttentionStore run whose
latents are only displayed; it returns the x_t it was given) and the written image grid are left out.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from official_p2p import Controller, OfficialProcessor
from spdinv.editing.attention import attention_layers, nearest_scale
from spdinv.editing.p2p import BLEND_SIDE


class DDIMSchedulerDev(DDIMScheduler):
    def step(self, model_output, timestep, sample, eta=0.0, return_dict=True, **kwargs):
        """The eta = 0, epsilon-prediction path of the script's step (no clipping, no ref_image)."""
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * model_output
        prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
        return {"prev_sample": prev_sample, "pred_original_sample": pred_original_sample}


class Pipeline:
    """The parts of StableDiffusionPipeline the script touches, on in-memory components."""

    def __init__(self, model, scheduler):
        self.vae, self.tokenizer, self.text_encoder, self.unet = model.vae, model.tokenizer, model.text_encoder, model.unet
        self.scheduler, self.device = scheduler, torch.device("cpu")
        self.scaling = model.vae.config.scaling_factor  # 0.18215 in the script


def load_512(image: Image.Image, size: int):
    """utils.load_512 for an already square image: resized to the model's size (512 in the script)."""
    return np.array(image.convert("RGB").resize((size, size)))[:, :, :3]


@torch.no_grad()
def image2latent(pipe, image):
    image = torch.from_numpy(image).float() / 127.5 - 1
    image = image.permute(2, 0, 1).unsqueeze(0)
    return pipe.vae.encode(image)["latent_dist"].mean * pipe.scaling


class DirectInversion:
    def __init__(self, model, num_ddim_steps):
        self.model = model
        self.tokenizer = self.model.tokenizer
        self.prompt = None
        self.context = None
        self.num_ddim_steps = num_ddim_steps

    @property
    def scheduler(self):
        return self.model.scheduler

    def prev_step(self, model_output, timestep: int, sample):
        prev_timestep = timestep - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        alpha_prod_t = self.scheduler.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.scheduler.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * model_output
        prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
        difference_scale = alpha_prod_t_prev ** 0.5 * (- beta_prod_t ** 0.5 / alpha_prod_t ** 0.5) + (1 - alpha_prod_t_prev) ** 0.5
        return prev_sample, difference_scale

    def next_step(self, model_output, timestep: int, sample):
        timestep, next_timestep = min(timestep - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps, 999), timestep
        alpha_prod_t = self.scheduler.alphas_cumprod[timestep] if timestep >= 0 else self.scheduler.final_alpha_cumprod
        alpha_prod_t_next = self.scheduler.alphas_cumprod[next_timestep]
        beta_prod_t = 1 - alpha_prod_t
        next_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        next_sample_direction = (1 - alpha_prod_t_next) ** 0.5 * model_output
        return alpha_prod_t_next ** 0.5 * next_original_sample + next_sample_direction

    def get_noise_pred_single(self, latents, t, context):
        return self.model.unet(latents, t, encoder_hidden_states=context)["sample"]

    @torch.no_grad()
    def init_prompt(self, prompt):
        uncond_input = self.model.tokenizer([""] * len(prompt), padding="max_length",
                                            max_length=self.model.tokenizer.model_max_length, return_tensors="pt")
        uncond_embeddings = self.model.text_encoder(uncond_input.input_ids)[0]
        text_input = self.model.tokenizer(prompt, padding="max_length", max_length=self.model.tokenizer.model_max_length,
                                          truncation=True, return_tensors="pt")
        text_embeddings = self.model.text_encoder(text_input.input_ids)[0]
        self.context = torch.cat([uncond_embeddings, text_embeddings])
        self.prompt = prompt

    @torch.no_grad()
    def ddim_loop(self, latent):
        uncond_embeddings, cond_embeddings = self.context.chunk(2)
        cond_embeddings = cond_embeddings[[0]]
        all_latent = [latent]
        latent = latent.clone().detach()
        for i in range(self.num_ddim_steps):
            t = self.model.scheduler.timesteps[len(self.model.scheduler.timesteps) - i - 1]
            noise_pred = self.get_noise_pred_single(latent, t, cond_embeddings)
            latent = self.next_step(noise_pred, t, latent)
            all_latent.append(latent)
        return all_latent

    @torch.no_grad()
    def ddim_inversion(self, image):
        latent = image2latent(self.model, image)
        return None, self.ddim_loop(latent)  # image_rec (latent2image) is only displayed

    def offset_calculate(self, latents, num_inner_steps, epsilon, guidance_scale):
        noise_loss_list = []
        latent_cur = torch.concat([latents[-1]] * (self.context.shape[0] // 2))
        for i in range(self.num_ddim_steps):
            latent_prev = torch.concat([latents[len(latents) - i - 2]] * latent_cur.shape[0])
            t = self.model.scheduler.timesteps[i]
            with torch.no_grad():
                noise_pred = self.get_noise_pred_single(torch.concat([latent_cur] * 2), t, self.context)
                noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
                noise_pred_w_guidance = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
                latents_prev_rec, _ = self.prev_step(noise_pred_w_guidance, t, latent_cur)
                loss = latent_prev - latents_prev_rec
            noise_loss_list.append(loss.detach())
            latent_cur = latents_prev_rec + loss
        return noise_loss_list

    def invert(self, image_gt, prompt, guidance_scale, num_inner_steps=10, early_stop_epsilon=1e-5):
        self.init_prompt(prompt)
        register_attention_control(self.model, None)
        image_rec, ddim_latents = self.ddim_inversion(image_gt)
        noise_loss_list = self.offset_calculate(ddim_latents, num_inner_steps, early_stop_epsilon, guidance_scale)
        return image_gt, image_rec, ddim_latents, noise_loss_list


class DummyController:
    def __call__(self, attn, is_cross, name):
        return attn


def register_attention_control(model, controller):
    """attention_control.register_attention_control on the current diffusers API: the einsum
    attention of its `ca_forward` in every attention layer (a DummyController for None). The script
    never restores the originals; the callers here do."""
    controller = DummyController() if controller is None else controller
    layers = attention_layers(model.unet)
    model.unet.set_attn_processor({l.key: OfficialProcessor(controller, l.name) for l in layers})
    controller.num_att_layers = len(layers)


def direct_inversion_p2p_guidance_diffusion_step(model, controller, latents, context, t, guidance_scale, noise_loss,
                                                 add_offset=True):
    latents_input = torch.cat([latents] * 2)
    noise_pred = model.unet(latents_input, t, encoder_hidden_states=context)["sample"]
    noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
    latents = model.scheduler.step(noise_pred, t, latents)["prev_sample"]
    if add_offset:
        latents = torch.concat((latents[:1] + noise_loss[:1], latents[1:]))
    return controller.step_callback(latents)


@torch.no_grad()
def direct_inversion_p2p_guidance_forward(model, prompt, controller, latent=None, num_inference_steps=50,
                                          guidance_scale=7.5, noise_loss_list=None, add_offset=True):
    batch_size = len(prompt)
    text_input = model.tokenizer(prompt, padding="max_length", max_length=model.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
    text_embeddings = model.text_encoder(text_input.input_ids)[0]
    max_length = text_input.input_ids.shape[-1]
    uncond_input = model.tokenizer([""] * batch_size, padding="max_length", max_length=max_length, return_tensors="pt")
    uncond_embeddings = model.text_encoder(uncond_input.input_ids)[0]
    latents = latent.expand(batch_size, *latent.shape[1:])  # init_latent
    model.scheduler.set_timesteps(num_inference_steps)
    for i, t in enumerate(model.scheduler.timesteps):
        context = torch.cat([uncond_embeddings, text_embeddings])
        latents = direct_inversion_p2p_guidance_diffusion_step(model, controller, latents, context, t, guidance_scale,
                                                               noise_loss_list[i], add_offset=add_offset)
    return latents, latent


def make_controller(model, prompts, num_ddim_steps, cross_replace_steps, self_replace_steps, blend_word, eq_params,
                    latent_hw):
    """make_controller (refine, reweight, LocalBlend at 0.3) as official_p2p's Controller ports it."""
    layers = attention_layers(model.unet)
    blend_layers = nearest_scale([l for l in layers if l.cross and l.place != "mid"],
                                 min(1.0, BLEND_SIDE / min(latent_hw)))
    assert eq_params["words"] == blend_word[1]  # the script reweights the target's blend word
    controller = Controller(model, prompts, num_ddim_steps, cross_replace_steps, self_replace_steps, blend_word,
                            eq_params["values"][0], 0.3, (latent_hw[0] // 2) * (latent_hw[1] // 2),
                            [l.name for l in blend_layers], blend_layers[0].size(latent_hw))
    controller.num_att_layers = len(layers)
    return controller, layers


def edit_image_directinversion(model, image: Image.Image, prompt_src, prompt_tar, blended_word, guidance_scale=7.5,
                               cross_replace_steps=0.4, self_replace_steps=0.6, num_ddim_steps=50, steps_offset=0):
    """P2PEditor.edit_image_directinversion with run_editing_p2p.py's arguments: (final [source, target]
    latents, the inverted trajectory); `steps_offset` 1 (not the script's): SD's DDIM spacing."""
    scheduler = DDIMSchedulerDev(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                 set_alpha_to_one=False, **({"steps_offset": steps_offset} if steps_offset else {}))
    pipe = Pipeline(model, scheduler)
    pipe.scheduler.set_timesteps(num_ddim_steps)
    image_gt = load_512(image, model.image_size)
    prompts = [prompt_src, prompt_tar]
    originals = dict(model.unet.attn_processors)
    try:
        _, _, x_stars, noise_loss_list = DirectInversion(pipe, num_ddim_steps).invert(
            image_gt=image_gt, prompt=prompts, guidance_scale=guidance_scale)
        x_t = x_stars[-1]
        blend_word = ((blended_word[0],), (blended_word[1],))
        eq_params = {"words": (blended_word[1],), "values": (2,)}
        controller, layers = make_controller(model, prompts, num_ddim_steps, cross_replace_steps, self_replace_steps,
                                             blend_word, eq_params, tuple(x_t.shape[-2:]))
        register_attention_control(pipe, controller)  # direct_inversion_p2p_guidance_forward's first line
        latents, _ = direct_inversion_p2p_guidance_forward(pipe, prompts, controller, latent=x_t,
                                                           num_inference_steps=num_ddim_steps,
                                                           guidance_scale=guidance_scale, noise_loss_list=noise_loss_list)
    finally:
        model.unet.set_attn_processor(originals)
    return latents, x_stars
