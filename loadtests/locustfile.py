"""Locust load test of the GEM knowledge front end over gRPC.

    .venv/bin/locust -f loadtests/locustfile.py --config loadtests/locust.conf \\
        --host 127.0.0.1:50051 --users 16 --rate 20 --run-time 60s [--processes 2] \\
        [--slo-p99-ms 50 --slo-error-rate 0.001]

`--host` is the front end's gRPC address. Each user is a ranker built on the project's
client library (`KnowledgeClient`); a gRPC interceptor fires Locust's request event for
every call with its latency, response size and outcome. The mix: candidates per call
log-uniform in `--candidates MIN,MAX` (16,512), the shared-user form (one user's
columns sent once), surfaces mixed across candidates, and a different set of outputs
per call (what a ranker, an adapter-only consumer or an embedding job asks for).
`--rate` is the target calls/s of all users together (0: as fast as they can).

At the end the master (or the single process) writes `--summary-file` (calls/s,
examples/s, p50/p95/p99, failures) and, in SLO mode, exits 1 when p99 or the error rate
is over its bound (Locust's `process_exit_code`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from pathlib import Path

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from gem.knowledge import KnowledgeClient
from gem.knowledge.client import pushback_s
from locust import User, events, task
from locust.runners import MasterRunner, WorkerRunner

from loadtests.report import slo_violations
from model.examples import random_call
from model.schema import schema_from_yaml

# gRPC's C core must yield to gevent's loop, or one call blocks every user of a process.
grpc_gevent.init_gevent()

log = logging.getLogger("gem.loadtest")

# The output sets a call asks for, as different consumers do (None: all of them).
OUTPUT_SETS = (("labels",), ("labels", "adapted_labels"), ("embedding", "user_embedding"), None)
# Distinct payloads per user: enough variety, built once so the load generator's CPU
# goes to sending calls, not to making random arrays.
PAYLOADS = 16
SEQ_LEN = 64
# The suffix of the Locust entry of calls the admission gate refused.
REFUSED = " (refused)"
# The failed calls the summary lists one by one (a stack that is down fails every call).
MAX_FAILED_LOGGED = 10_000


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("GEM knowledge")
    group.add_argument("--rate", type=float, default=0.0, help="Target calls/s of all users together (0: no pacing).")
    group.add_argument("--candidates", default="16,512", help="MIN,MAX candidates per call (log-uniform).")
    group.add_argument("--summary-file", default="", help="Write calls/s, examples/s, percentiles here (JSON).")
    group.add_argument("--slo-p99-ms", type=float, default=0.0, help="Exit 1 if p99 latency is over this (0: off).")
    group.add_argument("--slo-error-rate", type=float, default=-1.0,
                       help="Exit 1 if the failed share of calls is over this, e.g. 0.001 (-1: off).")  # fmt: skip
    group.add_argument("--token", default="", env_var="GEM_AUTH_TOKEN", help="Bearer token, if the server wants one.")
    group.add_argument("--retries", type=int, default=3,
                       help="The client's retries of an overload refusal (0: each one is seen).")  # fmt: skip


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Times every unary call and fires Locust's request event; examples served ride in
    the event's context for the examples/s figure."""

    def __init__(self, environment):
        self.environment = environment

    def intercept_unary_unary(self, continuation, client_call_details, request):
        start, exception, size = time.perf_counter(), None, 0
        # Wall-clock, for the soak (loadtests/soak.py): its faults happen in another process.
        context: dict = {"examples": 0, "start": time.time()}
        outcome = continuation(client_call_details, request)
        try:
            response = outcome.result()
            size = response.ByteSize()
            context["examples"] = max((t.shape[0] for t in getattr(request, "features", {}).values()), default=0)
            if response.HasField("versions"):
                context["versions"] = f"{response.versions.fm}:{response.versions.adapter}"
        except grpc.RpcError as e:
            exception = e
            context["code"] = e.code().name
        name = client_call_details.method.rsplit("/", 1)[-1]
        if exception is not None and pushback_s(exception) is not None:
            # Refused by the admission gate (UNAVAILABLE with a retry-after): timed apart,
            # so that the call's own entry holds the calls that were admitted.
            name += REFUSED
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=size,
            exception=exception,
            context=context,
        )
        return outcome


class KnowledgeUser(User):
    """A ranker calling `Generate` with one user and its candidate ads."""

    # When this user calls next (time.monotonic; set by on_start).
    next_call: float = 0.0

    def period(self) -> float:
        """Seconds between this user's calls: every user paces itself to its share of the
        total rate (0: no pacing)."""
        options = self.environment.parsed_options
        return max(1, options.num_users) / options.rate if options.rate else 0.0

    def wait_time(self) -> float:
        """Until this user's next slot; a user that fell behind calls at once, without
        trying to catch up on the slots it missed (that would be a burst)."""
        now = time.monotonic()
        self.next_call = max(self.next_call + self.period(), now)
        return self.next_call - now

    def on_start(self) -> None:
        # Users start at a random point of their period, or paced users would all call
        # at once at the start and then every period: bursts, not a rate.
        gevent.sleep(random.uniform(0, self.period()))
        self.next_call = time.monotonic()
        options = self.environment.parsed_options
        if not self.host:
            raise ValueError("no front end to call: give --host (the front end's gRPC address, host:port)")
        self.client = KnowledgeClient(self.host, token=options.token or None, timeout_s=30, retries=options.retries,
                                      interceptors=[LocustInterceptor(self.environment)])  # fmt: skip
        schema = schema_from_yaml(self.client.info().schema_yaml)
        low, high = (int(x) for x in options.candidates.split(","))
        rng = np.random.default_rng()
        sizes = np.exp(rng.uniform(np.log(low), np.log(high + 1), PAYLOADS)).astype(int).clip(low, high)
        self.payloads = [random_call(schema, int(n), SEQ_LEN, seed=int(rng.integers(1 << 31))) for n in sizes]
        self.rng = rng

    def on_stop(self) -> None:
        self.client.close()

    @task
    def generate(self) -> None:
        ads, shared = self.payloads[self.rng.integers(len(self.payloads))]
        outputs = OUTPUT_SETS[self.rng.integers(len(OUTPUT_SETS))]
        # A failed call is counted by the interceptor; the user goes on.
        with contextlib.suppress(grpc.RpcError):
            self.client.generate(ads, shared=shared, outputs=outputs)


class ExampleCounter:
    """Examples served, summed over this process and (on the master) its workers, and
    when the test ran (rates are over the whole run, not first to last call). Also what
    the soak's bounds need: the versions that answered (calls, first and last call start)
    and each failed call (start, end, status)."""

    def __init__(self) -> None:
        self.total = self.unreported = 0
        self.started = self.stopped = 0.0
        self.versions: dict[str, dict] = {}
        self.failed: list[dict] = []
        self.unreported_versions: dict[str, dict] = {}
        self.unreported_failed: list[dict] = []

    def on_start(self, **_) -> None:
        self.started = time.time()

    def on_stop(self, **_) -> None:
        self.stopped = time.time()

    def on_request(self, name, context, exception, **_) -> None:
        if exception is None:
            self.total += context["examples"]
            self.unreported += context["examples"]
            if "versions" in context:
                seen = {"calls": 1, "first": context["start"], "last": context["start"]}
                for tally in (self.versions, self.unreported_versions):
                    merge_versions(tally, {context["versions"]: seen})
        elif "code" in context and len(self.failed) < MAX_FAILED_LOGGED:
            failed = {"start": context["start"], "end": time.time(), "code": context["code"],
                      "refused": name.endswith(REFUSED)}  # fmt: skip
            self.failed.append(failed)
            self.unreported_failed.append(failed)

    def report(self, client_id, data) -> None:
        data["examples"], self.unreported = self.unreported, 0
        data["versions"], self.unreported_versions = self.unreported_versions, {}
        data["failed_calls"], self.unreported_failed = self.unreported_failed, []

    def collect(self, client_id, data) -> None:
        self.total += data.get("examples", 0)
        merge_versions(self.versions, data.get("versions", {}))
        self.failed.extend(data.get("failed_calls", [])[: MAX_FAILED_LOGGED - len(self.failed)])


def merge_versions(into: dict[str, dict], new: dict[str, dict]) -> None:
    for key, seen in new.items():
        if key not in into:
            into[key] = dict(seen)
            continue
        mine = into[key]
        mine["calls"] += seen["calls"]
        mine["first"], mine["last"] = min(mine["first"], seen["first"]), max(mine["last"], seen["last"])


counter = ExampleCounter()


@events.init.add_listener
def _wire(environment, **_) -> None:
    environment.events.test_start.add_listener(counter.on_start)
    environment.events.test_stop.add_listener(counter.on_stop)
    if isinstance(environment.runner, WorkerRunner):
        environment.events.request.add_listener(counter.on_request)
        environment.events.report_to_master.add_listener(counter.report)
    elif isinstance(environment.runner, MasterRunner):
        environment.events.worker_report.add_listener(counter.collect)
    else:
        environment.events.request.add_listener(counter.on_request)


def summary(environment) -> dict:
    """The workload's figures: latency and rates of `Generate` (each user's one
    `GetModelInfo` at start is not the workload); failures of every call."""
    stats = environment.stats
    total, calls, refused = stats.total, stats.get("Generate", "grpc"), stats.get("Generate" + REFUSED, "grpc")
    seconds = max((counter.stopped or time.time()) - counter.started, 1e-9)
    return {
        "calls": calls.num_requests,
        "failures": total.num_failures,
        "error_rate": total.fail_ratio,
        "seconds": seconds,
        "calls_per_s": calls.num_requests / seconds if seconds else 0.0,
        "examples": counter.total,
        "examples_per_s": counter.total / seconds if seconds else 0.0,
        "p50_ms": calls.get_response_time_percentile(0.5),
        "p95_ms": calls.get_response_time_percentile(0.95),
        "p99_ms": calls.get_response_time_percentile(0.99),
        # Attempts the admission gate refused (each retry of a call is an attempt).
        "refused": refused.num_requests,
        "refused_p50_ms": refused.get_response_time_percentile(0.5) if refused.num_requests else None,
        "refused_p99_ms": refused.get_response_time_percentile(0.99) if refused.num_requests else None,
        "refused_max_ms": refused.max_response_time if refused.num_requests else None,
        "users": environment.parsed_options.num_users,
        "rate": environment.parsed_options.rate,
        "candidates": environment.parsed_options.candidates,
        "versions": counter.versions,
        "failed_calls": counter.failed,
    }


@events.quitting.add_listener
def _finish(environment, **_) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    options, result = environment.parsed_options, summary(environment)
    log.info("%d calls (%.1f/s), %d examples (%.0f/s), p50 %.0f ms, p95 %.0f ms, p99 %.0f ms, %d failures",
             result["calls"], result["calls_per_s"], result["examples"], result["examples_per_s"],
             result["p50_ms"], result["p95_ms"], result["p99_ms"], result["failures"])  # fmt: skip
    if options.slo_p99_ms > 0 or options.slo_error_rate >= 0:
        broken = slo_violations(result, options.slo_p99_ms, options.slo_error_rate)
        result["slo"] = {"p99_ms": options.slo_p99_ms, "error_rate": options.slo_error_rate, "violations": broken}
        if broken:
            log.error("SLO violated: %s", "; ".join(broken))
            environment.process_exit_code = 1
    if options.summary_file:
        Path(options.summary_file).parent.mkdir(parents=True, exist_ok=True)
        Path(options.summary_file).write_text(json.dumps(result, indent=2))
