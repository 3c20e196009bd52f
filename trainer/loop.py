"""The side trainer's loop, run by every rank: continuous refreshes of the FM and the
Student Adapter, published to serving.

All ranks take the plan rank 0 makes (trainer/coordinator.py), train one pass over the
shard (each on its share of the rows, incrementally from the current weights), and keep
or drop the trained weights and optimizer state as rank 0's gate says; rank 0 then
commits and publishes. `run` starts it in this process (torchrun, or --procs 1) or in
--procs processes (torch.distributed, trainer/distributed.py).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
import torch.multiprocessing as mp

from export.onnx_export import ExportError
from export.repository import RepositoryError
from model.adapter import StudentAdapter
from model.batch import take
from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model.config import preset
from model.gem import GEM
from model.schema import SURFACE_INPUT, FeatureSchema, load_schema
from trainer import distributed as D
from trainer.config import TrainerConfig
from trainer.coordinator import Coordinator, Start, Trained, TrainerStateError, prepare
from trainer.gate import GateResult
from trainer.memory import pin_mmap_threshold, release_freed_memory
from trainer.plan import Plan
from trainer.stream import load_shard
from trainer.train import make_optimizers, train_steps

log = logging.getLogger(__name__)

# Errors the user can fix: one line and exit status 2, from any rank.
USER_ERRORS = (ValueError, OSError, CheckpointError, RepositoryError, ExportError)
# Loggers that say too much for a long-running service (ONNX's exporter and optimizer,
# each export and prune step): WARNING and up unless -v.
CHATTY = ("onnxscript", "onnx_ir", "torch.onnx", "export")


def start_checkpoint(cfg: TrainerConfig, start: Start, schema: FeatureSchema) -> Checkpoint:
    if start.path is not None:
        return load_checkpoint(start.path, expect_schema=schema)
    torch.manual_seed(cfg.seed)
    config = preset(cfg.preset)
    model = GEM(schema, config)
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces), parents=schema.task_parents)
    return Checkpoint(schema, config, model, adapter, path=cfg.state_dir, metrics={})


class Trainer:
    def __init__(self, cfg: TrainerConfig, rt: D.Runtime, start: Start | None = None):
        self.cfg, self.rt = cfg, rt
        pin_mmap_threshold()  # before the first cycle's allocations (trainer/memory.py)
        self.schema = load_schema(cfg.schema_path)
        start = start or prepare(cfg)  # in one process (tests, benchmarks)
        ckpt = start_checkpoint(cfg, start, self.schema)
        resumed = start.resumed
        self.config = ckpt.config
        # Rank 0 evaluates, checkpoints and exports a plain CPU copy, handed to the
        # coordinator at every call; with DDP on CPU that is the trained module itself.
        on_cpu_ddp = rt.device.type == "cpu" and (rt.strategy == "ddp" or not rt.distributed)
        if on_cpu_ddp:
            self.plain = ckpt.model
            self.model = D.wrap(ckpt.model, rt)
        else:
            self.plain = GEM(self.schema, self.config)
            self.plain.load_state_dict(ckpt.model.state_dict())
            self.model = D.wrap(ckpt.model, rt)
        self.optimizers = make_optimizers(self.model, cfg.lr, cfg.embedding_lr)
        if resumed and ckpt.optimizer is not None:
            D.load_optimizer_state(self.model, self.optimizers, ckpt.optimizer, rt)
        self.coordinator = Coordinator(cfg, self.schema, self.config, ckpt, resumed) if rt.is_main else None

    def run(self) -> None:
        coordinator = self.coordinator
        if coordinator is not None:
            coordinator.recover(self.plain)
        while True:
            plan: Plan = D.broadcast(coordinator.plan() if coordinator else None, self.rt)
            if plan.kind == "stop":
                break
            if plan.kind == "idle":
                if coordinator is not None:
                    time.sleep(self.cfg.poll_s)
                continue
            if plan.kind == "adapter":
                if coordinator is not None:
                    coordinator.adapter_cycle(plan, self.plain)
            else:
                self.fm_cycle(plan)
            release_freed_memory()
        D.barrier(self.rt)
        if coordinator is not None:
            log.info("trainer stopped after %d cycle(s)", coordinator.fm_cycles)

    def fm_cycle(self, plan: Plan) -> None:
        rt, cfg, coordinator = self.rt, self.cfg, self.coordinator
        assert plan.train is not None
        start = time.perf_counter()
        if coordinator is not None:
            batch = coordinator.batch(plan.train)
        else:
            batch = load_shard(cfg.source / plan.train, self.schema, self.config.seq_len)
        before = D.full_state_dict(self.model, rt)
        before_optimizers = D.full_optimizer_state(self.model, self.optimizers, rt, snapshot=True)

        # Train: this rank's rows; every rank takes the same number of steps.
        mine = take(batch, D.rank_rows(len(batch[SURFACE_INPUT]), rt.rank, rt.world_size))
        rng = np.random.default_rng([cfg.seed, plan.cycle, rt.rank])
        t0 = time.perf_counter()
        loss = train_steps(self.model, self.optimizers, mine, self.schema, cfg.batch_size, rng, device=rt.device)
        examples = len(mine[SURFACE_INPUT]) * rt.world_size
        rate = examples / (time.perf_counter() - t0)

        after = D.full_state_dict(self.model, rt)
        result: GateResult | None = None
        if coordinator is not None:
            if self.plain is not D.unwrap(self.model):
                self.plain.load_state_dict(after)
            result = coordinator.gate(plan, self.plain)
        passed = D.broadcast(result.passed if result else None, rt)
        if not passed:
            # Dropped on every rank: the next cycle starts from the weights that serve.
            D.load_full_state_dict(self.model, before, rt)
            D.load_optimizer_state(self.model, self.optimizers, before_optimizers, rt)
            if coordinator is not None and self.plain is not D.unwrap(self.model):
                self.plain.load_state_dict(before)
        optimizer_state = D.full_optimizer_state(self.model, self.optimizers, rt)
        if coordinator is not None:
            assert result is not None
            coordinator.finish_fm_cycle(plan, result, Trained(self.plain, loss, rate, examples, start, optimizer_state))
        D.barrier(rt)


def quiet(verbose: bool) -> None:
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)


def _worker(cfg: TrainerConfig, start: Start | None, verbose: bool) -> None:
    rt = D.init(cfg.strategy)
    if not logging.getLogger().handlers:  # a spawned process: no CLI logging set up
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO if rt.is_main else logging.WARNING,
            format=f"%(asctime)s [rank {rt.rank}] %(message)s",
        )
    quiet(verbose)
    try:
        if start is None:  # torchrun or one process: rank 0 prepares, the others wait for it
            start = D.broadcast(prepare(cfg) if rt.is_main else None, rt)
        Trainer(cfg, rt, start).run()
    finally:
        D.shutdown(rt)


def _spawned(cfg: TrainerConfig, start: Start, verbose: bool, errors: mp.SimpleQueue) -> None:
    try:
        _worker(cfg, start, verbose)
    except USER_ERRORS as e:
        errors.put(f"rank {os.environ.get('RANK', '?')}: {e}")
        raise SystemExit(2) from None


def run(cfg: TrainerConfig) -> None:
    """The trainer, in this process (torchrun or --procs 1) or in --procs processes. An
    error the user can fix is raised here as one TrainerStateError, whichever rank met it."""
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    if cfg.procs > 1 and not D.launched_by_torchrun():
        start = prepare(cfg)  # here, so that a bad state folder is one line, not a rank's traceback
        errors = mp.get_context("spawn").SimpleQueue()
        try:
            D.spawn(_spawned, cfg.procs, cfg, start, verbose, errors)
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if not errors.empty():
                raise TrainerStateError(errors.get()) from None
            raise
    else:
        _worker(cfg, None, verbose)
