"""`gem trainer`: the side trainer (continuous FM and Student Adapter refreshes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gem.cli.common import (
    DEFAULT_REPO,
    DEFAULT_STREAM,
    DEFAULT_TRAINER_STATE,
    PresetOption,
    RepoOption,
    SchemaOption,
    friendly_errors,
    log,
    stdout,
)
from gem.cli.export import KeepOption, LoadOption
from model.schema import DEFAULT_SCHEMA_PATH

trainer_app = typer.Typer(
    help="The side trainer: continuous FM and Student Adapter refreshes, published to serving.", no_args_is_help=True
)
StateOption = Annotated[
    Path, typer.Option("--state", help="The trainer's own checkpoint and ledger folder.", file_okay=False)
]


@trainer_app.command("run")
@friendly_errors
def trainer_run(
    stream: Annotated[
        str, typer.Option(help="Folder or s3:// URL where Parquet shards arrive (taken in name order).")
    ] = str(DEFAULT_STREAM),
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
    triton_url: LoadOption = None,
    keep: KeepOption = 3,
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
    knowledge_out: Annotated[
        str | None,
        typer.Option(
            help="Write the served versions' knowledge of every shard the gate scores here (a folder or s3:// URL), "
            "as `gem embed` does (from the gate's own pass; a folder of its own).",
        ),
    ] = None,
    schema: SchemaOption = DEFAULT_SCHEMA_PATH,
) -> None:
    """Train the FM continuously on shards arriving in --stream: each cycle trains on the
    oldest new shard, validates on the next (NE and AUC per task), gates against the served
    version, refreshes the Student Adapter, publishes new versions atomically and loads them
    into Triton. Exactly once: killed at any point, it resumes without skipping or
    repeating a shard."""
    from serving.local.triton import use_stored_admin_key
    from trainer.config import TrainerConfig
    from trainer.loop import run

    if triton_url:
        use_stored_admin_key()  # of a `gem up` / `gem triton up` started from another shell
    cfg = TrainerConfig(
        stream=stream, repository=repo, state_dir=state, checkpoint=checkpoint, preset=preset, schema_path=schema,
        procs=procs, strategy=strategy, triton_urls=tuple(triton_url or ()), keep=keep, tolerance=tolerance,
        metrics_port=metrics_port, poll_s=poll_s, max_cycles=max_cycles, exit_when_idle=exit_when_idle,
        batch_size=batch_size, seed=seed, knowledge_out=knowledge_out,
    )  # fmt: skip
    log.info("side trainer: stream %s -> %s (%d process(es), %s)", stream, repo, procs, strategy)
    run(cfg)


@trainer_app.command("status")
@friendly_errors
def trainer_status(state: StateOption = DEFAULT_TRAINER_STATE, repo: RepoOption = DEFAULT_REPO) -> None:
    """What the trainer has done: cycles, trained/refused/quarantined shards, last gate and
    publish, and the versions in the repository."""
    from trainer.status import status

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
    stdout().print(table)


@trainer_app.command("rollback")
@friendly_errors
def trainer_rollback(
    to: Annotated[int, typer.Option("--to", help="The version to serve again.")],
    repo: RepoOption = DEFAULT_REPO,
    model: Annotated[str, typer.Option(help="gem_fm or student_adapter.")] = "gem_fm",
    triton_url: Annotated[
        list[str] | None,
        typer.Option(
            metavar="HOST:PORT",
            help="gRPC address of a running Triton to reload the model on; repeat it for every Triton.",
        ),
    ] = None,
) -> None:
    """Serve an older version again: the newer versions are moved to <model>/.rejected/
    (their numbers are not reused), and every Triton of --triton-url reloads the model."""
    import asyncio

    from export.repository import ModelRepository
    from export.rollout import roll_back, triton_servers
    from serving.local.triton import use_stored_admin_key

    if triton_url:
        use_stored_admin_key()
    servers = triton_servers(triton_url or [])
    moved = asyncio.run(roll_back(ModelRepository(repo), model, to, servers))
    log.info(
        "%s: version %d is the latest%s; moved aside: %s",
        model, to, f" and serving on {', '.join(servers)}" if servers else "", ", ".join(map(str, moved)) or "nothing",
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
