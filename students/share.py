"""Parameter sharing: the student takes the FM's embedding tables for the features they
have in common, by name, from a published checkpoint's state dict.

The FM names its tables after the schema's features (model/embedding.py):
`embed.sparse.<feature>` and `embed.sequences.<i>.fields.<field>` hold a
`HashedEmbedding` (`.table.weight`), behind a projection when the feature's width is not
the model's (`.0.table.weight`). The student's `tables.<feature>` are `HashedEmbedding`s
of the same buckets and width, so a table is loaded as is (the same ids hash to the same
rows), then frozen or fine-tuned. Nothing is matched by position or copied by hand.

The student records where its tables came from: the checkpoint's FM digest (what the
repository's SOURCE files hold) and, given the model repository it was published to, the
FM version published from it (the side trainer writes SOURCE with each version).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from export.contract import FM_MODEL
from export.repository import ModelRepository, checkpoint_sources
from model.checkpoint import load_checkpoint
from students.model import Student

_TABLE_KEY = re.compile(
    r"^embed\.(?:sparse|sequences\.\d+\.fields)\.(?P<feature>[a-z][a-z0-9_]*)\.(?:0\.)?table\.weight$"
)


class ShareError(ValueError):
    """No FM table fits the student's features."""


def fm_tables(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Feature name -> the FM's embedding table, from a GEM state dict."""
    return {m["feature"]: v for k, v in state.items() if (m := _TABLE_KEY.match(k))}


def share_tables(student: Student, checkpoint: str | Path, mode: str = "finetune") -> list[str]:
    """Loads the FM's tables into the student's tables of the same features (same shape);
    `mode` "frozen" stops their gradients. Returns the features shared."""
    ckpt = load_checkpoint(checkpoint)
    tables = fm_tables(ckpt.model.state_dict())
    shared = []
    for name, module in student.tables.items():
        weight = module.get_parameter("table.weight")  # HashedTable's, named as the FM's
        fm = tables.get(name)
        if fm is None or fm.shape != weight.shape:
            continue
        with torch.no_grad():
            weight.copy_(fm)
        weight.requires_grad_(mode != "frozen")
        shared.append(name)
    if not shared:
        raise ShareError(
            f"no embedding table of {checkpoint} fits the student's features ({', '.join(student.tables)}); "
            f"the checkpoint has tables for {', '.join(sorted(tables)) or 'none'}"
        )
    return shared


def shared_fm_version(checkpoint: str | Path, repository: str | Path | None) -> tuple[str, int | None]:
    """(the checkpoint's FM source, the FM version of `repository` published from it; None
    without a repository). A repository that never published it is an error: the student
    would record a version its tables did not come from."""
    source = checkpoint_sources(Path(checkpoint))[FM_MODEL]
    if repository is None:
        return source, None
    version = ModelRepository(Path(repository)).version_from(FM_MODEL, source)
    if version is None:
        raise ShareError(f"{repository} has no {FM_MODEL} version published from {checkpoint} ({source})")
    return source, version
