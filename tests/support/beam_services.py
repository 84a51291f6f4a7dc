"""Beam's portable services as subprocesses of a test: job servers and SDK worker pools.

``tests/test_runners.py`` runs the pipeline on the PortableRunner against a separate job-server
process and an EXTERNAL worker pool, the stand-ins for Flink's and Spark's portable job servers.
Each is a :class:`Service`: its own process group (so the SDK workers it spawns are stopped with
it), its output in a log file, its port read from that file. The generators yield once the
service listens and stop it when closed, so a module-scoped fixture is ``yield from`` them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "JOB_SERVER_HONOURING_NUM_WORKERS",
    "STARTUP_TIMEOUT_S",
    "Service",
    "WorkerPool",
    "env_without",
    "start_job_server",
    "start_worker_pool",
]

VENV_BIN = str(Path(sys.executable).parent)
STARTUP_TIMEOUT_S = 60.0


def env_without(name: str) -> dict[str, str]:
    """This process's environment without the variable ``name``, this venv's ``bin`` first on
    ``PATH`` (worker pools start SDK workers as ``python -c ...`` from ``PATH``)."""
    env = {k: v for k, v in os.environ.items() if k != name}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    return env


class Service:
    """A subprocess we start, in its own process group (so the SDK workers it spawns are ours
    too), with its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as handle:
            self.proc = subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def _died(self, what: str) -> RuntimeError:
        return RuntimeError(f"{what} (exit code {self.proc.poll()}); log:\n"
                            f"{self.log.read_text(errors='replace')}")

    def wait_for(self, pattern: str, path: Path | None = None) -> re.Match[str]:
        """Until the file at ``path`` (default: the log; or a port file) matches ``pattern``."""
        path = path or self.log
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(pattern, path.read_text() if path.exists() else "", re.MULTILINE)
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise self._died(f"no {pattern!r} in {path.name}")

    def wait_for_port(self, port: int) -> None:
        """Until 127.0.0.1:port accepts connections."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise self._died(f"127.0.0.1:{port} does not accept connections")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to the process group we started (only that group)."""
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        # SDK worker processes the pool started may outlive it: they are in the group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


# Beam's Python job server (local_job_service) runs every job on a FnApiRunner through
# ``run_via_runner_api``, which never reads ``--direct_num_workers`` or ``--sdk_worker_parallelism``:
# it starts exactly one SDK worker per environment (Beam 2.77, fn_runner.py: ``_num_workers = 1``
# unless ``run_pipeline`` is the entry point). To see an EXTERNAL worker pool serve a job with two
# SDK worker processes, as Flink's task slots would, the second job server below is the same
# module with that one knob honoured: nothing else in Beam is changed.
JOB_SERVER_HONOURING_NUM_WORKERS = """
import logging, signal, sys
from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.runners.portability import local_job_service, local_job_service_main
from apache_beam.runners.portability.fn_api_runner import fn_runner

class FnApiRunner(fn_runner.FnApiRunner):
    def run_via_runner_api(self, pipeline_proto, options):
        self._num_workers = int(options.view_as(DirectOptions).direct_num_workers or 1)
        return super().run_via_runner_api(pipeline_proto, options)

patched = type(sys)("fn_runner")  # the job service's view of fn_runner, with this FnApiRunner
patched.__dict__.update(vars(fn_runner), FnApiRunner=FnApiRunner)
local_job_service.fn_runner = patched
signal.signal(signal.SIGTERM, lambda *args: sys.exit(0))
logging.basicConfig()
logging.getLogger().setLevel(logging.INFO)
local_job_service_main.run(sys.argv[1:])
"""



@dataclass
class WorkerPool:
    address: str


def start_worker_pool(logs: Path, env: dict[str, str]) -> Iterator[WorkerPool]:
    """An EXTERNAL SDK worker pool process on loopback, with ``env``; its address, then stopped."""
    log = logs / "worker-pool.log"
    pool = Service([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                    "--service_port=0"], env, log)
    try:
        port = int(pool.wait_for(r"worker pool servicer at port: [^:\s]+:(\d+)").group(1))
        pool.wait_for_port(port)
        yield WorkerPool(f"localhost:{port}")
    finally:
        pool.stop()



def start_job_server(logs: Path, argv: list[str], env: dict[str, str]) -> Iterator[str]:
    """A Beam job-server process on loopback, started by ``argv``; yields its endpoint."""
    port_file = logs / "job.port"
    log = logs / "job-server.log"
    job = Service([*argv, "--port=0", f"--port_file={port_file}"], env, log)
    try:
        port = int(job.wait_for(r"^\d+$", port_file).group(0))
        job.wait_for_port(port)
        yield f"localhost:{port}"
    finally:
        job.stop()
