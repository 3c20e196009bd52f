"""The front end's data plane, protocol-neutral: a validated `Call` in, its `Knowledge`
out. Concurrent calls merge into one backend batch of up to `max_batch_examples`
*examples* (`@serve.batch`, sized by rows, not calls) and the reply is split back by
rows; a failed merged batch is retried call by call so only the culprit fails; big calls
run apart in chunks; calls pinned to different FM versions never share a backend run;
no call is answered with a non-finite number. A call may come user-indexed (the shared
form: `serving.validation`); merged batches keep that form. `HealthState` keeps
the backend's health from a background probe, so health checks cost no inference."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import numpy as np
from ray import serve

from model.examples import zero_batch
from model.features import USER_INDEX
from model.outputs import sigmoid
from model.schema import FeatureSchema
from model.user_index import concat_batches
from serving.backends.base import Backend, Knowledge, rows_of
from serving.backends.errors import BackendTimeout, BackendUnavailable, VersionNotLoaded
from serving.config import FrontendConfig
from serving.errors import Refusal, Violation
from serving.prometheus import FrontendMetrics
from serving.tracing import backend_span

INVALID = grpc.StatusCode.INVALID_ARGUMENT
# How often the background health probe asks the backend.
HEALTH_PERIOD_S = 1.0


@dataclass(frozen=True)
class Call:
    batch: dict[str, np.ndarray]
    # Model output names (`logits`, `adapted_logits`, ...).
    outputs: tuple[str, ...]
    # The FM version the call pins (None: the latest).
    fm_version: int | None = None

    @property
    def rows(self) -> int:
        """Candidates (examples), whatever the form."""
        return rows_of(self.batch)

    def column(self, name: str) -> np.ndarray:
        """Input `name` with a row per candidate (a user input of a user-indexed call is
        gathered through its index)."""
        value = self.batch[name]
        if USER_INDEX in self.batch and len(value) != self.rows:
            return value[self.batch[USER_INDEX]]
        return value


def split(knowledge: Knowledge, calls: list[Call]) -> list[Knowledge]:
    """A merged batch's reply, back to its calls by rows (each with its own outputs)."""
    bounds = np.cumsum([c.rows for c in calls])[:-1]
    parts = {k: np.split(v, bounds) for k, v in knowledge.outputs.items()}
    return [
        Knowledge({k: parts[k][i] for k in c.outputs}, knowledge.fm_version, knowledge.adapter_version)
        for i, c in enumerate(calls)
    ]


def examples_of(calls: list[Call]) -> int:
    """The batcher's size of a merged batch: its examples, not its calls."""
    return sum(c.rows for c in calls)


def check_finite(call: Call, knowledge: Knowledge, dense: list[str]) -> None:
    """A good call is never answered with NaN or inf: non-finite outputs become this
    call's INVALID_ARGUMENT, naming the dense input that drove the model out of range."""
    bad = np.zeros(call.rows, dtype=bool)
    for value in knowledge.outputs.values():
        bad |= ~np.isfinite(value.reshape(call.rows, -1)).all(axis=1)
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    worst = max(dense, key=lambda n: float(np.abs(call.column(n)[rows]).max()), default=None)
    if worst is None:
        raise Refusal(INVALID, f"the model's output is not finite for {len(rows)} row(s) (first: row {rows[0]})")
    top = float(np.abs(call.column(worst)[rows]).max())
    raise Refusal(
        INVALID,
        f"the model's output is not finite for {len(rows)} row(s) (first: row {rows[0]}): dense feature "
        f"{worst!r} is out of the model's range (|value| up to {top:.3g})",
        (Violation(f"features[{worst!r}]", f"out of the model's range (|value| up to {top:.3g})"),),
    )


# API outputs that are probabilities: sigmoid of the model's logits.
PROBABILITIES = {"labels", "adapted_labels"}


def api_outputs(knowledge: Knowledge, wanted: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """The reply's arrays by API name (`wanted`: (API name, model output) pairs)."""
    out = {}
    for api_name, model_name in wanted:
        value = knowledge.outputs[model_name]
        if api_name in PROBABILITIES:
            with np.errstate(over="ignore"):  # exp(-x) of a very negative logit: 0, fine
                value = sigmoid(value)
        out[api_name] = value
    return out


class DataPlane:
    """Runs calls through the backend: merged, split, retried alone, bounded in time."""

    def __init__(self, backend: Backend, cfg: FrontendConfig, metrics: FrontendMetrics, user_names: tuple[str, ...]):
        """`user_names`: the schema's user inputs (to merge user-indexed calls)."""
        self.backend, self.cfg, self.metrics, self.user_names = backend, cfg, metrics, user_names
        # Calls between `run`'s start and end on this replica (one event loop: no lock).
        self._in_flight = 0
        # Concurrent calls merge into batches sized by examples. Batches run side by side
        # up to `concurrent_batches`: one ONNX Runtime run leaves cores idle between its
        # ops, a second fills them (bench/README.md: 0.59x -> 0.78x of in-process at c = 4).
        self._batched = serve.batch(
            max_batch_size=cfg.max_batch_examples,
            batch_wait_timeout_s=cfg.batch_wait_timeout_s,
            max_concurrent_batches=cfg.concurrent_batches,
            batch_size_fn=examples_of,
        )(self._merged)

    async def run(self, call: Call, timeout_s: float) -> Knowledge | Exception:
        """The call's knowledge, or the backend failure it met (the caller maps it)."""
        if call.rows > self.cfg.solo_examples:
            # A big call runs apart, in bounded chunks: it never holds a merged batch up.
            return await self._alone(call, timeout_s, chunk=self.cfg.solo_examples)
        # A call that finds nothing else in flight has no one to merge with: it skips the
        # batcher, whose `batch_wait_timeout_s` would only add to its latency. Under load
        # calls overlap, and every call that finds company in flight goes to the batcher.
        alone = self._in_flight == 0
        self._in_flight += 1
        try:
            if alone:
                (reply,) = await asyncio.wait_for(self._merged([call]), timeout_s)
                return reply
            return await asyncio.wait_for(self._batched(call), timeout_s)
        except TimeoutError:
            return BackendTimeout(f"merged batch: no answer within {timeout_s:g}s")
        finally:
            self._in_flight -= 1

    async def _merged(self, calls: list[Call]) -> list[Knowledge | Exception]:
        """The batcher's calls, one backend run per FM version they pin (a run is one
        version's FM and adapter), the runs side by side."""
        groups: dict[int | None, list[int]] = {}
        for i, call in enumerate(calls):
            groups.setdefault(call.fm_version, []).append(i)
        if len(groups) == 1:
            return await self._merged_run(calls)
        runs = await asyncio.gather(*(self._merged_run([calls[i] for i in rows]) for rows in groups.values()))
        results: list[Knowledge | Exception] = [Exception()] * len(calls)
        for rows, run in zip(groups.values(), runs, strict=True):
            for i, result in zip(rows, run, strict=True):
                results[i] = result
        return results

    async def _merged_run(self, calls: list[Call]) -> list[Knowledge | Exception]:
        """One backend run of calls that pin the same FM version (or none)."""
        outputs = tuple(dict.fromkeys(o for c in calls for o in c.outputs))
        try:
            merged = calls[0].batch if len(calls) == 1 else concat_batches([c.batch for c in calls], self.user_names)
            start = time.perf_counter()
            with backend_span(self.backend.name, examples_of(calls), len(calls)):
                knowledge = await self.backend.infer(
                    merged, outputs, self.cfg.backend_timeout_s, fm_version=calls[0].fm_version
                )
            self.metrics.batch(examples_of(calls), time.perf_counter() - start, knowledge.fm_version,
                               knowledge.adapter_version)  # fmt: skip
            results: list[Knowledge | Exception] = list(split(knowledge, calls))
            return results
        except (BackendUnavailable, BackendTimeout, VersionNotLoaded) as e:
            return [e] * len(calls)
        except Exception as e:
            if len(calls) == 1:
                return [e]
        # Something in the merged batch failed: each call alone, so only the culprit fails.
        return [await self._alone(call, self.cfg.backend_timeout_s) for call in calls]

    async def _alone(self, call: Call, timeout_s: float, chunk: int | None = None) -> Knowledge | Exception:
        try:
            knowledge = await self.backend.infer(call.batch, call.outputs, timeout_s, chunk, call.fm_version)
            return split(knowledge, [call])[0]
        except Exception as e:
            return e


class HealthState:
    """The backend's health as a background probe last saw it: one all-zero example
    through the backend every `HEALTH_PERIOD_S` (its reply also gives the output widths
    and the serving versions). The probe starts with the first question, on the
    replica's event loop."""

    def __init__(self, backend: Backend, schema: FeatureSchema, outputs: tuple[str, ...], timeout_s: float):
        self.backend, self.outputs, self.timeout_s = backend, outputs, timeout_s
        self.zero = zero_batch(schema)
        self.last: Knowledge | None = None
        self.why = "not probed yet"
        self._task: asyncio.Task | None = None
        # Python >= 3.10: an Event binds to the loop that first waits on it, not this one.
        self._probed = asyncio.Event()

    def ensure_probing(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                self.last, self.why = await self.backend.infer(self.zero, self.outputs, self.timeout_s), "SERVING"
            except Exception as e:
                self.last, self.why = None, f"{type(e).__name__}: {e}"
            self._probed.set()
            await asyncio.sleep(HEALTH_PERIOD_S)

    async def probed(self) -> Knowledge | None:
        """The last probe's reply, None when the backend failed it (waits for the first)."""
        self.ensure_probing()
        if self.why == "not probed yet":
            await self._probed.wait()
        return self.last
