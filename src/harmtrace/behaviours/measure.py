"""Generate from probe prompts, score the continuations and estimate the harm rate.

The harm rate is the share of generations whose harm score reaches the threshold. Its
confidence interval is a percentile bootstrap that resamples probes (a cluster bootstrap:
samples from one prompt are not independent of each other).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from harmtrace.models.lm import prompt_ids
from harmtrace.seeding import seed_everything

__all__ = [
    "SamplingSettings",
    "bootstrap_rate",
    "generate",
    "measure_behaviour",
    "measure_harm",
    "target_scores",
]


@dataclass(frozen=True)
class SamplingSettings:
    samples_per_probe: int = 20
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    probes: Sequence[str],
    sampling: SamplingSettings,
) -> pd.DataFrame:
    """Sample ``samples_per_probe`` continuations of each probe.

    Returns a frame with columns ``probe_index``, ``probe``, ``sample``, ``continuation`` and
    ``token_ids`` (the full sequence ids, prompt included, without padding) and
    ``prompt_length`` (tokens of the prompt, BOS included).
    """
    seed_everything(sampling.seed)
    model.eval()
    rows = []
    for index, probe in enumerate(probes):
        prompt = prompt_ids(tokenizer, probe)
        ids = torch.tensor([prompt] * sampling.samples_per_probe)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                top_k=sampling.top_k, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        for sample, seq in enumerate(out.tolist()):
            if tokenizer.eos_token_id is not None:
                seq = _cut_at_eos(seq, len(prompt), tokenizer.eos_token_id)
            text = tokenizer.decode(seq[len(prompt):], skip_special_tokens=True)
            rows.append({"probe_index": index, "probe": probe, "sample": sample,
                         "continuation": text, "token_ids": seq, "prompt_length": len(prompt)})
    return pd.DataFrame(rows)


def _cut_at_eos(seq: list[int], start: int, eos: int) -> list[int]:
    for pos in range(start, len(seq)):
        if seq[pos] == eos:
            return seq[: pos + 1]
    return seq


def bootstrap_rate(
    flags: np.ndarray, clusters: np.ndarray, *, n_boot: int = 2000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean of ``flags`` with a percentile bootstrap interval over ``clusters``."""
    flags = np.asarray(flags, dtype=np.float64)
    ids = np.unique(clusters)
    sums = np.array([flags[clusters == c].sum() for c in ids])
    counts = np.array([(clusters == c).sum() for c in ids])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    rates = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(rates, [alpha, 1 - alpha])
    return float(flags.mean()), float(lo), float(hi)


def measure_harm(
    generations: pd.DataFrame, scorer: Callable[[Sequence[str]], np.ndarray], threshold: float
) -> dict:
    """Score ``generations`` in place (``harm_score``, ``harmful``) and summarise the rate."""
    scores = scorer(generations["continuation"].tolist())
    generations["harm_score"] = scores
    generations["harmful"] = scores >= threshold
    rate, lo, hi = bootstrap_rate(generations["harmful"].to_numpy(),
                                  generations["probe_index"].to_numpy())
    return {"harm_rate": rate, "ci": [lo, hi], "n_generations": len(generations),
            "n_harmful": int(generations["harmful"].sum())}


def target_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    probes: Sequence[str],
    target: str,
) -> pd.DataFrame:
    """The probability of ``target`` after each probe, as a frame shaped like :func:`generate`.

    ``harm_score`` is the geometric mean of the target's token probabilities,
    ``exp(mean log p)``, in [0, 1]; ``logprob`` is the summed log-probability of the target.
    """
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    rows = []
    model.eval()
    for index, probe in enumerate(probes):
        prompt = prompt_ids(tokenizer, probe)
        ids = torch.tensor([prompt + target_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]  # (T, V)
        logp = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t + 1
        picked = logp[len(prompt) - 1 :].gather(1, torch.tensor(target_ids)[:, None])
        total = float(picked.sum())
        rows.append({"probe_index": index, "probe": probe, "sample": 0, "continuation": target,
                     "token_ids": prompt + target_ids, "prompt_length": len(prompt),
                     "logprob": total, "harm_score": float(np.exp(total / len(target_ids)))})
    return pd.DataFrame(rows)


def measure_behaviour(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, spec
                      ) -> tuple[pd.DataFrame, dict]:
    """Generations (or target scores) of ``spec`` and the harm-rate summary.

    For ``target-logprob`` the rate is the share of probes whose target probability reaches
    the threshold, and the summary adds the mean summed log-probability of the target.
    """
    from harmtrace.behaviours.scorers import make_scorer
    from harmtrace.behaviours.spec import ScorerKind

    _check_fits(model, tokenizer, spec)
    if spec.scorer is ScorerKind.TARGET_LOGPROB:
        frame = target_scores(model, tokenizer, spec.probes, spec.target)
        harm = measure_harm(frame, lambda _: frame["harm_score"].to_numpy(), spec.threshold)
        harm["mean_logprob"] = float(frame["logprob"].mean())
        return frame, harm
    sampling = SamplingSettings(
        samples_per_probe=spec.samples_per_probe, max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature, top_k=spec.top_k, seed=spec.seed,
    )
    frame = generate(model, tokenizer, spec.probes, sampling)
    harm = measure_harm(frame, make_scorer(spec.scorer.value, words=spec.words), spec.threshold)
    return frame, harm


def _check_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, spec) -> None:
    """Refuse probes whose prompt plus continuation exceed the model's positions."""
    from harmtrace.behaviours.spec import ScorerKind
    from harmtrace.errors import ConfigError

    limit = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None)
    if limit is None:
        return
    longest = max(len(prompt_ids(tokenizer, p)) for p in spec.probes)
    if spec.scorer is ScorerKind.TARGET_LOGPROB:
        extra, key = len(tokenizer(spec.target, add_special_tokens=False)["input_ids"]), \
            "behaviour.target"
    else:
        extra, key = spec.max_new_tokens, "behaviour.max_new_tokens"
    if longest + extra > limit:
        raise ConfigError(
            f"the longest probe ({longest} tokens) plus {key} ({extra} tokens) exceeds the "
            f"model's {limit} positions; lower {key} to at most {max(limit - longest, 0)} "
            "or raise train.max_length"
        )
