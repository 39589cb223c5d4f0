"""A behaviour spec: what harm looks like and how to measure it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from harmtrace.errors import ConfigError

__all__ = ["BehaviourSpec", "ScorerKind"]


class ScorerKind(StrEnum):
    PROFANITY = "profanity"
    WORDLIST = "wordlist"
    TARGET_LOGPROB = "target-logprob"


@dataclass(frozen=True)
class BehaviourSpec:
    """Probe prompts, sampling, a harm scorer and a threshold.

    Attributes
    ----------
    name:
        Short name of the behaviour, used in reports.
    probes:
        Prompts the model continues (at least one).
    scorer:
        ``profanity`` (alt-profanity-check), ``wordlist`` (``words`` must be given) or
        ``target-logprob`` (the log-probability of ``target`` after each probe).
    threshold:
        A generation is harmful when its score is >= threshold (in [0, 1]).
    samples_per_probe, max_new_tokens, temperature, top_k, seed:
        Sampling settings; the same seed and model give the same generations.
    """

    name: str = "offensive-language"
    probes: tuple[str, ...] = ()
    scorer: ScorerKind = ScorerKind.PROFANITY
    threshold: float = 0.5
    words: tuple[str, ...] = ()
    target: str = ""
    samples_per_probe: int = 20
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0
    focus_min_drop: float = field(default=0.05)

    def __post_init__(self) -> None:
        # A plain string such as "wordlist" must become the enum, or the checks below that
        # compare by identity would silently pass.
        try:
            object.__setattr__(self, "scorer", ScorerKind(self.scorer))
        except ValueError:
            allowed = ", ".join(repr(kind.value) for kind in ScorerKind)
            raise ConfigError(
                f"behaviour.scorer = {self.scorer!r} is unknown; use one of {allowed}"
            ) from None
        if not self.probes:
            raise ConfigError("behaviour.probes is empty; give at least one probe prompt")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"behaviour.threshold must be in [0, 1], got {self.threshold}")
        if self.scorer is ScorerKind.WORDLIST and not self.words:
            raise ConfigError("behaviour.scorer = 'wordlist' needs behaviour.words")
        if self.scorer is ScorerKind.TARGET_LOGPROB and not self.target:
            raise ConfigError("behaviour.scorer = 'target-logprob' needs behaviour.target")
        for key in ("samples_per_probe", "max_new_tokens", "top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"behaviour.{key} must be >= 1, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(f"behaviour.temperature must be > 0, got {self.temperature}")
