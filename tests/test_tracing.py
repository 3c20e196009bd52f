"""OpenTelemetry tracing, one flag on (`gem up --tracing URL`): a call that carries a W3C
`traceparent` leaves spans of one trace from Ray Serve's replica, our backend batch and
Triton at an OTLP/HTTP endpoint (a real receiver on the loopback, decoding the protobuf
export requests as a collector does). Off by default: no Triton trace flag, Serve's
TracingConfig disabled."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time

import grpc
import pytest
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.v1 import knowledge_pb2_grpc as pb_grpc
from gem.knowledge.wire import encode
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from model.examples import random_batch
from serving.local.ports import free_ports
from serving.local.triton import TritonConfig, command
from serving.tracing import SERVICE_NAME, serve_tracing_config
from tests.stack_support import gem_up

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP traces endpoint: (service, span name, trace id) of every span posted."""

    def __init__(self):
        self.spans: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


def _spans(body: bytes, content_type: str) -> list[tuple[str, str, str]]:
    """(service, span name, trace id in hex) of an OTLP export request, in either of
    OTLP/HTTP's encodings: protobuf (Python's exporter) or JSON (Triton's; ids in hex)."""
    if "json" in content_type:
        resources = json.loads(body).get("resourceSpans", [])
        out = []
        for r in resources:
            attrs = {a["key"]: a["value"].get("stringValue", "") for a in r.get("resource", {}).get("attributes", [])}
            for scope in r.get("scopeSpans", []):
                out += [(attrs.get("service.name", ""), s["name"], s["traceId"].lower()) for s in scope["spans"]]
        return out
    out = []
    for r in ExportTraceServiceRequest.FromString(body).resource_spans:
        attrs = {a.key: a.value.string_value for a in r.resource.attributes}
        for scope in r.scope_spans:
            out += [(attrs.get("service.name", ""), s.name, s.trace_id.hex()) for s in scope.spans]
    return out


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b""
        while size := int(self.rfile.readline().strip() or b"0", 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return body

    def do_POST(self):
        body = self._body()
        with self.server.lock:
            self.server.spans += _spans(body, self.headers.get("Content-Type", ""))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_tracing_is_off_by_default(tmp_path):
    assert not any(a.startswith("--trace-config") for a in command(TritonConfig(tmp_path, tmp_path), tmp_path, []))
    assert not serve_tracing_config(None).enabled
    assert serve_tracing_config("http://127.0.0.1:4318/v1/traces").enabled


@pytest.mark.stack
def test_a_call_is_one_trace_through_the_front_end_and_triton(tiny_checkpoint, published_repo, schema, tmp_path):
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    repo = tmp_path / "repo"
    shutil.copytree(published_repo, repo)
    grpc_port, http_port, metrics_port, t_http, t_grpc, t_metrics = free_ports(6)
    log = tmp_path / "up.log"
    try:
        with gem_up("up", "--checkpoint", str(tiny_checkpoint), "--repo", str(repo),
                    "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                    "--triton-http-port", str(t_http), "--triton-grpc-port", str(t_grpc),
                    "--triton-metrics-port", str(t_metrics), "--triton-work-dir", str(tmp_path / "triton"),
                    "--tracing", receiver.url, cwd=tmp_path, log=log):  # fmt: skip
            stub = pb_grpc.KnowledgeServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
            request = pb.GenerateRequest(features={k: encode(v) for k, v in random_batch(schema, 3, 2).items()})
            stub.Generate(request, timeout=60, metadata=[("traceparent", TRACEPARENT)])

            def ours() -> list[tuple[str, str, str]]:
                with receiver.lock:
                    return [s for s in receiver.spans if s[2] == TRACE_ID]

            def complete(spans) -> bool:
                names = {name for _, name, _ in spans}
                return (
                    any(s == SERVICE_NAME and n.startswith("replica_handle_request") for s, n, _ in spans)
                    and "gem backend batch" in names
                    and any(service == "triton" for service, _, _ in spans)
                )

            deadline = time.monotonic() + 60  # exporters send in batches, within seconds
            while not complete(ours()) and time.monotonic() < deadline:
                time.sleep(0.5)
            triton_log = (tmp_path / "triton" / "tritonserver.log").read_text(errors="replace").splitlines()
            tracing_lines = [line for line in triton_log if "trac" in line.lower() or "telemetry" in line.lower()]
            assert complete(ours()), (
                f"spans of the trace: {ours()}; all: {receiver.spans[:20]}; Triton: {tracing_lines}"
            )
    finally:
        receiver.shutdown()
