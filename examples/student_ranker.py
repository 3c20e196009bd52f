"""A vertical ranker that uses GEM's knowledge online: for one user and their candidate
ads it asks the knowledge service for `embedding` and `user_embedding`, feeds them to a
student trained with `--variant repr` (or `all`), and ranks the candidates by its score.

    .venv/bin/python examples/student_ranker.py --address 127.0.0.1:50051 \\
        --student artifacts/students/repr --data artifacts/data/synth/part-00003.parquet

The call uses the shared-user form (one user, many candidates: the user's features and
history are sent once), pinned to the FM version the student's embedding inputs came
from (recorded in its checkpoint), so that a newer FM never changes what the student's
inputs mean; a pin no longer loaded is FAILED_PRECONDITION. The candidates here are
logged rows of one user; in production they come from retrieval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from gem.knowledge import KnowledgeClient

from model.data.reader import table_to_batch
from model.features import input_specs
from model.outputs import EMBEDDING, USER_EMBEDDING
from model.schema import load_schema
from students.model import SERVING, Student
from students.train import load_student


def candidates_of_one_user(path: Path, student: Student, n: int) -> pa.Table:
    """Up to `n` logged rows of the busiest user, on the student's surfaces."""
    table = pq.read_table(path)
    surfaces = pc.cast(table.column("surface"), pa.string())
    table = table.filter(pc.is_in(surfaces, value_set=pa.array(list(student.cfg.surfaces or student.schema.surfaces))))
    users = pc.value_counts(table.column("user_id"))
    busiest = users.field("values")[int(np.argmax(users.field("counts").to_numpy()))]
    return table.filter(pc.equal(table.column("user_id"), busiest)).slice(0, n)


def rank(
    client: KnowledgeClient, student: Student, rows: pa.Table, fm_version: int | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Scores [n, tasks] of the candidates, and the knowledge the service returned.
    `fm_version`: the FM version the student's embedding inputs came from (its
    checkpoint's `fm_version`), pinned so that a newer FM never changes their meaning."""
    schema = load_schema()  # the FM's schema: which columns are user-side
    specs = [s for s in input_specs(schema) if s.kind != "length"]  # what the service takes
    user_cols = [s.name for s in specs if s.side == "user"]
    user = rows.slice(0, 1).select(user_cols)
    ads = rows.select([s.name for s in specs if s.side != "user"])
    reply = client.generate(ads, shared=user, outputs=["embedding", "user_embedding"], fm_version=fm_version)
    # The student reads the same user row for every candidate, as the service did.
    same_user = ads
    for name in user_cols:
        same_user = same_user.append_column(name, user.column(name).take(pa.array(np.zeros(rows.num_rows, np.int64))))
    batch = table_to_batch(same_user, student.schema, max_seq_len=student.cfg.sequence_events or None, labels=False)
    batch[EMBEDDING] = reply.outputs[EMBEDDING].astype(np.float32)
    batch[USER_EMBEDDING] = reply.outputs[USER_EMBEDDING].astype(np.float32)
    with torch.no_grad():
        inputs = {n: torch.from_numpy(np.require(batch[n], requirements=("C", "W"))) for n in student.input_names()}
        logits = student(inputs)[SERVING]
    return torch.sigmoid(logits).numpy(), {k: reply.outputs[k] for k in (EMBEDDING, USER_EMBEDDING)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="127.0.0.1:50051", help="the knowledge service (gem up / gem serve)")
    p.add_argument("--application", default=None, help="Serve application, when one instance runs several")
    p.add_argument("--student", type=Path, required=True, help="student checkpoint trained with --variant repr or all")
    p.add_argument("--data", type=Path, required=True, help="logged Parquet to take one user's candidates from")
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = p.parse_args()

    student, variant, metrics = load_student(args.student)
    if not variant.repr:
        p.error(f"{args.student} was trained as {variant.name!r}: it takes no GEM embeddings (train with repr)")
    rows = candidates_of_one_user(args.data, student, args.candidates)
    with KnowledgeClient(args.address, application=args.application, timeout_s=30) as client:
        try:
            scores, _ = rank(client, student, rows, metrics.get("fm_version"))
        except grpc.RpcError as e:  # e.g. FAILED_PRECONDITION: the student's FM version is gone
            p.exit(2, f"{p.prog}: the knowledge service refused the call: {e.code().name}: {e.details()}\n")
    tasks = [t.name for t in student.schema.tasks]
    order = np.argsort(-scores[:, 0])
    ids = rows.column("example_id").to_numpy()
    if args.json:
        print(json.dumps({"example_id": ids.tolist(), "scores": scores.tolist(), "tasks": tasks}))
        return
    print(f"{len(ids)} candidates of user {rows.column('user_id')[0].as_py()}, ranked by p({tasks[0]}):")
    for i in order:
        print(f"  example {ids[i]:>8}  " + "  ".join(f"p({t})={scores[i, k]:.4f}" for k, t in enumerate(tasks)))


if __name__ == "__main__":
    main()
