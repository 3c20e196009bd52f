"""The side trainer's rank 0: runs the stages of a cycle and recovers at start.

Every FM cycle (trainer/loop.py runs the training on all ranks and hands rank 0 the
`Trained` model):

1. plan (trainer/plan.py): the oldest unprocessed shard n to train on and the next one,
   n + 1, to validate on (progressive validation: a cycle needs both); a shard that does
   not fit the schema is quarantined (once it has stopped changing) and skipped;
2. gate: candidate vs the served version on shard n + 1 (trainer/gate.py); a refused
   candidate's weights and optimizer state are dropped on every rank;
3. adapter: the Student Adapter is refitted on the freshest shard, on the logits of the
   FM that will serve with it;
4. commit: with --knowledge-out, the served versions' knowledge of shard n + 1 from the
   gate's pass (trainer/knowledge.py); then (trainer/commit.py) a new numbered checkpoint
   (weights, adapter, optimizer state, the record of shards, the ledger line), then that
   ledger line (trainer/ledger.py);
5. publish (trainer/publish.py): the FM and the adapter as new versions (or the adapter
   alone when the FM was refused), Triton loads them (old versions serve until the new
   ones are ready), the last K versions are kept, then the `publish` line.

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

from export.contract import ADAPTER_MODEL, ADAPTER_OUTPUT, FM_MODEL
from export.repository import ModelRepository
from jobs.embed.outputs import MODEL_OUTPUTS
from model.adapter import StudentAdapter
from model.batch import Batch
from model.checkpoint import Checkpoint, CheckpointStore, ModelBundle
from model.config import GEMConfig
from model.gem import GEM
from model.outputs import LOGITS
from model.schema import SURFACE_INPUT, FeatureSchema
from model.storage import check_bucket, place
from trainer.commit import Committer
from trainer.config import TrainerConfig
from trainer.gate import GateConfig, GateResult, gate, serving_pass
from trainer.knowledge import KnowledgeWriter, tidy_staging
from trainer.ledger import REFUSED, TRAINED, AdapterCommit, Committed, Ledger, ShardCommit, ShardId, TrainerRecord
from trainer.plan import Plan, Planner
from trainer.prometheus import TrainerMetrics, cycle_line
from trainer.publish import Publisher
from trainer.train import fit_adapter, labels_of, predict

log = logging.getLogger(__name__)


class TrainerStateError(ValueError):
    """The trainer cannot start or go on (the message says what is missing)."""


@dataclass(frozen=True)
class Trained:
    """What the loop hands rank 0 after an FM cycle's training: `model` holds the
    trained weights, or the previous ones when the gate refused them."""

    model: GEM
    loss: float
    examples_per_s: float
    examples: int
    # perf_counter() when the cycle began.
    start: float
    optimizer_state: list[dict[str, Any]]


@dataclass(frozen=True)
class CycleResult:
    """What a cycle did: its outcome ("published", "publish failed", "refused", or
    "adapter" for an adapter-only cycle) and the versions it left serving (None: none new)."""

    cycle: int
    outcome: str
    versions: dict[str, int | None]
    seconds: float


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
    check_bucket(cfg.source)
    if cfg.knowledge_out is not None:
        check_bucket(place(cfg.knowledge_out))
        tidy_staging(cfg.knowledge_out)
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
    """Rank 0's side of the trainer: the stages of every cycle, on the model the loop hands over."""

    def __init__(self, cfg: TrainerConfig, schema: FeatureSchema, config: GEMConfig, ckpt: Checkpoint, resumed: bool):
        self.cfg, self.schema, self.config = cfg, schema, config
        self.adapter = ckpt.adapter
        self.repo = ModelRepository(cfg.repository)
        ledger = Ledger(cfg.ledger_path)
        self.ledger = ledger
        self.metrics = TrainerMetrics.create()
        if cfg.metrics_port is not None:
            self.metrics.serve(cfg.metrics_port)
        self.planner = Planner(cfg, schema, config.seq_len, ledger, self.repo, self.metrics)
        self.committer = Committer(CheckpointStore(cfg.state_dir), ledger, ckpt, resumed)
        self.publisher = Publisher(cfg, self.repo, ledger, self.metrics)
        out = cfg.knowledge_out
        self.knowledge = None if out is None else KnowledgeWriter(out, cfg.stream, schema.task_names)
        self.fm_cycles = 0

    def _bundle(self, model: GEM) -> ModelBundle:
        return ModelBundle(self.schema, self.config, model, self.adapter)

    # -- start-up ------------------------------------------------------------------------

    def recover(self, model: GEM) -> None:
        """Once, at start: the ledger made to agree with the checkpoint (whose weights
        `model` holds), and a commit that was not published, published (see trainer/ledger.py)."""
        c = self.committer
        for change in self.ledger.reconcile(c.record, c.line, self.cfg.source):
            log.warning("ledger repaired: %s", change)
        pending = self.ledger.pending_publish()
        if pending is not None:
            committed = Committed.of(pending)
            what = f"cycle {committed.cycle}" if committed.kind == "shard" else f"the adapter fit on {committed.shard}"
            log.warning("%s was committed but not published: publishing it now", what)
            self.publisher.publish(
                committed, c.checkpoint, self._bundle(model), with_fm=committed.state == TRAINED, eval_path=None
            )

    # -- planning ------------------------------------------------------------------------

    def batch(self, name: str) -> Batch:
        return self.planner.batches[name]

    def plan(self) -> Plan:
        return self.planner.plan(self.committer.record, self.fm_cycles)

    # -- an FM cycle (after the training on all ranks) -----------------------------------

    def gate(self, plan: Plan, candidate: GEM) -> GateResult:
        """The candidate (just trained) against the served version on plan.eval."""
        assert plan.eval is not None
        eval_batch = self.planner.batches[plan.eval]
        # The served version's pass keeps the knowledge too when it is asked for.
        outputs = MODEL_OUTPUTS if self.knowledge is not None else (LOGITS,)
        try:
            return gate(
                self.schema, predict(candidate, eval_batch, self.schema), eval_batch, plan.eval, self.repo,
                GateConfig(self.cfg.tolerance), outputs,
            )  # fmt: skip
        except Exception as e:  # a gate that cannot run refuses: never publish blind
            return GateResult(False, f"the gate could not run: {e}", plan.eval, {})

    def finish_fm_cycle(self, plan: Plan, result: GateResult, trained: Trained) -> CycleResult:
        """The adapter refresh, the commit and the publish of an FM cycle."""
        assert plan.train is not None and plan.eval is not None
        m = self.metrics
        m.examples.inc(trained.examples)
        m.examples_per_s.set(trained.examples_per_s)
        m.loss.set(trained.loss)
        for task, v in result.candidate.items():
            m.last_ne.labels(task).set(v["ne"])
            m.last_auc.labels(task).set(v["auc"])
        if not result.passed:
            m.failures.labels("gate").inc()
            log.warning("cycle %d: the gate refused the candidate of %s: %s", plan.cycle, plan.train, result.reason)

        # The adapter follows the FM that will serve with it.
        if plan.adapter is not None:
            self._refresh_adapter(plan.adapter, trained.model, use_candidate=result.passed)

        written = self._write_knowledge(plan, result)
        state = TRAINED if result.passed else REFUSED
        previous = self.committer.record
        record = TrainerRecord(
            plan.cycle, {**previous.processed, plan.train: state}, plan.adapter or previous.adapter_shard
        )
        entry = ShardCommit(
            ShardId.of(self.cfg.source / plan.train), plan.cycle, state, plan.eval, result.reason, trained.loss,
            trained.examples, trained.examples_per_s, result.candidate, result.serving, result.serving_version,
            written,
        )  # fmt: skip
        gate_metrics = {
            "passed": result.passed, "reason": result.reason, "eval_shard": result.eval_shard,
            "candidate": result.candidate, "serving": result.serving, "serving_version": result.serving_version,
        }  # fmt: skip
        bundle = self._bundle(trained.model)
        line = self.committer.commit(record, entry, {"gate": gate_metrics}, bundle, trained.optimizer_state)
        self.planner.batches.pop(plan.train, None)
        self.fm_cycles += 1

        versions = self.publisher.publish(
            Committed.of(line), self.committer.checkpoint, bundle, result.passed, self.cfg.source / plan.eval
        )
        outcome = ("published" if versions.get(FM_MODEL) else "publish failed") if result.passed else "refused"
        seconds = time.perf_counter() - trained.start
        m.cycles.labels(outcome).inc()
        m.cycle_seconds.set(seconds)
        served = {t: v["ne"] for t, v in result.serving.items()} if result.serving else None
        text = " ".join(f"{k} v{v}" for k, v in versions.items() if v) or "nothing published"
        log.info(
            cycle_line(
                plan.cycle, plan.train, plan.eval, outcome, trained.examples_per_s, trained.loss,
                {t: v["ne"] for t, v in result.candidate.items()}, served, text, time.perf_counter() - trained.start,
            )
        )  # fmt: skip
        return CycleResult(plan.cycle, outcome, versions, seconds)

    def _write_knowledge(self, plan: Plan, result: GateResult) -> dict[str, Any] | None:
        """The served versions' knowledge of the eval shard, committed before the cycle's
        checkpoint (trainer/knowledge.py); None when not asked or nothing scored it."""
        if self.knowledge is None:
            return None
        assert plan.eval is not None
        served = result.served
        if served is None:  # no candidate metrics: the gate could not run (its reason says why)
            why = "nothing is served yet" if result.candidate else result.reason
        elif ADAPTER_OUTPUT not in served.outputs:
            why = f"no {ADAPTER_MODEL} is published"
        else:
            return self.knowledge.write(plan.eval, served)
        log.warning("cycle %d: no knowledge for %s: %s", plan.cycle, plan.eval, why)
        return None

    def _refresh_adapter(self, shard: str, model: GEM, use_candidate: bool) -> None:
        batch = self.planner.batches.get(shard)
        if batch is None:
            return
        if use_candidate or self.repo.latest(FM_MODEL) is None:
            logits = predict(model, batch, self.schema)
        else:
            served = serving_pass(self.repo, batch, self.schema)
            assert served is not None  # checked above
            logits = served.outputs[LOGITS]
        self.adapter = fit_refresh(self.adapter, logits, batch, self.schema, self.cfg.adapter_epochs, self.cfg.seed)

    # -- an adapter-only cycle -----------------------------------------------------------

    def adapter_cycle(self, plan: Plan, model: GEM) -> CycleResult:
        """Only the adapter, on the freshest shard, over the served FM's logits; `model`:
        the FM weights the checkpoint keeps."""
        assert plan.adapter is not None
        start = time.perf_counter()
        self._refresh_adapter(plan.adapter, model, use_candidate=False)
        record = replace(self.committer.record, adapter_shard=plan.adapter)
        entry = AdapterCommit(ShardId.of(self.cfg.source / plan.adapter), record.cycle)
        bundle = self._bundle(model)
        line = self.committer.commit(record, entry, {}, bundle, self.committer.optimizer_state)
        versions = self.publisher.publish(Committed.of(line), self.committer.checkpoint, bundle, False, None)
        version = versions[ADAPTER_MODEL]
        log.info(
            "adapter refresh on %s: %s (%.1fs)",
            plan.adapter, f"student_adapter v{version}" if version else "not published", time.perf_counter() - start,
        )  # fmt: skip
        return CycleResult(record.cycle, "adapter", versions, time.perf_counter() - start)
