"""The client library for rankers: `KnowledgeClient` (sync) and `AsyncKnowledgeClient`.

    from gem.knowledge import KnowledgeClient

    with KnowledgeClient("127.0.0.1:50051") as client:
        reply = client.generate(ads, shared=user)     # numpy dict, pandas or pyarrow
        reply.outputs["labels"], reply.fm_version
        client.generate(ads, shared=user, fm_version=3)   # pinned: FM v3 and its adapter

Columns may be numpy arrays, a pandas DataFrame or a pyarrow Table in the logged-data
format: sequences as list columns (padded here, their `<sequence>_length` derived),
surfaces as names or indices, ids of any integer type. The server's schema (from
`GetModelInfo`, fetched once) says how. One channel per client, reused by every call;
UNAVAILABLE is retried with backoff by gRPC's own retry policy, within the deadline,
and a call waits (within its deadline) for a server that is not up yet or restarting;
`retries=0` turns both off, so a call fails at once (say, a TLS mismatch).
An overloaded server's refusal (admission control) is UNAVAILABLE with a
`retry-pushback-ms` trailer; Ray Serve sends response headers before it, which commits
the call for gRPC's policy, so `generate` retries those refusals itself: after the
pushback, up to `retries` times, within the call's deadline.

The channel is plaintext unless `credentials` are given (TLS, say
`grpc.ssl_channel_credentials(root_certificates=...)`); `options` are gRPC channel
arguments laid over the client's own (e.g. `("grpc.ssl_target_name_override", host)`).
Every call carries the user agent `gem-knowledge-client/<version>`. With
`server_timing=True` a call asks for the server's stages (gem/knowledge/timing.py),
returned in `Reply.server_timing`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import grpc
import numpy as np
from gem.knowledge.outputs import OUTPUT_NAMES
from gem.knowledge.timing import SERVER_TIMING_METADATA, parse_server_timing
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.v1 import knowledge_pb2_grpc as pb_grpc
from gem.knowledge.wire import DTYPES, decode, encode

# A mapping of numpy arrays, a pyarrow Table or a pandas DataFrame (the last two need
# the `arrow` / `pandas` extra; neither is imported unless such columns arrive).
Columns = Mapping[str, Any] | Any
# Metadata carrying the call's deadline to the server, which bounds its backend call by
# it (gRPC's own deadline is not visible behind Ray Serve's proxy); serving.config has
# the same name.
TIMEOUT_METADATA = "gem-timeout-ms"
# Only what is safe to retry: UNAVAILABLE means the call did not run (or its result was
# lost before any work counted); the server's overload refusals are UNAVAILABLE for this.
# RESOURCE_EXHAUSTED is not: gRPC answers it for a message over the size limit too.
# DEADLINE_EXCEEDED is not retried: the work may still be running, and a retry would
# double the load exactly when the server is slow.
RETRYABLE = ("UNAVAILABLE",)
# The trailer of an overload refusal: how long to wait before retrying, in ms (gRFC A6).
PUSHBACK_METADATA = "retry-pushback-ms"
# gRPC channel arguments, as grpc.insecure_channel and grpc.secure_channel take them.
ChannelOptions = Sequence[tuple[str, Any]]


def user_agent() -> str:
    """`gem-knowledge-client/<version>`, the version of the installed distribution."""
    try:
        version = metadata.version("gem-knowledge-client")
    except metadata.PackageNotFoundError:  # imported from a source tree, not installed
        version = "unknown"
    return f"gem-knowledge-client/{version}"


@dataclass(frozen=True)
class Reply:
    outputs: dict[str, np.ndarray]
    fm_version: int
    adapter_version: int
    # The server's stages in ms (asked with server_timing=True; empty otherwise).
    server_timing: dict[str, float] = field(default_factory=dict)


def channel_options(retries: int, extra: ChannelOptions = ()) -> list[tuple[str, Any]]:
    """The client's channel arguments with `extra` laid over them (a key given in both
    takes `extra`'s value: gRPC itself does not say which of two equal keys wins)."""
    method: dict[str, Any] = {"name": [{"service": "gem.knowledge.v1.KnowledgeService"}]}
    if retries > 0:  # gRPC refuses a retry policy of fewer than 2 attempts
        # A call waits for a server that is not up (a replica or the stack restarting,
        # connection refused) within its deadline, instead of failing at once.
        method["waitForReady"] = True
        method["retryPolicy"] = {
            "maxAttempts": retries + 1,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": list(RETRYABLE),
        }
    policy = {"methodConfig": [method]}
    options = {
        "grpc.service_config": json.dumps(policy),
        "grpc.enable_retries": 1,
        "grpc.max_send_message_length": 1 << 30,
        "grpc.max_receive_message_length": 1 << 30,
        "grpc.primary_user_agent": user_agent(),
        # Reconnect to a server that went away within a second of its return (gRPC's
        # default backoff grows to two minutes, past any deadline of ours).
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 1000,
    }
    options.update(extra)
    return list(options.items())


def pushback_s(error: grpc.RpcError) -> float | None:
    """The retry-after of an overloaded server's refusal (UNAVAILABLE with a pushback
    trailer), in seconds; None when the error is not such a refusal."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    for key, value in error.trailing_metadata() or ():
        if key == PUSHBACK_METADATA:
            try:
                wait = int(value) / 1000
            except ValueError:
                return None
            return wait if wait >= 0 else None
    return None


def pushback_wait(error: grpc.RpcError, attempt: int, retries: int, remaining_s: float) -> float | None:
    """Seconds to wait before retrying a call refused by an overloaded server, or None when
    it is not such a refusal, the retries are spent or the wait would pass the deadline."""
    if attempt >= retries:
        return None
    wait = pushback_s(error)
    return wait if wait is not None and wait < remaining_s else None


def _table(data: Columns) -> Any:
    """A pyarrow Table for Arrow or pandas input, None for a mapping of arrays."""
    if isinstance(data, Mapping):
        return None
    import pyarrow as pa  # the `arrow` extra: only Tables and DataFrames need it

    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas, without importing it
        return pa.Table.from_pandas(data, preserve_index=False)
    raise TypeError(f"columns must be a mapping of arrays, a pyarrow Table or a pandas DataFrame, got {type(data)}")


def to_columns(data: Columns, info: pb.GetModelInfoResponse) -> dict[str, np.ndarray]:
    """Any supported input -> numpy columns with the dtypes and shapes the server wants."""
    specs = {i.name: i for i in info.inputs}
    table = _table(data)
    columns: dict[str, np.ndarray] = {}
    if table is None:
        columns = {k: np.asarray(v) for k, v in data.items()}
    else:
        import pyarrow as pa
        from gem.knowledge.columns import pad_lists, surface_codes

        for name in table.column_names:
            column = table.column(name)
            spec = specs.get(name)
            if spec is not None and spec.kind == "surface" and not pa.types.is_integer(column.type):
                columns[name] = surface_codes(column, info.surfaces)
            elif (
                pa.types.is_list(column.type)
                or pa.types.is_large_list(column.type)
                or pa.types.is_fixed_size_list(column.type)
            ):
                padded, lengths = pad_lists(column, spec.max_length if spec else None)
                columns[name] = padded
                if spec is not None and spec.sequence:
                    columns.setdefault(f"{spec.sequence}_length", lengths)
            else:
                columns[name] = column.to_numpy()
    for name, array in columns.items():
        spec = specs.get(name)
        if spec is not None and array.dtype != DTYPES[spec.dtype] and array.dtype.kind in "iuf":
            columns[name] = array.astype(DTYPES[spec.dtype])
    return columns


def _request(
    features: dict[str, np.ndarray],
    shared: dict[str, np.ndarray],
    outputs: Iterable[str] | None,
    user_embedding_once: bool = False,
    fm_version: int | None = None,
) -> pb.GenerateRequest:
    """`fm_version`: the FM version to pin (None: the latest; the field stays unset so a
    server that predates pins reads the same request)."""
    if fm_version is not None and fm_version < 1:
        raise ValueError(f"fm_version must be a version number (>= 1), got {fm_version}")
    unknown = sorted(set(outputs or ()) - OUTPUT_NAMES.keys())
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; one of {', '.join(OUTPUT_NAMES)}")
    return pb.GenerateRequest(
        features={k: encode(v) for k, v in features.items()},
        shared={k: encode(v) for k, v in shared.items()},
        outputs=[OUTPUT_NAMES[o] for o in outputs or ()],
        user_embedding_once=user_embedding_once,
        fm_version=fm_version,
    )


def _reply(response: pb.GenerateResponse, trailer: Iterable[tuple[str, Any]] = ()) -> Reply:
    outputs = {k: decode(k, v) for k, v in response.outputs.items()}
    timing = next((v for k, v in trailer if k == SERVER_TIMING_METADATA and isinstance(v, str)), "")
    return Reply(outputs, response.versions.fm, response.versions.adapter, parse_server_timing(timing))


def _sync_channel(
    address: str, options: list, interceptors: Sequence[Any], credentials: grpc.ChannelCredentials | None
) -> grpc.Channel:
    if credentials is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def _async_channel(
    address: str, options: list, interceptors: Sequence[Any], credentials: grpc.ChannelCredentials | None
) -> grpc.aio.Channel:
    chained = list(interceptors) or None
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=chained)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=chained)


class _Base:
    # _sync_channel or _async_channel
    _make_channel: Any

    def __init__(
        self,
        address: str,
        token: str | None = None,
        timeout_s: float = 5.0,
        retries: int = 3,
        application: str | None = None,
        interceptors: Sequence[Any] = (),
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
    ):
        """`interceptors`: gRPC client interceptors (e.g. the load test's, which times
        every call). `credentials`: channel credentials for TLS (plaintext without).
        `options`: gRPC channel arguments laid over the client's own."""
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        if application:
            # Routes the call to one application when a Serve instance runs several.
            self.metadata.append(("application", application))
        self._info: pb.GetModelInfoResponse | None = None
        self._channel = type(self)._make_channel(address, channel_options(retries, options), interceptors, credentials)
        self._stub = pb_grpc.KnowledgeServiceStub(self._channel)

    def _call_metadata(self, timeout_s: float, server_timing: bool) -> list[tuple[str, str]]:
        timing = [(SERVER_TIMING_METADATA, "1")] if server_timing else []
        return [*self.metadata, (TIMEOUT_METADATA, str(max(int(timeout_s * 1000), 1))), *timing]

    def _remember(self, info: pb.GetModelInfoResponse) -> pb.GetModelInfoResponse:
        self._info = info
        return info

    def _columns(self, data: Columns | None) -> dict[str, np.ndarray]:
        # generate() asks for the model's info before the first call's columns.
        assert self._info is not None
        return {} if data is None else to_columns(data, self._info)


class KnowledgeClient(_Base):
    _make_channel = staticmethod(_sync_channel)

    def info(self) -> pb.GetModelInfoResponse:
        reply = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self.metadata)
        return self._remember(reply)

    def generate(
        self,
        features: Columns,
        shared: Columns | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        user_embedding_once: bool = False,
        fm_version: int | None = None,
        server_timing: bool = False,
    ) -> Reply:
        if self._info is None:
            self.info()
        request = _request(self._columns(features), self._columns(shared), outputs, user_embedding_once, fm_version)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        attempt = 0
        while True:  # pushback_wait ends it after `retries` retries
            remaining = deadline - time.monotonic()
            try:
                metadata = self._call_metadata(remaining, server_timing)
                if not server_timing:
                    return _reply(self._stub.Generate(request, timeout=remaining, metadata=metadata))
                response, call = self._stub.Generate.with_call(request, timeout=remaining, metadata=metadata)
                return _reply(response, call.trailing_metadata() or ())
            except grpc.RpcError as e:
                wait = pushback_wait(e, attempt, self.retries, deadline - time.monotonic())
                if wait is None:
                    raise
                attempt += 1
                time.sleep(wait)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KnowledgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncKnowledgeClient(_Base):
    _make_channel = staticmethod(_async_channel)

    async def info(self) -> pb.GetModelInfoResponse:
        reply = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self.metadata)
        return self._remember(reply)

    async def generate(
        self,
        features: Columns,
        shared: Columns | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        user_embedding_once: bool = False,
        fm_version: int | None = None,
        server_timing: bool = False,
    ) -> Reply:
        if self._info is None:
            await self.info()
        request = _request(self._columns(features), self._columns(shared), outputs, user_embedding_once, fm_version)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        attempt = 0
        while True:  # pushback_wait ends it after `retries` retries
            remaining = deadline - time.monotonic()
            try:
                metadata = self._call_metadata(remaining, server_timing)
                call = self._stub.Generate(request, timeout=remaining, metadata=metadata)
                response = await call
                return _reply(response, await call.trailing_metadata() if server_timing else ())
            except grpc.aio.AioRpcError as e:
                wait = pushback_wait(e, attempt, self.retries, deadline - time.monotonic())
                if wait is None:
                    raise
                attempt += 1
                await asyncio.sleep(wait)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncKnowledgeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
