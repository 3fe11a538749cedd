"""Concept words: a placeholder word in a prompt that stands for learned token embeddings.

As ELITE and textual inversion do, the placeholder's vectors enter the text encoder at the
token-embedding level (before position embeddings). Nothing shared is changed for good: a model
with a concept gets its own copy of the tokenizer, in which every whole-word occurrence of the
placeholder becomes k internal tokens, and the text encoder's token embedding is hooked only while
that model encodes a prompt (`injected`). Files: diffusers' `{token: tensor[k, width]}`
(.safetensors or .bin), the A1111 format `{"string_to_param": {"*": tensor}}` (.pt/.bin) and a
bare tensor; pickles are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import SpdinvError

DEFAULT_WORD = "S"
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Concept:
    """A placeholder `word` and its k token embeddings, (k, width) fp32."""

    word: str
    vectors: Tensor

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.word.encode())
        digest.update(self.vectors.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def word_pattern(word: str) -> re.Pattern:
    """The placeholder as a whole word (case-sensitive): "S" matches in "a S." but not in "Sun"."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")


def mentions(prompt: str, word: str) -> bool:
    return word_pattern(word).search(prompt) is not None


def check_word(word: str) -> str:
    if not word or any(ch.isspace() for ch in word):
        raise SpdinvError(f"the concept word must be one word without spaces, not {word!r}")
    return word


class ConceptTokenizer:
    """A tokenizer that spells each whole-word placeholder as k added tokens (ids `first_id` ..
    `first_id + k - 1`); everything else is the wrapped tokenizer's."""

    def __init__(self, base, word: str, count: int):
        self.base = base
        self.word = word
        self._tokenizer = copy.deepcopy(base)
        self.tokens = [f"<spdinv-concept-{i}>" for i in range(count)]
        self._tokenizer.add_tokens(self.tokens, special_tokens=False)
        ids = self._tokenizer.convert_tokens_to_ids(self.tokens)
        self.first_id = ids[0]
        if ids != list(range(self.first_id, self.first_id + count)):
            raise SpdinvError("could not add the concept's tokens to the tokenizer")
        self._pattern = word_pattern(word)

    def expand(self, text):
        if isinstance(text, str):
            return self._pattern.sub(" ".join(self.tokens), text)
        return [self.expand(t) for t in text]

    def __call__(self, text, *args, **kwargs):
        return self._tokenizer(self.expand(text), *args, **kwargs)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        return self._tokenizer.tokenize(self.expand(text), **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_tokenizer":  # copy/pickle probe these before __init__ ran
            raise AttributeError(name)
        return getattr(self._tokenizer, name)


@contextmanager
def injected(text_encoder: torch.nn.Module, first_id: int, vectors: Tensor) -> Iterator[None]:
    """While inside, token ids >= `first_id` embed as `vectors[id - first_id]` (differentiable in
    `vectors`); the encoder's weights are never written. `vectors` (k, width) serve every prompt;
    (B, k, width) give prompt b its own `vectors[b]` (a batch of concepts, as in encoder training)."""
    embedding = text_encoder.get_input_embeddings()
    seen: dict[str, Tensor] = {}

    def before(module, inputs):
        ids = inputs[0]
        seen["ids"] = ids
        return (ids.masked_fill(ids >= first_id, 0), *inputs[1:])

    def after(module, inputs, output):
        ids = seen["ids"]
        chosen = ids >= first_id
        if not chosen.any():
            return output
        output = output.clone()
        values = vectors.to(output.device, output.dtype)
        if values.dim() == 3:
            rows = torch.arange(len(ids), device=ids.device).unsqueeze(1).expand_as(ids)[chosen]
            output[chosen] = values[rows, ids[chosen] - first_id]
        else:
            output[chosen] = values[ids[chosen] - first_id]
        return output

    handles = [embedding.register_forward_pre_hook(before), embedding.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_width(concept: Concept, width: int, source: str = "the concept") -> None:
    if concept.vectors.shape[-1] != width:
        raise SpdinvError(f"{source} holds {concept.vectors.shape[-1]}-wide embeddings but the model's text encoder "
                          f"takes {width}: it was made for another model")


def _read(path: Path) -> object:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise SpdinvError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0]})") from None
    if suffix in PICKLE_SUFFIXES:
        return read_pickle(path, "textual-inversion file")
    raise SpdinvError(f"unknown concept file format {path.suffix or '(no suffix)'!r}: {path}; expected "
                      f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}")


def read_pickle(path: Path, what: str) -> object:
    """torch.load with weights_only=True (tensors and plain containers; no code runs)."""
    import pickle
    import struct

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, struct.error, RuntimeError, OSError, EOFError, ValueError, AttributeError,
            KeyError, IndexError, TypeError) as error:  # what a corrupt or truncated pickle raises
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SpdinvError(f"{path} is not a readable {what} ({message[:200]})") from None


def _vectors(data: object, path: Path) -> Tensor:
    """The one embedding a textual-inversion file holds."""
    if isinstance(data, dict) and "string_to_param" in data:  # A1111
        data = data["string_to_param"]
    if isinstance(data, dict):
        tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
        if len(tensors) != 1:
            names = ", ".join(map(str, tensors)) or "none"
            raise SpdinvError(f"{path} holds {len(tensors)} embeddings ({names}); a textual-inversion file holds one "
                              "token's (SDXL's two-encoder files are not supported)")
        data = next(iter(tensors.values()))
    if not isinstance(data, Tensor) or data.dim() not in (1, 2) or data.numel() == 0:
        raise SpdinvError(f"{path} is not a textual-inversion file: no (k, width) embedding in it")
    vectors = data.detach().float()
    if not torch.isfinite(vectors).all():
        raise SpdinvError(f"{path}: the embedding holds NaN or infinite values")
    return vectors.unsqueeze(0) if vectors.dim() == 1 else vectors


def load_concept(path: str | Path, word: str = DEFAULT_WORD) -> Concept:
    """A concept from any textual-inversion file; its vectors stand for `word` (the file's own
    token name is not used: prompts name the concept by `word`)."""
    path = Path(path)
    if not path.is_file():
        raise SpdinvError(f"concept file not found: {path}")
    return Concept(check_word(word), _vectors(_read(path), path))


def save_concept(concept: Concept, path: str | Path) -> Path:
    """diffusers' format: {word: tensor[k, width]} as safetensors, written atomically."""
    from safetensors.torch import save

    from .outputs import write_atomically

    data = save({concept.word: concept.vectors.detach().float().cpu().contiguous()})
    return write_atomically(path, data)
