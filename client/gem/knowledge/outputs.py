"""The API's outputs by name: the one list the client, the front end and the load test read."""

from __future__ import annotations

from gem.knowledge.v1 import knowledge_pb2 as pb

OUTPUT_NAMES: dict[str, pb.Output] = {
    "labels": pb.OUTPUT_LABELS,
    "adapted_labels": pb.OUTPUT_ADAPTED_LABELS,
    "embedding": pb.OUTPUT_EMBEDDING,
    "user_embedding": pb.OUTPUT_USER_EMBEDDING,
}
