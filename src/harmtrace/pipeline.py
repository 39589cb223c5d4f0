"""The investigation pipeline: ingest, train, measure, attribute, evaluate, verify, report.

Each stage reads the artifacts of the stages before it, writes its own named artifact in
the workspace (see :mod:`harmtrace.workspace`) and appends an entry to the ledger. A stage
whose artifact was made from the same settings and inputs is skipped and says so.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from harmtrace import __version__
from harmtrace._logging import get_logger
from harmtrace.attribute.gradients import trainable_parameters
from harmtrace.attribute.methods import METHODS, AttributionInputs, LMTraining, run_method
from harmtrace.attribute.rollup import auprc, records_frame, rollup_sources, top_k
from harmtrace.attribute.triangulate import method_agreement, overall_hint, source_agreement
from harmtrace.behaviours.focus import FocusedQuery, focus_tokens
from harmtrace.behaviours.measure import measure_behaviour
from harmtrace.behaviours.scorers import make_scorer
from harmtrace.behaviours.spec import ScorerKind
from harmtrace.config import PipelineConfig, with_methods
from harmtrace.datamap import DATAMAP_FORMAT, Attribution, DatamapResult, build_datamap
from harmtrace.datamap.perplexity import record_nll
from harmtrace.errors import ArtifactError, ConfigError, HarmtraceError, InputDataError
from harmtrace.hashing import sha256_file, sha256_json
from harmtrace.ingest import ingest as ingest_sources
from harmtrace.ingest import read_source
from harmtrace.ledger import Ledger
from harmtrace.models.lm import encode_texts, mean_token_nll, train_lm
from harmtrace.models.tokenizer import load_tokenizer, train_tokenizer
from harmtrace.progress import LogReporter, Reporter
from harmtrace.report import write_report
from harmtrace.store import AttributionRun, Checkpoint, Database, ModelInfo, current_user
from harmtrace.verify.design import source_arms
from harmtrace.verify.experiment import Condition, run_condition
from harmtrace.verify.stats import adjust, compare, compare_removals
from harmtrace.workspace import Workspace, atomic_write_json

__all__ = ["Pipeline", "STAGES"]

log = get_logger(__name__)

STAGES = ("ingest", "train", "measure", "attribute", "evaluate", "verify", "report")


def _settings(obj: Any) -> dict:
    return json.loads(json.dumps(asdict(obj), default=str))


class Pipeline:
    """Runs the stages of one investigation described by a :class:`PipelineConfig`.

    A workspace has one writer at a time: opening a pipeline removes temporary folders that
    a killed stage left behind.
    """

    def __init__(self, config: PipelineConfig, *, workspace: str | Path | None = None,
                 reporter: Reporter | None = None, force: bool = False) -> None:
        self.config = config
        self.ws = Workspace(Path(workspace or config.workspace),
                            database_url=config.database_url or None)
        self.db = Database(self.ws.db_url)
        self.db.create_all()
        self.ledger = Ledger.for_workspace(self.db, self.ws.root)
        self.reporter = reporter or LogReporter()
        self.force = force
        for leftover in self.ws.clean_partial():
            self.reporter.note(f"removed {leftover.name}, left by an interrupted stage")

    # -- helpers -------------------------------------------------------------------------

    def _skip(self, name: str, identity: dict) -> bool:
        if not self.force and self.ws.is_current(name, identity):
            self.reporter.stage(name, "up to date, skipped (same settings and inputs)")
            return True
        return False

    def _read(self, name: str, file: str, stage: str) -> Any:
        folder = self._checked(name, stage)
        return json.loads((folder / file).read_text(encoding="utf-8"))

    def _checked(self, name: str, stage: str) -> Path:
        """The folder of artifact ``name``, refusing one made from other settings or inputs."""
        folder = self.ws.require(name, stage_hint=stage)
        if not self.ws.is_current(name, self._identity(name)):
            raise ArtifactError(
                f"artifact '{name}' in {folder} was made from other settings or inputs than "
                f"{self.config.source_file or 'this config'}; run `harmtrace {stage}` (or "
                "`harmtrace run`) first"
            )
        return folder

    def _identity(self, name: str) -> dict:
        """Settings plus input fingerprints that artifact ``name`` must have been made from."""
        if name == "ingest":
            files = {s.name: sha256_file(s.path) if Path(s.path).exists() else "missing"
                     for s in self.config.sources}
            return {"sources": [_settings(s) for s in self.config.sources], "files": files}
        if name == "model":
            return {"version": self._version(), "train": _settings(self.config.train)}
        if name == "measure":
            return {"model": self._model_id(), "behaviour": _settings(self.config.behaviour)}
        if name == "attribute":
            generations = self._checked("measure", "measure") / "generations.parquet"
            return {"model": self._model_id(), "generations": sha256_file(generations),
                    "version": self._version(), "attribute": _settings(self.config.attribute)}
        if name == "evaluate":
            return self._evaluate_plan()[0]
        if name == "verify":
            return self._verify_plan()[0]
        return {}

    def _version(self) -> str:
        """The dataset version trained on: ``train.dataset_version`` or ingest's."""
        if self.config.train.dataset_version:
            try:
                return self.db.resolve_version(self.config.train.dataset_version)
            except ConfigError as err:
                raise ConfigError(f"{self.config.source_file or 'config'}: "
                                  f"train.dataset_version: {err}") from err
        return self._read("ingest", "ingest.json", "ingest")["version_id"]

    def _model_id(self) -> str:
        return self._read("model", "model.json", "train")["model_id"]

    def _append(self, stage: str, settings: dict, inputs: dict, outputs: dict) -> None:
        self.ledger.append(stage=stage, settings=settings, inputs=inputs, outputs=outputs)

    # -- ingest --------------------------------------------------------------------------

    def ingest(self) -> str:
        """Read every source, store records, create the dataset version; returns its id."""
        identity = self._identity("ingest")
        if self._skip("ingest", identity):
            return self._version()
        self.reporter.stage("ingest", f"reading {len(self.config.sources)} sources")
        result = ingest_sources(self.db, list(self.config.sources), ledger=self.ledger)
        with self.ws.writing("ingest", identity) as out:
            atomic_write_json(out / "ingest.json", {"version_id": result.version_id,
                                                    "n_records": result.n_records,
                                                    "per_source": result.per_source})
        self.reporter.note(f"dataset version {result.version_id[:12]}: "
                           f"{result.n_records} records {result.per_source}")
        return result.version_id

    def _records(self):
        version = self._version()
        return version, self.db.version_records(version)

    # -- train ---------------------------------------------------------------------------

    def train(self) -> str:
        """Train (or load) the model on the current dataset version; returns the model id."""
        version, records = self._records()
        train = self.config.train
        identity = self._identity("model")
        if self._skip("model", identity):
            return self._model_id()
        if train.model_path:
            return self._register_existing(version, identity)
        self.reporter.stage("train", f"training on {len(records)} records")
        with self.ws.writing("model", identity) as out:
            tokenizer = train_tokenizer([r.text for r in records],
                                        vocab_size=train.lm.vocab_size)
            tokenizer.save_pretrained(str(out / "tokenizer"))
            seqs = encode_texts(tokenizer, [r.text for r in records],
                                max_length=train.lm.max_length)
            trained = train_lm(seqs, tokenizer, train.lm, seed=train.seed, out_dir=out,
                               on_step=lambda d, t, _: self.reporter.step("train", d, t))
            checkpoints = [dataclasses.replace(c, path=Path(c.path).name)
                           for c in trained.checkpoints]
            model_id = sha256_json({"identity": identity,
                                    "checkpoints": [c.sha256 for c in checkpoints]})[:16]
            atomic_write_json(out / "model.json", {
                "model_id": model_id, "checkpoints": [asdict(c) for c in checkpoints],
                "final_loss": trained.losses[-1], "n_params": _n_params(trained.model),
            })
        self.db.register_model(ModelInfo(
            model_id=model_id, dataset_version=version, config=_settings(train),
            checkpoints=tuple(Checkpoint(c.step, c.path, c.sha256) for c in checkpoints)))
        self._append("train", _settings(train), {"dataset_version": version},
                     {"model_id": model_id, "checkpoints": [c.sha256 for c in checkpoints]})
        self.reporter.note(f"model {model_id}: final training loss {trained.losses[-1]:.3f}")
        return model_id

    def _register_existing(self, version: str, identity: dict) -> str:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(self.config.train.model_path)
        if not path.is_dir():
            raise ConfigError(
                f"train.model_path = {path} is not a folder; give a Hugging Face model folder "
                "(config.json, weights and tokenizer files) or remove the key to train a model"
            )
        model = AutoModelForCausalLM.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token is None:  # batches of training text need a pad token
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        weights = sorted(path.glob("*.safetensors"))
        digest = sha256_file(weights[0]) if weights else sha256_json(str(path))
        model_id = sha256_json({"identity": identity, "weights": digest})[:16]
        with self.ws.writing("model", identity) as out:
            tokenizer.save_pretrained(str(out / "tokenizer"))
            model.save_pretrained(str(out / "checkpoint-final"), safe_serialization=True)
            atomic_write_json(out / "model.json", {
                "model_id": model_id, "base_model": str(path), "n_params": _n_params(model),
                "checkpoints": [{"step": 0, "path": "checkpoint-final", "sha256": digest,
                                 "learning_rate": 1.0}]})
        self.db.register_model(ModelInfo(model_id=model_id, dataset_version=version,
                                         base_model=str(path), config={"model_path": str(path)},
                                         checkpoints=(Checkpoint(0, "checkpoint-final",
                                                                 digest),)))
        self._append("train", {"model_path": str(path)}, {"dataset_version": version},
                     {"model_id": model_id})
        return model_id

    def _load_models(self) -> tuple[Any, list[tuple[Any, float]], dict]:
        from transformers import AutoModelForCausalLM

        folder = self._checked("model", "train")
        info = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        tokenizer = load_tokenizer(folder / "tokenizer")
        models = []
        for c in info["checkpoints"]:
            model = AutoModelForCausalLM.from_pretrained(str(folder / c["path"]),
                                                         attn_implementation="eager")
            models.append((model.eval(), float(c["learning_rate"])))
        return tokenizer, models, info

    # -- measure -------------------------------------------------------------------------

    def _scorer(self):
        spec = self.config.behaviour
        if spec.scorer is ScorerKind.TARGET_LOGPROB:
            return None
        return make_scorer(spec.scorer.value, words=spec.words)

    def measure(self) -> dict:
        """Generate from the probes, score, and estimate the harm rate with a 95% CI."""
        model_id = self._model_id()
        spec = self.config.behaviour
        identity = self._identity("measure")
        if self._skip("measure", identity):
            return self._read("measure", "harm.json", "measure")
        tokenizer, models, _ = self._load_models()
        n = len(spec.probes) * spec.samples_per_probe
        self.reporter.stage("measure", f"scoring {spec.scorer.value} over {len(spec.probes)} "
                            f"probes ({n} samples when sampling)")
        generations, harm = measure_behaviour(models[-1][0], tokenizer, spec)
        harm["examples"] = generations.loc[generations["harmful"], "continuation"].head(8).tolist()
        with self.ws.writing("measure", identity) as out:
            generations.to_parquet(out / "generations.parquet")
            atomic_write_json(out / "harm.json", harm)
        self._append("measure", _settings(spec), {"model_id": model_id},
                     {"harm_rate": harm["harm_rate"], "ci": harm["ci"],
                      "generations": sha256_file(
                          self.ws.artifact_dir("measure") / "generations.parquet")})
        self.reporter.note(f"harm rate {harm['harm_rate']:.3f} (95% CI {harm['ci'][0]:.3f}-"
                           f"{harm['ci'][1]:.3f}), {harm['n_harmful']} harmful generations")
        return harm

    # -- attribute -----------------------------------------------------------------------

    def _train_sequences(self, tokenizer, records) -> list[list[int]]:
        return encode_texts(tokenizer, [r.text for r in records],
                            max_length=self.config.train.lm.max_length)

    def attribute(self, *, methods: str | Sequence[str] | None = None) -> dict:
        """Score every train record against the harmful generations, per method.

        ``methods`` (a list of names or one comma-separated string) replaces
        ``attribute.methods`` of this pipeline's config, for this stage and the later ones;
        the artifact's identity includes the methods, so another list recomputes.

        Writes ``scores-{method}.npy`` ``(n_query, n_train)`` (positive: the record made the
        harmful tokens more likely), ``scores-{method}.json`` (sign, normalisation, damping,
        projection dimension and parameters actually used, tokenizer, citation) and
        ``attribution.json`` (source roll-ups, method agreement, the same metadata).
        """
        if methods is not None:
            self.config = with_methods(self.config, methods)
        version, records = self._records()
        model_id = self._model_id()
        measure_dir = self._checked("measure", "measure")
        settings = self.config.attribute
        identity = self._identity("attribute")
        gens_digest = identity["generations"]
        if self._skip("attribute", identity):
            return self._read("attribute", "attribution.json", "attribute")
        generations = pd.read_parquet(measure_dir / "generations.parquet")
        harmful = generations[generations["harmful"]]
        if harmful.empty:
            raise ArtifactError(
                "no generation reached behaviour.threshold, so there is nothing to attribute; "
                "lower behaviour.threshold or raise behaviour.samples_per_probe"
            )
        tokenizer, models, _ = self._load_models()
        self.reporter.stage("attribute", f"{len(harmful)} harmful generations x "
                            f"{len(records)} records, methods {', '.join(settings.methods)}")
        queries = self._queries(harmful, tokenizer)
        inputs = self._attribution_inputs(records, queries, tokenizer, models)
        results = {m: run_method(m, inputs) for m in settings.methods}
        all_scores = {m: r.scores for m, r in results.items()}
        tokenizer_info = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token,
                          "pad": tokenizer.pad_token,
                          "max_length": self.config.train.lm.max_length}
        metadata = {m: {**r.metadata, "tokenizer": tokenizer_info, "loss": _LOSS,
                        "n_query": len(queries), "n_train": len(records)}
                    for m, r in results.items()}
        k = settings.k_records(len(records))
        sources = [r.source for r in records]
        summary = {
            "k": k, "n_queries": len(queries), "n_train": len(records),
            "sign": _SIGN,
            "loss": _LOSS,
            "methods": {m: {"description": METHODS[m].description, "sign": _SIGN,
                            "citation": METHODS[m].citation, "metadata": metadata[m],
                            "sources": rollup_sources(s, sources, k=k, seed=settings.seed)}
                        for m, s in all_scores.items()},
            **_triangulation(all_scores, sources, k),
            "settings": _settings(settings),
            "projection_dim_used": {m: metadata[m]["projection_dim"] for m in all_scores},
            "parameters": list(trainable_parameters(models[-1][0], settings.parameters)),
            "tokenizer": tokenizer_info,
            "focused_queries": int(sum(q.focused for q in queries)),
        }
        summary["reliability"] = _reliability(summary)
        frame = records_frame([r.record_id for r in records], sources,
                              [r.text for r in records], all_scores)
        with self.ws.writing("attribute", identity) as out:
            for m, s in all_scores.items():
                np.save(out / f"scores-{m}.npy", s.astype(np.float32))
                atomic_write_json(out / f"scores-{m}.json", metadata[m])
            frame.drop(columns=["text"]).to_parquet(out / "records.parquet")
            pd.DataFrame({"words": [q.words for q in queries],
                          "focused": [q.focused for q in queries]}).to_parquet(
                out / "queries.parquet")
            atomic_write_json(out / "attribution.json", summary)
        digests = {m: sha256_file(self.ws.artifact_dir("attribute") / f"scores-{m}.npy")
                   for m in all_scores}
        runs = [_attribution_run(model_id, version, m, _settings(settings), metadata[m],
                                 digests[m]) for m in all_scores]
        # The runs and their ledger entry commit together.
        with self.db.transaction(lock="ledger"):
            self.db.add_attribution_runs(runs)
            self._append("attribute", _settings(settings),
                         {"model_id": model_id, "dataset_version": version,
                          "generations": gens_digest},
                         {"score_files": digests, "runs": {r.method: r.run_id for r in runs},
                          "method_settings": {r.method: r.settings for r in runs}})
        for m in settings.methods:
            top = summary["methods"][m]["sources"][0]
            self.reporter.note(f"{m}: top source {top['source']} (score {top['score']:.4g})")
        self.reporter.note(f"agreement: {summary['agreement_hint']}")
        return summary

    def _attribution_inputs(self, records, queries, tokenizer, models) -> AttributionInputs:
        settings = self.config.attribute
        train = self.config.train
        # the exact replay needs the training the train stage ran; none for a loaded model
        training = None if train.model_path else LMTraining(train.lm, train.seed, tokenizer)
        return AttributionInputs(
            train_sequences=self._train_sequences(tokenizer, records),
            train_texts=[r.text for r in records], queries=queries, checkpoints=models,
            projection_dim=settings.projection_dim, seed=settings.seed,
            batch_size=settings.batch_size, parameters=settings.parameters,
            preconditioner=settings.preconditioner.value, damping=settings.damping,
            progress=self.reporter.step,
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            influence_damping=settings.influence_damping,
            trak_projection_dim=settings.trak_projection_dim,
            trak_ensemble=settings.trak_ensemble.value,
            logra_k_in=settings.logra_k_in, logra_k_out=settings.logra_k_out,
            training=training, exact_max_bytes=int(settings.exact_max_gib * 2**30),
        )

    def _queries(self, harmful: pd.DataFrame, tokenizer) -> list[FocusedQuery]:
        scorer = self._scorer()
        if scorer is None:  # target-logprob: the target's tokens are the query
            return [FocusedQuery(tuple(row.token_ids),
                                 tuple(i >= row.prompt_length for i in range(len(row.token_ids))),
                                 row.continuation, False)
                    for row in harmful.itertuples()]
        return [focus_tokens(list(row.token_ids), int(row.prompt_length), tokenizer, scorer,
                             min_drop=self.config.behaviour.focus_min_drop)
                for row in harmful.itertuples()]

    def _scores(self) -> dict[str, np.ndarray]:
        folder = self._checked("attribute", "attribute")
        return {p.stem.removeprefix("scores-"): np.load(p).astype(np.float64)
                for p in sorted(folder.glob("scores-*.npy"))}

    # -- evaluate (hidden labels) --------------------------------------------------------

    def _labels(self, records) -> list[int] | None:
        path = self.config.evaluation.ground_truth
        if not path:
            return None
        truth = {}
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                try:
                    row = json.loads(line)
                    truth[(row["source"], row["content_hash"])] = int(row["offensive"])
                except (json.JSONDecodeError, KeyError, ValueError) as err:
                    raise InputDataError(
                        f"{path}, line {line_no}: expected an object with source, "
                        f"content_hash and offensive ({err})") from err
        return [truth.get((r.source, r.content_hash), 0) for r in records]

    def _evaluate_plan(self) -> tuple[dict, Any, list[int] | None, dict]:
        version, records = self._records()
        labels = self._labels(records)
        scores = self._scores() if labels is not None else {}
        identity = {"version": version, "model": self._model_id(),
                    "labels": sha256_json(labels),
                    "scores": {m: sha256_json(s.mean(axis=0).round(8).tolist())
                               for m, s in scores.items()},
                    "floor": self.config.evaluation.floor,
                    "behaviour": _settings(self.config.behaviour),
                    "train": _settings(self.config.train)}
        return identity, records, labels, scores

    def evaluate(self) -> dict | None:
        """AUPRC of each method against hidden labels, and the scorer's floor."""
        identity, records, labels, scores = self._evaluate_plan()
        if labels is None:
            self.reporter.stage("evaluate", "no evaluation.ground_truth given, skipped")
            return None
        model_id = identity["model"]
        if self._skip("evaluate", identity):
            return self._read("evaluate", "evaluation.json", "evaluate")
        self.reporter.stage("evaluate", f"{sum(labels)} labelled records of {len(labels)}")
        result = {"base_rate": float(np.mean(labels)), "n_labelled": int(sum(labels)),
                  "auprc": {m: auprc(s, labels) for m, s in scores.items()}}
        if self.config.evaluation.floor:
            result["floor"] = self._floor(records, labels)
        with self.ws.writing("evaluate", identity) as out:
            atomic_write_json(out / "evaluation.json", result)
        self._append("evaluate", {"ground_truth": self.config.evaluation.ground_truth},
                     {"model_id": model_id}, {"auprc": result["auprc"],
                                              "floor": result.get("floor")})
        for m, v in result["auprc"].items():
            self.reporter.note(f"AUPRC {m}: {v:.3f} (base rate {result['base_rate']:.3f})")
        return result

    def _floor(self, records, labels) -> dict:
        """Harm rate of a model trained without any labelled record: the scorer's floor."""
        tokenizer, _, _ = self._load_models()
        sequences = self._train_sequences(tokenizer, records)
        keep = [s for s, y in zip(sequences, labels, strict=True) if not y]
        self.reporter.note(f"training the floor model on {len(keep)} unlabelled records")
        model = train_lm(keep, tokenizer, self.config.train.lm, seed=self.config.train.seed).model
        _, harm = measure_behaviour(model, tokenizer, self.config.behaviour)
        return {"harm_rate": harm["harm_rate"], "ci": harm["ci"],
                "description": "model trained without the labelled records, same seed"}

    # -- verify --------------------------------------------------------------------------

    def _heldout(self, tokenizer) -> list[list[int]]:
        path = self.config.heldout
        if not path:
            return []
        from harmtrace.ingest import SourceSpec

        spec = SourceSpec(name="heldout", path=path, format="jsonl",
                          text_field=self.config.heldout_field, on_duplicate="keep-first")
        texts = [r.text for r in read_source(spec)]
        return encode_texts(tokenizer, texts, max_length=self.config.train.lm.max_length)

    def _verify_plan(self) -> tuple[dict, dict[str, tuple[int, ...]], int]:
        settings = self.config.verify
        version, records = self._records()
        scores = self._scores()
        missing = [m for m in settings.methods if m not in scores]
        if missing:
            raise ConfigError(f"verify.methods {missing} were not run by `harmtrace attribute`;"
                              f" add them to attribute.methods")
        k = self.config.attribute.k_records(len(records))
        tops = {m: tuple(sorted(top_k(scores[m], k).tolist())) for m in settings.methods}
        identity = {"version": version, "model": self._model_id(), "tops": sha256_json(tops),
                    "verify": _settings(settings), "behaviour": _settings(self.config.behaviour),
                    "train": _settings(self.config.train), "heldout": self.config.heldout}
        return identity, tops, k

    def verify(self) -> dict | None:
        """Retrain without each method's top-k and without random k; compare harm rates."""
        settings = self.config.verify
        if not settings.enabled:
            self.reporter.stage("verify", "verify.enabled = false, skipped")
            return None
        identity, tops, k = self._verify_plan()
        model_id = identity["model"]
        if self._skip("verify", identity):
            return self._read("verify", "verification.json", "verify")
        conditions = [Condition(f"top-{m}", tops[m], k) for m in settings.methods]
        conditions.append(Condition("random", None, k))
        source_conditions, notes = self._source_conditions()
        conditions += source_conditions
        for note in notes:
            self.reporter.note(f"source controls: {note}")
        self._append("verify-plan", _settings(settings), {"model_id": model_id},
                     {"conditions": [c.name for c in conditions], "k": k,
                      "tops": sha256_json(tops), "source_controls": notes,
                      "runs": len(conditions) * len(settings.seeds)})
        result = self._run_conditions(conditions, identity, k)
        with self.ws.writing("verify", identity) as out:
            atomic_write_json(out / "verification.json", result)
        self._append("verify", _settings(settings), {"model_id": model_id},
                     {m: {"effect": r["effect"], "p_value": r["p_value"]}
                      for m, r in result["comparisons"].items()})
        return result

    def _source_conditions(self) -> tuple[list[Condition], list[str]]:
        """Conditions removing each of ``verify.sources`` and their matched controls."""
        settings = self.config.verify
        if not settings.sources:
            return [], []
        _, records = self._records()
        try:
            arms, notes = source_arms([r.source for r in records], settings.sources,
                                      size_tolerance=settings.source_size_tolerance)
        except ConfigError as err:
            raise ConfigError(f"verify.sources: {err}") from err
        conditions = [Condition(arm.name, arm.indices, arm.size, arm.exclude) for arm in arms]
        return conditions, notes

    def _run_conditions(self, conditions: list[Condition], identity: dict, k: int) -> dict:
        tokenizer, models, _ = self._load_models()
        _, records = self._records()
        sequences = self._train_sequences(tokenizer, records)
        heldout = self._heldout(tokenizer)
        runs_dir = self.ws.artifacts / "verify-runs" / sha256_json(identity)[:16]
        runs_dir.mkdir(parents=True, exist_ok=True)
        seeds = self.config.verify.seeds
        total, done = len(conditions) * len(seeds), 0
        self.reporter.stage("verify", f"{total} training runs: {len(conditions)} conditions x "
                            f"{len(seeds)} seeds, k = {k}")
        runs: dict[str, list] = {}
        for condition in conditions:
            for seed in seeds:
                started = time.perf_counter()
                run = run_condition(condition, seed, sequences=sequences,
                                    heldout=heldout or sequences[:1], tokenizer=tokenizer,
                                    lm=self.config.train.lm, behaviour=self.config.behaviour,
                                    runs_dir=runs_dir)
                runs.setdefault(condition.name, []).append(asdict(run))
                done += 1
                self.reporter.note(f"run {done}/{total} {condition.name} seed {seed}: harm "
                                   f"{run.harm_rate:.3f}, perplexity {run.perplexity:.1f} "
                                   f"({time.perf_counter() - started:.0f} s)")
        full_ppl = (float(np.exp(mean_token_nll(models[-1][0], heldout,
                                                tokenizer.pad_token_id)))
                    if heldout else None)
        summary = _summarise_runs(runs, k, self.config.verify.alpha, full_ppl, bool(heldout))
        if self.config.verify.sources:
            summary["sources"] = _source_comparisons(summary["conditions"], self.config.verify)
        return summary

    # -- report --------------------------------------------------------------------------

    def report(self, *, scenario: dict | None = None) -> Path:
        """Write report.html, report.md and summary.json; returns the HTML path."""
        summary, top = self.summary(scenario=scenario)
        identity = {"summary": sha256_json(summary)}
        with self.ws.writing("report", identity) as out:
            paths = write_report(summary, out, top_records=top,
                                 max_records=self.config.top_records)
        final = self.ws.artifact_dir("report") / paths.html.name
        self._append("report", {}, {"summary": identity["summary"]},
                     {"report": sha256_file(final)})
        return final

    def summary(self, *, scenario: dict | None = None) -> tuple[dict, pd.DataFrame | None]:
        """The machine-readable summary of every finished stage, and the top records."""
        version, records = self._records()
        model = self._read("model", "model.json", "train")
        harm = self._read("measure", "harm.json", "measure")
        spec = self.config.behaviour
        summary: dict[str, Any] = {
            "harmtrace_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "scenario": scenario or {"name": Path(self.config.source_file).stem,
                                     "kind": "user", "description": ""},
            "dataset": {"version": version, "n_records": len(records),
                        "sources": [{"name": s.name, "n_records": s.n_records,
                                     "origin": s.origin, "licence": s.licence}
                                    for s in self.db.get_sources()]},
            "model": {"model_id": model["model_id"], "n_params": model["n_params"],
                      "checkpoints": [c["step"] for c in model["checkpoints"]]},
            "behaviour": {"name": spec.name, "scorer": spec.scorer.value,
                          "threshold": spec.threshold, "n_probes": len(spec.probes),
                          "n_samples": spec.samples_per_probe, "harm_rate": harm["harm_rate"],
                          "ci": harm["ci"], "floor": None, "examples": harm["examples"]},
            "caveats": list(_CAVEATS),
        }
        top = None
        attribution = self._optional("attribute", "attribution.json", summary["caveats"])
        if attribution is not None:
            summary["attribution"] = attribution
            top = self._top_records(records, attribution["k"])
        evaluation = attribution and self._optional("evaluate", "evaluation.json",
                                                    summary["caveats"])
        if evaluation:
            for m, value in evaluation["auprc"].items():
                summary["attribution"]["methods"][m]["auprc"] = value
                summary["attribution"]["methods"][m]["auprc_random"] = evaluation["base_rate"]
            summary["behaviour"]["floor"] = evaluation.get("floor")
        verification = attribution and self._optional("verify", "verification.json",
                                                      summary["caveats"])
        if verification:
            summary["verification"] = verification
        summary["settings_digest"] = sha256_json({
            "train": _settings(self.config.train), "behaviour": _settings(spec),
            "attribute": _settings(self.config.attribute),
            "verify": _settings(self.config.verify)})
        entries = self.ledger.entries()
        summary["ledger"] = {"n_entries": len(entries),
                             "head": entries[-1].entry_hash if entries else ""}
        return summary, top

    def _optional(self, name: str, file: str, caveats: list[str]) -> dict | None:
        """A finished artifact for the report, or ``None`` (with a caveat when it is stale)."""
        if self.ws.read_meta(name) is None:
            return None
        try:
            current = self.ws.is_current(name, self._identity(name))
        except HarmtraceError:
            current = False
        if not current:
            caveats.append(f"The '{name}' results in the workspace were made from other "
                           f"settings and are left out; run `harmtrace {name}` to redo them.")
            return None
        return json.loads((self.ws.artifact_dir(name) / file).read_text(encoding="utf-8"))

    def _top_records(self, records, k: int) -> pd.DataFrame:
        frame = pd.read_parquet(self.ws.artifact_dir("attribute") / "records.parquet")
        frame["text"] = [r.text for r in records]
        methods = [c for c in frame.columns if c not in ("record_id", "source", "text")]
        ranks = sum(frame[m].rank(ascending=False) for m in methods) / len(methods)
        frame = frame.assign(mean_rank=ranks).sort_values("mean_rank").head(
            self.config.top_records)
        frame.insert(0, "rank", range(1, len(frame) + 1))
        return frame.drop(columns=["mean_rank"]).reset_index(drop=True)

    # -- data map ------------------------------------------------------------------------

    def datamap(self, *, show_text: bool = False, reason: str = "",
                actor: str | None = None) -> DatamapResult:
        """Per-record signals, clusters and private aggregates of the dataset version.

        Writes artifact ``datamap``: ``signals.parquet`` (no text), ``summary.json`` and
        ``aggregates.json`` (see :mod:`harmtrace.datamap`). With ``show_text`` (which needs a
        ``reason``) a ledger entry ``datamap-disclosure`` naming ``actor``, the reason and the
        exemplar record ids is appended first; only then is their raw text returned in
        ``disclosed``.
        """
        if show_text and not reason.strip():
            raise ConfigError("show_text=True needs a reason (the CLI's --reason TEXT): every "
                              "disclosure of raw text is recorded in the ledger with its reason")
        version, records = self._records()
        identity, extras = self._datamap_plan(records)
        if not self._skip("datamap", identity):
            self._write_datamap(records, identity, extras)
        folder = self.ws.artifact_dir("datamap")
        summary, aggregates = (json.loads((folder / f).read_text(encoding="utf-8"))
                               for f in ("summary.json", "aggregates.json"))
        result = DatamapResult(summary, aggregates, folder)
        if not show_text:
            return result
        shown = [e["record_id"] for g in aggregates["cluster"]["groups"] for e in g["exemplars"]]
        self.ledger.append(stage="datamap-disclosure",
                           settings={"reason": reason, "what": "raw text of data map exemplars"},
                           inputs={"dataset_version": version,
                                   "aggregates": sha256_file(folder / "aggregates.json")},
                           outputs={"record_ids": shown}, actor=actor or current_user())
        texts = {r.record_id: r.text for r in records}
        return dataclasses.replace(result, disclosed={i: texts[i] for i in shown})

    def _datamap_plan(self, records) -> tuple[dict, dict]:
        """The datamap artifact's identity and its optional inputs (model, scores, labels)."""
        extras: dict[str, Any] = {"skipped": {}, "scorer": self._scorer()}
        if extras["scorer"] is None:
            extras["skipped"]["toxicity"] = "behaviour.scorer = 'target-logprob' scores no text"
        model_id = None
        if self.ws.read_meta("model") is not None and self.ws.is_current(
                "model", self._identity("model")):
            model_id = self._model_id()
        else:
            extras["skipped"]["perplexity"] = ("no trained or registered model for this dataset "
                                               "version; run `harmtrace train` first")
        attribution = None
        try:
            if self.ws.read_meta("attribute") is not None and self.ws.is_current(
                    "attribute", self._identity("attribute")):
                folder = self.ws.artifact_dir("attribute")
                k = json.loads((folder / "attribution.json").read_text(encoding="utf-8"))["k"]
                attribution = Attribution(pd.read_parquet(folder / "records.parquet"), int(k))
                extras["attribution_digest"] = sha256_file(folder / "records.parquet")
        except HarmtraceError:  # stale or missing inputs of the attribution: leave it out
            attribution = None
        extras["attribution"], extras["labels"] = attribution, self._labels(records)
        spec = self.config.behaviour
        identity = {"format": DATAMAP_FORMAT, "version": self._version(),
                    "datamap": _settings(self.config.datamap),
                    "scorer": [spec.scorer.value, list(spec.words), spec.threshold],
                    "model": model_id, "attribution": extras.get("attribution_digest"),
                    "labels": sha256_json(extras["labels"])}
        extras["model_id"] = model_id
        return identity, extras

    def _write_datamap(self, records, identity: dict, extras: dict) -> None:
        perplexity = None
        if extras["model_id"] is not None:
            tokenizer, models, _ = self._load_models()
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            max_length = self.config.train.lm.max_length
            perplexity = lambda texts: record_nll(  # noqa: E731
                models[-1][0], encode_texts(tokenizer, texts, max_length=max_length), pad)
        self.reporter.stage("datamap", f"mapping {len(records)} records")
        built = build_datamap(records, self.config.datamap, scorer=extras["scorer"],
                              threshold=self.config.behaviour.threshold, perplexity=perplexity,
                              labels=extras["labels"], attribution=extras["attribution"],
                              skipped=extras["skipped"], progress=self.reporter.step)
        with self.ws.writing("datamap", identity) as out:
            built.signals.to_parquet(out / "signals.parquet")
            atomic_write_json(out / "summary.json", built.summary)
            atomic_write_json(out / "aggregates.json", built.aggregates)
        folder = self.ws.artifact_dir("datamap")
        self._append("datamap", _settings(self.config.datamap),
                     {"dataset_version": identity["version"], "model_id": identity["model"],
                      "attribution": identity["attribution"], "labels": identity["labels"]},
                     {f: sha256_file(folder / f)
                      for f in ("signals.parquet", "summary.json", "aggregates.json")})
        meta = built.summary["metadata"]
        self.reporter.note(f"data map: {len(records)} records, embedding {meta['embedding']}, "
                           f"written to {folder}")

    # -- everything ----------------------------------------------------------------------

    def run(self, *, scenario: dict | None = None) -> Path:
        """Run every stage in order; returns the path of the HTML report."""
        self.ingest()
        self.train()
        self.measure()
        self.attribute()
        self.evaluate()
        self.verify()
        return self.report(scenario=scenario)


_SIGN = "positive = the record made the harmful tokens more likely"
_ONE_METHOD = ("one method only, nothing cross-checks it: treat the ranking as a hypothesis, "
               "verify by retraining")
_LOSS = ("query: summed token NLL over its focus tokens; train record: summed token NLL over "
         "all its tokens; no 1/n factor unless the method's normalisation says otherwise")

_CAVEATS = (
    ("Attribution scores are first-order estimates; only the removal experiments test "
    "causation, and only for the methods and k that were run."),
    ("The harm scorer (alt-profanity-check) is itself a model with false positives: its floor "
    "is the rate it reports for a model that never saw offensive data."),
    ("Gradient methods are first-order: they see each record's effect at the saved "
    "checkpoints only, and with attribute.projection_dim > 0 carry projection noise."),
    ("With 3 seeds per condition the exact permutation test cannot go below p = 0.05; the "
    "Welch t-test p-value assumes roughly normal per-seed harm rates."),
    ("Retraining keeps the tokenizer of the full data fixed, so only the model's training "
    "records change between conditions."),
)


def _attribution_run(model_id: str, version: str, method: str, settings: dict,
                     metadata: dict, scores_sha256: str) -> AttributionRun:
    """The registry row of one method's scores; its id hashes what made them."""
    method_settings = json.loads(json.dumps(
        {"attribute": settings, "metadata": metadata}, default=str))
    run_id = sha256_json({"model": model_id, "version": version, "method": method,
                          "settings": method_settings, "scores": scores_sha256})[:16]
    return AttributionRun(run_id=run_id, model_id=model_id, dataset_version=version,
                          method=method, settings=method_settings, scores_sha256=scores_sha256)


def _n_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _triangulation(all_scores: dict[str, np.ndarray], sources: list[str], k: int) -> dict:
    """Agreement of the methods on records and on sources, and the overall hint
    (:mod:`harmtrace.attribute.triangulate`); ``topk_overlap`` is the top-k share, the field
    older reports read."""
    if len(all_scores) < 2:
        return {"agreement": [], "source_agreement": [],
                "agreement_hint": _ONE_METHOD}
    pairs = method_agreement(all_scores, k=k)
    by_source = source_agreement(all_scores, sources)
    return {"agreement": [{**p.as_dict(), "topk_overlap": p.topk_share} for p in pairs],
            "source_agreement": [p.as_dict() for p in by_source],
            "agreement_hint": overall_hint([*pairs, *by_source])}


def _reliability(summary: dict) -> str:
    tops = {m: v["sources"][0]["source"] for m, v in summary["methods"].items()}
    hint = summary["agreement_hint"]
    if len(tops) < 2:
        return hint
    if len(set(tops.values())) > 1:
        listed = ", ".join(f"{m}: {src}" for m, src in tops.items())
        return f"{hint} (top source: {listed}); trust only what removal experiments confirm"
    return f"{hint}; every method ranks source {next(iter(tops.values()))} first"


def _summarise_runs(runs: dict[str, list], k: int, alpha: float, full_ppl: float | None,
                    has_heldout: bool) -> dict:
    conditions = {}
    for name, items in runs.items():
        rates = [r["harm_rate"] for r in items]
        ppl = [r["perplexity"] for r in items]
        lo, hi = _mean_ci(rates)
        conditions[name] = {"harm_rates": rates, "mean": float(np.mean(rates)), "ci": [lo, hi],
                            "perplexity": ppl if has_heldout else [],
                            "perplexity_mean": float(np.mean(ppl)) if has_heldout else None,
                            "seeds": [r["seed"] for r in items]}
    control = conditions["random"]
    comparisons = {}
    for name, cond in conditions.items():
        if name == "random" or name.startswith("source-"):
            continue
        stats = compare_removals(cond["harm_rates"], control["harm_rates"], alpha=alpha)
        if has_heldout:
            stats["utility_change"] = (cond["perplexity_mean"] - control["perplexity_mean"]) \
                / control["perplexity_mean"]
        comparisons[name.removeprefix("top-")] = stats
    return {"k": k, "seeds": control["seeds"], "conditions": conditions,
            "comparisons": comparisons, "full_perplexity": full_ppl, "alpha": alpha}


def _source_comparisons(conditions: dict, settings) -> dict:
    """Each tested source against its matched controls; p-values corrected across sources.

    Effects are ``mean(harm | source removed) - mean(harm | control)`` over seeds, with a
    bootstrap interval and an exact permutation p-value (one-sided: removal lowers harm).
    A source is declared causal only when it beats its random-records control after the
    correction (and, where one exists, the similar-size source as well).
    """
    results: dict[str, dict] = {}
    for target in settings.sources:
        name = f"source-{target}"
        treated = conditions[name]
        controls = {c.split("/", 1)[1]: conditions[c] for c in conditions
                    if c.startswith(name + "/")}
        results[target] = {
            "harm_mean": treated["mean"],
            "controls": {label: compare(treated["harm_rates"], c["harm_rates"],
                                        alpha=settings.alpha).as_dict()
                         for label, c in controls.items()},
        }
    random_p = [r["controls"]["random-records"]["p_value"] for r in results.values()]
    adjusted = adjust(random_p, method=settings.correction)
    for result, p_adj in zip(results.values(), adjusted, strict=True):
        similar = [c for label, c in result["controls"].items() if label != "random-records"]
        beats_similar = all(c["p_value"] < settings.alpha for c in similar)
        result["p_adjusted"] = float(p_adj)
        result["correction"] = settings.correction
        result["causal"] = bool(p_adj < settings.alpha and beats_similar)
        result["verdict"] = ("causal: removal lowers harm more than matched controls"
                             if result["causal"] else "not shown causal (null result kept)")
    return results


def _mean_ci(values: list[float]) -> tuple[float, float]:
    """t interval of the mean of per-seed harm rates, clipped to [0, 1]."""
    from scipy import stats

    arr = np.asarray(values, dtype=np.float64)
    if len(arr) < 2 or np.ptp(arr) == 0:
        return float(arr.mean()), float(arr.mean())
    lo, hi = stats.t.interval(0.95, len(arr) - 1, loc=arr.mean(), scale=stats.sem(arr))
    return float(max(lo, 0.0)), float(min(hi, 1.0))  # a rate lies in [0, 1]
