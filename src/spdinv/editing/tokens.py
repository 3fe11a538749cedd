"""Words to token positions, and the token alignments Prompt-to-Prompt's Replace and Refine use.

Positions index the text encoder's padded sequence (0 = the start token). A word may span several
tokens (all of them count) and may occur several times (every occurrence counts).
"""

from __future__ import annotations

import string

import torch
from torch import Tensor


def _normal(word: str) -> str:
    return word.lower().strip(string.punctuation)


def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` between the start and end tokens (truncated like the text encoder's input)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return list(ids[1:-1])


def word_spans(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """Each whitespace-separated word of `prompt` with the positions of its tokens."""
    spans, position, limit = [], 1, tokenizer.model_max_length - 1
    for word in prompt.split():
        count = len(tokenizer(word, add_special_tokens=False).input_ids)
        spans.append((word, [p for p in range(position, position + count) if p < limit]))
        position += count
    return spans


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of the tokens of `word` (one word or a phrase of consecutive words) in `prompt`;
    empty when it does not occur."""
    query = [_normal(w) for w in word.split()]
    spans = word_spans(tokenizer, prompt)
    words = [_normal(w) for w, _ in spans]
    positions: list[int] = []
    for start in range(len(words) - len(query) + 1):
        if query and words[start : start + len(query)] == query:
            for _, span in spans[start : start + len(query)]:
                positions += span
    return sorted(set(positions))


def replacement_mapper(length: int) -> tuple[Tensor, Tensor]:
    """P2P Replace with equal token counts: target token j attends like source token j."""
    return torch.arange(length), torch.ones(length)


def refinement_mapper(source: list[int], target: list[int], length: int) -> tuple[Tensor, Tensor]:
    """P2P Refine: align the token sequences (a longest common subsequence, which is what P2P's
    global alignment with gap 0 / mismatch -1 computes); target tokens aligned to a source token
    take its attention (alpha 1), new tokens keep their own (alpha 0). The start token, the end
    token and the padding after it are aligned position by position from each end."""
    n, m = len(source), len(target)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for a in range(n - 1, -1, -1):
        for b in range(m - 1, -1, -1):
            table[a][b] = table[a + 1][b + 1] + 1 if source[a] == target[b] else max(table[a + 1][b], table[a][b + 1])
    mapper, alphas = torch.arange(length), torch.zeros(length)
    alphas[0] = 1
    a = b = 0
    while a < n and b < m:
        if source[a] == target[b]:
            mapper[b + 1], alphas[b + 1] = a + 1, 1
            a, b = a + 1, b + 1
        elif table[a + 1][b] >= table[a][b + 1]:
            a += 1
        else:
            b += 1
    for offset, position in enumerate(range(m + 1, length)):
        mapper[position], alphas[position] = min(n + 1 + offset, length - 1), 1
    return mapper, alphas


BACKGROUND_NOUNS = ("background", "backdrop", "backgrounds", "backdrops")


def names_background(prompt: str, word: str) -> bool:
    """Whether `word` names the background in `prompt`: it is a background noun, or one of the two
    words before one ('a brown background', 'a brown grid background'), at any of its occurrences."""
    words = [_normal(w) for w in prompt.split()]
    query = [_normal(w) for w in word.split()]
    if not query:
        return False
    if all(w in BACKGROUND_NOUNS for w in query):
        return True
    n = len(query)
    for start in range(len(words) - n + 1):
        if words[start : start + n] == query and set(words[start + n : start + n + 2]) & set(BACKGROUND_NOUNS):
            return True
    return False
