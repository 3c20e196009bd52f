"""The side trainer: continuous refreshes of the FM and the Student Adapter, published
to serving.

Every cycle (all ranks in step; rank 0 decides, evaluates, exports and publishes):

1. plan (rank 0): the oldest unprocessed shard n to train on and the next one, n + 1,
   to validate on (progressive validation: a cycle needs both); a shard that does not
   fit the schema is quarantined and skipped;
2. train (all ranks): one pass over shard n, each rank on its share of the rows,
   incrementally from the current weights;
3. gate (rank 0): candidate vs the served version on shard n + 1 (trainer/gate.py); a
   refused candidate's weights are dropped on every rank (back to the pre-cycle ones);
4. adapter (rank 0): the Student Adapter is refitted on the freshest shard, on the
   logits of the FM that will serve with it;
5. commit (rank 0): checkpoint (atomic rename), then the ledger line (trainer/ledger.py);
6. publish (rank 0): the FM and the adapter as new versions (or the adapter alone when
   the FM was refused), then Triton loads them (old versions serve until the new ones
   are ready), and the last K versions are kept.

When only one new shard is there (no next shard to validate the FM on yet), the adapter
alone is refreshed on it: the adapter keeps up with the stream while the FM waits for
its gate, so adapted labels stay calibrated when the FM is stale.

Any failure of the gate, the export or the load leaves the served versions as they were,
and is logged with its reason and counted in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.onnx_export import ExportError
from export.publish import ExportConfig, export_adapter_only, export_checkpoint
from export.repository import ADAPTER_MODEL, FM_MODEL, ModelRepository, RepositoryError
from model.adapter import StudentAdapter
from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model.config import GEMConfig, preset
from model.data.reader import Batch, DataError, take
from model.gem import GEM
from model.schema import DEFAULT_SCHEMA_PATH, SURFACE_INPUT, FeatureSchema, load_schema
from trainer import distributed as D
from trainer.gate import GateConfig, GateResult, gate, serving_logits
from trainer.ledger import REFUSED, TRAINED, Ledger, ShardId, TrainerRecord
from trainer.observability import TrainerMetrics, cycle_line
from trainer.stream import discover, load_shard, quarantine
from trainer.train import fit_adapter, labels_of, make_optimizers, predict, train_steps

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
LEDGER = "ledger.jsonl"
# Fault injection for the crash tests: "STAGE:CYCLE" (stages: train, staged, publish)
# makes rank 0 write <state>/held and wait there to be killed.
HOLD_ENV = "GEM_TRAINER_HOLD_AT"


@dataclass(frozen=True)
class TrainerConfig:
    stream: Path
    repository: Path
    # The trainer's own checkpoint and ledger.
    state_dir: Path = Path("artifacts/trainer")
    # The FM to start from when state_dir has no checkpoint yet; None: a fresh `preset`.
    checkpoint: Path | None = None
    preset: str = "small"
    schema_path: Path = DEFAULT_SCHEMA_PATH
    procs: int = 1
    strategy: str = "ddp"
    triton_url: str | None = None
    keep: int = 3
    tolerance: float = 0.01
    metrics_port: int | None = None
    poll_s: float = 5.0
    max_cycles: int | None = None
    exit_when_idle: bool = False
    batch_size: int = 512
    lr: float = 2e-3
    embedding_lr: float = 0.05
    adapter_epochs: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.procs < 1:
            raise ValueError(f"--procs must be at least 1, got {self.procs}")
        if self.keep < 1:
            raise ValueError(f"--keep must be at least 1, got {self.keep}")
        if self.tolerance < 0:
            raise ValueError(f"--tolerance must be >= 0, got {self.tolerance}")
        D.check_strategy(self.strategy)

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / CHECKPOINT

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / LEDGER


def hold_point(cfg: TrainerConfig, stage: str, cycle: int) -> None:
    """Waits forever at `stage` of `cycle` when HOLD_ENV asks for it (crash tests)."""
    if os.environ.get(HOLD_ENV) != f"{stage}:{cycle}":
        return
    (cfg.state_dir / "held").write_text(f"{stage}:{cycle} {os.getpid()}\n")
    log.warning("holding at %s of cycle %d (%s)", stage, cycle, HOLD_ENV)
    while True:
        time.sleep(60)


def fit_refresh(
    adapter: StudentAdapter, fm_logits: np.ndarray, batch: Batch, schema: FeatureSchema, epochs: int, seed: int
) -> StudentAdapter:
    """A copy of `adapter` refitted on the shard's labels over these FM logits."""
    fresh = StudentAdapter(adapter.n_tasks, adapter.n_surfaces, adapter.hidden)
    fresh.load_state_dict(adapter.state_dict())
    fit_adapter(fresh, fm_logits, batch[SURFACE_INPUT], labels_of(batch, schema), epochs, seed)
    return fresh


@dataclass
class Plan:
    kind: str  # "fm", "adapter", "idle", "stop"
    train: str | None = None
    eval: str | None = None
    adapter: str | None = None


class Trainer:
    def __init__(self, cfg: TrainerConfig, rt: D.Runtime):
        self.cfg, self.rt = cfg, rt
        self.schema = load_schema(cfg.schema_path)
        self.repo = ModelRepository(cfg.repository, on_staged=self._on_staged)
        ckpt = self._initial_checkpoint()
        self.config: GEMConfig = ckpt.config
        self.record = TrainerRecord.from_dict(ckpt.metrics.get("trainer")) if ckpt.path == cfg.checkpoint_path else (
            TrainerRecord()
        )  # fmt: skip
        self.adapter = ckpt.adapter
        self.model = D.wrap(ckpt.model, rt)
        # Rank 0 evaluates and exports a plain CPU copy; with DDP on CPU that is the
        # trained module itself.
        on_cpu_ddp = rt.device.type == "cpu" and (rt.strategy == "ddp" or not rt.distributed)
        self.plain = D.unwrap(self.model) if on_cpu_ddp else GEM(self.schema, self.config)
        self.optimizers = make_optimizers(self.model, cfg.lr, cfg.embedding_lr)
        self.cycles_run = 0
        self.metrics: TrainerMetrics | None = None
        self.ledger: Ledger | None = None
        self.cycle = self.record.cycle
        self.batches: dict[str, Batch] = {}
        if rt.is_main:
            self.ledger = Ledger(cfg.ledger_path)
            self.metrics = TrainerMetrics.create()
            if cfg.metrics_port is not None:
                self.metrics.serve(cfg.metrics_port)

    # -- start-up ------------------------------------------------------------------------

    def _initial_checkpoint(self) -> Checkpoint:
        cfg = self.cfg
        if (cfg.checkpoint_path / "manifest.json").exists():
            return load_checkpoint(cfg.checkpoint_path, expect_schema=self.schema)
        if cfg.checkpoint is not None and cfg.checkpoint.exists():
            return load_checkpoint(cfg.checkpoint, expect_schema=self.schema)
        if cfg.checkpoint is not None:
            # A container whose repository was published before any checkpoint was kept.
            log.warning("no checkpoint at %s: starting from a fresh %r model", cfg.checkpoint, cfg.preset)
        torch.manual_seed(cfg.seed)
        config = preset(cfg.preset)
        model = GEM(self.schema, config)
        adapter = StudentAdapter(len(self.schema.tasks), len(self.schema.surfaces), parents=self.schema.task_parents)
        return Checkpoint(cfg.checkpoint_path, self.schema, config, model, adapter, {})

    def recover(self) -> None:
        """Rank 0, once at start: repairs what a kill left (see trainer/ledger.py)."""
        assert self.ledger is not None
        for stale in self.repo.clean_staging():
            log.warning("a publish was interrupted: removed %s", stale)
        for change in self.ledger.reconcile(self.record):
            log.warning("ledger repaired: %s", change)
        pending = self.ledger.pending_publish()
        if pending is not None:
            log.warning("cycle %d was committed but not published: publishing it now", pending["cycle"])
            self._publish(int(pending["cycle"]), pending["state"] == TRAINED, eval_path=None)

    # -- planning (rank 0) ---------------------------------------------------------------

    def _shard(self, path: Path) -> Batch | None:
        """The shard's rows, or None after quarantining it."""
        if path.name in self.batches:
            return self.batches[path.name]
        try:
            batch = load_shard(path, self.schema, self.config.seq_len)
        except DataError as e:
            assert self.ledger is not None and self.metrics is not None
            quarantine(path, str(e))
            self.ledger.append({"kind": "quarantine", "shard": path.name, "reason": str(e)})
            self.metrics.quarantined.inc()
            self.metrics.failures.labels("data").inc()
            return None
        self.batches[path.name] = batch
        return batch

    def plan(self) -> Plan:
        assert self.ledger is not None and self.metrics is not None
        if self.cfg.max_cycles is not None and self.cycles_run >= self.cfg.max_cycles:
            return Plan("stop")
        while True:
            pending = discover(self.cfg.stream, self.ledger.done())
            self.metrics.pending_shards.set(len(pending))
            good = []
            for path in pending[:2]:
                if self._shard(path) is not None:
                    good.append(path)
            if len(good) == len(pending[:2]):
                break
        # The freshest shard that reads cleanly, for the adapter.
        fresh = next((p for p in reversed(pending) if p in good or self._shard(p) is not None), None)
        for name in list(self.batches):  # keep only what is still pending
            if name not in {p.name for p in pending}:
                del self.batches[name]
        if len(good) >= 2:
            return Plan("fm", good[0].name, good[1].name, fresh.name if fresh else None)
        if fresh is not None and fresh.name != self.record.adapter_shard and self.repo.latest(FM_MODEL) is not None:
            return Plan("adapter", adapter=fresh.name)
        return Plan("stop" if self.cfg.exit_when_idle else "idle")

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        if self.rt.is_main:
            self.recover()
        while True:
            plan = D.broadcast(self.plan() if self.rt.is_main else None, self.rt)
            if plan.kind == "stop":
                break
            if plan.kind == "idle":
                if self.rt.is_main:
                    time.sleep(self.cfg.poll_s)
                continue
            if plan.kind == "adapter":
                if self.rt.is_main:
                    self.adapter_cycle(plan)
                continue
            self.fm_cycle(plan)
            self.cycles_run += 1
        D.barrier(self.rt)
        if self.rt.is_main:
            log.info("trainer stopped after %d cycle(s)", self.cycles_run)

    def fm_cycle(self, plan: Plan) -> None:
        rt, cfg = self.rt, self.cfg
        start = time.perf_counter()
        self.cycle += 1
        cycle = self.cycle
        train_path = cfg.stream / plan.train
        batch = self.batches[plan.train] if rt.is_main else load_shard(train_path, self.schema, self.config.seq_len)
        before = D.full_state_dict(self.model, rt)

        # Train: this rank's rows; every rank takes the same number of steps.
        mine = take(batch, D.rank_rows(len(batch[SURFACE_INPUT]), rt.rank, rt.world_size))
        rng = np.random.default_rng([cfg.seed, cycle, rt.rank])
        steps = [0]

        def on_step(_n: int, _loss: float) -> None:
            steps[0] += 1
            if steps[0] == 2 and rt.is_main:
                hold_point(cfg, "train", cycle)

        t0 = time.perf_counter()
        loss = train_steps(
            self.model, self.optimizers, mine, self.schema, cfg.batch_size, rng, on_step, device=rt.device
        )
        examples = len(mine[SURFACE_INPUT]) * rt.world_size
        rate = examples / (time.perf_counter() - t0)

        after = D.full_state_dict(self.model, rt)
        result: GateResult | None = None
        if rt.is_main:
            if self.plain is not D.unwrap(self.model):
                self.plain.load_state_dict(after)
            eval_batch = self.batches[plan.eval]
            try:
                result = gate(
                    self.schema, predict(self.plain, eval_batch, self.schema), eval_batch, plan.eval, self.repo,
                    GateConfig(cfg.tolerance),
                )  # fmt: skip
            except Exception as e:  # a gate that cannot run refuses: never publish blind
                result = GateResult(False, f"the gate could not run: {e}", plan.eval, {})
        passed = D.broadcast(result.passed if result else None, rt)
        if not passed:
            # Dropped on every rank: the next cycle starts from the weights that serve.
            D.load_full_state_dict(self.model, before, rt)
            self.optimizers = make_optimizers(self.model, cfg.lr, cfg.embedding_lr)
            if rt.is_main and self.plain is not D.unwrap(self.model):
                self.plain.load_state_dict(before)
        if rt.is_main:
            assert result is not None
            self._after_gate(plan, cycle, result, batch, loss, rate, examples, start)
        D.barrier(rt)

    def _after_gate(
        self, plan: Plan, cycle: int, result: GateResult, batch: Batch, loss: float, rate: float, examples: int,
        start: float,
    ) -> None:  # fmt: skip
        assert self.ledger is not None and self.metrics is not None
        cfg, m = self.cfg, self.metrics
        m.examples.inc(examples)
        m.examples_per_s.set(rate)
        m.loss.set(loss)
        for task, v in result.candidate.items():
            m.last_ne.labels(task).set(v["ne"])
            m.last_auc.labels(task).set(v["auc"])
        if not result.passed:
            m.failures.labels("gate").inc()
            log.warning("cycle %d: the gate refused the candidate trained on %s: %s", cycle, plan.train, result.reason)

        # The adapter follows the FM that will serve with it.
        if plan.adapter is not None:
            self._refresh_adapter(plan.adapter, use_candidate=result.passed)

        # Commit: checkpoint (one rename), then the ledger line.
        state = TRAINED if result.passed else REFUSED
        self.record = TrainerRecord(
            cycle, {**self.record.processed, plan.train: state}, plan.adapter or self.record.adapter_shard
        )
        metrics: dict[str, Any] = {
            "trainer": self.record.to_dict(),
            "gate": {
                "passed": result.passed, "reason": result.reason, "eval_shard": result.eval_shard,
                "candidate": result.candidate, "serving": result.serving, "serving_version": result.serving_version,
            },
        }  # fmt: skip
        save_checkpoint(cfg.checkpoint_path, self.schema, self.config, self.plain, self.adapter, metrics)
        sid = ShardId.of(cfg.stream / plan.train)
        self.ledger.append(
            {
                "kind": "shard", "shard": plan.train, "size": sid.size, "sha256": sid.sha256, "cycle": cycle,
                "state": state, "eval_shard": plan.eval, "reason": result.reason, "loss": loss,
                "examples": examples, "examples_per_s": rate, "candidate": result.candidate,
                "serving": result.serving, "serving_version": result.serving_version,
            }
        )  # fmt: skip
        self.batches.pop(plan.train, None)

        versions = self._publish(cycle, result.passed, cfg.stream / plan.eval)
        outcome = ("published" if versions.get(FM_MODEL) else "publish failed") if result.passed else "refused"
        m.cycles.labels(outcome).inc()
        m.cycle_seconds.set(time.perf_counter() - start)
        served = {t: v["ne"] for t, v in result.serving.items()} if result.serving else None
        text = " ".join(f"{k} v{v}" for k, v in versions.items() if v) or "nothing published"
        log.info(
            cycle_line(
                cycle, plan.train, plan.eval, outcome, rate, loss, {t: v["ne"] for t, v in result.candidate.items()},
                served, text, time.perf_counter() - start,
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

    def adapter_cycle(self, plan: Plan) -> None:
        """Only the adapter, on the freshest shard, over the served FM's logits."""
        assert self.ledger is not None and self.metrics is not None and plan.adapter is not None
        start = time.perf_counter()
        self._refresh_adapter(plan.adapter, use_candidate=False)
        self.record = replace(self.record, adapter_shard=plan.adapter)
        save_checkpoint(
            self.cfg.checkpoint_path, self.schema, self.config, self.plain, self.adapter,
            {"trainer": self.record.to_dict()},
        )  # fmt: skip
        version = self._publish_adapter()
        self.ledger.append({"kind": "adapter", "shard": plan.adapter, "adapter_version": version})
        log.info(
            "adapter refresh on %s: %s (%.1fs)",
            plan.adapter, f"student_adapter v{version}" if version else "not published", time.perf_counter() - start,
        )  # fmt: skip

    # -- publishing (rank 0) ---------------------------------------------------------

    def _on_staged(self, staging: Path) -> None:
        hold_point(self.cfg, "staged", self.cycle)

    def _export_config(self, eval_path: Path | None) -> ExportConfig:
        return ExportConfig(
            repository=self.cfg.repository, data=eval_path, keep_versions=self.cfg.keep, on_staged=self._on_staged
        )

    def _publish(self, cycle: int, with_fm: bool, eval_path: Path | None) -> dict[str, int | None]:
        """Publishes (FM and adapter, or the adapter alone), rolls out, writes the publish line."""
        assert self.ledger is not None and self.metrics is not None
        hold_point(self.cfg, "publish", cycle)
        versions: dict[str, int | None] = {FM_MODEL: None, ADAPTER_MODEL: None}
        error = None
        if with_fm:
            try:
                ckpt = Checkpoint(self.cfg.checkpoint_path, self.schema, self.config, self.plain, self.adapter, {})
                if eval_path is not None and not eval_path.exists():
                    eval_path = None
                report = export_checkpoint(ckpt, self._export_config(eval_path))
                versions = {FM_MODEL: report.fm.version, ADAPTER_MODEL: report.adapter.version}
            except (ExportError, RepositoryError, DataError, OSError, RuntimeError, ValueError) as e:
                error = f"export failed: {e}"
        else:
            versions[ADAPTER_MODEL] = self._publish_adapter()
        if error:
            self.metrics.failures.labels("export").inc()
            log.error("cycle %d: %s; the served versions stay", cycle, error)
        else:
            versions = self._roll_out(versions)
        self.ledger.append({"kind": "publish", "cycle": cycle, "error": error, **versions})
        now = time.time()
        for model, version in versions.items():
            if version:
                self.metrics.serving_version.labels(model).set(version)
                self.metrics.last_publish.labels(model).set(now)
        return versions

    def _publish_adapter(self) -> int | None:
        assert self.metrics is not None
        if self.repo.latest(FM_MODEL) is None:
            return None
        try:
            published, _ = export_adapter_only(self.adapter, self._export_config(None))
        except (ExportError, RepositoryError, OSError, RuntimeError, ValueError) as e:
            self.metrics.failures.labels("export").inc()
            log.error("adapter export failed: %s; the served adapter stays", e)
            return None
        return self._roll_out({ADAPTER_MODEL: published.version})[ADAPTER_MODEL]

    def _roll_out(self, versions: dict[str, int | None]) -> dict[str, int | None]:
        """Asks Triton (when there is one) to load the new versions; a refused one is
        moved aside (the old version keeps serving) and reported as None."""
        url = self.cfg.triton_url
        if url is None:
            return versions
        from serving.triton.client import BackendError, TritonClient
        from serving.triton.rollout import roll_out

        async def load() -> dict[str, int | None]:
            out = dict(versions)
            async with TritonClient(url, timeout_s=30) as client:
                for model in (FM_MODEL, ADAPTER_MODEL):
                    if not versions.get(model):
                        continue
                    if model == ADAPTER_MODEL and versions.get(FM_MODEL) is not None and out[FM_MODEL] is None:
                        # Fitted on the refused FM's logits: it must not serve with the old FM.
                        self.repo.reject(model, versions[model], "its FM version was refused by Triton")
                        out[model] = None
                        continue
                    r = await roll_out(client, self.repo, model, self.cfg.keep)
                    if not r.loaded:
                        assert self.metrics is not None
                        self.metrics.failures.labels("load").inc()
                        log.error("Triton refused %s v%d: %s; the served version stays", model, r.version, r.reason)
                        out[model] = None
            return out

        try:
            return asyncio.run(load())
        except (BackendError, OSError) as e:
            assert self.metrics is not None
            self.metrics.failures.labels("load").inc()
            log.error("could not reach Triton at %s: %s (published, not loaded)", url, e)
            return {k: None for k in versions}


def _worker(cfg: TrainerConfig) -> None:
    rt = D.init(cfg.strategy)
    if not logging.getLogger().handlers:  # a spawned process: no CLI logging set up
        logging.basicConfig(
            level=logging.INFO if rt.is_main else logging.WARNING,
            format=f"%(asctime)s [rank {rt.rank}] %(message)s",
        )
    try:
        Trainer(cfg, rt).run()
    finally:
        D.shutdown(rt)


def run(cfg: TrainerConfig) -> None:
    """The trainer, in this process (torchrun or --procs 1) or in --procs processes."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    if cfg.procs > 1 and not D.launched_by_torchrun():
        D.spawn(_worker, cfg.procs, cfg)
    else:
        _worker(cfg)


# -- status and rollback -----------------------------------------------------------------


def status(state_dir: Path, repository: Path) -> dict[str, Any]:
    ledger = Ledger(state_dir / LEDGER)
    shards = ledger.shard_entries()
    publishes = [e for e in ledger.entries if e.get("kind") == "publish"]
    repo = ModelRepository(repository)
    return {
        "cycles": max((int(e["cycle"]) for e in shards), default=0),
        "trained": sum(e["state"] == TRAINED for e in shards),
        "refused": sum(e["state"] == REFUSED for e in shards),
        "quarantined": sorted(ledger.quarantined()),
        "last_shard": shards[-1] if shards else None,
        "last_publish": publishes[-1] if publishes else None,
        "versions": {m: repo.versions(m) for m in (FM_MODEL, ADAPTER_MODEL)},
    }


def rollback(repository: Path, model: str, to: int, triton_url: str | None = None) -> list[int]:
    """Makes `to` the served version of `model`: the newer versions are moved aside as
    rejected (their numbers are never reused), then Triton reloads when given."""
    repo = ModelRepository(repository)
    versions = repo.versions(model)
    if to not in versions:
        raise RepositoryError(f"{model} has no version {to} in {repository} (versions: {versions or 'none'})")
    newer = [v for v in versions if v > to]
    for v in newer:
        repo.reject(model, v, f"rolled back to version {to}")
    if triton_url:
        from serving.triton.client import TritonClient

        async def reload() -> None:
            async with TritonClient(triton_url, timeout_s=30) as client:
                await client.load(model)

        asyncio.run(reload())
    return newer
