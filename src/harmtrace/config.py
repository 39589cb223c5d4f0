"""TOML config -> frozen settings objects; unknown keys and wrong types are errors.

A config has these tables (all optional but ``sources`` and ``behaviour.probes``)::

    [workspace]      path, database_url
    [[sources]]      one table per source (see harmtrace.ingest.SourceSpec)
    [heldout]        path, text_field: benign held-out text for the utility metric
    [train]          harmtrace.models.lm.LMSettings fields, seed, model_path, dataset_version
    [behaviour]      harmtrace.behaviours.spec.BehaviourSpec fields
    [attribute]      AttributeSettings fields
    [verify]         VerifySettings fields
    [report]         top_records
    [evaluation]     ground_truth (hidden labels, for AUPRC), floor (bool)
    [datamap]        harmtrace.datamap.DatamapSettings fields; [datamap.domains] source = domain

Relative paths are read relative to the config file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, get_type_hints

from harmtrace.attribute.methods import method_names
from harmtrace.behaviours.spec import BehaviourSpec
from harmtrace.datamap._settings import DatamapSettings
from harmtrace.errors import ConfigError
from harmtrace.ingest import SourceSpec
from harmtrace.models.lm import LMSettings

__all__ = [
    "AttributeSettings",
    "EvaluationSettings",
    "PipelineConfig",
    "TrainSettings",
    "TrakEnsemble",
    "VerifySettings",
    "load_config",
    "parse_config",
    "parse_methods",
    "with_methods",
]


@dataclass(frozen=True)
class TrainSettings:
    """``lm`` is the model and optimiser; ``model_path`` loads an existing HF model instead;
    ``dataset_version`` (an id or unambiguous prefix, e.g. a version made by
    ``harmtrace data edit``) trains on that version instead of the one ingest made."""

    lm: LMSettings = field(default_factory=LMSettings)
    seed: int = 0
    model_path: str = ""
    dataset_version: str = ""


class Preconditioner(StrEnum):
    """Inner product of the gradient methods; see harmtrace.attribute.methods."""

    NONE = "none"
    DIAGONAL = "diagonal"
    ADAM = "adam"


class TrakEnsemble(StrEnum):
    """The models TRAK averages over: every saved checkpoint, or the final model only."""

    CHECKPOINTS = "checkpoints"
    FINAL = "final"


@dataclass(frozen=True)
class AttributeSettings:
    """Which methods run, their settings, and ``k`` for top-k summaries.

    methods:
        Names from :func:`harmtrace.attribute.methods.method_names`, each once.
    projection_dim:
        >= 0 (default 0: exact gradients) for graddot, gradcos and tracin; a positive value
        projects them with a seeded Gaussian matrix.
    seed:
        >= 0; seeds every projection and the sampled targets of the influence curvature.
    k:
        Below 1 a fraction of the training records, 1 or more a count.
    batch_size:
        >= 1 records per gradient batch, for every model-based method.
    parameters:
        Substrings of parameter names to include (default: every trainable parameter);
        ekfac, kfac and logra keep the Linear/Conv1D layers whose parameters match.
    preconditioner, damping:
        Inner product of the gradient methods (none, diagonal or adam) and its damping, a
        fraction (>= 0) of the mean curvature; ``damping`` is also TRAK's relative lambda.
    influence_damping:
        ekfac and kfac: a number >= 0 added to every eigenvalue, or ``None`` (omit the key)
        for 0.1 x the mean eigenvalue of each module (Grosse et al. 2023).
    trak_projection_dim:
        >= 0 (default 2048; 0: unprojected) TRAK's projection dimension.
    trak_ensemble:
        :class:`TrakEnsemble`, default every saved checkpoint.
    logra_k_in, logra_k_out:
        >= 1 (default 16 each), LoGra's projection width of each layer's input and output.
    exact_max_gib:
        > 0 (default 4), the largest unrolled training graph the exact method builds.
    """

    methods: tuple[str, ...] = ("gradcos", "graddot", "tracin", "bm25")
    projection_dim: int = 0
    seed: int = 0
    k: float = 0.1
    batch_size: int = 32
    parameters: tuple[str, ...] = ()
    preconditioner: Preconditioner = Preconditioner.NONE
    damping: float = 1e-3
    influence_damping: float | None = None
    trak_projection_dim: int = 2048
    trak_ensemble: TrakEnsemble = TrakEnsemble.CHECKPOINTS
    logra_k_in: int = 16
    logra_k_out: int = 16
    exact_max_gib: float = 4.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "methods", parse_methods(self.methods))
        for name, low in (("projection_dim", 0), ("seed", 0), ("batch_size", 1),
                          ("trak_projection_dim", 0), ("logra_k_in", 1), ("logra_k_out", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"attribute.{name} must be an integer >= {low}, got "
                                  f"{value!r}")
        if not _number(self.damping) or self.damping < 0:
            raise ConfigError(f"attribute.damping must be a number >= 0, got {self.damping!r}")
        if self.influence_damping is not None and (
                not _number(self.influence_damping) or self.influence_damping < 0):
            raise ConfigError(
                f"attribute.influence_damping must be a number >= 0, got "
                f"{self.influence_damping!r}; leave the key out for the default (0.1 x the "
                "mean eigenvalue of each module)")
        if self.influence_damping is not None:
            set_(self, "influence_damping", float(self.influence_damping))
        if not _number(self.exact_max_gib) or self.exact_max_gib <= 0:
            raise ConfigError(f"attribute.exact_max_gib must be a number > 0, got "
                              f"{self.exact_max_gib!r}")
        try:
            set_(self, "trak_ensemble", TrakEnsemble(self.trak_ensemble))
        except ValueError:
            raise ConfigError(f"attribute.trak_ensemble = {self.trak_ensemble!r} is not one "
                              f"of {[e.value for e in TrakEnsemble]}") from None
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


def _number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def parse_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """Method names as a tuple: a list, or one string of comma-separated names.

    Raises :class:`ConfigError` for an empty list, an unknown name (listing the valid ones)
    or a name given twice.
    """
    items = [methods] if isinstance(methods, str) else list(methods)
    names = tuple(part.strip() for item in items for part in str(item).split(",")
                  if part.strip())
    valid = method_names()
    unknown = [m for m in names if m not in valid]
    if unknown or not names:
        raise ConfigError(f"attribute.methods has {unknown or 'nothing'}; choose from "
                          f"{', '.join(valid)}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise ConfigError(f"attribute.methods lists {twice} more than once; give each "
                          "method once")
    return names


@dataclass(frozen=True)
class VerifySettings:
    """Removal experiments: the methods whose top-k is removed, seeds, and the test level.

    ``sources`` names sources whose removal is tested too, each against a random removal
    of as many records from elsewhere and, when one exists within
    ``source_size_tolerance`` (relative size difference), against removing the source
    closest in size; p-values across the tested sources are corrected by ``correction``
    (``"holm"`` or ``"bh"``).
    """

    methods: tuple[str, ...] = ("gradcos", "bm25")
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha: float = 0.05
    enabled: bool = True
    sources: tuple[str, ...] = ()
    source_size_tolerance: float = 0.5
    correction: str = "holm"

    def __post_init__(self) -> None:
        if len(self.seeds) < 2:
            raise ConfigError("verify.seeds needs at least 2 seeds (3 or more recommended)")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"verify.alpha must be in (0, 1), got {self.alpha}")
        if self.correction not in ("holm", "bh"):
            raise ConfigError(
                f"verify.correction = {self.correction!r} is not allowed; use 'holm' or 'bh'")
        if not self.source_size_tolerance > 0:
            raise ConfigError("verify.source_size_tolerance must be above 0, e.g. 0.5")
        if len(set(self.sources)) != len(self.sources):
            raise ConfigError("verify.sources names a source more than once; give each once")


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
    datamap: DatamapSettings = field(default_factory=DatamapSettings)
    source_file: str = ""


_TABLES = {"workspace", "sources", "heldout", "train", "behaviour", "attribute", "verify",
           "report", "evaluation", "datamap"}


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
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name in allowed and f.name not in table
               and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{origin}: [{where.rstrip('.')}] needs the key(s) "
                          f"{', '.join(missing)}; add them (see the README's config example)")
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
    outer = {"seed", "model_path", "dataset_version"}
    _check_keys(train_table, {f.name for f in dataclasses.fields(LMSettings)} | outer,
                "train.", origin)
    lm = _build(LMSettings, {k: v for k, v in train_table.items() if k not in outer},
                "train.", origin)
    train = TrainSettings(lm=lm, seed=_coerce(train_table.get("seed", 0), int, "train.seed",
                                              origin),
                          model_path=_resolve(train_table.get("model_path", ""), base),
                          dataset_version=_coerce(train_table.get("dataset_version", ""), str,
                                                  "train.dataset_version", origin))
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
        datamap=_datamap(data.get("datamap", {}), origin),
        top_records=int(report.get("top_records", 20)),
        source_file=origin,
    )


def _datamap(table: dict, origin: str) -> DatamapSettings:
    """The [datamap] table; ``domains`` is a table of source = domain, checked apart."""
    _check_keys(table, {f.name for f in dataclasses.fields(DatamapSettings)}, "datamap.", origin)
    table = dict(table)
    domains = table.pop("domains", {})
    if not isinstance(domains, dict):
        raise ConfigError(f"{origin}: datamap.domains must be a table of source = \"domain\", "
                          f"got {domains!r}")
    settings = _build(DatamapSettings, table, "datamap.", origin, skip={"domains"})
    try:
        return dataclasses.replace(settings, domains=domains)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from err


def with_methods(config: PipelineConfig, methods: str | Sequence[str]) -> PipelineConfig:
    """``config`` with ``attribute.methods`` replaced by ``methods`` (a list of names or a
    comma-separated string), validated like the config key."""
    attribute = dataclasses.replace(config.attribute, methods=parse_methods(methods))
    return dataclasses.replace(config, attribute=attribute)


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
