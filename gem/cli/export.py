"""`gem export`, `gem tensorrt-script` and `gem triton`: the model repository and the
local Triton that serves it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from export.contract import CONTAINER_REPOSITORY, LOADED_VERSIONS
from gem.cli.common import (
    DEFAULT_CHECKPOINT,
    DEFAULT_DATA,
    DEFAULT_REPO,
    TRITON_WORK_DIR,
    BarProgress,
    RepoOption,
    SchemaOption,
    console,
    friendly_errors,
    log,
    progress,
    stdout,
)
from model.schema import DEFAULT_SCHEMA_PATH, load_schema

# Options `gem export` and `gem trainer run` share: both publish through export.publish.
KeepOption = Annotated[int, typer.Option(help="Versions to keep per model; older ones are deleted.")]
LoadedOption = Annotated[
    int,
    typer.Option(
        help="FM versions Triton keeps loaded (callers may pin any of them); never pruned, whatever --keep says."
    ),
]
LoadOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="HOST:PORT",
        help="gRPC address of a running Triton to load the new versions into; repeat it for every Triton.",
    ),
]

triton_app = typer.Typer(
    help="The local Triton server (the nvidia-pytriton wheel's tritonserver).", no_args_is_help=True
)


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
    triton_urls: list[str] | None = None,
    fp16: bool = False,
    loaded_versions: int = LOADED_VERSIONS,
):
    from export.publish import PublishPolicy, publish
    from export.repository import ModelRepository
    from export.rollout import triton_servers
    from export.tensorrt import build_plan, serving_profile
    from export.triton_config import ServingConfig
    from model.checkpoint import load_checkpoint

    if loaded_versions < 1:
        raise ValueError(f"--loaded-versions must be at least 1, got {loaded_versions}")
    ckpt = load_checkpoint(checkpoint)
    repository = ModelRepository(repo, ServingConfig(loaded_versions=loaded_versions))
    servers = triton_servers(triton_urls or [])
    with progress("stages") as bar:
        report = publish(
            ckpt, repository, PublishPolicy(data=data, keep_versions=keep, fp16=fp16), servers, BarProgress(bar)
        )
    if tensorrt:
        assert report.fm is not None  # this policy publishes the FM
        with console.status("building the TensorRT plan"):
            build_plan(report.fm.path, serving_profile(ckpt.schema, repository.serving.max_batch_size), fp16)
    if servers:
        _report_rollouts(report, list(servers))
    return report


def _report_rollouts(report, urls: list[str]) -> None:
    """Logs what each Triton serves now; raises when a version was refused, or when no
    Triton could be reached (one that was down loads the versions when it starts again)."""
    from serving.backends.errors import BackendError

    if report.rollout_error:
        raise BackendError(f"could not reach Triton at {', '.join(urls)}: {report.rollout_error}")
    for r in report.rollouts:
        if r.reason:
            raise BackendError(f"Triton refused {r.model} version {r.version}: {r.reason}")
        missed = dict(r.missed)
        if not r.loaded:
            raise BackendError(f"could not reach Triton at {', '.join(urls)}: {'; '.join(missed.values())}")
        for url in urls:
            if url in missed:
                log.warning("Triton at %s was not reached (%s); it loads %s version %d when it starts again",
                            url, missed[url], r.model, r.version)  # fmt: skip
            else:
                log.info("Triton at %s serves %s version %d", url, r.model, r.version)
        if len(urls) > 1:
            log.info("%s version %d: the Tritons switched within %.2fs", r.model, r.version, r.window_s)


@friendly_errors
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint folder (from `gem train`).")] = DEFAULT_CHECKPOINT,
    repo: RepoOption = DEFAULT_REPO,
    data: Annotated[
        Path | None, typer.Option(help="Logged rows for the parity check (its last file); default: the synthetic set.")
    ] = None,
    keep: KeepOption = 3,
    tensorrt: Annotated[
        bool, typer.Option(help="Also build a TensorRT plan for the new FM version (needs trtexec and a GPU).")
    ] = False,
    load: LoadOption = None,
    loaded_versions: LoadedOption = LOADED_VERSIONS,
    fp16: Annotated[
        bool,
        typer.Option(help="Also publish a half-precision FM graph (model.fp16.onnx); with --tensorrt, an FP16 plan."),
    ] = False,
) -> None:
    """Export a checkpoint to ONNX (parity-checked against PyTorch) and publish it as new
    versions of gem_fm and student_adapter in the Triton model repository."""
    if data is None and any(DEFAULT_DATA.glob("*.parquet")):
        data = DEFAULT_DATA
    report = run_export(checkpoint, repo, data, keep, tensorrt, load, fp16, loaded_versions)
    stdout().print(parity_table(report))


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
    from serving.local.triton import TritonConfig

    return TritonConfig(
        repository=repo, work_dir=TRITON_WORK_DIR, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port
    )


PortOption = Annotated[int, typer.Option()]


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

    from serving.local.triton import TritonServer

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
            server.wait()
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
    from serving.local.state import read_state
    from serving.local.triton import stop_detached

    owner = (read_state(work_dir) or {}).get("owner")
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

    from serving.backends.triton_client import TritonClient
    from serving.local.triton import TritonError, detached_config

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
    stdout().print(table)
