"""Files that readers never see half-written, and their digests.

Checkpoints, data shards, the side trainer's ledger and the model repository's
versions are all read by other processes while they are written (Triton, the side
trainer, `gem embed`), and any writer may be killed. So each is written under a hidden
temporary name beside its final one and renamed into place in one step.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden name in `path`'s folder (same filesystem, so a rename is atomic),
    unique to this process."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def remove(path: Path) -> None:
    """Removes a file or a folder tree; nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write a file or a folder at; on success it replaces
    `path` in one rename, on an exception it is removed and `path` is untouched.

        with atomic_path(out / "model.onnx") as tmp:
            onnx.save(proto, tmp)
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def write_text_atomic(path: str | Path, text: str, fsync: bool = False) -> None:
    """Replaces a text file in one step; `fsync`: durable before the rename (a ledger)."""
    with atomic_path(path) as tmp, tmp.open("w") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
