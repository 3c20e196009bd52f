"""The side trainer's rank 0: plans, gates, commits, publishes and recovers.

Every FM cycle (trainer/loop.py runs the training on all ranks):

1. plan: the oldest unprocessed shard n to train on and the next one, n + 1, to validate
   on (progressive validation: a cycle needs both); a shard that does not fit the
   schema is quarantined (once it has stopped changing) and skipped;
2. gate: candidate vs the served version on shard n + 1 (trainer/gate.py); a refused
   candidate's weights and optimizer state are dropped on every rank;
3. adapter: the Student Adapter is refitted on the freshest shard, on the logits of the
   FM that will serve with it;
4. commit: a new numbered checkpoint (weights, adapter, optimizer state, the record of
   shards, the ledger line), then that ledger line (trainer/ledger.py);
5. publish: the FM and the adapter as new versions (or the adapter alone when the FM was
   refused), Triton loads them (old versions serve until the new ones are ready), the
   last K versions are kept, then the `publish` line.

When only one new shard is there (no next shard to validate the FM on yet), the adapter
alone is refreshed on it, committed and published the same way: the adapter keeps up
with the stream while the FM waits for its gate.

Any failure of the gate, the export or the load leaves the served versions as they were,
and is logged with its reason and counted in the metrics.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from export.contract import ADAPTER_MODEL, FM_MODEL
from export.onnx_export import ExportError
from export.publish import MODELS, PublishPolicy, PublishReport, publish
from export.repository import ModelRepository, RepositoryError
from export.rollout import Connect
from model.adapter import StudentAdapter
from model.checkpoint import Checkpoint, CheckpointStore, ModelBundle, checkpoint_digests
from model.config import GEMConfig
from model.data.reader import Batch, DataError
from model.gem import GEM
from model.schema import SURFACE_INPUT, FeatureSchema
from trainer.config import TrainerConfig
from trainer.gate import GateConfig, GateResult, gate, serving_logits
from trainer.ledger import REFUSED, TRAINED, Ledger, ShardId, TrainerRecord
from trainer.prometheus import TrainerMetrics, cycle_line
from trainer.stream import discover, fingerprint, load_shard, quarantine
from trainer.train import fit_adapter, labels_of, predict

log = logging.getLogger(__name__)


class TrainerStateError(ValueError):
    """The trainer cannot start or go on (the message says what is missing)."""


@dataclass(frozen=True)
class Plan:
    kind: str  # "fm", "adapter", "idle", "stop"
    # The FM cycle's number: every rank seeds its shuffling with it.
    cycle: int = 0
    train: str | None = None
    eval: str | None = None
    adapter: str | None = None


@dataclass(frozen=True)
class Start:
    """Where the trainer starts: a checkpoint of its own (`resumed`), the --checkpoint
    given, or (path None) a fresh model."""

    path: Path | None
    resumed: bool


def prepare(cfg: TrainerConfig) -> Start:
    """Once, before any rank loads weights: removes what a kill left (checkpoint and
    export temporaries, staging folders, versions set aside) and finds where to start.
    Once the ledger has commits, the trainer resumes from its newest complete checkpoint
    or refuses to start: never from --checkpoint, which would train committed shards
    again from older weights."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cfg.work_dir, ignore_errors=True)
    store = CheckpointStore(cfg.state_dir)
    left = store.tidy()
    if left:
        log.warning("removed %d leftover(s) of an interrupted checkpoint save in %s", len(left), cfg.state_dir)
    ModelRepository(cfg.repository).clean()
    ledger = Ledger(cfg.ledger_path)
    newest = store.newest()
    if newest is not None:
        return Start(newest, resumed=True)
    commits = ledger.commits()
    if commits:
        raise TrainerStateError(
            f"{cfg.ledger_path} records {len(commits)} commit(s) (the last: {commits[-1]['shard']}) but "
            f"{store.folder} holds no complete checkpoint: refusing to start over from "
            f"{cfg.checkpoint or 'a fresh model'}; restore the checkpoint, or move the ledger aside to start over"
        )
    if cfg.checkpoint is not None and cfg.checkpoint.exists():
        return Start(cfg.checkpoint, resumed=False)
    if cfg.checkpoint is not None:
        # A container whose repository was published before any checkpoint was kept.
        log.warning("no checkpoint at %s: starting from a fresh %r model", cfg.checkpoint, cfg.preset)
    return Start(None, resumed=False)


def fit_refresh(
    adapter: StudentAdapter, fm_logits: np.ndarray, batch: Batch, schema: FeatureSchema, epochs: int, seed: int
) -> StudentAdapter:
    """A copy of `adapter` refitted on the shard's labels over these FM logits."""
    fresh = StudentAdapter(adapter.n_tasks, adapter.n_surfaces, adapter.hidden, parents=adapter.parents)
    fresh.load_state_dict(adapter.state_dict())
    fit_adapter(fresh, fm_logits, batch[SURFACE_INPUT], labels_of(batch, schema), epochs, seed)
    return fresh


class Coordinator:
    """Rank 0's side of the trainer: the ledger, the checkpoints, the gate, the repository."""

    def __init__(
        self, cfg: TrainerConfig, schema: FeatureSchema, config: GEMConfig, plain: GEM, ckpt: Checkpoint, resumed: bool
    ):
        self.cfg, self.schema, self.config = cfg, schema, config
        # The weights rank 0 evaluates, checkpoints and exports (kept current by the loop).
        self.plain = plain
        self.adapter = ckpt.adapter
        self.repo = ModelRepository(cfg.repository)
        self.store = CheckpointStore(cfg.state_dir)
        self.ledger = Ledger(cfg.ledger_path)
        self.metrics = TrainerMetrics.create()
        if cfg.metrics_port is not None:
            self.metrics.serve(cfg.metrics_port)
        self.record = TrainerRecord.from_dict(ckpt.metrics.get("trainer")) if resumed else TrainerRecord()
        # The current checkpoint, its ledger line and the optimizer state it holds.
        self.checkpoint: Path | None = ckpt.path if resumed else None
        self.commit: dict[str, Any] | None = ckpt.metrics.get("commit") if resumed else None
        self.optimizer_state = ckpt.optimizer if resumed else None
        self.batches: dict[str, Batch] = {}
        # Unreadable shards seen once: name -> (size, mtime) then.
        self.unsettled: dict[str, tuple[int, int]] = {}
        self.fm_cycles = 0

    # -- start-up ------------------------------------------------------------------------

    def recover(self) -> None:
        """Once, at start: the ledger made to agree with the checkpoint, and a commit
        that was not published, published (see trainer/ledger.py)."""
        for change in self.ledger.reconcile(self.record, self.commit, self.cfg.stream):
            log.warning("ledger repaired: %s", change)
        pending = self.ledger.pending_publish()
        if pending is not None:
            what = (
                f"cycle {pending['cycle']}" if pending["kind"] == "shard" else f"the adapter fit on {pending['shard']}"
            )
            log.warning("%s was committed but not published: publishing it now", what)
            self._publish(pending, with_fm=pending.get("state") == TRAINED, eval_path=None)

    # -- planning ------------------------------------------------------------------------

    def batch(self, name: str) -> Batch:
        return self.batches[name]

    def _shard(self, path: Path) -> Batch | bool | None:
        """The shard's rows; None after quarantining it (or when it is gone); False when
        it cannot be read yet but may still be being written (look again after a poll)."""
        if path.name in self.batches:
            return self.batches[path.name]
        try:
            batch = load_shard(path, self.schema, self.config.seq_len)
        except DataError as e:
            seen = fingerprint(path)
            if seen is None:
                return None
            if self.unsettled.get(path.name) != seen:
                self.unsettled[path.name] = seen
                log.info("%s cannot be read (yet?): looking again in %.1fs", path.name, self.cfg.poll_s)
                return False
            del self.unsettled[path.name]
            sid = ShardId.of(path)
            quarantine(path, str(e))
            self.ledger.append({"kind": "quarantine", **sid.fields(), "reason": str(e)})
            self.metrics.quarantined.inc()
            self.metrics.failures.labels("data").inc()
            return None
        self.unsettled.pop(path.name, None)
        self.batches[path.name] = batch
        return batch

    def plan(self) -> Plan:
        if self.cfg.max_cycles is not None and self.fm_cycles >= self.cfg.max_cycles:
            return Plan("stop")
        pending = discover(self.cfg.stream, self.ledger.done())
        self.metrics.pending_shards.set(len(pending))
        good: list[Path] = []
        for path in pending:
            got = self._shard(path)
            if got is False:
                return Plan("idle")  # the shards are taken in order: wait for this one
            if got is not None:
                good.append(path)
                if len(good) == 2:
                    break
        # The freshest shard that reads cleanly, for the adapter.
        fresh = next((p for p in reversed(pending) if p in good or self._shard(p) not in (None, False)), None)
        names = {p.name for p in pending}
        self.batches = {k: v for k, v in self.batches.items() if k in names}  # keep only what is still pending
        if len(good) == 2:
            return Plan("fm", self.record.cycle + 1, good[0].name, good[1].name, fresh.name if fresh else None)
        if fresh is not None and fresh.name != self.record.adapter_shard and self.repo.latest(FM_MODEL) is not None:
            return Plan("adapter", adapter=fresh.name)
        return Plan("stop" if self.cfg.exit_when_idle else "idle")

    # -- an FM cycle (after the training on all ranks) -----------------------------------

    def gate(self, plan: Plan) -> GateResult:
        """The candidate (`plain`, just trained) against the served version on plan.eval."""
        assert plan.eval is not None
        eval_batch = self.batches[plan.eval]
        try:
            return gate(
                self.schema, predict(self.plain, eval_batch, self.schema), eval_batch, plan.eval, self.repo,
                GateConfig(self.cfg.tolerance),
            )  # fmt: skip
        except Exception as e:  # a gate that cannot run refuses: never publish blind
            return GateResult(False, f"the gate could not run: {e}", plan.eval, {})

    def finish_fm_cycle(
        self, plan: Plan, result: GateResult, loss: float, rate: float, examples: int, start: float,
        optimizer_state: list[dict[str, Any]],
    ) -> None:  # fmt: skip
        """The adapter refresh, the commit and the publish of an FM cycle whose candidate
        `plain` now holds (the trained weights, or the previous ones when refused)."""
        assert plan.train is not None and plan.eval is not None
        m = self.metrics
        m.examples.inc(examples)
        m.examples_per_s.set(rate)
        m.loss.set(loss)
        for task, v in result.candidate.items():
            m.last_ne.labels(task).set(v["ne"])
            m.last_auc.labels(task).set(v["auc"])
        if not result.passed:
            m.failures.labels("gate").inc()
            log.warning("cycle %d: the gate refused the candidate of %s: %s", plan.cycle, plan.train, result.reason)

        # The adapter follows the FM that will serve with it.
        if plan.adapter is not None:
            self._refresh_adapter(plan.adapter, use_candidate=result.passed)

        state = TRAINED if result.passed else REFUSED
        record = TrainerRecord(
            plan.cycle, {**self.record.processed, plan.train: state}, plan.adapter or self.record.adapter_shard
        )
        entry = {
            "kind": "shard", **ShardId.of(self.cfg.stream / plan.train).fields(), "cycle": plan.cycle,
            "state": state, "eval_shard": plan.eval, "reason": result.reason, "loss": loss, "examples": examples,
            "examples_per_s": rate, "candidate": result.candidate, "serving": result.serving,
            "serving_version": result.serving_version,
        }  # fmt: skip
        gate_metrics = {
            "passed": result.passed, "reason": result.reason, "eval_shard": result.eval_shard,
            "candidate": result.candidate, "serving": result.serving, "serving_version": result.serving_version,
        }  # fmt: skip
        entry = self._commit(record, entry, {"gate": gate_metrics}, optimizer_state)
        self.batches.pop(plan.train, None)
        self.fm_cycles += 1

        versions = self._publish(entry, result.passed, self.cfg.stream / plan.eval)
        outcome = ("published" if versions.get(FM_MODEL) else "publish failed") if result.passed else "refused"
        m.cycles.labels(outcome).inc()
        m.cycle_seconds.set(time.perf_counter() - start)
        served = {t: v["ne"] for t, v in result.serving.items()} if result.serving else None
        text = " ".join(f"{k} v{v}" for k, v in versions.items() if v) or "nothing published"
        log.info(
            cycle_line(
                plan.cycle, plan.train, plan.eval, outcome, rate, loss,
                {t: v["ne"] for t, v in result.candidate.items()}, served, text, time.perf_counter() - start,
            )
        )  # fmt: skip

    def _refresh_adapter(self, shard: str, use_candidate: bool) -> None:
        batch = self.batches.get(shard)
        if batch is None:
            return
        if use_candidate or self.repo.latest(FM_MODEL) is None:
            logits = predict(self.plain, batch, self.schema)
        else:
            _, logits = serving_logits(self.repo, batch, self.schema)
        self.adapter = fit_refresh(self.adapter, logits, batch, self.schema, self.cfg.adapter_epochs, self.cfg.seed)

    # -- an adapter-only cycle -----------------------------------------------------------

    def adapter_cycle(self, plan: Plan) -> None:
        """Only the adapter, on the freshest shard, over the served FM's logits."""
        assert plan.adapter is not None
        start = time.perf_counter()
        self._refresh_adapter(plan.adapter, use_candidate=False)
        record = replace(self.record, adapter_shard=plan.adapter)
        entry = {"kind": "adapter", **ShardId.of(self.cfg.stream / plan.adapter).fields(), "cycle": record.cycle}
        entry = self._commit(record, entry, {}, self.optimizer_state)
        versions = self._publish(entry, with_fm=False, eval_path=None)
        version = versions[ADAPTER_MODEL]
        log.info(
            "adapter refresh on %s: %s (%.1fs)",
            plan.adapter, f"student_adapter v{version}" if version else "not published", time.perf_counter() - start,
        )  # fmt: skip

    # -- commit --------------------------------------------------------------------------

    def _commit(
        self, record: TrainerRecord, entry: dict[str, Any], extra: dict[str, Any],
        optimizer_state: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:  # fmt: skip
        """A new checkpoint holding `record` and its ledger line, then the line."""
        number = self.store.next_number()
        entry = {**entry, "checkpoint": number}
        metrics = {"trainer": record.to_dict(), "commit": entry, **extra}
        bundle = ModelBundle(self.schema, self.config, self.plain, self.adapter)
        self.checkpoint = self.store.save(number, bundle, metrics, optimizer_state)
        self.record, self.commit, self.optimizer_state = record, entry, optimizer_state
        self._record_commit(entry)
        return entry

    def _record_commit(self, entry: dict[str, Any]) -> None:
        self.ledger.append(entry)

    # -- publish -------------------------------------------------------------------------

    def _sources(self) -> dict[str, str]:
        """What the current checkpoint's versions say they came from: its weights' digests."""
        if self.checkpoint is None:
            return {}
        digests = checkpoint_digests(self.checkpoint)
        return {FM_MODEL: f"sha256:{digests['model.pt']}", ADAPTER_MODEL: f"sha256:{digests['adapter.pt']}"}

    def _publish(self, entry: dict[str, Any], with_fm: bool, eval_path: Path | None) -> dict[str, int | None]:
        """Publishes the current checkpoint (FM and adapter, or the adapter alone), rolls
        out, writes the publish line. A version already published from this checkpoint
        (a publish interrupted after its rename) is kept, not published again."""
        start = time.perf_counter()
        log.info(
            "publishing %s from checkpoint %s", f"{FM_MODEL} and {ADAPTER_MODEL}" if with_fm else ADAPTER_MODEL,
            entry.get("checkpoint", "?"),
        )  # fmt: skip
        if eval_path is not None and not eval_path.exists():
            eval_path = None
        self.cfg.work_dir.mkdir(parents=True, exist_ok=True)
        policy = PublishPolicy(
            data=eval_path, keep_versions=self.cfg.keep, with_fm=with_fm, sources=self._sources(),
            work_dir=self.cfg.work_dir,
        )  # fmt: skip
        error = None
        versions: dict[str, int | None] = dict.fromkeys(MODELS)
        try:
            report = publish(ModelBundle(self.schema, self.config, self.plain, self.adapter), self.repo, policy,
                             self._connect())  # fmt: skip
        except (ExportError, RepositoryError, DataError, OSError, RuntimeError, ValueError) as e:
            error = f"export failed: {e}"
            self.metrics.failures.labels("export").inc()
            log.error("%s; the served versions stay", error)
        else:
            versions = self._served(report)
        self._record_publish(entry, error, versions)
        text = ", ".join(f"{k} v{v}" for k, v in versions.items() if v) or "nothing"
        log.info("published %s (%.1fs)", text, time.perf_counter() - start)
        return versions

    def _record_publish(self, entry: dict[str, Any], error: str | None, versions: dict[str, int | None]) -> None:
        self.ledger.append(
            {"kind": "publish", "cycle": entry.get("cycle"), "checkpoint": entry.get("checkpoint"), "error": error,
             **versions}
        )  # fmt: skip
        now = time.time()
        for model, version in versions.items():
            if version:
                self.metrics.serving_version.labels(model).set(version)
                self.metrics.last_publish.labels(model).set(now)

    def _connect(self) -> Connect | None:
        """The Triton to load new versions into, when there is one."""
        url = self.cfg.triton_url
        if url is None:
            return None
        from serving.triton.client import TritonClient

        return lambda: TritonClient(url, timeout_s=30.0)

    def _served(self, report: PublishReport) -> dict[str, int | None]:
        """The published versions, a version Triton refused (moved aside, the old one
        keeps serving) as None; all None when Triton could not be reached."""
        if report.rollout_error is not None:
            self.metrics.failures.labels("load").inc()
            log.error("could not reach Triton at %s: %s (published, not loaded)", self.cfg.triton_url,
                      report.rollout_error)  # fmt: skip
            return dict.fromkeys(MODELS)
        out = report.versions
        for r in report.rollouts:
            if not r.loaded:
                self.metrics.failures.labels("load").inc()
                log.error("Triton refused %s v%d: %s; the served version stays", r.model, r.version, r.reason)
                out[r.model] = None
        return out
