"""The Ray Serve application: the gRPC ingress of GEM knowledge serving.

Ray Serve's gRPC proxy receives the calls (the servicers are registered through
`grpc_servicer_functions`, see `serving.config.SERVICER_FUNCTIONS`) and hands them to
`KnowledgeIngress`, whose methods are the RPCs. Each call is decoded and validated
alone; then `@serve.batch` merges concurrent calls into one backend batch of up to
`max_batch_examples` *examples* (not calls), and splits the reply back by rows.

    serve run serving/serve_config.yaml      # or: gem serve / gem up
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
from gem.knowledge.outputs import OUTPUT_NAMES
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.wire import WireError, decode_map, encode
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from export.contract import ADAPTER_OUTPUT
from model.data.reader import concat
from model.features import EMBEDDING, LOGITS, USER_EMBEDDING, input_specs, sigmoid, zero_batch
from model.schema import load_schema
from serving.backends import Backend, Knowledge, OnnxBackend, TritonBackend
from serving.config import FrontendConfig
from serving.prometheus import FrontendMetrics
from serving.triton.client import BackendError, BackendUnavailable, InvalidRequest
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
# Backend failures by status code (first match); anything else is INTERNAL.
STATUS_OF = {BackendUnavailable: grpc.StatusCode.UNAVAILABLE, InvalidRequest: INVALID}
# Ray Serve must admit enough concurrent calls for batches to fill (its default of 5
# starves them; see DESIGN.md).
MAX_ONGOING_REQUESTS = 1024


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


def _observed(rpc):
    """Counts every call of an RPC by its status code and times it, refusals included."""

    @functools.wraps(rpc)
    async def observed(self, request, grpc_context: RayServegRPCContext):
        start, code, response = time.perf_counter(), grpc.StatusCode.INTERNAL, None
        try:
            response = await rpc(self, request, grpc_context)
            code = grpc_context.code() or grpc.StatusCode.OK
            return response
        finally:
            ok = code == grpc.StatusCode.OK and isinstance(response, pb.GenerateResponse)
            examples = max((t.shape[0] for t in response.outputs.values()), default=0) if ok else 0
            self.metrics.call(rpc.__name__, code.name, time.perf_counter() - start, examples)

    return observed


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
class KnowledgeIngress:
    def __init__(self, cfg: FrontendConfig | dict | None = None):
        self.cfg = cfg if isinstance(cfg, FrontendConfig) else FrontendConfig.from_args(cfg or {})
        self.schema = load_schema(self.cfg.schema_path)
        self.limits = Limits(self.cfg.max_examples_per_call)
        self.backend: Backend = (
            TritonBackend(self.cfg.triton_url, self.cfg.backend_timeout_s)
            if self.cfg.backend == "triton"
            else OnnxBackend(self.cfg.repository)
        )
        self._batched.set_max_batch_size(self.cfg.max_batch_examples)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.metrics = FrontendMetrics(self.backend.name)
        log.info("GEM knowledge ingress: backend %s, schema %s", self.backend.name, self.schema.name)

    def _authorized(self, context: RayServegRPCContext) -> bool:
        if not self.cfg.auth_token:
            return True
        metadata = dict(context.invocation_metadata())
        expected = f"Bearer {self.cfg.auth_token}"
        return hmac.compare_digest(metadata.get("authorization", "").encode(), expected.encode())

    @staticmethod
    def _fail(context: RayServegRPCContext, code: grpc.StatusCode, details: str, response_type: type):
        context.set_code(code)
        context.set_details(details)
        return response_type()

    @_observed
    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        if not self._authorized(grpc_context):
            return self._fail(grpc_context, UNAUTHENTICATED, NO_TOKEN, pb.GenerateResponse)
        try:
            wanted = [OUTPUTS[o] for o in (request.outputs or OUTPUTS)]
        except KeyError as e:
            return self._fail(grpc_context, INVALID, f"unknown output {e.args[0]}", pb.GenerateResponse)
        try:
            batch = assemble(self.schema, decode_map(request.features), decode_map(request.shared), self.limits)
        except (RequestError, WireError) as e:
            return self._fail(grpc_context, INVALID, str(e), pb.GenerateResponse)
        call = Call(batch, tuple(dict.fromkeys(model for _, model in wanted)))
        result = await self._batched(call)
        if isinstance(result, Exception):
            code = next((c for t, c in STATUS_OF.items() if isinstance(result, t)), grpc.StatusCode.INTERNAL)
            return self._fail(grpc_context, code, str(result), pb.GenerateResponse)
        outputs = {}
        for api_name, model_name in wanted:
            value = result.outputs[model_name]
            outputs[api_name] = encode(sigmoid(value) if api_name in PROBABILITIES else value)
        versions = pb.ModelVersions(fm=result.fm_version, adapter=result.adapter_version)
        return pb.GenerateResponse(outputs=outputs, versions=versions)

    @serve.batch(max_batch_size=4096, batch_wait_timeout_s=0.002, batch_size_fn=_rows_of)
    async def _batched(self, calls: list[Call]) -> list[Knowledge | Exception]:
        outputs = tuple(dict.fromkeys(o for c in calls for o in c.outputs))
        try:
            merged = calls[0].batch if len(calls) == 1 else concat([c.batch for c in calls])
            start = time.perf_counter()
            knowledge = await self.backend.infer(merged, outputs)
            self.metrics.batch(_rows_of(calls), time.perf_counter() - start, knowledge.fm_version,
                               knowledge.adapter_version)  # fmt: skip
            return _split(knowledge, calls)
        except BackendUnavailable as e:
            return [e] * len(calls)
        except BackendError as e:
            if len(calls) == 1:
                return [e]
        # Something in the merged batch failed: each call alone, so only the culprit fails.
        return [result for call in calls for result in await self._batched_alone(call)]

    async def _batched_alone(self, call: Call) -> list[Knowledge | Exception]:
        try:
            return _split(await self.backend.infer(call.batch, call.outputs), [call])
        except BackendError as e:
            return [e]

    @_observed
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, grpc_context: RayServegRPCContext
    ) -> pb.GetModelInfoResponse:
        if not self._authorized(grpc_context):
            return self._fail(grpc_context, UNAUTHENTICATED, NO_TOKEN, pb.GetModelInfoResponse)
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
        try:
            probe = await self._probe()
        except BackendError as e:
            return self._fail(grpc_context, grpc.StatusCode.UNAVAILABLE, str(e), pb.GetModelInfoResponse)
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
        return await self.backend.infer(zero_batch(self.schema), tuple(model for _, model in OUTPUTS.values()))

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext):
        """gRPC health checking: SERVING when the backend answers."""
        try:
            await self._probe()
        except BackendError:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def app_builder(args: dict) -> serve.Application:
    """`serve run serving.ingress:app_builder backend=onnxruntime ...` / the Serve config file."""
    return KnowledgeIngress.bind(FrontendConfig.from_args(args))
