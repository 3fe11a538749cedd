"""Prompt-to-Prompt (Hertz et al., ICLR 2023) as attention processors: Replace / Refine cross-attention
injection with Reweight, self-attention injection at coarse resolutions, LocalBlend, and the
optional ProxEdit proximal guidance (Han et al., 2023) that the official SPDInv P2P code applies.

Like the official controllers (google/prompt-to-prompt's and SPDInv's `AttentionStore` /
`AttentionControlEdit`), only the conditional half of the batch is edited, the target row takes the
source row's maps, and LocalBlend reads the cross-attention maps *as edited* (the target row refined
and reweighted while cross-replacement lasts, its own maps after), summed over the steps so far
(the official store keeps a view of each map, which the edit then overwrites in place); only the
blend words' share of each map is kept. Resolutions are relative to the latent, except LocalBlend's default: it reads
the maps with BLEND_SIDE tokens a side (SD's 16x16 maps of its 64x64 latent, the finest maps of the
embedded model's 16x16 latent), since a mask needs that many cells to follow an object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..arguments import option, words
from ..errors import SpdinvError
from ..inversion.base import Inversion
from ..model import DiffusionModel
from ..prediction import guided
from .attention import AttentionLayer, nearest_scale
from .base import Editor, check_fraction
from .sampler import SOURCE, TARGET
from .tokens import names_background, prompt_tokens, refinement_mapper, replacement_mapper, word_positions

MODES = ("replace", "refine")
SOURCES, TARGETS = slice(SOURCE, SOURCE + 1), slice(TARGET, TARGET + 1)  # a branch's latents / eps, keeping the batch dim
BLEND_NORMS = ("max", "range")
BLEND_MAPS = ("attention", "noise")
PROX_PULLS = ("target", "both")
BLEND_THRESHOLDS = {"attention": 0.3, "noise": 0.5}  # defaults; 0.5 measured best for noise (docs/results.md)
Words = tuple[str, ...]
BLEND_SIDE = 16  # tokens a side of the cross-attention maps LocalBlend reads by default


def blend_map_scale(latent_hw: tuple[int, int], blend_scale: float | None) -> float:
    """Resolution (relative to the latent) of the maps LocalBlend reads: `blend_scale` when given,
    else the one with BLEND_SIDE tokens a side, or the latent's own when it is smaller."""
    return blend_scale if blend_scale is not None else min(1.0, BLEND_SIDE / min(latent_hw))


def _words(value, what: str) -> Words:
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, (tuple, list)) and all(isinstance(w, str) for w in value):
        return tuple(w for w in value if w.strip())
    raise SpdinvError(f"p2p option {what} must be a word or a tuple of words, got {value!r}")


def parse_blend(value) -> tuple[Words, Words] | None:
    """None | 'word' (both prompts) | 'SOURCE_WORD TARGET_WORD' (PIE-Bench's blended_word) |
    (source words, target words) -> (source words, target words)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        words = value.split()
        if len(words) > 2:
            raise SpdinvError(f"blend takes 'WORD' or 'SOURCE_WORD TARGET_WORD', got {len(words)} words: {value!r}")
        return (words[0],), (words[-1],)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        source, target = _words(value[0], "blend"), _words(value[1], "blend")
        return (source, target) if source or target else None
    raise SpdinvError(f"blend must be 'WORD', 'SOURCE_WORD TARGET_WORD' or a (source, target) pair, got {value!r}")


@dataclass(frozen=True)
class P2POptions:
    """mode: 'refine' (any prompt pair; aligned tokens take the source's cross-attention) or
    'replace' (equal token counts); cross_replace / self_replace: fractions of the steps during
    which the target uses the source's cross- / self-attention maps (self-attention only at layers
    no finer than self_replace_scale of the latent side: 0.5 as PIE-Bench and SPDInv, 0.25 as
    upstream P2P); reweight: scale of the cross-attention of reweight_words in the target
    (default: the target's blend words; 1 disables); blend: LocalBlend words ('SOURCE TARGET');
    blend_threshold, blend_start (fraction of the steps), blend_scale (resolution of the maps
    it reads, relative to the latent; default: BLEND_SIDE tokens a side, `blend_map_scale`),
    blend_norm (how the map is scaled to [0, 1] before the threshold: 'max' divides by its max, as
    P2P; 'range' first subtracts its min, for maps whose attention off the object is not near 0);
    blend_map: what the mask is read from: 'attention' (the blend words' cross-attention, P2P's) or
    'noise' (where the target's and the source's conditional noise predictions differ, summed over
    the steps: DiffEdit's idea (Couairon et al. 2023) at no extra network call; it needs no blend words);
    prox: ProxEdit proximal guidance (quantile of the
    guidance-difference threshold; pull back to the inverted trajectory below prox_timestep, the
    target row or, prox_pull 'both', as the official code, both rows)."""

    mode: str = option("refine", "refine or replace (equal token counts)", flag="--p2p-mode")
    cross_replace: float = option(0.8, "fraction of steps with injected cross-attention")
    self_replace: float = option(0.6, "fraction of steps with injected self-attention")
    self_replace_scale: float = option(
        0.5, "finest self-attention resolution injected, relative to the latent")
    reweight: float = option(2.0, "cross-attention scale of the reweighted words")
    reweight_words: Words | None = option(
        None, "target words to reweight (default: the target blend word)", parse=words)
    blend: tuple[Words, Words] | None = option(
        None, "LocalBlend words: 'SOURCE_WORD TARGET_WORD', or one word for both", parse=str)
    blend_threshold: float | None = option(None, "LocalBlend mask threshold (default 0.3 for attention maps, 0.5 "
                                           "for noise)")
    blend_start: float = option(0.2, "fraction of steps before LocalBlend starts")
    blend_scale: float | None = option(
        None, "resolution of the maps LocalBlend reads, relative to the latent (default: the maps 16 tokens a side)")
    blend_norm: str = option("range", "LocalBlend map scaling before the threshold: range (minus its min) or max "
                             "(P2P's)", choices=BLEND_NORMS)
    blend_map: str = option("attention", "what LocalBlend's mask is read from: attention (the blend words' "
                            "cross-attention, P2P's) or noise (where the target's and the source's noise predictions "
                            "differ; no blend words needed)", choices=BLEND_MAPS)
    prox: bool = option(False, "ProxEdit proximal guidance (off by default)")
    prox_quantile: float = option(0.7, "ProxEdit threshold quantile")
    prox_timestep: int = option(400, "ProxEdit pulls back below this timestep")
    prox_pull: str = option("target", "rows ProxEdit pulls back onto the inverted trajectory: target (the source branch "
                            "stays the reconstruction) or both (the official SPDInv/ProxEdit code)", choices=PROX_PULLS)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpdinvError(f"unknown p2p mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.blend_norm not in BLEND_NORMS:
            raise SpdinvError(f"unknown p2p blend_norm {self.blend_norm!r}; valid: {', '.join(BLEND_NORMS)}")
        if self.blend_map not in BLEND_MAPS:
            raise SpdinvError(f"unknown p2p blend_map {self.blend_map!r}; valid: {', '.join(BLEND_MAPS)}")
        if self.prox_pull not in PROX_PULLS:
            raise SpdinvError(f"unknown p2p prox_pull {self.prox_pull!r}; valid: {', '.join(PROX_PULLS)}")
        for name in ("cross_replace", "self_replace", "blend_start"):
            check_fraction("p2p", name, getattr(self, name))
        check_fraction("p2p", "self_replace_scale", self.self_replace_scale, open_low=True)
        if self.blend_scale is not None:
            check_fraction("p2p", "blend_scale", self.blend_scale, open_low=True)
        if self.blend_threshold is None:
            object.__setattr__(self, "blend_threshold", BLEND_THRESHOLDS[self.blend_map])
        for name in ("blend_threshold", "prox_quantile"):
            check_fraction("p2p", name, getattr(self, name), open_low=True, open_high=True)
        if not isinstance(self.reweight, (int, float)) or not math.isfinite(self.reweight) or self.reweight < 0:
            raise SpdinvError(f"p2p option reweight must be a finite number >= 0, got {self.reweight}")
        if not isinstance(self.prox_timestep, int) or self.prox_timestep < 0:
            raise SpdinvError(f"p2p option prox_timestep must be an integer >= 0, got {self.prox_timestep}")
        if not isinstance(self.prox, bool):
            raise SpdinvError(f"p2p option prox must be true or false, got {self.prox!r}")
        object.__setattr__(self, "blend", parse_blend(self.blend))
        if self.reweight_words is not None:
            object.__setattr__(self, "reweight_words", _words(self.reweight_words, "reweight_words"))


def _positions(tokenizer, prompt: str, word: str, what: str, which: str) -> list[int]:
    positions = word_positions(tokenizer, prompt, word)
    if not positions:
        raise SpdinvError(f"{what} word {word!r} is not in the {which} prompt {prompt!r}")
    return positions


def token_mapper(tokenizer, source_prompt: str, target_prompt: str, mode: str) -> tuple[Tensor, Tensor]:
    """(mapper, alphas) over the padded token positions: Replace (equal token counts) or Refine."""
    length = tokenizer.model_max_length
    source, target = prompt_tokens(tokenizer, source_prompt), prompt_tokens(tokenizer, target_prompt)
    if mode == "refine":
        return refinement_mapper(source, target, length)
    if len(source) != len(target):
        raise SpdinvError(f"p2p replace needs prompts with the same number of tokens (source {len(source)}, "
                          f"target {len(target)}); use refine (--p2p-mode refine)")
    return replacement_mapper(length)


def blend_indicator(tokenizer, source_prompt: str, target_prompt: str, blend: tuple[Words, Words] | None) -> Tensor:
    """(2, L): 1 at the tokens of the source's blend words (row 0) and the target's (row 1)."""
    indicator = torch.zeros(2, tokenizer.model_max_length)
    for row, (words, prompt, which) in enumerate(zip(blend or ((), ()), (source_prompt, target_prompt),
                                                     ("source", "target"))):
        for word in words:
            indicator[row, _positions(tokenizer, prompt, word, "blend", which)] = 1
    return indicator


def equalizer(tokenizer, target_prompt: str, words: Words, scale: float) -> Tensor:
    """(L,): `scale` at the tokens of `words` in the target prompt, 1 elsewhere (AttentionReweight)."""
    weights = torch.ones(tokenizer.model_max_length)
    if scale != 1.0:
        for word in words:
            weights[_positions(tokenizer, target_prompt, word, "reweight", "target")] = scale
    return weights


@dataclass
class ProximalGuidance:
    """ProxEdit's proximal guidance as the official SPDInv P2P code applies it: the guidance
    difference eps_cond - eps_uncond is soft-thresholded at its `quantile` (over the whole
    [source, target] batch, as there), and below `timestep` the target's latents are pulled back
    onto the inverted trajectory wherever that thresholded difference is small (a 3x3-dilated
    mask; pull strength 1). `pull` 'target' leaves the source branch alone, so that it stays the
    reconstruction; 'both' pulls it too, as the official code (ptp_utils.diffusion_step), where
    the source row's difference is 0 under uncond = source, so its row is replaced by the
    inverted latent wherever the step is below `timestep`."""

    quantile: float
    timestep: int
    trajectory: Tensor
    num_steps: int
    pull_rows: str = "target"
    keep: Tensor | None = field(default=None, repr=False)

    def guide(self, t: int, eps_uncond: Tensor | None, eps_cond: Tensor, scales: Tensor) -> Tensor | None:
        if eps_uncond is None:
            return None
        delta = eps_cond - eps_uncond
        threshold = delta.abs().float().flatten().quantile(self.quantile).to(delta.dtype)
        shrunk = delta - delta.clamp(-threshold, threshold)
        eps = guided(eps_uncond, eps_cond, scales)
        eps[TARGETS] = eps_uncond[TARGETS] + scales[TARGETS] * shrunk[TARGETS]
        self.keep = None
        if t < self.timestep:
            edited = F.max_pool2d((shrunk.abs() > threshold).float(), 3, 1, padding=1)
            self.keep = 1 - edited
        return eps

    def pull(self, i: int, z: Tensor) -> Tensor:
        if self.keep is None:
            return z
        k = self.num_steps - i
        inverted = self.trajectory[k - 1 : k].to(z)
        if self.pull_rows == "both":
            return z - (z - inverted) * self.keep
        z = z.clone()
        z[TARGETS] = z[TARGETS] - (z[TARGETS] - inverted) * self.keep[TARGETS]
        return z


def range_rows(source_prompt: str, target_prompt: str, options: P2POptions) -> Tensor:
    """(2, 1, 1, 1): 1 where LocalBlend subtracts the map's minimum (blend_norm 'range'), per row
    (source, target). Never for blend words that name the background: their region is the
    spread-out part of the map, not a peak, and cutting the peak out of it (measured: a 54% mask
    over the object and half the background of a drawn triangle on brown) blends the rest of the
    background from the source branch, so the old and the new background fight. Such a row gets
    P2P's own scaling (divided by its max) and covers the background it names."""
    rows = torch.zeros(2, 1, 1, 1)
    if options.blend_norm != "range":
        return rows
    blend = options.blend or ((), ())
    for row, (words, prompt) in enumerate(zip(blend, (source_prompt, target_prompt))):
        background = options.blend_map == "attention" and any(names_background(prompt, w) for w in words)
        rows[row] = 0.0 if background else 1.0
    return rows


class P2PEditor(Editor):
    """Prompt-to-Prompt controller (AttentionReplace / AttentionRefine + AttentionReweight + LocalBlend)."""

    def __init__(self, model: DiffusionModel, source_prompt: str, target_prompt: str, options: P2POptions) -> None:
        super().__init__()
        self.options = options
        tokenizer = model.tokenizer
        self.mapper, self.alphas = token_mapper(tokenizer, source_prompt, target_prompt, options.mode)
        self.blend_alpha = blend_indicator(tokenizer, source_prompt, target_prompt, options.blend)
        reweighted = options.reweight_words if options.reweight_words is not None else (
            options.blend[1] if options.blend else ())
        self.equalizer = equalizer(tokenizer, target_prompt, reweighted, options.reweight)
        self.range_rows = range_rows(source_prompt, target_prompt, options)
        self.maps: dict[str, Tensor] = {}  # per blend layer: (2, Nq), summed over blend tokens, heads, steps
        self.blend_heads: dict[str, int] = {}
        self.noise_difference: Tensor | None = None  # (1, 1, h, w), summed over steps (blend_map 'noise')
        self._mask: Tensor | None = None
        self.prox: ProximalGuidance | None = None
        self.every_uncond = options.prox  # ProxEdit thresholds the guidance difference of both branches

    def prepare(self, model: DiffusionModel, inversion: Inversion) -> None:
        super().prepare(model, inversion)
        o, n = self.options, self.num_steps
        self.cross_steps = int(o.cross_replace * (n + 1))  # the official alpha table has n + 1 rows
        self.self_steps = int(o.self_replace * n)
        self.blend_start_step = int(o.blend_start * n)
        cross = [layer for layer in self.layers if layer.cross]
        self.cross_layers = cross
        self.self_layers = [layer for layer in self.layers if not layer.cross and layer.scale <= o.self_replace_scale + 1e-9]
        by_attention = bool(o.blend) and o.blend_map == "attention"
        self.blend_layers = nearest_scale([l for l in cross if l.place != "mid"],
                                          blend_map_scale(self.latent_hw, o.blend_scale)) if by_attention else []
        if by_attention and not self.blend_layers:
            raise SpdinvError("LocalBlend needs cross-attention layers in the UNet's down or up blocks")
        self.blend_names = {layer.name for layer in self.blend_layers}
        device = model.device
        self.mapper, self.alphas = self.mapper.to(device), self.alphas.to(device)
        self.equalizer, self.blend_alpha = self.equalizer.to(device), self.blend_alpha.to(device)
        self.maps, self.blend_heads, self.noise_difference, self._mask = {}, {}, None, None
        if o.prox:
            self.prox = ProximalGuidance(o.prox_quantile, o.prox_timestep, self.trajectory, n, o.prox_pull)

    def processor_layers(self) -> list[AttentionLayer]:
        return self.cross_layers + (self.self_layers if self.self_steps > 0 else [])

    def wants_probs(self, layer: AttentionLayer) -> bool:
        """Cross-attention maps (Nk = 77 tokens: small) while they are injected and at LocalBlend's
        layers; self-attention injection needs none (`target_reads_source`)."""
        return layer.cross and (self.step_index < self.cross_steps or layer.name in self.blend_names)

    def target_reads_source(self, layer: AttentionLayer) -> bool:
        return not layer.cross and self.step_index < self.self_steps

    def edit_probs(self, layer: AttentionLayer, probs: Tensor) -> bool:
        """probs (2, heads, Nq, Nk): the conditional source and target maps; the target's are replaced."""
        edited = self._replace_maps(layer, probs)
        if layer.name in self.blend_names:
            self._keep_blend_maps(layer, probs)
        return edited

    def _replace_maps(self, layer: AttentionLayer, probs: Tensor) -> bool:
        i = self.step_index
        if layer.cross and i < self.cross_steps:
            source, own = probs[SOURCE], probs[TARGET]
            alphas = self.alphas.to(probs.dtype)
            refined = source[..., self.mapper] * alphas + own * (1 - alphas)
            probs[TARGET] = refined * self.equalizer.to(probs.dtype)
            return True
        if self.target_reads_source(layer):
            probs[TARGET] = probs[SOURCE]
            return True
        return False

    def _keep_blend_maps(self, layer: AttentionLayer, probs: Tensor) -> None:
        """LocalBlend reads the maps as the target used them (edited, as the official controllers
        store them), summed over steps; only what it reads is kept: the blend words' attention
        summed over their tokens and over heads, (2, Nq) a layer (not (2, heads, Nq, 77))."""
        words = torch.einsum("bhqk,bk->bq", probs.float(), self.blend_alpha)
        self.maps[layer.name] = self.maps[layer.name] + words if layer.name in self.maps else words
        self.blend_heads[layer.name] = probs.shape[1]

    @property
    def blends(self) -> bool:
        return bool(self.blend_layers) or self.options.blend_map == "noise"

    def guide(self, i: int, t: int, eps_uncond: Tensor | None, eps_cond: Tensor, scales: Tensor) -> Tensor | None:
        if self.options.blend_map == "noise":
            difference = (eps_cond[TARGETS] - eps_cond[SOURCES]).float().abs().mean(1, keepdim=True)
            self.noise_difference = difference if self.noise_difference is None else self.noise_difference + difference
        return self.prox.guide(t, eps_uncond, eps_cond, scales) if self.prox else None

    def end_step(self, i: int, t: int, z: Tensor) -> Tensor:
        if self.prox:
            z = self.prox.pull(i, z)
        if self.blends and i + 1 > self.blend_start_step:
            z = self.local_blend(z)
        return z

    def blend_maps(self) -> Tensor:
        """(2, 1, h, w): the source's and the target's map the mask is cut from."""
        if self.options.blend_map == "noise":
            return self.noise_difference.expand(2, -1, -1, -1)
        h, w = self.blend_layers[0].size(self.latent_hw)  # nearest_scale: all at one resolution
        summed = sum(self.maps[layer.name] for layer in self.blend_layers)
        heads = sum(self.blend_heads[layer.name] for layer in self.blend_layers)
        return (summed / heads).reshape(2, 1, h, w)  # the mean over every layer's heads

    def local_blend(self, z: Tensor) -> Tensor:
        """LocalBlend: the blend words' summed cross-attention, averaged over heads and layers (or
        the summed noise-prediction difference), 3x3 max-pooled, resized to the latent, scaled to
        [0, 1] (blend_norm) and thresholded; the union of the source's and the target's masks;
        x_t = x_src + mask * (x_t - x_src)."""
        words = F.max_pool2d(self.blend_maps(), 3, 1, padding=1)
        mask = F.interpolate(words, size=tuple(z.shape[-2:]))
        mask = mask - mask.amin(dim=(2, 3), keepdim=True) * self.range_rows.to(mask)
        mask = mask / mask.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        mask = mask > self.options.blend_threshold
        mask = mask[SOURCES] | mask
        self._mask = mask[TARGETS].float()
        return z[SOURCES] + mask.to(z.dtype) * (z - z[SOURCES])

    @property
    def mask(self) -> Tensor | None:
        return self._mask


def p2p_editor(model: DiffusionModel, source_prompt: str, target_prompt: str, options: P2POptions) -> P2PEditor:
    return P2PEditor(model, source_prompt, target_prompt, options)
