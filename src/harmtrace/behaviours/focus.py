"""Which tokens of a harmful generation carry the harm (occlusion of the harm scorer).

Most tokens of a harmful tweet are ordinary tweet tokens; the harm sits in a few words. A
query gradient taken over every token would mostly ask "which records taught tweet style".
For each harmful generation we delete one continuation token at a time, re-score the text,
and keep the tokens whose deletion lowers the harm score by at least ``min_drop`` and by at
least half of the largest drop. Those tokens are the targets of the query's loss and the
words of the lexical query. A generation where no token passes keeps all its tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerFast

__all__ = ["FocusedQuery", "focus_tokens"]


@dataclass(frozen=True)
class FocusedQuery:
    """One harmful generation prepared for attribution.

    ``token_ids`` is the whole sequence (prompt included); ``target_mask[t]`` is True for
    the tokens whose likelihood is explained; ``words`` are the decoded focus tokens.
    """

    token_ids: tuple[int, ...]
    target_mask: tuple[bool, ...]
    words: str
    focused: bool


def focus_tokens(
    token_ids: Sequence[int],
    prompt_length: int,
    tokenizer: PreTrainedTokenizerFast,
    scorer: Callable[[Sequence[str]], np.ndarray],
    *,
    min_drop: float = 0.05,
) -> FocusedQuery:
    """Find the tokens of one generation that make the scorer call it harmful."""
    continuation = list(token_ids[prompt_length:])
    variants = [tokenizer.decode(continuation, skip_special_tokens=True)]
    variants += [
        tokenizer.decode(continuation[:j] + continuation[j + 1 :], skip_special_tokens=True)
        for j in range(len(continuation))
    ]
    scores = scorer(variants)
    drops = scores[0] - scores[1:]  # (len(continuation),)
    keep = drops >= max(min_drop, 0.5 * float(drops.max(initial=0.0)))
    focused = bool(keep.any())
    if not focused:
        keep = np.ones(len(continuation), dtype=bool)
    mask = [False] * prompt_length + keep.tolist()
    words = _focus_words(tokenizer, continuation, keep.tolist())
    return FocusedQuery(tuple(token_ids), tuple(mask), words, focused)


def _focus_words(
    tokenizer: PreTrainedTokenizerFast, continuation: list[int], keep: list[bool]
) -> str:
    """Decode each run of consecutive kept tokens as one piece.

    Decoding token by token would turn a word split into sub-word tokens ("id", "iot") into
    separate fragments that no lexical query can match.
    """
    runs: list[list[int]] = [[]]
    for token, kept in zip(continuation, keep, strict=True):
        if kept:
            runs[-1].append(token)
        elif runs[-1]:
            runs.append([])
    pieces = (tokenizer.decode(run, skip_special_tokens=True).strip() for run in runs if run)
    return " ".join(piece for piece in pieces if piece)
