"""Prompt-to-Prompt on a flow transformer's joint attention (SD3 / SD3.5 / FLUX.1).

An MMDiT has no cross-attention layer: in every block the image queries attend over image and text
keys in one softmax. P2P's cross-attention control becomes the image-query x text-key block of
those maps: during the cross-replace window the target's block is the source's, through the same
Replace / Refine token mappings (aligned tokens take the source's map, new tokens keep their own,
P2P's `alphas`), then reweighted (AttentionReweight's equalizer). The target's image-key block is
rescaled so that each image query's row still sums to one (in a UNet the cross-attention row is
its own softmax and needs no such step). Self-attention injection (`self_replace`) copies the
source's image-query x image-key block, in every layer (a DiT has one resolution). LocalBlend reads
the image-query x blend-word-key maps of the source and the target, averaged over heads and
layers and summed over the steps, as P2P reads its cross-attention maps; the mask is then cut
exactly as on a UNet (`P2PEditor.local_blend`).

The text sequence is the family's: SD3 / SD3.5: CLIP's 77 positions, then T5's (or T5's zeros when
the folder has none, which are the same in both prompts and aligned position by position); FLUX.1:
T5's positions only. T5 has no start token, so its positions are CLIP-style positions minus one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..conditioning import unpack
from ..errors import SpdinvError
from ..families import FLUX
from ..inversion.base import Inversion
from ..model import DiffusionModel
from .base import Editor
from .joint import JointLayer, TokenLayout
from .p2p import P2POptions, P2PEditor, Words, range_rows
from .sampler import SOURCE, TARGET
from .tokens import refinement_mapper, replacement_mapper, word_positions


@dataclass(frozen=True)
class TextSegment:
    """A run of text positions: `clip` (a start token at 0), `t5` (no start token) or `fixed`
    (T5's zeros in an SD3 folder without T5: the same in every prompt)."""

    kind: str
    length: int
    tokenizer: object = None


def text_segments(model: DiffusionModel, text_tokens: int) -> list[TextSegment]:
    pipeline = model.pipeline
    if model.family is FLUX:
        return [TextSegment("t5", text_tokens, pipeline.tokenizer_2)]
    clip = model.tokenizer.model_max_length
    t5 = getattr(pipeline, "tokenizer_3", None) if getattr(pipeline, "text_encoder_3", None) is not None else None
    rest = TextSegment("t5", text_tokens - clip, t5) if t5 is not None else TextSegment("fixed", text_tokens - clip)
    return [TextSegment("clip", clip, model.tokenizer), rest]


def _ids(segment: TextSegment, prompt: str) -> list[int]:
    """Token ids between the start token (if any) and the end token, truncated as the encoder's input."""
    ids = segment.tokenizer(prompt, truncation=True, max_length=segment.length).input_ids
    return list(ids[1:-1] if segment.kind == "clip" else ids[:-1])


def segment_mapper(segment: TextSegment, source: str, target: str, mode: str) -> tuple[Tensor, Tensor]:
    """P2P's (mapper, alphas) over one segment's positions."""
    if segment.kind == "fixed":
        return replacement_mapper(segment.length)
    source_ids, target_ids = _ids(segment, source), _ids(segment, target)
    if mode == "replace" and len(source_ids) != len(target_ids):
        raise SpdinvError(f"p2p replace needs prompts with the same number of tokens (source {len(source_ids)}, "
                          f"target {len(target_ids)}); use refine (--p2p-mode refine)")
    if mode == "replace":
        return replacement_mapper(segment.length)
    if segment.kind == "clip":
        return refinement_mapper(source_ids, target_ids, segment.length)
    mapper, alphas = refinement_mapper(source_ids, target_ids, segment.length + 1)  # a virtual start token at 0
    return mapper[1:] - 1, alphas[1:]


def segment_positions(segment: TextSegment, prompt: str, word: str) -> list[int]:
    if segment.kind == "fixed":
        return []
    positions = word_positions(segment.tokenizer, prompt, word)
    shift = 0 if segment.kind == "clip" else 1
    return [p - shift for p in positions if 0 <= p - shift < segment.length]


def text_mapper(segments: list[TextSegment], source: str, target: str, mode: str) -> tuple[Tensor, Tensor]:
    """(mapper, alphas) over the whole text sequence, segment by segment."""
    mappers, alphas, offset = [], [], 0
    for segment in segments:
        mapper, alpha = segment_mapper(segment, source, target, mode)
        mappers.append(mapper + offset)
        alphas.append(alpha)
        offset += segment.length
    return torch.cat(mappers), torch.cat(alphas)


def word_indicator(segments: list[TextSegment], prompt: str, words: Words, what: str, which: str) -> Tensor:
    """(L,): 1 at every position of `words` in `prompt`, in every segment; a word found nowhere is an error."""
    indicator, offset = torch.zeros(sum(s.length for s in segments)), 0
    found = {word: False for word in words}
    for segment in segments:
        for word in words:
            positions = segment_positions(segment, prompt, word)
            indicator[[offset + p for p in positions]] = 1
            found[word] = found[word] or bool(positions)
        offset += segment.length
    missing = [word for word, seen in found.items() if not seen]
    if missing:
        raise SpdinvError(f"{what} word {missing[0]!r} is not in the {which} prompt {prompt!r}")
    return indicator


class FlowP2PEditor(P2PEditor):
    """P2P (Refine / Replace, Reweight, self-attention injection, LocalBlend) on joint attention."""

    def __init__(self, model: DiffusionModel, source_prompt: str, target_prompt: str, options: P2POptions) -> None:
        Editor.__init__(self)
        if options.prox:
            raise SpdinvError("p2p's ProxEdit guidance (prox) is for diffusion models; "
                              f"{model.family.name} is a rectified flow")
        self.options = options
        text_tokens = unpack(model.encode_prompt(source_prompt), model.pooled_dim)[0].shape[1]
        segments = text_segments(model, text_tokens)
        self.mapper, self.alphas = text_mapper(segments, source_prompt, target_prompt, options.mode)
        blend = options.blend or ((), ())
        self.blend_alpha = torch.stack([word_indicator(segments, source_prompt, blend[0], "blend", "source"),
                                        word_indicator(segments, target_prompt, blend[1], "blend", "target")])
        reweighted = options.reweight_words if options.reweight_words is not None else blend[1]
        self.equalizer = torch.ones(text_tokens)
        if options.reweight != 1.0:
            reweight = word_indicator(segments, target_prompt, reweighted, "reweight", "target")
            self.equalizer = 1 + (options.reweight - 1) * reweight
        self.range_rows = range_rows(source_prompt, target_prompt, options)  # background words: max-normalised
        self.maps: dict[str, Tensor] = {}
        self.noise_difference, self._mask, self.prox = None, None, None
        self.every_uncond = False

    def prepare(self, model: DiffusionModel, inversion: Inversion) -> None:
        Editor.prepare(self, model, inversion)
        o, n = self.options, self.num_steps
        self.cross_steps = int(o.cross_replace * (n + 1))  # as P2PEditor: the official alpha table has n + 1 rows
        self.self_steps = int(o.self_replace * n)
        self.blend_start_step = int(o.blend_start * n)
        self.patch = model.patch
        by_attention = bool(o.blend) and o.blend_map == "attention"
        self.blend_layers = [layer for layer in self.layers if layer.has_text] if by_attention else []
        self.blend_names = {layer.name for layer in self.blend_layers}
        device = model.device
        self.mapper, self.alphas = self.mapper.to(device), self.alphas.to(device)
        self.equalizer, self.blend_alpha = self.equalizer.to(device), self.blend_alpha.to(device)
        self.maps, self.noise_difference, self._mask = {}, None, None

    def processor_layers(self) -> list[JointLayer]:
        return self.layers

    def wants_joint_probs(self, layer: JointLayer) -> bool:
        i = self.step_index
        return (self.record or i < self.self_steps or layer.name in self.blend_names
                or (layer.has_text and i < self.cross_steps))

    def edit_joint_probs(self, layer: JointLayer, probs: Tensor, layout: TokenLayout) -> bool:
        """probs (2, heads, N, N): the conditional source and target maps; the target's image rows are edited."""
        i, image, text = self.step_index, layout.image, layout.text
        if self.record:
            self.recorded[layer.name] = probs.detach().float().cpu()
        if layer.name in self.blend_names:  # LocalBlend reads the unedited maps, summed over steps
            words = (probs[:, :, image, text] * self.blend_alpha[:, None, None, :]).sum(-1).mean(1)
            self.maps[layer.name] = self.maps[layer.name] + words if layer.name in self.maps else words
        target, source = probs[TARGET], probs[SOURCE]
        changed = False
        if i < self.self_steps:
            target[:, image, image] = source[:, image, image]
            changed = True
        if layer.has_text and i < self.cross_steps:
            own, own_image = target[:, image, text], target[:, image, image]
            refined = source[:, image, text][..., self.mapper] * self.alphas + own * (1 - self.alphas)
            # the image keys keep the row's remaining mass, in the target's own proportions
            rest = (1 - refined.sum(-1, keepdim=True)).clamp_min(0) / own_image.sum(-1, keepdim=True).clamp_min(1e-12)
            target[:, image, image] = own_image * rest
            target[:, image, text] = refined * self.equalizer
            changed = True
        return changed

    def blend_maps(self) -> Tensor:
        """(2, 1, h, w): the source's and the target's blend-word maps (mean over layers) on the token grid."""
        if self.options.blend_map == "noise":
            return self.noise_difference.expand(2, -1, -1, -1)
        maps = torch.stack([self.maps[layer.name] for layer in self.blend_layers]).mean(0)
        h, w = (side // self.patch for side in self.latent_hw)
        return maps.reshape(2, 1, h, w)


def flow_p2p_editor(model: DiffusionModel, source_prompt: str, target_prompt: str,
                    options: P2POptions) -> FlowP2PEditor:
    return FlowP2PEditor(model, source_prompt, target_prompt, options)
