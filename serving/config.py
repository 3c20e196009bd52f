"""Configuration of the Ray Serve front end (one dataclass; CLI flags and the Serve
config file's `args` both map onto it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, cast

from export.contract import MAX_BATCH_EXAMPLES, TRITON_GRPC_URL
from model.schema import DEFAULT_SCHEMA_PATH
from serving.admission import AdmissionConfig
from serving.backends.base import BackendConfig, BackendKind
from serving.backends.priority import MAX_NICE

SERVICER_FUNCTIONS = (
    # Raw-bytes requests: malformed protobuf is refused by the ingress (serving/grpc_api.py).
    "serving.grpc_api.add_KnowledgeServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
TOKEN_ENV = "GEM_AUTH_TOKEN"
# Ray Serve's gRPC servers (the proxy's, and a replica's own under direct ingress: both
# are grpc_util.gRPCGenericServer) read their receive limit from this variable
# (ray.serve._private.constants.RAY_SERVE_GRPC_MAX_MESSAGE_SIZE); bigger messages get
# RESOURCE_EXHAUSTED from gRPC itself, before they are read.
MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"

# Who answers the public gRPC port: "direct", the replica's own gRPC server (Ray Serve's
# direct ingress: no proxy hop), or "proxy", Serve's gRPC proxy in front of the
# replicas (serving/local/launcher.py says what each means for the ports).
Ingress = Literal["direct", "proxy"]
INGRESSES: tuple[Ingress, ...] = ("direct", "proxy")
# Where Serve runs its proxies (ray.serve.config.ProxyLocation's values). HeadOnly: one
# proxy, for several nodes on one machine, whose proxies would all want the same port.
ProxyLocation = Literal["EveryNode", "HeadOnly", "Disabled"]
PROXY_LOCATIONS: tuple[ProxyLocation, ...] = ("EveryNode", "HeadOnly", "Disabled")
INGRESS_ENV = "GEM_INGRESS"


def default_ingress() -> Ingress:
    """$GEM_INGRESS, or "direct"."""
    value = os.environ.get(INGRESS_ENV) or "direct"
    if value not in INGRESSES:
        raise ValueError(f"{INGRESS_ENV}={value!r}: the ingress is one of {', '.join(INGRESSES)}")
    return cast(Ingress, value)


def max_message_bytes(schema, max_examples: int) -> int:
    """The largest legal Generate request (every input per example, sequences at their
    max_length, protobuf framing included), with 25 % + 1 MiB of margin."""
    from model.features import input_specs

    max_length = {q.name: q.max_length for q in schema.sequences}
    per_row = sum(
        s.dtype.itemsize * (max_length.get(s.sequence or "", 1) if s.rank == 2 else 1) for s in input_specs(schema)
    )
    framing = 64 * len(input_specs(schema)) + 64
    return int((per_row * max_examples + framing) * 1.25) + (1 << 20)


@dataclass(frozen=True)
class FrontendConfig:
    # "triton" (default) or "onnxruntime" (embedded: no Triton).
    backend: BackendKind = "triton"
    triton_url: str = TRITON_GRPC_URL
    # For the embedded backend: the repository whose latest versions it loads.
    repository: Path = Path("model_repo")
    schema_path: Path = DEFAULT_SCHEMA_PATH
    # Examples per backend batch (calls are merged up to this) and per call.
    max_batch_examples: int = MAX_BATCH_EXAMPLES
    max_examples_per_call: int = MAX_BATCH_EXAMPLES
    # How long the first call of a batch waits for others to join it.
    batch_wait_timeout_s: float = 0.002
    # Merged batches that may run at once on a replica (one running alone leaves cores idle).
    concurrent_batches: int = 2
    # The longest a backend call may take; a caller's shorter deadline (TIMEOUT_METADATA)
    # wins. Calls past it get DEADLINE_EXCEEDED, which clients do not retry.
    backend_timeout_s: float = 10.0
    # Calls with more examples than this run apart from the merged batches, in backend
    # chunks of at most this many rows, so that one slow call never holds others up.
    solo_examples: int = 1024
    # Admission control (serving/admission.py): examples and calls in flight on one
    # replica past which a call is refused at once (UNAVAILABLE with a retry-after)
    # instead of queued. 0 examples: two full batches (one running, one filling).
    # Calls stay below the deployment's max_ongoing_requests (1024), so Serve's own
    # queue, which refuses without a retry-after, only fills when the gate is off.
    max_in_flight_examples: int = 0
    max_in_flight_calls: int = 512
    # ... and past which a call would wait longer than this behind the work in flight
    # (examples in flight over the replica's recent examples/s; 0: off).
    max_queue_wait_s: float = 0.0
    # The embedded backend's inference threads run this many nice steps below the
    # replica's event loop (at nice 0), so that on saturated cores the loop, where calls
    # are admitted and refused, runs first (serving/backends/priority.py; 0: level with
    # it). Triton runs in a process of its own.
    inference_nice: int = 10
    # Bearer token every call must carry (metadata `authorization: Bearer <token>`);
    # empty: no check. Defaults to $GEM_AUTH_TOKEN. Never logged.
    auth_token: str = field(default_factory=lambda: os.environ.get(TOKEN_ENV, ""), repr=False)

    def __post_init__(self) -> None:
        BackendConfig(self.backend)  # refuses an unknown backend
        if self.max_examples_per_call > self.max_batch_examples:
            raise ValueError("max_examples_per_call cannot exceed max_batch_examples (a call must fit in a batch)")
        _ = self.admission  # refuses a bound below 1
        if self.concurrent_batches < 1:
            raise ValueError(f"concurrent_batches must be at least 1, got {self.concurrent_batches}")
        if not 0 <= self.inference_nice <= MAX_NICE:
            raise ValueError(f"inference_nice must be 0 (off) to {MAX_NICE}, got {self.inference_nice}")

    @property
    def admission(self) -> AdmissionConfig:
        examples = self.max_in_flight_examples or 2 * self.max_batch_examples
        return AdmissionConfig(max_examples=examples, max_calls=self.max_in_flight_calls,
                               max_wait_s=self.max_queue_wait_s)  # fmt: skip

    @property
    def backend_config(self) -> BackendConfig:
        return BackendConfig(
            self.backend, self.triton_url, self.repository, self.backend_timeout_s, nice=self.inference_nice
        )

    @classmethod
    def from_args(cls, args: dict) -> FrontendConfig:
        """From the `args` of a Serve config file (strings allowed), unknown keys refused."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown front end settings: {', '.join(unknown)}; known: {', '.join(known)}")
        defaults = cls()
        values = {k: type(getattr(defaults, k))(v) for k, v in args.items()}
        return cls(**values)
