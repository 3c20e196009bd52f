"""Keeps the local Triton running under `gem up`.

A watcher thread waits on the server process. When it exits without being asked to,
the supervisor logs it (exit code, the log's error lines), kills what is left of its
process group (python-backend stubs outlive a killed server and may ignore SIGTERM),
removes its stale shared-memory regions, and starts it again with exponential backoff
(1 s, 2 s, ... 30 s; back to 1 s once a server has stayed up for a minute). The front end
needs nothing: its Triton channel reconnects within a second (serving/backends/triton_client.py).
"""

from __future__ import annotations

import logging
import threading
import time

from serving.local.shm import clean_shared_memory
from serving.local.triton import TritonConfig, TritonError, TritonServer, kill_group, log_errors

log = logging.getLogger(__name__)

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_S = 60.0


class SupervisedTriton:
    """A context manager: Triton started and ready on entry, supervised until exit."""

    def __init__(self, cfg: TritonConfig, owner: int | None = None, backoff_s: tuple[float, ...] = BACKOFF_S):
        self.cfg = cfg
        self.owner = owner
        self.backoff_s = backoff_s
        self.server = TritonServer(cfg, owner=owner)
        self.cfg = self.server.cfg  # with its admin key
        self.restarts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def start(self) -> SupervisedTriton:
        self.server.start()
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.startup_timeout_s + 30)
        with self._lock:
            self.server.stop()

    def __enter__(self) -> SupervisedTriton:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _watch(self) -> None:
        attempt, started = 0, time.monotonic()
        while not self._stop.is_set():
            process = self.server.process
            if process is None or process.poll() is None:
                self._stop.wait(0.5)
                continue
            # It exited without being asked to (poll() reaped it: no zombie).
            pid, code = process.pid, process.returncode
            log.warning(
                "Triton (pid %d) exited with code %s; restarting it (log %s)\n%s",
                pid, code, self.cfg.log_file, log_errors(self.cfg, limit=5),
            )  # fmt: skip
            kill_group(pid)
            clean_shared_memory(pid)
            if time.monotonic() - started > STABLE_S:
                attempt = 0
            while not self._stop.is_set():
                delay = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
                attempt += 1
                if self._stop.wait(delay):
                    return
                with self._lock:
                    if self._stop.is_set():
                        return
                    self.server = TritonServer(self.cfg, owner=self.owner)
                    try:
                        self.server.start()
                    except TritonError as e:
                        log.error("Triton restart %d failed: %s", attempt, str(e).splitlines()[0])
                        continue
                self.restarts += 1
                started = time.monotonic()
                log.info("Triton is back (pid %d, restart %d)", self.server.pid, self.restarts)
                break
