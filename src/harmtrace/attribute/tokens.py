"""Tokenizer settings kept with a feature store, and the check of a query's tokens against them.

The same harmful completion can reach an index as different token ids: with no BOS token,
one, or two (a chat template that writes one and a tokenizer call that adds another), or
through another vocabulary. Its gradient then differs from the stored records' and the
ranking drifts without an error. So a store of LM features keeps, under the metadata key
``"tokens"``:

* ``"tokenizer"``: :func:`tokenizer_settings` of the tokenizer the records were encoded
  with (class, vocabulary size and hash, special token ids, whether it adds BOS / EOS, the
  chat template's hash), when the caller passed one;
* ``"profile"``: :func:`token_profile` of the records: how many start with 0, 1, 2, ...
  BOS tokens and how many hold a BOS token after their start.

At query time :func:`check_query_tokens` compares the query side with them and warns
(:class:`TokenizerMismatchWarning`) naming what differs and the fix; it never changes a
score. What was scored is reported by :meth:`LMTask.scored_token_ids
<harmtrace.attribute.task.LMTask.scored_token_ids>` in the results' metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from harmtrace._warn import warn_at_caller
from harmtrace.attribute.task import _as_lm_example

__all__ = [
    "TokenizerMismatchWarning",
    "check_query_tokens",
    "token_metadata",
    "token_profile",
    "tokenizer_settings",
]


class TokenizerMismatchWarning(UserWarning):
    """Queries were tokenised differently from the records they are scored against."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenizer_settings(tokenizer: Any) -> dict[str, Any]:
    """The settings of a Hugging Face tokenizer that decide the token ids of a text (JSON).

    ``adds_bos`` / ``adds_eos``: whether ``tokenizer(text)`` (special tokens on, as by
    default) puts a BOS first / an EOS last; ``vocab_sha256``: a hash of the vocabulary.
    """
    vocab = sorted(tokenizer.get_vocab().items())
    probe = list(tokenizer("a")["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    template = getattr(tokenizer, "chat_template", None)
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": _sha(json.dumps(vocab)),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
        "adds_bos": bool(probe) and bos is not None and probe[0] == bos,
        "adds_eos": bool(probe) and eos is not None and probe[-1] == eos,
        "chat_template_sha256": _sha(template) if isinstance(template, str) else None,
    }


def _bos_layout(example: Any, index: int, bos: int) -> tuple[int, bool]:
    """Leading BOS count of one LM example and whether a BOS follows its first token."""
    ids, _ = _as_lm_example(example, index)
    lead = 0
    while lead < len(ids) and ids[lead] == bos:
        lead += 1
    return lead, bos in ids[max(lead, 1):]


def token_profile(examples: Sequence[Any], bos_token_id: int | None) -> dict[str, Any]:
    """How LM ``examples`` use the BOS token: ``leading_bos`` maps a count (as a string) to
    the number of examples starting with that many BOS tokens; ``inner_bos`` counts the
    examples with a BOS after their start (one per turn of some chat templates)."""
    if bos_token_id is None:
        return {"bos_token_id": None, "leading_bos": {}, "inner_bos": 0, "n": len(examples)}
    layouts = [_bos_layout(e, i, bos_token_id) for i, e in enumerate(examples)]
    leading = Counter(str(lead) for lead, _ in layouts)
    return {"bos_token_id": bos_token_id, "leading_bos": dict(sorted(leading.items())),
            "inner_bos": sum(inner for _, inner in layouts), "n": len(examples)}


def token_metadata(examples: Sequence[Any], tokenizer: Any) -> dict[str, Any]:
    """The ``"tokens"`` metadata of a store of LM ``examples`` encoded by ``tokenizer``."""
    settings = tokenizer_settings(tokenizer)
    return {"tokenizer": settings, "profile": token_profile(examples,
                                                            settings["bos_token_id"])}


def _differing(stored: Mapping, now: Mapping) -> list[str]:
    return sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))


def check_query_tokens(stored: Mapping[str, Any] | None, queries: Sequence[Any], *,
                       tokenizer: Any = None) -> list[str]:
    """Warn when ``queries`` (LM examples) were tokenised unlike the stored records.

    ``stored`` is a store's ``"tokens"`` metadata (:func:`token_metadata`; None: nothing to
    compare). Checked: the query ``tokenizer``'s settings against the stored ones (when
    both are known), each query's leading BOS count against the counts the records have,
    and a BOS inside a query when no record has one. Returns the problems found, each
    also issued once as a :class:`TokenizerMismatchWarning`; scores are never changed.
    """
    if not stored:
        return []
    problems = []
    saved, profile = stored.get("tokenizer"), stored.get("profile") or {}
    if tokenizer is not None and saved is not None:
        keys = _differing(saved, json.loads(json.dumps(tokenizer_settings(tokenizer))))
        if keys:
            problems.append(
                f"the queries' tokenizer differs from the one the stored records were encoded "
                f"with (differing: {', '.join(keys)}); encode the queries with the store's "
                f"tokenizer ({_brief(saved)}) or rebuild the store")
    bos = profile.get("bos_token_id")
    if bos is not None and profile.get("leading_bos"):
        seen = {int(k): v for k, v in profile["leading_bos"].items()}
        usual = max(seen, key=seen.get)
        for index, query in enumerate(queries):
            lead, inner = _bos_layout(query, index, bos)
            if lead not in seen:
                problems.append(
                    f"query {index} starts with {lead} BOS token(s) (id {bos}) but the stored "
                    f"records start with {_counts(seen)}; tokenise it as they were ({usual} "
                    f"BOS: check add_special_tokens and any chat template adding a BOS)")
            elif inner and not profile.get("inner_bos"):
                problems.append(
                    f"query {index} holds a BOS token (id {bos}) after its start, which no "
                    f"stored record does (a chat template marking each turn?); tokenise the "
                    f"query as the training records were")
    for problem in problems:
        warn_at_caller(problem, TokenizerMismatchWarning)
    return problems


def _counts(seen: Mapping[int, int]) -> str:
    return ", ".join(f"{k} BOS ({v} records)" for k, v in sorted(seen.items()))


def _brief(settings: Mapping[str, Any]) -> str:
    keys = ("class", "vocab_size", "bos_token_id", "adds_bos")
    return ", ".join(f"{k}={settings.get(k)!r}" for k in keys)
