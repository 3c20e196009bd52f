"""Asyncio client for the knowledge models on Triton (`tritonclient.grpc.aio`).

`infer` sends one columnar batch (feature name -> numpy array, as
`model.features.input_specs` describes) and returns numpy arrays by output name; Triton
errors become `serving.backends.errors`, each with the gRPC status a caller gets. Model
control (load, unload, versions) is here too: the side trainer and `gem export --load`
publish through it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from export.contract import (
    ADAPTER_VERSION,
    ENSEMBLE_MODEL,
    FM_VERSION,
    KNOWLEDGE_OUTPUTS,
    MAX_BATCH_EXAMPLES,
    USER_INPUTS_PARAMETER,
)
from model.user_index import in_graph_form
from serving.backends.base import row_chunks, rows_of
from serving.backends.errors import BackendError, BackendTimeout, BackendUnavailable, InvalidRequest, ModelLoadError
from serving.tracing import trace_headers

_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}
_TIMEOUT = {"StatusCode.DEADLINE_EXCEEDED"}
# The header our own control code sends with Triton's restricted APIs (model
# repository: load, unload, index); its value is the admin key.
ADMIN_HEADER = "gem-admin-key"
# Where our control code finds the key (the local Triton's launcher sets it).
ADMIN_KEY_ENV = "GEM_TRITON_ADMIN_KEY"


def _translate(e: InferenceServerException, what: str) -> BackendError:
    status, message = str(e.status() or ""), e.message() or str(e)
    if status in _TIMEOUT or "deadline exceeded" in message.lower():
        return BackendTimeout(f"{what}: {message}")
    if status in _UNAVAILABLE or "is not ready" in message or "unknown model" in message.lower():
        return BackendUnavailable(f"{what}: {message}")
    if status == "StatusCode.INVALID_ARGUMENT":
        return InvalidRequest(f"{what}: {message}")
    return BackendError(f"{what}: {message} ({status or 'no status'})")


def _channel_args() -> list[tuple[str, int]]:
    """tritonclient's defaults plus a short reconnect backoff: after Triton restarts,
    calls succeed again within a second instead of after gRPC's backoff (up to 2 min)."""
    size = 2**31 - 1
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


@dataclass(frozen=True)
class VersionState:
    model: str
    version: int
    state: str
    reason: str


class TritonClient:
    """One gRPC channel to Triton, reused by every call (safe to share across tasks)."""

    def __init__(
        self,
        url: str,
        model: str = ENSEMBLE_MODEL,
        timeout_s: float = 10.0,
        max_batch_size: int = MAX_BATCH_EXAMPLES,
        admin_key: str | None = None,
        user_names: Sequence[str] | None = None,
    ):
        """`admin_key`: the key of Triton's restricted model-repository API, sent only with
        load, unload, the repository index and statistics (default: $GEM_TRITON_ADMIN_KEY).
        `user_names`: the schema's user inputs (`user_input_names`), to expand a
        user-indexed batch for a per-example model (default: told by their row counts)."""
        self.url = url
        if admin_key is None:
            admin_key = os.environ.get(ADMIN_KEY_ENV, "")
        # Triton checks a restricted gRPC protocol's key under this prefix (HTTP: as is).
        self._admin_headers = {f"triton-grpc-protocol-{ADMIN_HEADER}": admin_key} if admin_key else None
        self.model = model
        self.timeout_s = timeout_s
        self.max_batch_size = max_batch_size
        self.user_names = None if user_names is None else tuple(user_names)
        self._client = InferenceServerClient(url, channel_args=_channel_args())
        # Model -> its user inputs if it takes the user-indexed form, else None.
        self._forms: dict[str, tuple[str, ...] | None] = {}
        # Model -> whether Triton batches it (its [B] inputs are declared [B, 1]).
        self._batched: dict[str, bool] = {}

    async def _user_inputs(self, model: str) -> tuple[str, ...] | None:
        """The user inputs of a user-indexed model (`user_inputs` parameter of a config
        without Triton batching), None for a batched per-example model; asked once."""
        if model not in self._forms:
            config = await self._config(model)
            users = config.get("parameters", {}).get(USER_INPUTS_PARAMETER, {}).get("string_value", "")
            batched = int(config.get("max_batch_size", 0)) > 0
            self._batched[model] = batched
            self._forms[model] = None if batched or not users else tuple(users.split(","))
        return self._forms[model]

    async def _config(self, model: str) -> dict:
        """The model's loaded config, as JSON."""
        try:
            return (await self._client.get_model_config(model, as_json=True))["config"]
        except InferenceServerException as e:
            raise _translate(e, f"{model} config") from None
        except grpc.RpcError as e:
            raise BackendUnavailable(f"{model} config: {e}") from None

    async def parameter(self, model: str, name: str) -> str:
        """A string parameter of the model's loaded config (empty when it has none);
        asked each time: a reload may change it."""
        return (await self._config(model)).get("parameters", {}).get(name, {}).get("string_value", "")

    async def ready_versions(self, model: str) -> list[int]:
        """The versions of `model` that take requests now."""
        try:
            metadata = await self._client.get_model_metadata(model, as_json=True)
        except InferenceServerException as e:
            raise _translate(e, f"{model} metadata") from None
        except grpc.RpcError as e:
            raise BackendUnavailable(f"{model} metadata: {e}") from None
        return sorted(int(v) for v in metadata.get("versions", []))

    async def user_inputs(self, model: str | None = None) -> tuple[str, ...] | None:
        """The user inputs of the model (default: the client's) if it takes the
        user-indexed form, else None."""
        return await self._user_inputs(model or self.model)

    async def _form(
        self, batch: dict[str, np.ndarray], model: str
    ) -> tuple[dict[str, np.ndarray], tuple[str, ...] | None]:
        """The batch in the model's form (`in_graph_form`: checked before Triton sees it),
        and the model's user inputs (None: per example)."""
        user_inputs = await self._user_inputs(model)
        return in_graph_form(batch, user_inputs, self.user_names), user_inputs

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> TritonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def infer(
        self,
        batch: Mapping[str, np.ndarray],
        outputs: Sequence[str] = KNOWLEDGE_OUTPUTS,
        version: int | None = None,
        model: str | None = None,
        timeout_s: float | None = None,
        chunk: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs `batch` through the model (the ensemble by default) at `version`
        (default: the latest loaded); batches over `chunk` rows (default
        `max_batch_size`) go as several calls. `timeout_s` (default: the client's) bounds
        the whole call; past it, `BackendTimeout`. The batch may be per example or
        user-indexed (`user_index`, checked before it is sent); chunks count candidates."""
        model = model or self.model
        batch, user_inputs = await self._form(dict(batch), model)
        chunk = min(chunk or self.max_batch_size, self.max_batch_size)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if rows_of(batch) <= chunk:
            return await self._infer(batch, outputs, version, model, timeout_s)
        parts = await asyncio.gather(
            *(self._infer(p, outputs, version, model, timeout_s) for p in row_chunks(batch, chunk, user_inputs or ()))
        )
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    async def _infer(
        self,
        batch: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        version: int | None,
        model: str | None,
        timeout_s: float,
    ) -> dict[str, np.ndarray]:
        model = model or self.model
        if model == ENSEMBLE_MODEL:
            # Every reply names the versions that made it. Asking for both also keeps
            # both ensemble steps live: Triton 2.51 deadlocks ("at least one output is
            # not set") when a request leaves one step without a requested output.
            outputs = list(dict.fromkeys([*outputs, FM_VERSION, ADAPTER_VERSION]))
        # Again here: the model may have changed form since `infer` asked.
        batch, user_inputs = await self._form(dict(batch), model)
        inputs = []
        for name, array in batch.items():
            # Triton declares [B] inputs as [B, 1] (a batched model needs a non-batch dim).
            reshape = array.ndim == 1 and self._batched.get(model, user_inputs is None)
            array = np.ascontiguousarray(array.reshape(-1, 1) if reshape else array)
            tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            result = await self._client.infer(
                model,
                inputs,
                model_version="" if version is None else str(version),
                outputs=[InferRequestedOutput(o) for o in outputs],
                client_timeout=max(timeout_s, 0.001),
                headers=trace_headers(),
            )
        except InferenceServerException as e:
            # The model may have changed form (a new version, another arch): ask again next time.
            self._forms.pop(model, None)
            raise _translate(e, f"{model} inference") from None
        except grpc.RpcError as e:  # raised before tritonclient wraps it (channel down)
            raise BackendUnavailable(f"{model} inference: {e}") from None
        return {o: result.as_numpy(o) for o in outputs}

    async def load(self, model: str) -> None:
        """Loads the model's versions per its version policy; the versions already
        loaded keep serving until the new ones are ready."""
        try:
            await self._client.load_model(model, headers=self._admin_headers, client_timeout=max(self.timeout_s, 300.0))
        except InferenceServerException as e:
            # A server that is down or too slow did not refuse anything: the version
            # stays in the repository for it to load later (export.rollout).
            if str(e.status() or "") in _UNAVAILABLE | _TIMEOUT:
                raise _translate(e, f"loading {model}") from None
            raise ModelLoadError(f"loading {model}: {e.message() or e}") from None

    async def unload(self, model: str) -> None:
        try:
            await self._client.unload_model(model, headers=self._admin_headers)
        except InferenceServerException as e:
            raise _translate(e, f"unloading {model}") from None

    async def served_requests(self, model: str | None = None) -> tuple[int, int]:
        """(requests answered, their total ns inside Triton) of `model` (default: the
        client's), all versions, since Triton started: its statistics API (restricted)."""
        model = model or self.model
        try:
            stats = await self._client.get_inference_statistics(model, headers=self._admin_headers, as_json=True)
        except InferenceServerException as e:
            raise _translate(e, f"{model} statistics") from None
        success = [m["inference_stats"]["success"] for m in stats.get("model_stats", [])]
        return sum(int(s.get("count", 0)) for s in success), sum(int(s.get("ns", 0)) for s in success)

    async def versions(self, model: str | None = None) -> list[VersionState]:
        """Every version of the repository index (all models, or one), with its state."""
        try:
            index = await self._client.get_model_repository_index(headers=self._admin_headers, as_json=True)
        except InferenceServerException as e:
            raise _translate(e, "repository index") from None
        states = [
            VersionState(m["name"], int(m.get("version", 0) or 0), m.get("state", "UNKNOWN"), m.get("reason", ""))
            for m in index.get("models", [])
            if model is None or m["name"] == model
        ]
        return sorted(states, key=lambda s: (s.model, s.version))
