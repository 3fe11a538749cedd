"""A CLIP tokenizer over the shapes world's vocabulary, built in code (no downloads).

Byte-pair merges are written so that every world word becomes one token; any other text still
tokenizes (into letters), as with CLIP's own tokenizer.
"""

from __future__ import annotations

import string

from transformers import CLIPTokenizer

from .captions import vocabulary

MAX_LENGTH = 48
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _merge_chain(word: str) -> list[tuple[str, str]]:
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges, left = [], pieces[0]
    for right in pieces[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def build_tokenizer(words: list[str] | None = None) -> CLIPTokenizer:
    words = words or vocabulary()
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    for word in words:
        for left, right in _merge_chain(word):
            if (left, right) not in merges:
                merges.append((left, right))
            add(left + right)
    add(BOS)
    add(EOS)
    # A word whose letters also spell other words can be merged along another path; chain the
    # pieces it ends up in until every world word is one token.
    for _ in range(10):
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)
        split = {w: tokenizer.tokenize(w) for w in words}
        split = {w: pieces for w, pieces in split.items() if len(pieces) != 1}
        if not split:
            return tokenizer
        for pieces in split.values():
            left = pieces[0]
            for right in pieces[1:]:
                if (left, right) not in merges:
                    merges.append((left, right))
                left = left + right
                add(left)
    raise RuntimeError(f"tokenizer splits world words: {split}")


def text_config_fields(tokenizer: CLIPTokenizer) -> dict:
    """The fields of a CLIP text encoder's config that the tokenizer fixes (vocabulary, window, special
    token ids); every text encoder built for it takes these and chooses its own sizes."""
    return dict(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def save_tokenizer(tokenizer: CLIPTokenizer, folder) -> None:
    """Save in both formats: tokenizer.json and CLIP's classic vocab.json + merges.txt."""
    import json
    from pathlib import Path

    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
