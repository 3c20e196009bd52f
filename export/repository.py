"""The Triton model repository: publishing versions atomically, keeping a few.

Layout and names: `export.contract`. A version is assembled in a hidden staging folder
beside the versions and renamed into place in one step, so Triton never sees half a
version; pruning renames a version to `.pruned-<version>` before deleting it, for the
same reason. Version numbers only grow:
a version Triton refused (or one rolled back) is moved to `.rejected/<version>` with
the reason and its number is not reused. A version may carry `SOURCE`: what it was
exported from (the side trainer writes its checkpoint's weight digests there, so that a
restarted publish does not publish the same weights twice).

A user-indexed FM (no common batch axis, see `export.triton_config`) makes the whole
ensemble unbatched by Triton: the adapter's configs follow the FM's.

Each published graph gets one extra output, `<model>_version` (int64 [B, 1]), a
constant holding its version number, so every reply says which versions made it,
even while Triton switches from one version to the next.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.contract import (
    ADAPTER_INPUTS,
    ADAPTER_MODEL,
    DEFAULT_FLAVOUR,
    ENSEMBLE_MODEL,
    FLAVOURS,
    FM_ADAPTERS_PARAMETER,
    FM_MODEL,
    FP16_FILENAME,
    ONNX_FILENAME,
    PAIRED_FM_FILENAME,
    PYTHON_MODEL_FILENAME,
    REJECTED,
    USER_INPUTS_PARAMETER,
    VERSION_OUTPUTS,
    format_pairs,
    latest_version,
    loaded_pairs,
    published_versions,
)
from export.triton_config import (
    ServingConfig,
    Step,
    config_filename,
    config_io,
    ensemble_config,
    from_pbtxt,
    model_config,
    to_pbtxt,
)
from model.files import write_text_atomic
from model.outputs import LOGITS

log = logging.getLogger(__name__)

# The python-backend model (ONNX Runtime inside Triton), copied into every version; package
# data of `export` (pyproject.toml), so an installed wheel carries it.
PYTHON_MODEL_SOURCE = files("export") / "python_model" / PYTHON_MODEL_FILENAME
# A version set aside for deletion (pruning), and a version's record of its source.
PRUNED = ".pruned-"
SOURCE_FILENAME = "SOURCE"


def checkpoint_sources(checkpoint: Path) -> dict[str, str]:
    """What versions exported from `checkpoint` say they came from (SOURCE), per model:
    its weights' digests."""
    # Here, not at the top: model.checkpoint imports torch, which the repository's other
    # users (the CLI's start, serving) do not need.
    from model.checkpoint import checkpoint_digests

    digests = checkpoint_digests(checkpoint)
    return {FM_MODEL: f"sha256:{digests['model.pt']}", ADAPTER_MODEL: f"sha256:{digests['adapter.pt']}"}


class RepositoryError(RuntimeError):
    """The repository cannot take this version (missing model, bad graph)."""


def stamp_version(proto: onnx.ModelProto, output: str, version: int) -> onnx.ModelProto:
    """Adds `output`: int64 [B, 1] filled with `version`, B taken from the first output.

    Shape/Concat/ConstantOfShape only, all of which TensorRT runs. A stamp already in
    the graph (a republished version) is replaced.
    """
    stamped = onnx.ModelProto()
    stamped.CopyFrom(proto)
    g = stamped.graph
    ours = (output, f"{output}__")
    kept_nodes = [n for n in g.node if not any(o.startswith(ours) for o in n.output)]
    kept_inits = [i for i in g.initializer if not i.name.startswith(ours)]
    kept_outputs = [o for o in g.output if o.name != output]
    del g.node[:], g.initializer[:], g.output[:]
    g.node.extend(kept_nodes)
    g.initializer.extend(kept_inits)
    g.output.extend(kept_outputs)
    first = g.output[0].name
    batch, one, shape = f"{output}__batch", f"{output}__one", f"{output}__shape"
    g.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), one))
    g.node.extend(
        [
            helper.make_node("Shape", [first], [batch], start=0, end=1),
            helper.make_node("Concat", [batch, one], [shape], axis=0),
            helper.make_node(
                "ConstantOfShape",
                [shape],
                [output],
                value=helper.make_tensor("value", onnx.TensorProto.INT64, [1], [version]),
            ),
        ]
    )
    dim = g.output[0].type.tensor_type.shape.dim[0]
    value = helper.make_tensor_value_info(output, onnx.TensorProto.INT64, [dim.dim_param or dim.dim_value or None, 1])
    g.output.append(value)
    onnx.checker.check_model(stamped)
    return stamped


@dataclass(frozen=True)
class Published:
    model: str
    version: int
    path: Path


class ModelRepository:
    def __init__(self, root: Path, serving: ServingConfig | None = None):
        self.root = Path(root)
        self.serving = serving or ServingConfig()

    def versions(self, model: str) -> list[int]:
        return published_versions(self.root, model)

    def latest(self, model: str) -> int | None:
        return latest_version(self.root, model)

    def _next_version(self, model: str) -> int:
        rejected = self.root / model / REJECTED
        used = self.versions(model) + [int(p.name) for p in rejected.glob("*") if p.name.isdigit()]
        return max(used, default=0) + 1

    def source(self, model: str, version: int | None) -> str | None:
        """What `version` was exported from (its SOURCE file), if it says."""
        if version is None:
            return None
        path = self.root / model / str(version) / SOURCE_FILENAME
        return path.read_text().strip() if path.is_file() else None

    def version_from(self, model: str, source: str) -> int | None:
        """The newest version of `model` exported from `source` (its SOURCE file), if any."""
        return next((v for v in sorted(self.versions(model), reverse=True) if self.source(model, v) == source), None)

    def publish(
        self, model: str, onnx_path: Path, fp16_path: Path | None = None, source: str | None = None
    ) -> Published:
        """Stamps the graph with its version, writes configs for every flavour and
        renames the new version folder into place. `fp16_path`: a half-precision graph
        of the same model, kept beside it for a TensorRT FP16 plan; `source`: written to
        the version's SOURCE file."""
        if model not in VERSION_OUTPUTS:
            raise RepositoryError(f"unknown model {model!r}; one of {', '.join(VERSION_OUTPUTS)}")
        try:
            proto = onnx.load(str(onnx_path))
        except Exception as e:
            raise RepositoryError(f"{onnx_path}: not a readable ONNX model ({e})") from None
        folder = self.root / model
        folder.mkdir(parents=True, exist_ok=True)
        version = self._next_version(model)
        stamped = stamp_version(proto, VERSION_OUTPUTS[model], version)
        self._write_configs(model, stamped)
        staging = folder / f".staging-{version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        onnx.save(stamped, staging / ONNX_FILENAME)
        if fp16_path is not None:
            onnx.save(
                stamp_version(onnx.load(str(fp16_path)), VERSION_OUTPUTS[model], version), staging / FP16_FILENAME
            )
        (staging / PYTHON_MODEL_FILENAME).write_bytes(PYTHON_MODEL_SOURCE.read_bytes())
        if source is not None:
            (staging / SOURCE_FILENAME).write_text(source + "\n")
        if model == ADAPTER_MODEL:
            # Published with the FM just written, or fitted alone on the latest FM's logits.
            fm = self.latest(FM_MODEL)
            if fm is None:
                raise RepositoryError(f"{self.root} has no {FM_MODEL} version for {model} to follow")
            (staging / PAIRED_FM_FILENAME).write_text(f"{fm}\n")
        self._install(staging, folder / str(version))
        log.info("published %s version %d", model, version)
        if model == FM_MODEL:
            self._sync_adapter_configs()
        self._write_pairs()
        self._write_ensemble()
        return Published(model, version, folder / str(version))

    def _fm_batched(self) -> bool:
        """Whether the served FM is batched by Triton (a user-indexed FM is not)."""
        path = self.root / FM_MODEL / config_filename(DEFAULT_FLAVOUR)
        return not path.exists() or from_pbtxt(path.read_text()).max_batch_size > 0

    def _write_configs(self, model: str, proto: onnx.ModelProto) -> None:
        # The adapter is batched by Triton exactly when the FM is (the ensemble is one or the other).
        batched = None if model == FM_MODEL else self._fm_batched()
        for flavour in FLAVOURS:
            config = model_config(model, proto, flavour, self.serving, batched)
            if model == ADAPTER_MODEL:
                # Each loaded FM runs with the adapter published for it, which for an older
                # FM need not be among the newest adapters: all adapter versions on disk
                # load (they are tiny), and pruning keeps the paired ones (`prune`).
                config.version_policy.all.SetInParent()
            target = self.root / model / config_filename(flavour)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(target, to_pbtxt(config))

    def _write_pairs(self) -> None:
        """The adapter configs' record of which adapter each loaded FM version runs
        with (`FM_ADAPTERS_PARAMETER`), after every change of the versions on disk."""
        pairs = format_pairs(loaded_pairs(self.root, self.serving.loaded_versions))
        for flavour in FLAVOURS:
            path = self.root / ADAPTER_MODEL / config_filename(flavour)
            if path.exists():
                config = from_pbtxt(path.read_text())
                config.parameters[FM_ADAPTERS_PARAMETER].string_value = pairs
                write_text_atomic(path, to_pbtxt(config))

    def _sync_adapter_configs(self) -> None:
        """Rewrites the adapter's configs when the FM's batching changed."""
        latest = self.latest(ADAPTER_MODEL)
        path = self.root / ADAPTER_MODEL / config_filename(DEFAULT_FLAVOUR)
        if latest is None or not path.exists():
            return
        if (from_pbtxt(path.read_text()).max_batch_size > 0) != self._fm_batched():
            graph = onnx.load(str(self.root / ADAPTER_MODEL / str(latest) / ONNX_FILENAME))
            self._write_configs(ADAPTER_MODEL, graph)

    def _write_ensemble(self) -> None:
        """The ensemble config, once both models have a version. Its IO is theirs, read
        from the configs just written rather than from the (possibly large) graphs."""
        if self.latest(FM_MODEL) is None or self.latest(ADAPTER_MODEL) is None:
            return
        default = config_filename(DEFAULT_FLAVOUR)
        fm_config = from_pbtxt((self.root / FM_MODEL / default).read_text())
        fm_in, fm_out = config_io(fm_config)
        _, ad_out = config_io(from_pbtxt((self.root / ADAPTER_MODEL / default).read_text()))
        users = fm_config.parameters[USER_INPUTS_PARAMETER].string_value if fm_config.max_batch_size == 0 else ""
        adapter_logits, surface = ADAPTER_INPUTS
        steps = (
            Step(FM_MODEL, {t.name: t.name for t in fm_in}, {t.name: t.name for t in fm_out}),
            Step(ADAPTER_MODEL, {adapter_logits: LOGITS, surface: surface}, {t.name: t.name for t in ad_out}),
        )
        user_inputs = tuple(users.split(",")) if users else ()
        config = ensemble_config(ENSEMBLE_MODEL, fm_in, fm_out + ad_out, steps, self.serving, user_inputs)
        folder = self.root / ENSEMBLE_MODEL
        (folder / "1").mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / "config.pbtxt", to_pbtxt(config))

    def _install(self, staging: Path, target: Path) -> None:
        """The one rename that makes a version visible."""
        staging.rename(target)

    def clean(self) -> list[Path]:
        """Removes what a killed publisher or pruner left (staging folders, versions
        set aside for deletion, config temporaries), never a version: those only appear
        by rename, complete, and only disappear by rename. Returns what it removed."""
        stale = [
            *self.root.glob("*/.staging-*"), *self.root.glob(f"*/{PRUNED}*"), *self.root.glob("*/.*.tmp-*"),
            *self.root.glob("*/configs/.*.tmp-*"),
        ]  # fmt: skip
        for p in stale:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            log.warning("removed %s (left by an interrupted publish or prune)", p)
        return stale

    def reject(self, model: str, version: int, reason: str) -> Path:
        """Moves a version Triton refused out of the way, with the reason beside it."""
        target = self.root / model / REJECTED / str(version)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        (self.root / model / str(version)).rename(target)
        (target / "REASON").write_text(reason + "\n")
        self._write_pairs()
        log.warning("rejected %s version %d: %s", model, version, reason)
        return target

    def rollback(self, model: str, to: int) -> list[int]:
        """Makes `to` the latest version of `model`: the newer ones are moved aside as
        rejected (their numbers are never reused). Returns the versions moved."""
        versions = self.versions(model)
        if to not in versions:
            raise RepositoryError(f"{model} has no version {to} in {self.root} (versions: {versions or 'none'})")
        newer = [v for v in versions if v > to]
        for v in newer:
            self.reject(model, v, f"rolled back to version {to}")
        return newer

    def _set_aside(self, model: str, version: int) -> Path:
        aside = self.root / model / f"{PRUNED}{version}"
        (self.root / model / str(version)).rename(aside)
        return aside

    def prune(self, model: str, keep: int) -> list[int]:
        """Deletes all but the newest `keep` versions (each renamed aside first, so that
        no incomplete version is ever visible); returns the deleted ones. Never deleted:
        the newest `serving.loaded_versions` FM versions and their adapters, which
        pinned calls may still name."""
        versions, loaded = self.versions(model), self.serving.loaded_versions
        if model == FM_MODEL:
            keep = max(keep, loaded)
        kept = set(versions[-keep:]) if keep > 0 else set()
        if model == ADAPTER_MODEL:
            kept |= {adapter for _, adapter in loaded_pairs(self.root, loaded)}
        old = [v for v in versions if v not in kept]
        for v in old:
            shutil.rmtree(self._set_aside(model, v))
        self._write_pairs()
        if old:
            log.info("pruned %s versions %s", model, old)
        return old
