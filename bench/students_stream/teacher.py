"""The FM in time order over all surfaces, one pass per shard, and its knowledge of the
student's shards, as the side trainer makes it.

The knowledge of shard k is what the served versions say about it in the cycle that
trains on shard k - 1: the FM trained through shard k - 2 (published by the cycle
before) and the adapter refitted on shard k - 1 over that FM's logits. So the FM never
labels rows it trained on and the adapter none it was fitted on. It is made by the
trainer's own code path: versions published to a model repository (export.publish), the
gate's pass over shard k from their ONNX files (trainer.gate.serving_pass) and the
trainer's knowledge writer (trainer.knowledge.KnowledgeWriter, `gem embed`'s layout).

Two arms: `fresh` (the FM keeps training, a new version every cycle) and `frozen` (the
FM stops mid-stream; its adapter is still refitted every cycle).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.students_stream.config import ARMS, StreamConfig
from bench.students_stream.world import World
from export.publish import PublishPolicy, publish
from export.repository import ModelRepository
from jobs.embed.outputs import MODEL_OUTPUTS
from model.adapter import StudentAdapter
from model.batch import Batch
from model.checkpoint import ModelBundle, save_checkpoint
from model.config import preset
from model.data.reader import read_batch
from model.embedding import dense_stats, set_dense_stats
from model.gem import GEM
from model.outputs import LOGITS
from model.schema import FeatureSchema
from trainer.coordinator import fit_refresh
from trainer.gate import serving_pass
from trainer.knowledge import KnowledgeWriter
from trainer.train import make_optimizers, train_steps


@dataclass(frozen=True)
class Arm:
    knowledge: Path
    # The FM checkpoint at the student's launch (what `share` takes its tables from).
    checkpoint: Path


class _ArmStream:
    """One arm's model repository, adapter and knowledge writer."""

    def __init__(self, root: Path, world: World, schema: FeatureSchema, adapter: StudentAdapter):
        self.root, self.world, self.schema, self.adapter = root, world, schema, adapter
        self.repo = ModelRepository(root / "model_repo")
        self.knowledge = root / "knowledge"  # a local folder (the writer takes s3:// too)
        self.writer = KnowledgeWriter(self.knowledge, world.shards[0].parent, schema.task_names)
        self.fm: ModelBundle | None = None

    def serve(self, bundle: ModelBundle, k: int) -> None:
        """Publishes the FM (trained through shard k - 2) to serve while shard k is labelled."""
        self.fm = bundle
        publish(bundle, self.repo, PublishPolicy(data=self.world.shards[k - 2]))

    def label(self, k: int, batches: dict[int, Batch], epochs: int) -> None:
        """The adapter refitted on shard k - 1 over the served FM's logits, published, then
        the served versions' one pass over shard k, written as its knowledge."""
        assert self.fm is not None
        served = serving_pass(self.repo, batches[k - 1], self.schema)
        assert served is not None  # an FM is published
        self.adapter = fit_refresh(self.adapter, served.outputs[LOGITS], batches[k - 1], self.schema, epochs, k)
        bundle = ModelBundle(self.schema, self.fm.config, self.fm.model, self.adapter)
        publish(bundle, self.repo, PublishPolicy(data=self.world.shards[k - 1], with_fm=False))
        served = serving_pass(self.repo, batches[k], self.schema, MODEL_OUTPUTS)
        assert served is not None
        self.writer.write(self.world.shards[k].name, served)

    def keep_checkpoint(self) -> Path:
        assert self.fm is not None
        return save_checkpoint(self.root / "fm_at_launch", self.fm, {})


def teach(world: World, cfg: StreamConfig, schema: FeatureSchema, work: Path, seed: int) -> dict[str, Arm]:
    """Trains the FM through the stream and writes both arms' knowledge of the shards
    [launch, shards); returns each arm's knowledge folder and launch checkpoint."""
    config = preset(cfg.preset)
    torch.manual_seed(seed)
    model = GEM(schema, config)
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces), parents=schema.task_parents)
    batches: dict[int, Batch] = {}

    def batch(i: int) -> Batch:
        if i not in batches:
            batches[i] = read_batch(world.shards[i], schema, max_seq_len=config.seq_len)
        return batches[i]

    # The dense features' statistics from the first shard: all a fresh stack has seen.
    set_dense_stats(model, dense_stats(schema.dense, [batch(0)]))
    optimizers = make_optimizers(model, cfg.fm_lr, cfg.fm_embedding_lr)
    rng = np.random.default_rng(seed)
    arms = {name: _ArmStream(work / name, world, schema, copy.deepcopy(adapter)) for name in ARMS}
    launch_checkpoints: dict[str, Path] = {}
    for n in range(cfg.shards - 2):
        train_steps(model, optimizers, batch(n), schema, cfg.fm_batch_size, rng)
        k = n + 2  # the shard the FM trained through n labels
        frozen_now = n == cfg.freeze - 1
        if k >= cfg.launch or frozen_now:
            snapshot = ModelBundle(schema, config, copy.deepcopy(model), adapter)
            if k >= cfg.launch:
                arms["fresh"].serve(snapshot, k)
            if frozen_now:
                arms["frozen"].serve(snapshot, k)
        for name, arm in arms.items():
            if k >= cfg.launch:
                batch(k - 1), batch(k)
                arm.label(k, batches, cfg.adapter_epochs)
                if k == cfg.launch:
                    launch_checkpoints[name] = arm.keep_checkpoint()
        batches.pop(n - 1, None)  # neither trained on again nor an adapter's shard
    return {name: Arm(arm.knowledge, launch_checkpoints[name]) for name, arm in arms.items()}
