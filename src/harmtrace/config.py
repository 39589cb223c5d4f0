"""TOML config -> frozen settings objects; unknown keys and wrong types are errors.

A config has these tables (all optional but ``sources`` and ``behaviour.probes``)::

    [workspace]      path, database_url
    [[sources]]      one table per source (see harmtrace.ingest.SourceSpec)
    [heldout]        path, text_field: benign held-out text for the utility metric
    [train]          harmtrace.models.lm.LMSettings fields, seed, model_path
    [behaviour]      harmtrace.behaviours.spec.BehaviourSpec fields
    [attribute]      AttributeSettings fields
    [verify]         VerifySettings fields
    [report]         top_records
    [evaluation]     ground_truth (hidden labels, for AUPRC), floor (bool)

Relative paths are read relative to the config file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, get_type_hints

from harmtrace.attribute.methods import method_names
from harmtrace.behaviours.spec import BehaviourSpec
from harmtrace.errors import ConfigError
from harmtrace.ingest import SourceSpec
from harmtrace.models.lm import LMSettings

__all__ = [
    "AttributeSettings",
    "EvaluationSettings",
    "PipelineConfig",
    "TrainSettings",
    "VerifySettings",
    "load_config",
    "parse_config",
]


@dataclass(frozen=True)
class TrainSettings:
    """``lm`` is the model and optimiser; ``model_path`` loads an existing HF model instead."""

    lm: LMSettings = field(default_factory=LMSettings)
    seed: int = 0
    model_path: str = ""


class Preconditioner(StrEnum):
    """Inner product of the gradient methods; see harmtrace.attribute.methods."""

    NONE = "none"
    DIAGONAL = "diagonal"
    ADAM = "adam"


@dataclass(frozen=True)
class AttributeSettings:
    """Which methods run, the projection, and ``k`` for top-k summaries.

    ``projection_dim = 0`` (default) keeps gradients exact; a positive value projects them
    with a seeded Gaussian matrix. ``k`` below 1 is a fraction of the training records; 1 or
    more is a count. ``parameters`` restricts gradients to parameter names containing one of
    the given substrings (default: every trainable parameter). ``preconditioner`` (none,
    diagonal or adam) and ``damping`` set the gradient inner product.
    """

    methods: tuple[str, ...] = ("gradcos", "graddot", "tracin", "bm25")
    projection_dim: int = 0
    seed: int = 0
    k: float = 0.1
    batch_size: int = 32
    parameters: tuple[str, ...] = ()
    preconditioner: Preconditioner = Preconditioner.NONE
    damping: float = 1e-3

    def __post_init__(self) -> None:
        if self.damping < 0:
            raise ConfigError(f"attribute.damping must be >= 0, got {self.damping}")
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown or not self.methods:
            raise ConfigError(
                f"attribute.methods has {unknown or 'nothing'}; choose from "
                f"{', '.join(method_names())}"
            )
        if self.k <= 0:
            raise ConfigError(f"attribute.k must be > 0, got {self.k}")
        if self.k >= 1 and self.k != int(self.k):
            raise ConfigError(
                f"attribute.k = {self.k} is neither a fraction below 1 nor a whole count"
            )

    def k_records(self, n_train: int) -> int:
        """``k`` as a number of records for a training set of ``n_train``."""
        if self.k < 1:
            return max(1, int(round(self.k * n_train)))
        if self.k >= n_train:
            raise ConfigError(
                f"attribute.k = {self.k:g} is not below the {n_train} training records; use a "
                "smaller count or a fraction below 1"
            )
        return int(self.k)


@dataclass(frozen=True)
class VerifySettings:
    """Removal experiments: the methods whose top-k is removed, seeds, and the test level."""

    methods: tuple[str, ...] = ("gradcos", "bm25")
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha: float = 0.05
    enabled: bool = True

    def __post_init__(self) -> None:
        if len(self.seeds) < 2:
            raise ConfigError("verify.seeds needs at least 2 seeds (3 or more recommended)")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"verify.alpha must be in (0, 1), got {self.alpha}")


@dataclass(frozen=True)
class EvaluationSettings:
    """Hidden labels for scoring the attribution; never shown to the methods."""

    ground_truth: str = ""
    floor: bool = True


@dataclass(frozen=True)
class PipelineConfig:
    sources: tuple[SourceSpec, ...]
    behaviour: BehaviourSpec
    workspace: str = "harmtrace-workspace"
    database_url: str = ""
    heldout: str = ""
    heldout_field: str = "text"
    train: TrainSettings = field(default_factory=TrainSettings)
    attribute: AttributeSettings = field(default_factory=AttributeSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    top_records: int = 20
    source_file: str = ""


_TABLES = {"workspace", "sources", "heldout", "train", "behaviour", "attribute", "verify",
           "report", "evaluation"}


def _check_keys(table: dict, allowed: set[str], where: str, origin: str) -> None:
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, sorted(allowed), n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"{origin}: unknown key '{where}{key}'{also}; allowed keys: "
                f"{', '.join(sorted(allowed))}"
            )


def _build(cls: type, table: dict, where: str, origin: str, skip: set[str] = frozenset()):
    allowed = {f.name for f in dataclasses.fields(cls)} - set(skip)
    _check_keys(table, allowed, where, origin)
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        values[key] = _coerce(value, hints[key], f"{where}{key}", origin)
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{origin}: [{where.rstrip('.')}] {err}") from err


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError as err:
            allowed = ", ".join(repr(m.value) for m in hint)
            raise ConfigError(f"{origin}: {key} = {value!r} is not one of {allowed}") from err
    origin_type = getattr(hint, "__origin__", None)
    if origin_type is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{origin}: {key} must be a list, got {value!r}")
        return tuple(value)
    expected = {int: int, float: (int, float), str: str, bool: bool}.get(hint)
    if expected and (not isinstance(value, expected) or
                     (hint is not bool and isinstance(value, bool))):
        raise ConfigError(
            f"{origin}: {key} must be of type {hint.__name__}, got {value!r}"
        )
    return float(value) if hint is float else value


def _resolve(path: str, base: Path) -> str:
    if not path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def parse_config(data: dict, *, origin: str = "<config>", base: Path | None = None
                 ) -> PipelineConfig:
    """Build a :class:`PipelineConfig` from parsed TOML ``data``."""
    base = base or Path.cwd()
    _check_keys(data, _TABLES, "", origin)
    sources = data.get("sources") or []
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"{origin}: no [[sources]] given; add at least one [[sources]] table")
    specs = []
    for i, table in enumerate(sources):
        table = dict(table)
        if "path" in table:
            table["path"] = _resolve(table["path"], base)
        specs.append(_build(SourceSpec, table, f"sources[{i}].", origin))
    if "behaviour" not in data:
        raise ConfigError(f"{origin}: no [behaviour] table; give behaviour.probes at least")
    behaviour = _build(BehaviourSpec, data["behaviour"], "behaviour.", origin)
    train_table = dict(data.get("train", {}))
    outer = {"seed", "model_path"}
    lm = _build(LMSettings, {k: v for k, v in train_table.items() if k not in outer},
                "train.", origin)
    train = TrainSettings(lm=lm, seed=_coerce(train_table.get("seed", 0), int, "train.seed",
                                              origin),
                          model_path=_resolve(train_table.get("model_path", ""), base))
    workspace = data.get("workspace", {})
    _check_keys(workspace, {"path", "database_url"}, "workspace.", origin)
    heldout = data.get("heldout", {})
    _check_keys(heldout, {"path", "text_field"}, "heldout.", origin)
    report = data.get("report", {})
    _check_keys(report, {"top_records"}, "report.", origin)
    evaluation = _build(EvaluationSettings, data.get("evaluation", {}), "evaluation.", origin)
    if evaluation.ground_truth:
        evaluation = dataclasses.replace(
            evaluation, ground_truth=_resolve(evaluation.ground_truth, base))
    return PipelineConfig(
        sources=tuple(specs),
        behaviour=behaviour,
        workspace=_resolve(workspace.get("path", "harmtrace-workspace"), base),
        database_url=workspace.get("database_url", ""),
        heldout=_resolve(heldout.get("path", ""), base),
        heldout_field=heldout.get("text_field", "text"),
        train=train,
        attribute=_build(AttributeSettings, data.get("attribute", {}), "attribute.", origin),
        verify=_build(VerifySettings, data.get("verify", {}), "verify.", origin),
        evaluation=evaluation,
        top_records=int(report.get("top_records", 20)),
        source_file=origin,
    )


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a TOML config file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from err
    return parse_config(data, origin=str(path), base=path.parent.resolve())
