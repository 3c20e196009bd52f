"""`gem`: the command line of GEM knowledge serving.

Each command is a thin layer over a library function; errors the user can fix (a bad
schema, bad data, a corrupt checkpoint) are printed as one line, without a traceback,
and exit with status 2.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from export.onnx_export import ExportError
from export.repository import RepositoryError
from export.tensorrt import CONTAINER_REPOSITORY, TensorRTUnavailable
from model.checkpoint import CheckpointError, load_checkpoint
from model.config import PRESETS
from model.data.reader import DataError
from model.schema import DEFAULT_SCHEMA_PATH, SchemaError, load_schema
from serving.triton.client import BackendError
from serving.triton.server import TritonError

console = Console(stderr=True)
log = logging.getLogger("gem")

ARTIFACTS = Path("artifacts")
DEFAULT_DATA = ARTIFACTS / "data" / "synth"
DEFAULT_CHECKPOINT = ARTIFACTS / "checkpoints" / "gem-small"
DEFAULT_REPO = Path("model_repo")
TRITON_WORK_DIR = ARTIFACTS / "triton"

app = typer.Typer(
    help="GEM knowledge serving: data, training, export and serving of an ads foundation model.", no_args_is_help=True
)
data_app = typer.Typer(help="Synthetic logged examples.", no_args_is_help=True)
schema_app = typer.Typer(help="The feature schema.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(schema_app, name="schema")
triton_app = typer.Typer(
    help="The local Triton server (the nvidia-pytriton wheel's tritonserver).", no_args_is_help=True
)
app.add_typer(triton_app, name="triton")
trainer_app = typer.Typer(
    help="The side trainer: continuous FM and Student Adapter refreshes, published to serving.", no_args_is_help=True
)
app.add_typer(trainer_app, name="trainer")

F = TypeVar("F", bound=Callable[..., Any])
USER_ERRORS = (
    SchemaError, DataError, CheckpointError, ExportError, RepositoryError, TensorRTUnavailable, TritonError,
    BackendError, ValueError, FileNotFoundError, OSError, TimeoutError,
)  # fmt: skip


def friendly_errors(fn: F) -> F:
    """Errors the user can fix become one red line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


SchemaOption = Annotated[Path, typer.Option("--schema", help="Feature schema YAML.", dir_okay=False)]


@schema_app.command("check")
@friendly_errors
def schema_check(path: Annotated[Path, typer.Argument(help="Schema YAML to validate.")] = DEFAULT_SCHEMA_PATH) -> None:
    """Validate a schema file and summarize it."""
    s = load_schema(path)
    seqs = ", ".join(f"{q.name} (max {q.max_length}: {', '.join(f.name for f in q.fields)})" for q in s.sequences)
    console.print(
        f"[green]ok[/] {s.name}: {len(s.sparse)} sparse, {len(s.dense)} dense, sequences: {seqs or 'none'}; "
        f"surfaces: {', '.join(s.surfaces)}; tasks: {', '.join(s.task_names)}",
        highlight=False,
    )


@data_app.command("synth")
@friendly_errors
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder for the Parquet shards (part-00000.parquet, ...).")] = DEFAULT_DATA,
    rows: Annotated[int, typer.Option(help="Total rows over all shards.")] = 200_000,
    shards: Annotated[int, typer.Option(help="Files, each a consecutive time slice; the last is the freshest.")] = 4,
    seed: Annotated[int, typer.Option(help="Same seed, same data.")] = 0,
    drift: Annotated[float, typer.Option(help="0 = stationary; 1 = preferences move fully over the time range.")] = 0.0,
    days: Annotated[float, typer.Option(help="Time range the shards cover.")] = 7.0,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Generate logged examples from a planted model (deterministic by seed)."""
    from model.data.synth import SynthConfig, write_shards

    cfg = SynthConfig(rows=rows, shards=shards, seed=seed, drift=drift, days=days)
    with _progress("rows") as progress:
        task = progress.add_task("synthesizing rows", total=rows)
        paths = write_shards(cfg, load_schema(schema), out, on_rows=lambda n: progress.advance(task, n))
    log.info("wrote %d rows in %d shard(s) to %s", rows, len(paths), out)


class RateColumn(ProgressColumn):
    """Items per second of a task since it started, e.g. `12,345 rows/s` (an average:
    work that arrives in bursts makes rich's windowed speed jump)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.completed / task.elapsed if task.elapsed else None
        return Text(f"{speed:>9,.0f} {self.unit}/s" if speed else "", style="cyan")


def _progress(unit: str) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def metric_table(metrics: dict) -> Table:
    """GEM, its adapted labels and the baselines, per task: AUC and NE on the held-out slice."""
    models = [m for m in ("gem", "gem_adapted", "gem_mean_pool", "pooled_mlp", "logistic") if m in metrics]
    tasks = list(metrics["gem"].keys() - {"train_examples_per_s"})
    tasks.sort(key=lambda t: list(metrics["gem"]).index(t))
    table = Table(title=f"held-out slice {', '.join(metrics['eval_shards'])}")
    table.add_column("model", no_wrap=True)
    for t in tasks:
        table.add_column(f"{t} AUC", justify="right")
        table.add_column(f"{t} NE", justify="right")
    table.add_column("train ex/s", justify="right")
    for m in models:
        row = [m]
        for t in tasks:
            overall = metrics[m][t]["overall"]
            row += [f"{overall['auc']:.4f}", f"{overall['ne']:.4f}"]
        rate = metrics[m].get("train_examples_per_s")
        row.append(f"{rate:,.0f}" if rate else "")
        table.add_row(*row)
    return table


def run_training(
    data: Path, out: Path, preset: str, epochs: int, batch_size: int, baselines: bool, seed: int, schema: Path
) -> dict:
    from trainer.train import TrainConfig, train

    cfg = TrainConfig(
        data=data,
        out=out,
        preset=preset,
        epochs=epochs,
        batch_size=batch_size,
        baselines=baselines,
        seed=seed,
        schema_path=schema,
    )
    with _progress("examples") as progress:
        current: dict[str, Any] = {}

        def on_model(name: str, total: int) -> None:
            current["task"] = progress.add_task(f"training {name}", total=total)

        result = train(cfg, on_step=lambda n, _loss: progress.advance(current["task"], n), on_model=on_model)
    log.info("checkpoint written to %s (GEM trained at %.0f examples/s)", result.checkpoint, result.examples_per_s)
    return result.metrics


PresetOption = Annotated[str, typer.Option(help=f"Model size: {', '.join(PRESETS)}.")]


@app.command("train")
@friendly_errors
def train_cmd(
    data: Annotated[Path, typer.Option(help="Parquet file, folder or glob; shards in time order.")] = DEFAULT_DATA,
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write (replaced atomically).")] = DEFAULT_CHECKPOINT,
    preset: PresetOption = "small",
    epochs: Annotated[int, typer.Option(help="Passes over the training shards.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 512,
    baselines: Annotated[
        bool, typer.Option(help="Also train logistic regression, a pooled MLP and GEM with mean-pooled sequences.")
    ] = False,
    seed: Annotated[int, typer.Option()] = 0,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Train GEM on logged examples; the last shard is the held-out evaluation slice."""
    metrics = run_training(data, out, preset, epochs, batch_size, baselines, seed, schema)
    Console().print(metric_table(metrics))


RepoOption = Annotated[Path, typer.Option("--repo", help="Triton model repository to publish into.", file_okay=False)]


def parity_table(report) -> Table:
    table = Table(title="ONNX Runtime vs PyTorch: max abs difference")
    table.add_column("model", no_wrap=True)
    table.add_column("version", justify="right")
    table.add_column("output")
    table.add_column("max |diff|", justify="right")
    rows = [("gem_fm", report.fm, report.fm_parity), ("student_adapter", report.adapter, report.adapter_parity)]
    if report.fp16_parity is not None:
        rows.append(("gem_fm fp16", report.fm, report.fp16_parity))
    for name, published, parity in rows:
        for output, diff in parity.max_abs_diff.items():
            table.add_row(name, str(published.version), output, f"{diff:.2e}")
    return table


def run_export(
    checkpoint: Path,
    repo: Path,
    data: Path | None,
    keep: int,
    tensorrt: bool = False,
    triton_url: str | None = None,
    fp16: bool = False,
):
    import asyncio

    from export.publish import ExportConfig, export_checkpoint
    from export.repository import ADAPTER_MODEL, FM_MODEL, ModelRepository
    from export.tensorrt import build_plan, serving_profile

    ckpt = load_checkpoint(checkpoint)
    cfg = ExportConfig(repository=repo, data=data, keep_versions=keep, fp16=fp16)
    with console.status("exporting") as status:
        report = export_checkpoint(ckpt, cfg, on_stage=lambda stage: status.update(stage))
        if tensorrt:
            status.update("building the TensorRT plan")
            build_plan(report.fm.path, serving_profile(ckpt.schema, cfg.serving.max_batch_size), fp16)
    if triton_url:
        from serving.triton.client import TritonClient
        from serving.triton.rollout import roll_out

        async def load_all():
            async with TritonClient(triton_url) as client:
                repository = ModelRepository(repo, cfg.serving)
                return [await roll_out(client, repository, m, keep) for m in (FM_MODEL, ADAPTER_MODEL)]

        for r in asyncio.run(load_all()):
            if not r.loaded:
                raise BackendError(f"Triton refused {r.model} version {r.version}: {r.reason}")
            log.info("Triton at %s serves %s version %d", triton_url, r.model, r.version)
    return report


@app.command("export")
@friendly_errors
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint folder (from `gem train`).")] = DEFAULT_CHECKPOINT,
    repo: RepoOption = DEFAULT_REPO,
    data: Annotated[
        Path | None, typer.Option(help="Logged rows for the parity check (its last file); default: the synthetic set.")
    ] = None,
    keep: Annotated[int, typer.Option(help="Versions to keep per model; older ones are deleted.")] = 3,
    tensorrt: Annotated[
        bool, typer.Option(help="Also build a TensorRT plan for the new FM version (needs trtexec and a GPU).")
    ] = False,
    load: Annotated[
        str | None, typer.Option(help="gRPC address of a running Triton to load the new versions into.")
    ] = None,
    fp16: Annotated[
        bool,
        typer.Option(help="Also publish a half-precision FM graph (model.fp16.onnx); with --tensorrt, an FP16 plan."),
    ] = False,
) -> None:
    """Export a checkpoint to ONNX (parity-checked against PyTorch) and publish it as new
    versions of gem_fm and student_adapter in the Triton model repository."""
    if data is None and any(DEFAULT_DATA.glob("*.parquet")):
        data = DEFAULT_DATA
    report = run_export(checkpoint, repo, data, keep, tensorrt, load, fp16)
    Console().print(parity_table(report))


@app.command("tensorrt-script")
@friendly_errors
def tensorrt_script(
    repo: Annotated[
        Path, typer.Option("--repo", help="Triton model repository whose latest versions get plans.", file_okay=False)
    ] = DEFAULT_REPO,
    out: Annotated[Path | None, typer.Option(help="Script file to write (default: print it).", dir_okay=False)] = None,
    mount: Annotated[
        Path, typer.Option(help="Where the Triton container mounts the repository.")
    ] = CONTAINER_REPOSITORY,
    fp16: Annotated[bool, typer.Option(help="Build the FM's plan from its half-precision graph.")] = False,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Write the shell script that builds the TensorRT plans of the latest gem_fm and
    student_adapter versions with trtexec, inside the NGC Triton image (the same build
    `gem export --tensorrt` runs or prints); docker-compose.yml's `tensorrt-build` runs it."""
    from export.tensorrt import build_script, serving_profile
    from export.triton_config import ServingConfig

    script = build_script(repo, serving_profile(load_schema(schema), ServingConfig().max_batch_size), fp16, mount)
    if out is None:
        typer.echo(script, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(script)
        log.info("wrote %s", out)


def _triton_config(repo: Path, http_port: int, grpc_port: int, metrics_port: int):
    from serving.triton.server import TritonConfig

    return TritonConfig(
        repository=repo, work_dir=TRITON_WORK_DIR, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port
    )


PortOption = Annotated[int, typer.Option()]
MetricsPortOption = Annotated[
    int, typer.Option(help="Prometheus port of the front end (its metrics and Ray Serve's, at /metrics).")
]


@triton_app.command("up")
@friendly_errors
def triton_up(
    repo: RepoOption = DEFAULT_REPO,
    http_port: PortOption = 8000,
    grpc_port: PortOption = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics of Triton itself.")] = 8002,
    foreground: Annotated[bool, typer.Option(help="Stay attached; Ctrl-C stops the server.")] = False,
    host: Annotated[
        str, typer.Option(envvar="GEM_HOST", help="Address Triton listens on; 0.0.0.0 opens it to the network.")
    ] = "127.0.0.1",
) -> None:
    """Start the local Triton on the model repository (explicit model control, the
    `python` config flavour) and wait until it is ready. Its model-control and
    repository APIs need the key in artifacts/triton/server.json ($GEM_TRITON_ADMIN_KEY)."""
    import dataclasses

    from serving.triton.server import TritonServer

    if not repo.is_dir():
        raise FileNotFoundError(f"no model repository at {repo}; run `gem export` first")
    cfg = dataclasses.replace(_triton_config(repo, http_port, grpc_port, metrics_port), host=host)
    with console.status("starting tritonserver"):
        server = TritonServer(cfg).start(detach=not foreground)
    cfg = server.cfg
    log.info(
        "Triton ready: gRPC %s, HTTP %s, metrics :%d, log %s", cfg.grpc_url, cfg.http_url, metrics_port, cfg.log_file
    )
    if foreground:
        try:
            server.process.wait()
        except KeyboardInterrupt:
            log.info("stopping Triton")
        finally:
            server.stop()
    else:
        log.info("stop it with `gem triton down`")


@triton_app.command("down")
@friendly_errors
def triton_down(
    work_dir: Annotated[
        Path, typer.Option(help="The state folder of the server (gem up --triton-work-dir).", file_okay=False)
    ] = TRITON_WORK_DIR,
) -> None:
    """Stop the Triton that `gem triton up` left running, or the one a `gem up` runs
    (that stops the `gem up`: its supervisor would restart Triton otherwise)."""
    import json

    from serving.triton.server import stop_detached

    state = work_dir / "server.json"
    owner = json.loads(state.read_text()).get("owner") if state.exists() else None
    pid = stop_detached(work_dir)
    if pid is None:
        log.info("no Triton was started from %s", work_dir.absolute())
    elif owner:
        log.info("stopped the `gem up` (pid %d) that supervised Triton (pid %d)", owner, pid)
    else:
        log.info("stopped Triton (pid %d)", pid)


@triton_app.command("status")
@friendly_errors
def triton_status(
    url: Annotated[str | None, typer.Option(help="gRPC address; default: the server `gem triton up` started.")] = None,
) -> None:
    """Show every model version Triton knows and its state."""
    import asyncio

    from serving.triton.client import TritonClient
    from serving.triton.server import detached_config

    key = None
    if url is None:
        cfg = detached_config(TRITON_WORK_DIR)
        if cfg is None:
            raise TritonError("no Triton was started with `gem triton up`; pass --url to ask another one")
        url, key = cfg.grpc_url, cfg.admin_key or None

    async def versions():
        async with TritonClient(url, timeout_s=5, admin_key=key) as client:
            return await client.versions()

    table = Table(title=f"Triton at {url}")
    for col in ("model", "version", "state", "reason"):
        table.add_column(col)
    for v in asyncio.run(versions()):
        table.add_row(v.model, str(v.version), v.state, v.reason.splitlines()[0] if v.reason else "")
    Console().print(table)


def _wait_for_ctrl_c() -> None:
    """Blocks until SIGINT or SIGTERM. Installed after Ray started, which sets handlers
    of its own; a timed wait lets Python run the handler promptly."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    log.info("shutting down")


def _ready_message(address: str, metrics_port: int) -> None:
    """What to do next, with absolute paths; each command on its own line, never wrapped
    (printed plainly, not through rich), so it can be copied from any terminal width."""
    import sys

    bin_dir = Path(sys.executable).parent.absolute()
    root = Path(__file__).resolve().parents[1]
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


BootstrapDataOption = Annotated[Path, typer.Option(help="Synthetic data folder used when a model must be trained.")]


def bootstrap(checkpoint: Path, data: Path, repo: Path, train_when_published: bool = False) -> None:
    """Publishes a model if the repository has none: trains the `small` model on synthetic
    data (synthesized first if `data` holds none) unless the checkpoint exists, and
    exports it. `gem up` also trains a missing checkpoint when the repository is already
    published (`train_when_published`); `gem bootstrap` does not, so that a container
    started on a published repository never spends minutes training."""
    from export.repository import FM_MODEL, ModelRepository

    published = ModelRepository(repo).latest(FM_MODEL) is not None
    if published and not train_when_published:
        log.info("model repository %s already has a published model", repo)
        return
    if not (checkpoint / "manifest.json").exists():
        log.info("no checkpoint at %s: training the small model on synthetic data first", checkpoint)
        if not any(data.glob("*.parquet")):
            data_synth(out=data)
        # GEM only: serving never uses the baselines (`gem train --baselines` trains them).
        Console().print(metric_table(run_training(data, checkpoint, "small", 1, 512, False, 0, DEFAULT_SCHEMA_PATH)))
    if not published:
        log.info("model repository %s is empty: exporting %s", repo, checkpoint)
        Console().print(parity_table(run_export(checkpoint, repo, data if data.exists() else None, keep=3)))


@app.command("bootstrap")
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


@app.command("up")
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
) -> None:
    """The local stack: train the `small` model if there is no checkpoint, export it if
    the model repository is empty, start Triton (supervised: restarted if it exits) and
    the Ray Serve gRPC front end, and serve until Ctrl-C."""
    from serving.stack import StackConfig, check_ports, local_stack

    cfg = StackConfig(
        repository=repo,
        triton_work_dir=triton_work_dir,
        embedded=embedded,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        triton_http_port=triton_http_port,
        triton_grpc_port=triton_grpc_port,
        triton_metrics_port=triton_metrics_port,
        host=host,
    )
    check_ports(cfg)  # before minutes of training
    bootstrap(checkpoint, data, repo, train_when_published=True)
    with local_stack(cfg) as address:
        _ready_message(address, metrics_port)
        _wait_for_ctrl_c()


@app.command("serve")
@friendly_errors
def serve_cmd(
    backend: Annotated[str, typer.Option(help="triton, or onnxruntime (embedded, no Triton).")] = "triton",
    triton_url: Annotated[str, typer.Option(help="Triton's gRPC address (triton backend).")] = "127.0.0.1:8001",
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
) -> None:
    """Only the Ray Serve front end, on a Triton already running (or embedded). For a
    cluster, use `serve deploy serving/serve_config.yaml`."""
    from serving import frontend
    from serving.config import FrontendConfig

    address = frontend.start(
        FrontendConfig(backend=backend, triton_url=triton_url, repository=repo),
        grpc_port=grpc_port,
        replicas=replicas,
        metrics_port=metrics_port,
        host=host,
    )
    try:
        frontend.wait_healthy(address)
        _ready_message(address, metrics_port)
        _wait_for_ctrl_c()
    finally:
        frontend.stop()


@app.command("query")
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

    from model.features import random_call
    from model.schema import schema_from_yaml
    from serving.client import KnowledgeClient

    with KnowledgeClient(address, token=token, timeout_s=30, application=application) as client:
        try:
            info = client.info()
            schema = schema_from_yaml(info.schema_yaml)
            ads, shared = random_call(schema, candidates, 16, seed=int(time.time()))
            start = time.perf_counter()
            reply = client.generate(ads, shared=shared)
            ms = (time.perf_counter() - start) * 1e3
        except grpc.RpcError as e:
            raise BackendError(f"{address}: {e.code().name}: {e.details()}") from None
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
    Console().print(table)


@app.command("health")
def health(
    address: Annotated[str, typer.Option(help="gRPC address of the server to ask.")] = "127.0.0.1:50051",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.", min=0.0)] = 5.0,
) -> None:
    """Ask a server's standard gRPC health service (grpc.health.v1) once: exit 0 when it
    answers SERVING, 1 otherwise, with a one-line reason. The compose healthcheck of the
    front end."""
    from serving.health import check

    serving, status = check(address, timeout)
    typer.echo(f"{address}: {status}", err=not serving)
    raise typer.Exit(0 if serving else 1)


@app.command("embed")
@friendly_errors
def embed_cmd(
    source: Annotated[
        str, typer.Argument(help="Parquet file, folder or glob of logged examples (the schema's format).")
    ],
    out: Annotated[Path, typer.Option(help="Output folder: one subfolder per input file, errors in _errors/.")],
    repo: RepoOption = DEFAULT_REPO,
    backend: Annotated[str, typer.Option(help="onnxruntime (in the Ray actors) or triton.")] = "onnxruntime",
    triton_url: Annotated[str, typer.Option(help="Triton's gRPC address (triton backend).")] = "127.0.0.1:8001",
    batch_size: Annotated[int, typer.Option(help="Rows per model call in each actor.")] = 2048,
    actors: Annotated[int, typer.Option(help="Actors in the pool, each holding a model or a client.")] = 1,
    threads: Annotated[
        int, typer.Option(help="ONNX Runtime threads per actor (0: the node's cores divided among the actors).")
    ] = 0,
    overwrite: Annotated[bool, typer.Option(help="Redo files whose output exists (default: skip them).")] = False,
    fail_on_error: Annotated[
        bool,
        typer.Option(
            help="Refuse to start if any file cannot be read as the schema, and exit 2 if any row is refused "
            "(default: report both and go on)."
        ),
    ] = False,
    limit: Annotated[
        int | None, typer.Option(help="At most this many rows per file: a dry run (a later full run redoes them).")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: a local Ray); --out must then be shared storage.")
    ] = None,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Stamp GEM's knowledge (labels and adapted labels per task, embeddings, versions) onto
    logged examples, as one Ray Data job over all files. Resumable: each file's output is
    committed when complete, and a rerun skips committed files."""
    from serving.embed import EmbedConfig, Listener, run_embed

    cfg = EmbedConfig(
        source=source, out=out, repository=repo, schema_path=schema, backend=backend, triton_url=triton_url,
        batch_size=batch_size, actors=actors, threads=threads, overwrite=overwrite, fail_on_error=fail_on_error,
        limit=limit, address=address,
    )  # fmt: skip

    class Bar(Listener):
        def planned(self, files) -> None:
            pending = sum(f.rows_in for f in files if not f.skipped and not f.error)
            self.task = progress.add_task("stamping knowledge", total=pending)

        def rows(self, n: int) -> None:
            progress.advance(self.task, n)

        def file(self, result) -> None:
            if result.skipped:
                log.info("%s: skipped (committed before: %s rows)", result.path.name, f"{result.rows_out:,}")
            elif result.error:
                log.error("%s: %s", result.path.name, result.error)
            else:
                log.info("%s: %s rows out, %s refused, fm v%s, adapter v%s", result.path.name,
                         f"{result.rows_out:,}", f"{result.error_rows:,}",
                         ",".join(map(str, result.fm_versions)) or "-",
                         ",".join(map(str, result.adapter_versions)) or "-")  # fmt: skip

    with _progress("rows") as progress:
        summary = run_embed(cfg, Bar())
    table = Table(title=f"gem embed -> {out}")
    for col in ("files", "skipped", "failed", "rows in", "rows out", "error rows", "seconds", "rows/s"):
        table.add_column(col, justify="right")
    rate = summary.rows_done_now / summary.seconds if summary.seconds else 0.0
    table.add_row(
        str(len(summary.files)), str(sum(f.skipped for f in summary.files)), str(len(summary.failed_files)),
        f"{summary.rows_in:,}", f"{summary.rows_out:,}", f"{summary.error_rows:,}", f"{summary.seconds:.1f}",
        f"{rate:,.0f}",
    )  # fmt: skip
    Console().print(table)
    if summary.failed_files:
        raise DataError("; ".join(f"{f.path.name}: {f.error}" for f in summary.failed_files))
    if summary.error_rows and fail_on_error:
        raise DataError(f"{summary.error_rows:,} rows refused (--fail-on-error); reasons in {out / '_errors'}")


# -- the side trainer -----------------------------------------------------------------

DEFAULT_STREAM = ARTIFACTS / "stream"
DEFAULT_TRAINER_STATE = ARTIFACTS / "trainer"
StateOption = Annotated[
    Path, typer.Option("--state", help="The trainer's own checkpoint and ledger folder.", file_okay=False)
]


@data_app.command("stream")
@friendly_errors
def data_stream(
    out: Annotated[Path, typer.Option(help="Folder the shards arrive in (what `gem trainer run --stream` reads).")] = (
        DEFAULT_STREAM
    ),
    shards: Annotated[int, typer.Option(help="Shards to write, one every --every-s seconds.", min=1)] = 10,
    rows_per_shard: Annotated[int, typer.Option(help="Rows per shard.", min=1)] = 20_000,
    every_s: Annotated[float, typer.Option(help="Seconds between two shards.", min=0.0)] = 30.0,
    drift: Annotated[
        float, typer.Option(help="0 = stationary; 1 = preferences move fully from the first shard to the last.")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Same seed, same stream.")] = 0,
    start: Annotated[int, typer.Option(help="First shard index to write (resume a stream).", min=0)] = 0,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Play a stream of logged examples: write synthetic shards into a folder over time,
    each renamed into place when complete (a trainer never sees half a shard)."""
    from trainer.stream import StreamConfig, play_stream

    cfg = StreamConfig(
        out=out, shards=shards, rows_per_shard=rows_per_shard, every_s=every_s, drift=drift, seed=seed, start=start
    )
    play_stream(cfg, load_schema(schema), on_shard=lambda p: log.info("wrote %s", p))


@trainer_app.command("run")
@friendly_errors
def trainer_run(
    stream: Annotated[Path, typer.Option(help="Folder where Parquet shards arrive (taken in name order).")] = (
        DEFAULT_STREAM
    ),
    repo: RepoOption = DEFAULT_REPO,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="FM to start from when --state has no checkpoint yet (default: a fresh --preset model)."),
    ] = None,
    state: StateOption = DEFAULT_TRAINER_STATE,
    preset: PresetOption = "small",
    procs: Annotated[
        int, typer.Option(help="Training processes on this machine (torch.distributed; ignored under torchrun).")
    ] = 1,
    strategy: Annotated[
        str, typer.Option(help="ddp (default; CPU gloo or GPU NCCL), fsdp2 or hsdp (GPUs: FSDP2 on the dense part).")
    ] = "ddp",
    triton_url: Annotated[
        str | None, typer.Option(help="gRPC address of the Triton to load new versions into (default: publish only).")
    ] = None,
    keep: Annotated[int, typer.Option(help="Versions kept per model in the repository.")] = 3,
    tolerance: Annotated[
        float, typer.Option(help="Gate: refuse when a task's NE is worse than the served version's by more (relative).")
    ] = 0.01,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (/metrics); default: none.")
    ] = None,
    poll_s: Annotated[float, typer.Option(help="Seconds between looks at the stream folder when idle.")] = 5.0,
    max_cycles: Annotated[int | None, typer.Option(help="Stop after this many FM cycles (default: forever).")] = None,
    exit_when_idle: Annotated[
        bool, typer.Option(help="Stop once no cycle can run (fewer than two unprocessed shards).")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Examples per step on each process.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the shuffling (and of a fresh model).")] = 0,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Train the FM continuously on shards arriving in --stream: each cycle trains on the
    oldest new shard, validates on the next (NE and AUC per task), gates against the served
    version, refreshes the Student Adapter, publishes new versions atomically and loads them
    into Triton. Exactly once: killed at any point, it resumes without skipping or
    repeating a shard."""
    from trainer.service import TrainerConfig, run

    cfg = TrainerConfig(
        stream=stream, repository=repo, state_dir=state, checkpoint=checkpoint, preset=preset, schema_path=schema,
        procs=procs, strategy=strategy, triton_url=triton_url, keep=keep, tolerance=tolerance,
        metrics_port=metrics_port, poll_s=poll_s, max_cycles=max_cycles, exit_when_idle=exit_when_idle,
        batch_size=batch_size, seed=seed,
    )  # fmt: skip
    log.info("side trainer: stream %s -> %s (%d process(es), %s)", stream, repo, procs, strategy)
    run(cfg)


@trainer_app.command("status")
@friendly_errors
def trainer_status(state: StateOption = DEFAULT_TRAINER_STATE, repo: RepoOption = DEFAULT_REPO) -> None:
    """What the trainer has done: cycles, trained/refused/quarantined shards, last gate and
    publish, and the versions in the repository."""
    from trainer.service import status

    if not (state / "ledger.jsonl").exists():
        raise FileNotFoundError(f"no trainer ledger in {state}; start one with `gem trainer run`")
    s = status(state, repo)
    table = Table(title=f"side trainer {state}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("cycles", str(s["cycles"]))
    table.add_row("shards trained / refused", f"{s['trained']} / {s['refused']}")
    table.add_row("quarantined", ", ".join(s["quarantined"]) or "-")
    if s["last_shard"]:
        last = s["last_shard"]
        table.add_row("last shard", f"{last['shard']} ({last['state']}): {last.get('reason', '')}")
    if s["last_publish"]:
        pub = s["last_publish"]
        table.add_row(
            "last publish",
            f"cycle {pub['cycle']}: gem_fm {pub.get('gem_fm')}, student_adapter {pub.get('student_adapter')}"
            + (f", error: {pub['error']}" if pub.get("error") else ""),
        )
    for model, versions in s["versions"].items():
        table.add_row(f"{model} versions", ", ".join(map(str, versions)) or "-")
    Console().print(table)


@trainer_app.command("rollback")
@friendly_errors
def trainer_rollback(
    to: Annotated[int, typer.Option("--to", help="The version to serve again.")],
    repo: RepoOption = DEFAULT_REPO,
    model: Annotated[str, typer.Option(help="gem_fm or student_adapter.")] = "gem_fm",
    triton_url: Annotated[
        str | None, typer.Option(help="gRPC address of a running Triton to reload the model on.")
    ] = None,
) -> None:
    """Serve an older version again: the newer versions are moved to <model>/.rejected/
    (their numbers are not reused), and Triton reloads the model when --triton-url is given."""
    from trainer.service import rollback

    moved = rollback(repo, model, to, triton_url)
    log.info(
        "%s: version %d is the latest%s; moved aside: %s",
        model, to, f" and serving on {triton_url}" if triton_url else "", ", ".join(map(str, moved)) or "nothing",
    )  # fmt: skip


@trainer_app.command("health")
def trainer_health(
    port: Annotated[int, typer.Option(help="The trainer's --metrics-port.")] = 8091,
    host: Annotated[str, typer.Option(help="Where the trainer runs.")] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.", min=0.0)] = 5.0,
) -> None:
    """Ask a running trainer's metrics endpoint once: exit 0 when it answers with the
    trainer's metrics, 1 otherwise (the compose healthcheck of the trainer)."""
    import urllib.error
    import urllib.request

    url = f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            ok = b"gem_trainer_examples_total" in r.read()
        status = "the side trainer answers" if ok else "answers, but not with the trainer's metrics"
    except (urllib.error.URLError, OSError) as e:
        ok, status = False, f"no answer ({e})"
    typer.echo(f"{url}: {status}", err=not ok)
    raise typer.Exit(0 if ok else 1)
