"""The Ray Serve application: the gRPC ingress of GEM knowledge serving.

Ray Serve's gRPC proxy receives the calls (the servicers are registered through
`grpc_servicer_functions`, see `serving.config.SERVICER_FUNCTIONS`) and hands them to
`KnowledgeIngress`, whose methods are the RPCs. Each call is decoded and validated
alone; then `@serve.batch` merges concurrent calls into one backend batch of up to
`max_batch_examples` *examples* (not calls), and splits the reply back by rows.

    serve run serving/serve_config.yaml      # or: gem serve / gem up
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
from gem.knowledge.client import TIMEOUT_METADATA
from gem.knowledge.outputs import OUTPUT_NAMES
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.wire import WireError, decode_map, encode
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from export.contract import ADAPTER_OUTPUT
from model.batch import concat
from model.examples import zero_batch
from model.features import input_specs, user_input_names
from model.outputs import EMBEDDING, LOGITS, USER_EMBEDDING, sigmoid
from model.schema import load_schema
from model.user_index import UserIndexError
from serving.backends import Backend, Knowledge, OnnxBackend, TritonBackend
from serving.config import FrontendConfig
from serving.errors import Refusal, Violation, internal, quote, refuse
from serving.grpc_api import SERVICE
from serving.prometheus import FrontendMetrics
from serving.triton.client import BackendTimeout, BackendUnavailable, InvalidRequest
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
PROBABILITIES = {"labels", "adapted_labels"}
FLOAT32 = pb.DATA_TYPE_FLOAT32
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
NO_TOKEN = "missing or wrong bearer token"
# Ray Serve must admit enough concurrent calls for batches to fill (its default of 5
# starves them; see DESIGN.md).
MAX_ONGOING_REQUESTS = 1024
# How often the background health probe asks the backend (health checks read its state).
HEALTH_PERIOD_S = 1.0


@dataclass(frozen=True)
class Call:
    batch: dict[str, np.ndarray]
    outputs: tuple[str, ...]

    @property
    def rows(self) -> int:
        return len(next(iter(self.batch.values())))


def _split(knowledge: Knowledge, calls: list[Call]) -> list[Knowledge]:
    bounds = np.cumsum([c.rows for c in calls])[:-1]
    parts = {k: np.split(v, bounds) for k, v in knowledge.outputs.items()}
    return [
        Knowledge({k: parts[k][i] for k in c.outputs}, knowledge.fm_version, knowledge.adapter_version)
        for i, c in enumerate(calls)
    ]


def _rows_of(calls: list[Call]) -> int:
    return sum(c.rows for c in calls)


def _parse(message_type, request):
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


def _backend_refusal(e: Exception, timeout_s: float) -> tuple[grpc.StatusCode, str]:
    """A backend failure -> the status the caller gets; internals stay in the log."""
    if isinstance(e, BackendTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer from the model within {timeout_s:g}s"
    if isinstance(e, BackendUnavailable):
        return grpc.StatusCode.UNAVAILABLE, "the model backend is unavailable; retry later"
    if isinstance(e, InvalidRequest):
        return INVALID, "the model refused the batch's tensors"
    if isinstance(e, UserIndexError):
        # Our own check of a user-indexed batch: the message names the input, no internals.
        return INVALID, f"the batch's user rows do not hold together: {e}"
    if isinstance(e, ValueError):
        # A batch the backend cannot take is the caller's, never an internal failure.
        return INVALID, "the model refused the batch"
    return grpc.StatusCode.INTERNAL, "the model failed on this call"


def _check_finite(call: Call, knowledge: Knowledge, dense: list[str]) -> None:
    """A good call is never answered with NaN or inf: non-finite outputs become this
    call's INVALID_ARGUMENT, naming the dense input that drove the model out of range."""
    bad = np.zeros(call.rows, dtype=bool)
    for value in knowledge.outputs.values():
        bad |= ~np.isfinite(value.reshape(call.rows, -1)).all(axis=1)
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    worst = max(dense, key=lambda n: float(np.abs(call.batch[n][rows]).max()), default=None)
    if worst is None:
        raise Refusal(INVALID, f"the model's output is not finite for {len(rows)} row(s) (first: row {rows[0]})")
    top = float(np.abs(call.batch[worst][rows]).max())
    raise Refusal(
        INVALID,
        f"the model's output is not finite for {len(rows)} row(s) (first: row {rows[0]}): dense feature "
        f"{worst!r} is out of the model's range (|value| up to {top:.3g})",
        (Violation(f"features[{worst!r}]", f"out of the model's range (|value| up to {top:.3g})"),),
    )


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
                refuse(grpc_context, r.code, r.message, r.violations)
                response = _EMPTY[rpc.__name__]()
            except Exception as e:
                internal(grpc_context, grpc.StatusCode.INTERNAL, "internal error", repr(e))
                log.exception("unexpected failure in %s", rpc.__name__)
                response = _EMPTY[rpc.__name__]()
            code = grpc_context.code() or grpc.StatusCode.OK
            return response
        finally:
            ok = code == grpc.StatusCode.OK and isinstance(response, pb.GenerateResponse)
            examples = max((t.shape[0] for t in response.outputs.values()), default=0) if ok else 0
            self.metrics.call(rpc.__name__, code.name, time.perf_counter() - start, examples)

    return observed


_EMPTY = {"Generate": pb.GenerateResponse, "GetModelInfo": pb.GetModelInfoResponse}


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
class KnowledgeIngress:
    def __init__(self, cfg: FrontendConfig | dict | None = None):
        self.cfg = cfg if isinstance(cfg, FrontendConfig) else FrontendConfig.from_args(cfg or {})
        self.schema = load_schema(self.cfg.schema_path)
        self.limits = Limits(self.cfg.max_examples_per_call)
        self.dense = [s.name for s in input_specs(self.schema) if s.kind == "dense"]
        users = user_input_names(self.schema)
        self.backend: Backend = (
            TritonBackend(self.cfg.triton_url, self.cfg.backend_timeout_s, user_names=users)
            if self.cfg.backend == "triton"
            else OnnxBackend(self.cfg.repository, user_names=users)
        )
        self._batched.set_max_batch_size(self.cfg.max_batch_examples)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.metrics = FrontendMetrics(self.backend.name)
        # The backend's state as the background probe last saw it: (probe reply or None, why).
        self._health: tuple[Knowledge | None, str] = (None, "not probed yet")
        self._health_task: asyncio.Task | None = None
        self._health_changed: asyncio.Event | None = None
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
        self._authorize(grpc_context)
        self._ensure_health_probe()
        request = _parse(pb.GenerateRequest, request)
        timeout_s = self._timeout_s(grpc_context)
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
        call = Call(batch, tuple(dict.fromkeys(model for _, model in wanted)))
        if call.rows > self.cfg.solo_examples:
            # A big call runs apart, in bounded chunks: it never holds a merged batch up.
            result = await self._alone(call, timeout_s, chunk=self.cfg.solo_examples)
        else:
            try:
                result = await asyncio.wait_for(self._batched(call), timeout_s)
            except TimeoutError:
                result = BackendTimeout(f"merged batch: no answer within {timeout_s:g}s")
        if isinstance(result, Exception):
            code, public = _backend_refusal(result, timeout_s)
            internal(grpc_context, code, public, result)
            return pb.GenerateResponse()
        _check_finite(call, result, self.dense)
        outputs = {}
        for api_name, model_name in wanted:
            value = result.outputs[model_name]
            if api_name in PROBABILITIES:
                with np.errstate(over="ignore"):  # exp(-x) of a very negative logit: 0, fine
                    value = sigmoid(value)
            outputs[api_name] = encode(value)
        versions = pb.ModelVersions(fm=result.fm_version, adapter=result.adapter_version)
        return pb.GenerateResponse(outputs=outputs, versions=versions)

    @serve.batch(max_batch_size=4096, batch_wait_timeout_s=0.002, batch_size_fn=_rows_of)
    async def _batched(self, calls: list[Call]) -> list[Knowledge | Exception]:
        outputs = tuple(dict.fromkeys(o for c in calls for o in c.outputs))
        try:
            merged = calls[0].batch if len(calls) == 1 else concat([c.batch for c in calls])
            start = time.perf_counter()
            knowledge = await self.backend.infer(merged, outputs, self.cfg.backend_timeout_s)
            self.metrics.batch(_rows_of(calls), time.perf_counter() - start, knowledge.fm_version,
                               knowledge.adapter_version)  # fmt: skip
            return _split(knowledge, calls)
        except (BackendUnavailable, BackendTimeout) as e:
            return [e] * len(calls)
        except Exception as e:
            if len(calls) == 1:
                return [e]
        # Something in the merged batch failed: each call alone, so only the culprit fails.
        return [await self._alone(call, self.cfg.backend_timeout_s) for call in calls]

    async def _alone(self, call: Call, timeout_s: float, chunk: int | None = None) -> Knowledge | Exception:
        try:
            return _split(await self.backend.infer(call.batch, call.outputs, timeout_s, chunk), [call])[0]
        except Exception as e:
            return e

    @_observed
    async def GetModelInfo(self, request, grpc_context: RayServegRPCContext) -> pb.GetModelInfoResponse:
        self._authorize(grpc_context)
        _parse(pb.GetModelInfoRequest, request)
        s = self.schema
        max_length = {q.name: q.max_length for q in s.sequences}
        inputs = [
            pb.TensorInfo(
                name=spec.name,
                dtype=pb.DATA_TYPE_INT64 if spec.dtype == np.int64 else FLOAT32,
                shape=[-1, -1] if spec.rank == 2 else [-1],
                kind=spec.kind,
                side=spec.side,
                max_length=max_length.get(spec.sequence or "", 0),
                sequence=spec.sequence or "",
            )
            for spec in input_specs(s)
        ]
        probe = await self._probed()
        if probe is None:
            internal(grpc_context, grpc.StatusCode.UNAVAILABLE, "the model backend is unavailable", self._health[1])
            return pb.GetModelInfoResponse()
        outputs = [
            pb.TensorInfo(
                name=api, dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, probe.outputs[model].shape[1]], kind="output"
            )
            for api, model in OUTPUTS.values()
        ]
        return pb.GetModelInfoResponse(
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

    async def _probe(self) -> Knowledge:
        """One all-zero example through the backend: output widths and serving versions."""
        outputs = tuple(model for _, model in OUTPUTS.values())
        return await self.backend.infer(zero_batch(self.schema), outputs, min(self.cfg.backend_timeout_s, 5.0))

    def _ensure_health_probe(self) -> None:
        if self._health_task is None or self._health_task.done():
            self._health_changed = asyncio.Event()
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def _health_loop(self) -> None:
        """Keeps `_health` current: health checks and GetModelInfo read it instead of
        running an inference each."""
        while True:
            try:
                self._health = (await self._probe(), "SERVING")
            except Exception as e:
                self._health = (None, f"{type(e).__name__}: {e}")
            self._health_changed.set()
            await asyncio.sleep(HEALTH_PERIOD_S)

    async def _probed(self) -> Knowledge | None:
        """The last probe's reply (waits for the first probe)."""
        self._ensure_health_probe()
        if self._health[1] == "not probed yet":
            await self._health_changed.wait()
        return self._health[0]

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext):
        """gRPC health checking: SERVING when the backend answered the last background
        probe. The service is "" (the server) or gem.knowledge.v1.KnowledgeService."""
        if request.service not in ("", SERVICE):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {quote(request.service)}")
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        serving = await self._probed() is not None
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def app_builder(args: dict) -> serve.Application:
    """`serve run serving.ingress:app_builder backend=onnxruntime ...` / the Serve config file."""
    return KnowledgeIngress.bind(FrontendConfig.from_args(args))
