"""What a `gem embed` run is asked to do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.contract import TRITON_GRPC_URL
from model.schema import DEFAULT_SCHEMA_PATH
from serving.backends.base import BackendConfig, BackendKind


@dataclass(frozen=True)
class EmbedConfig:
    source: str
    # A local folder or an s3:// URL (model/storage.py).
    out: str | Path
    repository: Path = Path("model_repo")
    schema_path: Path = DEFAULT_SCHEMA_PATH
    # "onnxruntime" (in the actors) or "triton".
    backend: BackendKind = "onnxruntime"
    triton_url: str = TRITON_GRPC_URL
    batch_size: int = 2048
    actors: int = 1
    # ONNX Runtime threads per actor (0: the node's cores divided among the actors).
    threads: int = 0
    overwrite: bool = False
    # Refuse to start when a file cannot be read as the schema, and fail the job when
    # any row is refused (else: report them and go on).
    fail_on_error: bool = False
    # Rows per input file at most (a dry run).
    limit: int | None = None
    # Ray cluster address (None: a local Ray).
    address: str | None = None
    # The request (or user) key column: a user-indexed FM encodes the user of each key
    # once per batch. None, or a column a file lacks: users found by content alone.
    group_by: str | None = "request_id"
    # The FM version to stamp with, and the adapter published for it (None: the latest);
    # recorded in each file's manifest, so that a rerun with another pin redoes the file.
    fm_version: int | None = None

    def __post_init__(self) -> None:
        BackendConfig(self.backend)  # refuses an unknown backend
        if self.batch_size < 1 or self.actors < 1:
            raise ValueError("batch_size and actors must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be at least 1")
        if self.fm_version is not None and self.fm_version < 1:
            raise ValueError("fm_version must be a version number (at least 1)")
