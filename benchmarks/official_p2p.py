"""A minimal port of the official SPDInv P2P edit (leeruibin/SPDInv: run_SPDInv_P2P.py `editing_p2p`,
P2P/ptp_utils.py `register_attention_control` and `diffusion_step`, utils/control_utils.py
`AttentionStore`, `AttentionControlEdit`, `AttentionRefine`, `AttentionReweight`, `LocalBlend`), for
benchmarks/official_comparison.py. Patched only as issue 28 describes: the current diffusers
attention API (a processor that computes the official `forward`), the model's token count (its
tokenizer's model_max_length, not 77), its latent size, and SD's layer choices by resolution: LocalBlend
reads the cross-attention maps with 16 tokens a side outside the mid block (SD: down_cross[2:4] +
up_cross[:3]), self-attention is replaced at maps of at most (latent side / 2)^2 tokens (SD: 32**2).
The token alignment (seq_aligner) and word indices come from spdinv.editing.tokens / p2p, which port them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from spdinv.editing.attention import attention_layers, nearest_scale
from spdinv.editing.p2p import BLEND_SIDE, blend_indicator, equalizer, token_mapper


class Controller:
    """AttentionReweight(AttentionRefine) with LocalBlend, as make_controller builds it."""

    def __init__(self, model, prompts, num_steps, cross_replace, self_replace, blend, reweight, threshold,
                 self_tokens, blend_names, latent_hw, start_blend=0.2):
        tokenizer = model.tokenizer
        self.mapper, alphas = token_mapper(tokenizer, prompts[0], prompts[1], "refine")
        self.alphas = alphas.reshape(1, 1, 1, -1)
        self.equalizer = equalizer(tokenizer, prompts[1], blend[1], reweight)
        self.alpha_layers = blend_indicator(tokenizer, prompts[0], prompts[1], blend).reshape(2, 1, 1, 1, 1, -1)
        steps = torch.zeros(num_steps + 1)  # get_time_words_attention_alpha, 'default_' only
        steps[: int(cross_replace * (num_steps + 1))] = 1
        self.cross_alpha = steps.reshape(num_steps + 1, 1, 1, 1, 1)
        self.num_self_replace = (0, int(num_steps * self_replace))
        self.start_blend, self.counter, self.threshold = int(start_blend * num_steps), 0, threshold
        self.self_tokens, self.blend_names, self.latent_hw = self_tokens, blend_names, latent_hw
        self.cur_step, self.cur_att_layer, self.num_att_layers = 0, 0, -1
        self.step_store, self.attention_store = {}, {}

    def __call__(self, attn, is_cross, name):  # AttentionControl.__call__, LOW_RESOURCE False
        h = attn.shape[0]
        attn[h // 2:] = self.forward(attn[h // 2:], is_cross, name)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn

    def forward(self, attn, is_cross, name):
        if is_cross and name in self.blend_names:  # AttentionStore.forward: a view, edited below in place
            self.step_store.setdefault(name, []).append(attn)
        if is_cross or (self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]):
            attn = attn.reshape(2, attn.shape[0] // 2, *attn.shape[1:])
            base, replace = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_alpha[self.cur_step]
                refined = base[..., self.mapper].unsqueeze(0) * self.alphas + replace * (1 - self.alphas)
                reweighted = refined * self.equalizer[None, None, None, :]
                attn[1:] = reweighted * alpha_words + (1 - alpha_words) * replace
            elif replace.shape[2] <= self.self_tokens:
                attn[1:] = base.unsqueeze(0).expand(replace.shape[0], *base.shape)
            attn = attn.reshape(-1, *attn.shape[2:])
        return attn

    def between_steps(self):
        for name, maps in self.step_store.items():
            if name in self.attention_store:
                self.attention_store[name] += maps[0]
            else:
                self.attention_store[name] = maps[0]
        self.step_store = {}

    def step_callback(self, x_t):  # LocalBlend.__call__
        self.counter += 1
        if self.counter <= self.start_blend:
            return x_t
        h, w = self.latent_hw
        maps = [self.attention_store[name].reshape(2, -1, 1, h, w, self.alpha_layers.shape[-1])
                for name in self.blend_names]
        maps = (torch.cat(maps, dim=1) * self.alpha_layers).sum(-1).mean(1)
        maps = nnf.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = nnf.interpolate(maps, size=tuple(x_t.shape[-2:]))
        mask = mask / mask.max(2, keepdims=True)[0].max(3, keepdims=True)[0]
        mask = mask.gt(self.threshold)
        mask = (mask[:1] + mask).float()
        return x_t[:1] + mask * (x_t - x_t[:1])


class OfficialProcessor:
    """ptp_utils.register_attention_control's `forward` on the current diffusers Attention."""

    def __init__(self, controller, name):
        self.controller, self.name = controller, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * attn.scale
        probs = self.controller(sim.softmax(dim=-1), is_cross, self.name)
        out = attn.batch_to_head_dim(torch.einsum("b i j, b j d -> b i d", probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def prev_step(model, eps, t, sample, num_steps):
    """DDIMSchedulerDev.step without noise or reference image."""
    scheduler = model.scheduler
    prev = t - scheduler.config.num_train_timesteps // num_steps
    alpha_t = scheduler.alphas_cumprod[t]
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    x0 = (sample - (1 - alpha_t) ** 0.5 * eps) / alpha_t ** 0.5
    return alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


@torch.no_grad()
def official_p2p(model, x_stars, prompts, timesteps, *, blend, threshold=0.3, cross_replace=0.8, self_replace=0.6,
                 reweight=2.0, guidance_scale=7.5, quantile=0.7, recon_t=400):
    """editing_p2p + diffusion_step (prox 'l0', inversion guidance on), uncond = the source prompt;
    x_stars: the inverted trajectory z_0 ... z_T. Returns the final [source, target] latents."""
    n = len(timesteps)
    layers = attention_layers(model.unet)
    latent_hw = tuple(x_stars.shape[-2:])
    blend_layers = nearest_scale([l for l in layers if l.cross and l.place != "mid"],
                                 min(1.0, BLEND_SIDE / min(latent_hw)))
    controller = Controller(model, prompts, n, cross_replace, self_replace, blend, reweight, threshold,
                            (latent_hw[0] // 2) * (latent_hw[1] // 2), [l.name for l in blend_layers],
                            blend_layers[0].size(latent_hw))
    controller.num_att_layers = len(layers)
    originals = dict(model.unet.attn_processors)
    model.unet.set_attn_processor({l.key: OfficialProcessor(controller, l.name) for l in layers})
    try:
        text = torch.cat([model.encode_prompt(p) for p in prompts])
        context = torch.cat([text[:1].expand(2, -1, -1), text])  # uncond_embeddings[i] = the source prompt
        latents = x_stars[-1:].expand(2, -1, -1, -1).to(model.device).float()
        for i, t in enumerate(timesteps):
            noise = model._unet(torch.cat([latents] * 2), t, context)
            uncond, cond = noise.chunk(2)
            delta = cond - uncond
            threshold_q = delta.abs().quantile(quantile)
            delta = delta - delta.clamp(-threshold_q, threshold_q)
            mask_edit = None
            if t < recon_t:
                mask_edit = nnf.max_pool2d((delta.abs() > threshold_q).float(), 3, 1, padding=1)
            latents = prev_step(model, uncond + guidance_scale * delta, t, latents, n)
            if mask_edit is not None:
                latents = latents - (latents - x_stars[len(x_stars) - i - 2].expand_as(latents)) * (1 - mask_edit)
            latents = controller.step_callback(latents)
    finally:
        model.unet.set_attn_processor(originals)
    return latents
