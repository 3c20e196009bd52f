"""`gem bootstrap`, `gem up`, `gem serve`, `gem query` and `gem health`: the serving
stack and its clients."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from export.contract import TRITON_GRPC_URL
from gem.cli.common import (
    DEFAULT_CHECKPOINT,
    DEFAULT_DATA,
    DEFAULT_REPO,
    TRITON_WORK_DIR,
    BarProgress,
    MetricsPortOption,
    RepoOption,
    TritonUrlOption,
    backend_of,
    console,
    friendly_errors,
    one_of,
    progress,
    stdout,
    wait_for_ctrl_c,
)

if TYPE_CHECKING:
    from serving.config import Ingress, ProxyLocation


# Admission control (serving/admission.py); defaults are serving.config.FrontendConfig's.
InFlightExamplesOption = Annotated[
    int,
    typer.Option(
        min=0,
        help="Examples in flight on a replica past which calls are refused at once (UNAVAILABLE, "
        "with a retry-after); 0: two full batches.",
    ),
]
InFlightCallsOption = Annotated[
    int, typer.Option(min=1, help="Calls in flight on a replica past which calls are refused at once.")
]
InferenceNiceOption = Annotated[
    int,
    typer.Option(
        min=0,
        max=19,
        help="Embedded backend: run inference this many nice steps below the replica's event loop, so that "
        "on saturated cores the loop (admission, refusals) runs first; 0: level with it.",
    ),
]
QueueWaitOption = Annotated[
    float,
    typer.Option(
        min=0,
        help="Refuse a call at once when it would wait longer than this many ms behind the work in flight "
        "(examples in flight over the replica's recent examples/s); 0: off.",
    ),
]


def ingress_of(value: str) -> Ingress:
    from serving.config import INGRESSES

    return one_of(value, INGRESSES, "--ingress")


def proxy_location_of(value: str) -> ProxyLocation:
    from serving.config import PROXY_LOCATIONS

    return one_of(value, PROXY_LOCATIONS, "--proxy-location")


def _ready_message(address: str, metrics_port: int) -> None:
    """What to do next, with absolute paths; each command on its own line, never wrapped
    (printed plainly, not through rich), so it can be copied from any terminal width."""
    import sys

    bin_dir = Path(sys.executable).parent.absolute()
    root = Path(__file__).resolve().parents[2]
    host = address.rsplit(":", 1)[0]
    console.print(
        f"\n[bold green]GEM knowledge is serving gRPC at {address}[/] (Ctrl-C stops everything)",
        highlight=False,
        soft_wrap=True,
    )
    lines = [
        "query it:",
        f"  {bin_dir / 'gem'} query --address {address}",
        "describe:",
        f"  grpcurl -plaintext {address} gem.knowledge.v1.KnowledgeService/GetModelInfo",
        "health:",
        f"  grpcurl -plaintext {address} grpc.health.v1.Health/Check",
        "metrics:",
        f"  curl -s http://{host}:{metrics_port}/metrics | grep ray_gem_",
        "load test:",
        f"  {bin_dir / 'locust'} -f {root / 'loadtests' / 'locustfile.py'} "
        f"--config {root / 'loadtests' / 'locust.conf'} --host {address}",
    ]
    sys.stderr.write("".join(f"  {line}\n" for line in lines) + "\n")
    sys.stderr.flush()


IngressOption = Annotated[
    str,
    typer.Option(
        envvar="GEM_INGRESS",
        help="Who answers the gRPC port: direct (the replica's own server, one hop) or proxy (Serve's gRPC proxy).",
    ),
]
TracingOption = Annotated[
    str | None,
    typer.Option(
        envvar="GEM_TRACING",
        help="OpenTelemetry: send every call's spans (Ray Serve's, the backend batch's, Triton's) to this OTLP/HTTP "
        "traces endpoint, e.g. http://127.0.0.1:4318/v1/traces. Off by default.",
    ),
]
BootstrapDataOption = Annotated[Path, typer.Option(help="Synthetic data folder used when a model must be trained.")]


def bootstrap(checkpoint: Path, data: Path, repo: Path, train_when_published: bool = False) -> None:
    """trainer.bootstrap with progress bars, and the tables of what it trained and published."""
    from gem.cli.export import parity_table
    from gem.cli.train import metric_table
    from trainer.bootstrap import BootstrapConfig
    from trainer.bootstrap import bootstrap as run_bootstrap

    cfg = BootstrapConfig(checkpoint, data, repo, train_when_published=train_when_published)
    with progress("examples") as bar:
        result = run_bootstrap(cfg, BarProgress(bar))
    if result.metrics is not None:
        stdout().print(metric_table(result.metrics))
    if result.export is not None:
        stdout().print(parity_table(result.export))


@friendly_errors
def bootstrap_cmd(
    checkpoint: Annotated[
        Path, typer.Option(help="Checkpoint to publish; trained on synthetic data if missing.")
    ] = DEFAULT_CHECKPOINT,
    data: BootstrapDataOption = DEFAULT_DATA,
    repo: RepoOption = DEFAULT_REPO,
) -> None:
    """Publish a model if the model repository has none: train the `small` model on
    synthetic data (unless the checkpoint exists) and export it; do nothing when the
    repository has a model. What `gem up` does before it serves, and the one-shot
    `bootstrap` service of docker-compose.yml."""
    bootstrap(checkpoint, data, repo)


@friendly_errors
def up(
    checkpoint: Annotated[
        Path, typer.Option(help="Checkpoint to serve; trained on synthetic data if missing.")
    ] = DEFAULT_CHECKPOINT,
    data: BootstrapDataOption = DEFAULT_DATA,
    repo: RepoOption = DEFAULT_REPO,
    embedded: Annotated[bool, typer.Option(help="In-process ONNX Runtime instead of Triton.")] = False,
    grpc_port: Annotated[int, typer.Option(help="The front end's gRPC port.")] = 50051,
    metrics_port: MetricsPortOption = 8090,
    http_port: Annotated[int, typer.Option(help="The front end's HTTP port (Ray Serve's HTTP proxy).")] = 8080,
    triton_http_port: Annotated[int, typer.Option(help="Triton's HTTP port.")] = 8000,
    triton_grpc_port: Annotated[int, typer.Option(help="Triton's gRPC port.")] = 8001,
    triton_metrics_port: Annotated[int, typer.Option(help="Triton's metrics port.")] = 8002,
    triton_work_dir: Annotated[
        Path, typer.Option(help="Triton's log and state folder (where `gem triton down` looks).", file_okay=False)
    ] = TRITON_WORK_DIR,
    host: Annotated[
        str,
        typer.Option(envvar="GEM_HOST", help="Address everything listens on; 0.0.0.0 opens the stack to the network."),
    ] = "127.0.0.1",
    ingress: IngressOption = "direct",
    tracing: TracingOption = None,
    max_in_flight_examples: InFlightExamplesOption = 0,
    max_in_flight_calls: InFlightCallsOption = 512,
    max_queue_wait_ms: QueueWaitOption = 0.0,
    inference_nice: InferenceNiceOption = 10,
) -> None:
    """The local stack: train the `small` model if there is no checkpoint, export it if
    the model repository is empty, start Triton (supervised: restarted if it exits) and
    the Ray Serve gRPC front end, and serve until Ctrl-C."""
    from serving.config import FrontendConfig
    from serving.local.stack import StackConfig, check_ports, local_stack
    from serving.local.triton import TritonConfig

    triton = None
    if not embedded:
        triton = TritonConfig(repo, triton_work_dir, triton_http_port, triton_grpc_port, triton_metrics_port, host)
    frontend = FrontendConfig(
        backend="onnxruntime" if embedded else "triton",
        repository=repo,
        max_in_flight_examples=max_in_flight_examples,
        max_in_flight_calls=max_in_flight_calls,
        max_queue_wait_s=max_queue_wait_ms / 1000,
        inference_nice=inference_nice,
    )
    cfg = StackConfig(frontend, triton, grpc_port, http_port, metrics_port, host, ingress_of(ingress), tracing)
    check_ports(cfg)  # before minutes of training
    bootstrap(checkpoint, data, repo, train_when_published=True)
    with local_stack(cfg) as address:
        _ready_message(address, metrics_port)
        wait_for_ctrl_c()


@friendly_errors
def serve_cmd(
    backend: Annotated[str, typer.Option(help="triton, or onnxruntime (embedded, no Triton).")] = "triton",
    triton_url: TritonUrlOption = TRITON_GRPC_URL,
    repo: RepoOption = DEFAULT_REPO,
    grpc_port: Annotated[int, typer.Option(help="gRPC port of the front end.")] = 50051,
    replicas: Annotated[int, typer.Option(help="Ingress replicas.")] = 1,
    metrics_port: MetricsPortOption = 8090,
    host: Annotated[
        str,
        typer.Option(
            envvar="GEM_HOST", help="Address the front end listens on; 0.0.0.0 opens it (compose, in its network)."
        ),
    ] = "127.0.0.1",
    ingress: IngressOption = "direct",
    tracing: TracingOption = None,
    max_in_flight_examples: InFlightExamplesOption = 0,
    max_in_flight_calls: InFlightCallsOption = 512,
    max_queue_wait_ms: QueueWaitOption = 0.0,
    inference_nice: InferenceNiceOption = 10,
    address: Annotated[
        str | None,
        typer.Option(help="A running Ray cluster to deploy on (`ray start`'s address; default: a Ray of its own)."),
    ] = None,
    max_replicas_per_node: Annotated[
        int | None, typer.Option(min=1, help="At most this many replicas on one node (1 spreads them over the nodes).")
    ] = None,
    proxy_location: Annotated[
        str,
        typer.Option(help="Where Serve runs its proxies: EveryNode, or HeadOnly (several nodes on one machine)."),
    ] = "EveryNode",
) -> None:
    """Only the Ray Serve front end, on a Triton already running (or embedded). For a
    cluster, `--address` (or `serve deploy serving/serve_config.yaml`). Several replicas need
    `--ingress proxy` (direct ingress serves one replica on the gRPC port)."""
    from serving.config import FrontendConfig
    from serving.local import launcher

    served = launcher.start(
        FrontendConfig(
            backend=backend_of(backend),
            triton_url=triton_url,
            repository=repo,
            max_in_flight_examples=max_in_flight_examples,
            max_in_flight_calls=max_in_flight_calls,
            max_queue_wait_s=max_queue_wait_ms / 1000,
            inference_nice=inference_nice,
        ),
        grpc_port=grpc_port,
        replicas=replicas,
        metrics_port=metrics_port,
        host=host,
        ingress=ingress_of(ingress),
        tracing=tracing,
        address=address,
        replicas_per_node=max_replicas_per_node,
        proxy_location=proxy_location_of(proxy_location),
    )
    try:
        launcher.wait_healthy(served)
        _ready_message(served, metrics_port)
        wait_for_ctrl_c()
    finally:
        launcher.stop()


@friendly_errors
def query(
    address: Annotated[str, typer.Option(help="The front end's gRPC address.")] = "127.0.0.1:50051",
    candidates: Annotated[int, typer.Option(help="Candidate ads for the one sample user.")] = 8,
    token: Annotated[
        str | None, typer.Option(envvar="GEM_AUTH_TOKEN", help="Bearer token, if the server wants one.")
    ] = None,
    application: Annotated[str | None, typer.Option(help="Serve application, when several run.")] = None,
) -> None:
    """Send one sample call (a user and candidate ads, shared-user form) and print the reply."""
    import time

    import grpc
    from gem.knowledge.client import KnowledgeClient

    from model.examples import random_call
    from model.schema import schema_from_yaml

    with KnowledgeClient(address, token=token, timeout_s=30, application=application) as client:
        try:
            info = client.info()
            schema = schema_from_yaml(info.schema_yaml)
            ads, shared = random_call(schema, candidates, 16, seed=int(time.time()))
            start = time.perf_counter()
            reply = client.generate(ads, shared=shared)
            ms = (time.perf_counter() - start) * 1e3
        except grpc.RpcError as e:
            raise ConnectionError(f"{address}: {e.code().name}: {e.details()}") from None
    table = Table(
        title=f"{candidates} candidates, fm v{reply.fm_version}, adapter v{reply.adapter_version}, {ms:.1f} ms"
    )
    table.add_column("row", justify="right")
    for task in info.tasks:
        table.add_column(f"{task} label", justify="right")
        table.add_column(f"{task} adapted", justify="right")
    table.add_column("embedding[:3]", no_wrap=True)
    for i in range(candidates):
        cells = [str(i)]
        for t in range(len(info.tasks)):
            cells += [f"{reply.outputs['labels'][i, t]:.4f}", f"{reply.outputs['adapted_labels'][i, t]:.4f}"]
        cells.append(" ".join(f"{x:+.3f}" for x in reply.outputs["embedding"][i, :3]))
        table.add_row(*cells)
    stdout().print(table)


def health(
    address: Annotated[str, typer.Option(help="gRPC address of the server to ask.")] = "127.0.0.1:50051",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.", min=0.0)] = 5.0,
) -> None:
    """Ask a server's standard gRPC health service (grpc.health.v1) once: exit 0 when it
    answers SERVING, 1 otherwise, with a one-line reason. The compose healthcheck of the
    front end."""
    from serving.local.health import check

    serving, status = check(address, timeout)
    typer.echo(f"{address}: {status}", err=not serving)
    raise typer.Exit(0 if serving else 1)
