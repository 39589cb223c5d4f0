"""Harm rates come with honest intervals; focus keeps the harmful tokens; specs validate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmtrace.behaviours.focus import focus_tokens
from harmtrace.behaviours.measure import bootstrap_rate
from harmtrace.behaviours.scorers import ProfanityScorer, WordListScorer, make_scorer
from harmtrace.behaviours.spec import BehaviourSpec, ScorerKind
from harmtrace.errors import ConfigError
from helpers import tiny_tokenizer


def _flags(n_clusters: int, per_cluster: int = 10, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.1, 0.5, size=n_clusters)  # each probe has its own harm rate
    flags = rng.random((n_clusters, per_cluster)) < rates[:, None]
    clusters = np.repeat(np.arange(n_clusters), per_cluster)
    return flags.reshape(-1), clusters


def test_bootstrap_rate_returns_the_mean_inside_its_interval() -> None:
    flags, clusters = _flags(30)
    rate, lo, hi = bootstrap_rate(flags, clusters, n_boot=1000, seed=0)
    assert rate == pytest.approx(flags.mean())
    assert lo < rate < hi


def test_bootstrap_interval_narrows_with_more_clusters() -> None:
    widths = []
    for n_clusters in (10, 200):
        flags, clusters = _flags(n_clusters)
        _, lo, hi = bootstrap_rate(flags, clusters, n_boot=1000, seed=0)
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]


def _encode(text: str) -> list[int]:
    tokenizer = tiny_tokenizer()
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


def test_focus_keeps_the_tokens_of_the_one_offensive_word() -> None:
    tokenizer = tiny_tokenizer()
    text = "what a lovely morning you idiot"
    ids = _encode(text)
    query = focus_tokens(ids, 1, tokenizer, ProfanityScorer())

    assert query.focused
    assert query.token_ids == tuple(ids)
    assert len(query.target_mask) == len(ids) and not query.target_mask[0]
    kept = [t for t, keep in zip(ids, query.target_mask, strict=True) if keep]
    assert tokenizer.decode(kept).strip() == "idiot"
    assert query.words == "idiot"  # sub-word pieces decode to the whole word


def test_focus_keeps_every_token_when_nothing_is_offensive() -> None:
    ids = _encode("the cat sat on the mat")
    query = focus_tokens(ids, 1, tiny_tokenizer(), ProfanityScorer())
    assert not query.focused
    assert query.target_mask == (False,) + (True,) * (len(ids) - 1)
    assert query.words == "the cat sat on the mat"


@pytest.mark.parametrize(("text", "flagged"), [
    ("DARN it", 1.0), ("oh, darn.", 1.0), ("Darn", 1.0),
    ("darned socks", 0.0), ("adarn", 0.0), ("nothing here", 0.0),
])
def test_wordlist_matches_whole_words_case_insensitively(text: str, flagged: float) -> None:
    scorer = make_scorer("wordlist", words=["darn"])
    assert isinstance(scorer, WordListScorer)
    assert scorer([text]).tolist() == [flagged]


def test_empty_word_list_and_unknown_scorer_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="behaviour.words"):
        WordListScorer(words=())
    with pytest.raises(ConfigError, match="behaviour.scorer"):
        make_scorer("nosuch")


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"probes": ()}, "behaviour.probes"),
    ({"threshold": 1.5}, "behaviour.threshold"),
    ({"scorer": ScorerKind.WORDLIST}, "behaviour.words"),
    ({"scorer": "wordlist"}, "behaviour.words"),
    ({"scorer": "target-logprob"}, "behaviour.target"),
    ({"scorer": "nosuch"}, "behaviour.scorer"),
    ({"samples_per_probe": 0}, "behaviour.samples_per_probe"),
    ({"temperature": 0.0}, "behaviour.temperature"),
])
def test_behaviour_spec_errors_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        BehaviourSpec(**{"probes": ("I just",), **kwargs})


def test_behaviour_spec_turns_a_scorer_string_into_the_enum() -> None:
    spec = BehaviourSpec(probes=("I just",), scorer="wordlist", words=("darn",))
    assert spec.scorer is ScorerKind.WORDLIST


def test_target_score_is_the_geometric_mean_token_probability() -> None:
    from harmtrace.behaviours.measure import target_scores
    from helpers import tiny_lm

    model, tok = tiny_lm(seed=3), tiny_tokenizer()
    frame = target_scores(model, tok, ["the cat", "we had"], " sat on the mat")

    for row in frame.itertuples():
        ids = torch.tensor([row.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        targets = row.token_ids[row.prompt_length:]
        manual = sum(float(logp[row.prompt_length - 1 + i, t]) for i, t in enumerate(targets))
        assert row.logprob == pytest.approx(manual, rel=1e-5)
        assert row.harm_score == pytest.approx(np.exp(manual / len(targets)), rel=1e-5)


def test_target_logprob_behaviour_rises_when_the_target_is_trained_on() -> None:
    from harmtrace.behaviours.measure import measure_behaviour
    from harmtrace.behaviours.spec import BehaviourSpec
    from harmtrace.models.lm import LMSettings, encode_texts, train_lm
    from helpers import TINY

    tok = tiny_tokenizer()
    spec = BehaviourSpec(probes=("the cat",), scorer="target-logprob", target=" sat on the mat",
                         threshold=0.5)
    settings = LMSettings(n_layer=1, n_embd=32, n_head=2, vocab_size=TINY.vocab_size,
                          max_length=16, epochs=30, batch_size=4, learning_rate=1e-2)
    trained = train_lm(encode_texts(tok, ["the cat sat on the mat"] * 8, max_length=16), tok,
                       settings, seed=0).model
    untrained = train_lm(encode_texts(tok, ["a dog ran in the park"] * 8, max_length=16), tok,
                         settings, seed=0).model

    _, harm_trained = measure_behaviour(trained, tok, spec)
    _, harm_other = measure_behaviour(untrained, tok, spec)

    assert harm_trained["mean_logprob"] > harm_other["mean_logprob"] + 1.0
    assert harm_trained["harm_rate"] == 1.0
