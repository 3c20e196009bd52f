"""The Ray Serve deployment of GEM knowledge serving: the gRPC servicer.

Ray Serve's gRPC server receives the calls (the replica's own under direct ingress,
else Serve's gRPC proxy: serving/local/launcher.py; the servicers are registered through
`grpc_servicer_functions`, see `serving.config.SERVICER_FUNCTIONS`) and hands them to
`KnowledgeIngress`, whose methods are the RPCs. A method checks the token and the
deadline metadata, decodes and validates its request, and leaves the rest to the data
plane (`serving.dataplane`: merging, splitting, the finiteness guard) and the health
state; a refusal becomes a precise status (`serving.errors`).

    serve run serving/serve_config.yaml      # or: gem serve / gem up
"""

from __future__ import annotations

import functools
import hmac
import logging
import time

import grpc
import numpy as np
from gem.knowledge.client import TIMEOUT_METADATA
from gem.knowledge.outputs import OUTPUT_NAMES
from gem.knowledge.timing import SERVER_TIMING_METADATA, format_server_timing
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.wire import WireError, decode_map, encode
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from export.contract import ADAPTER_OUTPUT
from model.features import USER_INDEX, input_specs, user_input_names
from model.outputs import EMBEDDING, LOGITS, USER_EMBEDDING
from model.schema import load_schema
from serving.admission import DEADLINE, FULL, WAIT, AdmissionGate
from serving.backends.base import Knowledge, make_backend
from serving.backends.errors import BackendError, status_of
from serving.config import FrontendConfig
from serving.dataplane import Call, DataPlane, HealthState, api_outputs, check_finite
from serving.errors import Refusal, Violation, internal, quote, refuse
from serving.grpc_api import SERVICE
from serving.prometheus import FrontendMetrics
from serving.validation import Limits, RequestError, assemble

log = logging.getLogger("ray.serve")

# API output name -> the model output it is made from.
MODEL_OUTPUT = {
    "labels": LOGITS,
    "adapted_labels": ADAPTER_OUTPUT,
    "embedding": EMBEDDING,
    "user_embedding": USER_EMBEDDING,
}
# API output code -> (API name, model output).
OUTPUTS = {code: (name, MODEL_OUTPUT[name]) for name, code in OUTPUT_NAMES.items()}
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
NO_TOKEN = "missing or wrong bearer token"
OVERLOADED = {
    FULL: "overloaded: the server is at its bound of calls in flight; retry after the pushback",
    DEADLINE: "overloaded: the call's deadline is shorter than calls take now; retry after the pushback",
    WAIT: "overloaded: the work in flight ahead of the call passes the server's wait bound; retry after the pushback",
}
# Ray Serve must admit enough concurrent calls for batches to fill (its default of 5
# starves them; see DESIGN.md).
MAX_ONGOING_REQUESTS = 1024
# Serve's own bound on calls waiting for one of those slots: a backstop (refused with
# RESOURCE_EXHAUSTED, no retry-after) behind the admission gate, which refuses first.
MAX_QUEUED_REQUESTS = 64


def parse(message_type, request):
    """The request message: Serve's proxy hands over the raw bytes (serving/grpc_api.py)."""
    if not isinstance(request, bytes | bytearray | memoryview):
        return request
    try:
        return message_type.FromString(bytes(request))
    except (DecodeError, RecursionError, ValueError):
        name = message_type.DESCRIPTOR.full_name
        raise Refusal(
            INVALID,
            f"the request is not a valid {name} (protobuf decoding failed)",
            (Violation("", f"not a {name}"),),
        ) from None


def pinned_version(request: pb.GenerateRequest) -> int | None:
    """The FM version a request pins; unset or 0 (an old client, or "latest"): None."""
    if not request.HasField("fm_version") or request.fm_version == 0:
        return None
    if request.fm_version < 0:
        raise Refusal(
            INVALID,
            f"fm_version must be a version number (>= 1) or 0 for the latest, got {request.fm_version}",
            (Violation("fm_version", "not a version number"),),
        )
    return request.fm_version


def _observed(rpc):
    """Counts every call of an RPC by its status code and times it, refusals included;
    a failure nobody foresaw becomes INTERNAL without its traceback (logged instead)."""

    @functools.wraps(rpc)
    async def observed(self, request, grpc_context: RayServegRPCContext):
        start, code, response = time.perf_counter(), grpc.StatusCode.INTERNAL, None
        try:
            try:
                response = await rpc(self, request, grpc_context)
            except Refusal as r:
                refuse(grpc_context, r.code, r.message, r.violations, r.retry_after_s)
                response = _EMPTY[rpc.__name__]()
            except Exception as e:
                internal(grpc_context, grpc.StatusCode.INTERNAL, "internal error", repr(e))
                log.exception("unexpected failure in %s", rpc.__name__)
                response = _EMPTY[rpc.__name__]()
            code = grpc_context.code() or grpc.StatusCode.OK
            return response
        finally:
            examples = 0
            if code == grpc.StatusCode.OK and isinstance(response, pb.GenerateResponse):
                examples = max((t.shape[0] for t in response.outputs.values()), default=0)
            self.metrics.call(rpc.__name__, code.name, time.perf_counter() - start, examples)

    return observed


_EMPTY = {"Generate": pb.GenerateResponse, "GetModelInfo": pb.GetModelInfoResponse}


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS, max_queued_requests=MAX_QUEUED_REQUESTS)
class KnowledgeIngress:
    def __init__(self, cfg: FrontendConfig | dict | None = None):
        self.cfg = cfg if isinstance(cfg, FrontendConfig) else FrontendConfig.from_args(cfg or {})
        self.schema = load_schema(self.cfg.schema_path)
        self.limits = Limits(self.cfg.max_examples_per_call)
        self.dense = [s.name for s in input_specs(self.schema) if s.kind == "dense"]
        users = user_input_names(self.schema)
        self.backend = make_backend(self.cfg.backend_config, user_names=users)
        self.metrics = FrontendMetrics(self.backend.name)
        self.dataplane = DataPlane(self.backend, self.cfg, self.metrics, users)
        self.admission = AdmissionGate(self.cfg.admission)
        every_output = tuple(model for _, model in OUTPUTS.values())
        self.health = HealthState(self.backend, self.schema, every_output, min(self.cfg.backend_timeout_s, 5.0))
        log.info("GEM knowledge ingress: backend %s, schema %s", self.backend.name, self.schema.name)

    def _authorize(self, context: RayServegRPCContext) -> None:
        if not self.cfg.auth_token:
            return
        values = [v for k, v in context.invocation_metadata() if k.lower() == "authorization"]
        if len(values) > 1:
            raise Refusal(UNAUTHENTICATED, "more than one authorization header")
        expected = f"Bearer {self.cfg.auth_token}".encode()
        given = values[0].encode() if values and isinstance(values[0], str) else b""
        if not hmac.compare_digest(given, expected):
            raise Refusal(UNAUTHENTICATED, NO_TOKEN)

    def _timeout_s(self, context: RayServegRPCContext) -> float:
        """The backend budget of this call: the caller's deadline (sent in
        TIMEOUT_METADATA by our client) when shorter than the configured bound."""
        timeout = self.cfg.backend_timeout_s
        for key, value in context.invocation_metadata():
            if key == TIMEOUT_METADATA:
                try:
                    ms = float(value)
                except (TypeError, ValueError):
                    raise Refusal(
                        INVALID, f"metadata {TIMEOUT_METADATA}: not a number of milliseconds: {quote(value)}"
                    ) from None
                if ms > 0:
                    timeout = min(timeout, ms / 1000.0)
        return timeout

    @_observed
    async def Generate(self, request, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        start = time.perf_counter()
        self._authorize(grpc_context)
        self.health.ensure_probing()
        timeout_s = self._timeout_s(grpc_context)
        self._admit(0, timeout_s)  # before decoding: a refusal costs no parse
        request = parse(pb.GenerateRequest, request)
        try:
            wanted = [OUTPUTS[o] for o in (request.outputs or OUTPUTS)]
        except KeyError as e:
            raise Refusal(INVALID, f"unknown output {e.args[0]}", (Violation("outputs", "unknown output"),)) from None
        try:
            batch = assemble(self.schema, decode_map(request.features), decode_map(request.shared), self.limits)
        except RequestError as e:
            raise Refusal(INVALID, str(e), (Violation(e.field, str(e)),)) from None
        except WireError as e:
            raise Refusal(INVALID, str(e), (Violation(f"features[{quote(e.name)}]", str(e)),)) from None
        if request.user_embedding_once and USER_INDEX not in batch:
            raise Refusal(
                INVALID,
                "user_embedding_once needs a call of one user: every user input in `shared`",
                (Violation("user_embedding_once", "set on a call with user inputs per example"),),
            )
        call = Call(batch, tuple(dict.fromkeys(model for _, model in wanted)), pinned_version(request))
        decoded = time.perf_counter()
        result = await self._admitted(call, timeout_s)
        answered = time.perf_counter()
        if isinstance(result, Exception):
            code, public = status_of(result, timeout_s)
            internal(grpc_context, code, public, result)
            return pb.GenerateResponse()
        check_finite(call, result, self.dense)
        replied = api_outputs(result, wanted)
        if request.user_embedding_once and "user_embedding" in replied:
            # One user: every candidate's row is the same (a gather of the one user row).
            replied["user_embedding"] = replied["user_embedding"][:1]
        outputs = {api: encode(value) for api, value in replied.items()}
        versions = pb.ModelVersions(fm=result.fm_version, adapter=result.adapter_version)
        response = pb.GenerateResponse(outputs=outputs, versions=versions)
        if any(key == SERVER_TIMING_METADATA for key, _ in grpc_context.invocation_metadata()):
            stages = {"decode": decoded - start, "model": answered - decoded, "encode": time.perf_counter() - answered}
            timing = format_server_timing({name: s * 1000 for name, s in stages.items()})
            grpc_context.set_trailing_metadata([(SERVER_TIMING_METADATA, timing)])
        return response

    def _admit(self, rows: int, timeout_s: float) -> None:
        verdict = self.admission.decide(rows, timeout_s)
        if not verdict.admitted:
            self.metrics.refusal(verdict.reason)
            raise Refusal(UNAVAILABLE, OVERLOADED[verdict.reason], retry_after_s=verdict.retry_after_s)

    async def _admitted(self, call: Call, timeout_s: float) -> Knowledge | Exception:
        """The data plane's answer, if the admission gate lets the call in now."""
        self._admit(call.rows, timeout_s)
        start = time.perf_counter()
        self.admission.enter(call.rows)
        try:
            return await self.dataplane.run(call, timeout_s)
        finally:
            self.admission.leave(call.rows, time.perf_counter() - start)

    @_observed
    async def GetModelInfo(self, request, grpc_context: RayServegRPCContext) -> pb.GetModelInfoResponse:
        self._authorize(grpc_context)
        parse(pb.GetModelInfoRequest, request)
        s = self.schema
        max_length = {q.name: q.max_length for q in s.sequences}
        inputs = [
            pb.TensorInfo(
                name=spec.name,
                dtype=pb.DATA_TYPE_INT64 if spec.dtype == np.int64 else pb.DATA_TYPE_FLOAT32,
                shape=[-1, -1] if spec.rank == 2 else [-1],
                kind=spec.kind,
                side=spec.side,
                max_length=max_length.get(spec.sequence or "", 0),
                sequence=spec.sequence or "",
            )
            for spec in input_specs(s)
        ]
        probe = await self.health.probed()
        if probe is None:
            internal(grpc_context, grpc.StatusCode.UNAVAILABLE, "the model backend is unavailable", self.health.why)
            return pb.GetModelInfoResponse()
        outputs = [
            pb.TensorInfo(
                name=api,
                dtype=pb.DATA_TYPE_FLOAT32,
                shape=[-1, probe.outputs[model].shape[1]],
                kind="output",
            )
            for api, model in OUTPUTS.values()
        ]
        try:
            available = [pb.ModelVersions(fm=fm, adapter=adapter) for fm, adapter in await self.backend.loaded()]
        except BackendError as e:
            code, public = status_of(e, self.cfg.backend_timeout_s)
            internal(grpc_context, code, public, e)
            return pb.GetModelInfoResponse()
        return pb.GetModelInfoResponse(
            available=available,
            schema_name=s.name,
            schema_yaml=s.to_yaml(),
            inputs=inputs,
            outputs=outputs,
            tasks=s.task_names,
            surfaces=s.surfaces,
            versions=pb.ModelVersions(fm=probe.fm_version, adapter=probe.adapter_version),
            backend=self.backend.name,
            max_examples_per_call=self.cfg.max_examples_per_call,
        )

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext):
        """gRPC health checking: SERVING when the backend answered the last background
        probe. The service is "" (the server) or gem.knowledge.v1.KnowledgeService."""
        if request.service not in ("", SERVICE):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {quote(request.service)}")
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        serving = await self.health.probed() is not None
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def app_builder(args: dict) -> serve.Application:
    """`serve run serving.servicer:app_builder backend=onnxruntime ...` / the Serve config file."""
    return KnowledgeIngress.bind(FrontendConfig.from_args(args))  # type: ignore[attr-defined]  # a Deployment at run time
