"""The output folder's life cycle: who may write it, what is deleted, and when.

An output folder holds the runs of one job, one committed at a time:

- ``manifest.json``: the committed run (``complete`` or ``aborted``); the list of its files is
  authoritative.
- ``vectors/``, ``usage/``, ``rejects/``: Parquet files named ``part-RUN_ID-*.parquet``, so one
  run's files can never be mistaken for another's, whatever a glob matches.
- ``_temporary/RUN_ID/``: files being written by a live run.
- ``_lease.json``: the live run's lease (run id, host, pid, heartbeat).

Rules, in the order a run applies them (:func:`prepare_output`):

1. **One live run per output.** A run takes the lease before it touches anything and renews it
   every :data:`HEARTBEAT_S`; a second run is refused (exit 2) while the lease is live. A lease
   whose heartbeat is older than :data:`LEASE_TTL_S`, or whose process is gone from this host,
   was left by a dead run and is taken over.
2. **Only embedpipe's files are deleted.** Under the lease, files named ``part-*.parquet`` that
   the committed manifest does not list (left by a crashed or aborted run) and ``_temporary/``
   are removed; any other file in ``vectors/``, ``usage/`` or ``rejects/`` stops the run (exit 2,
   naming it) before anything is deleted or sent. Nothing else in the folder is touched.
3. **The previous run stays readable until the new one commits.** With ``--overwrite`` the
   committed manifest and its files are left alone while the new run works; a run that fails
   before its commit (a bad key at the preflight, a crash) leaves them as they were. Once the new
   manifest is in place, the previous run's files are deleted (:func:`retire_previous`).

On a local disk the lease is created exclusively (``O_EXCL``); object stores have no
create-if-absent in fsspec, so there the lease is written and read back, which closes the
window to two runs starting within the same second.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec

from transforms.errors import ConfigError
from transforms.manifest import STATUS_COMPLETE, read_manifest, utc_now

log = logging.getLogger("embedpipe")

LEASE_NAME = "_lease.json"
TEMPORARY = "_temporary"
KINDS = ("vectors", "usage", "rejects")
#: Seconds between two renewals of a live run's lease.
HEARTBEAT_S = 30.0
#: A lease not renewed for this long belongs to a dead run.
LEASE_TTL_S = 300.0


def is_embedpipe_file(name: str) -> bool:
    """Whether a file in a table folder has the name embedpipe gives its shards."""
    return name.startswith("part-") and name.endswith(".parquet")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class OutputLease:
    """This run's hold on an output folder; a context manager that renews and releases it."""

    url: str
    storage_options: dict[str, Any]
    run_id: str
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self._path = f"{root.rstrip('/')}/{LEASE_NAME}"

    def _record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat": time.time(), "heartbeat_at": utc_now()}

    def acquire(self) -> None:
        """Take the lease, or raise :class:`ConfigError` naming the live run that holds it."""
        self._fs.makedirs(self._path.rsplit("/", 1)[0], exist_ok=True)
        for _ in range(2):
            if self._create():
                break
            holder = self._read()
            if holder is not None and self._is_live(holder):
                age = time.time() - float(holder.get("heartbeat", 0))
                raise ConfigError(
                    f"{self.url} is being written by run {holder.get('run_id')} (host "
                    f"{holder.get('host')}, pid {holder.get('pid')}, lease renewed {age:.0f} s "
                    f"ago); wait for it to finish or write to another path. If that run is "
                    f"dead, its lease expires {LEASE_TTL_S:.0f} s after its last renewal, or "
                    f"delete {self._path}",
                    key="output.path",
                )
            log.info("embedpipe: taking over the lease of run %s on %s, which is no longer "
                     "alive", (holder or {}).get("run_id"), self.url)
            self._fs.rm(self._path)
        else:
            raise ConfigError(f"could not take the lease {self._path}: another run took it "
                              "at the same time; try again", key="output.path")
        self._thread = threading.Thread(target=self._renew, name="embedpipe-lease", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        """Create the lease file if there is none; False if one exists."""
        data = json.dumps(self._record()).encode()
        try:
            with self._fs.open(self._path, "xb") as handle:
                handle.write(data)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):
            # No exclusive create on this store: write, then read back to see who won.
            if self._fs.exists(self._path):
                return False
            self._fs.pipe_file(self._path, data)
            holder = self._read()
            return holder is not None and holder.get("run_id") == self.run_id
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._fs.cat_file(self._path))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as stale
            return {}

    @staticmethod
    def _is_live(holder: dict[str, Any]) -> bool:
        age = time.time() - float(holder.get("heartbeat", 0) or 0)
        if age > LEASE_TTL_S:
            return False
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return _pid_alive(holder["pid"])
        return True

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._fs.pipe_file(self._path, json.dumps(self._record()).encode())
            except Exception:  # a missed renewal is retried; the run goes on
                log.warning("embedpipe: could not renew the lease %s", self._path, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = self._read()
            if holder is not None and holder.get("run_id") == self.run_id:
                self._fs.rm(self._path)
        except Exception:  # a dead store: the run's own error says so
            log.warning("embedpipe: could not release the lease %s; it expires %.0f s after "
                        "its last renewal", self._path, LEASE_TTL_S, exc_info=True)

    def __enter__(self) -> OutputLease:  # noqa: PYI034 - Self needs 3.11; we support 3.10
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class PreviousRun:
    """What the folder held when this run started: the committed run, if any."""

    manifest: dict[str, Any] | None

    @property
    def files(self) -> frozenset[str]:
        return frozenset(f["path"] for f in (self.manifest or {}).get("files", []))

    @property
    def complete(self) -> bool:
        return (self.manifest or {}).get("status") == STATUS_COMPLETE


def prepare_output(url: str, storage_options: dict[str, Any], overwrite: bool) -> PreviousRun:
    """Check the folder and clear what dead runs left; call it holding the lease.

    Raises :class:`ConfigError` (exit 2) for a complete run without ``overwrite``, and for any
    file in a table folder that embedpipe did not write, before deleting anything.
    """
    manifest = read_manifest(url, storage_options)
    previous = PreviousRun(manifest)
    if manifest is not None and previous.complete and not overwrite:
        raise ConfigError(
            f"{url} already holds a complete run ({manifest.get('run_id')}); pass --overwrite "
            "to replace it or choose a new path",
            key="output.path",
        )
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    root = root.rstrip("/")
    kept = {_strip(fs, p) for p in previous.files}
    leftovers: list[str] = []
    for kind in KINDS:
        folder = f"{root}/{kind}"
        if not fs.exists(folder):
            continue
        for path in sorted(fs.find(folder, withdirs=True)):
            if path.rstrip("/") == folder:
                continue
            name = path.rsplit("/", 1)[-1]
            if fs.isdir(path) or not is_embedpipe_file(name):
                raise ConfigError(
                    f"{path} was not written by embedpipe; embedpipe deletes only its own files "
                    f"(part-*.parquet) in {kind}/. Move it away, or choose another output path",
                    key="output.path",
                )
            if _strip(fs, path) not in kept:
                leftovers.append(path)
    if leftovers:
        log.info("embedpipe: removing %d files left in %s by runs that did not commit",
                 len(leftovers), url)
        fs.rm(leftovers)
    if fs.exists(f"{root}/{TEMPORARY}"):
        fs.rm(f"{root}/{TEMPORARY}", recursive=True)
    return previous


def retire_previous(url: str, storage_options: dict[str, Any], previous: PreviousRun) -> None:
    """After this run's manifest is in place: delete the files of the run it replaced."""
    if not previous.files:
        return
    manifest = read_manifest(url, storage_options) or {}
    fs, _ = fsspec.core.url_to_fs(url, **storage_options)
    listed = {_strip(fs, f["path"]) for f in manifest.get("files", [])}
    retired = [p for p in previous.files
               if _strip(fs, p) not in listed and is_embedpipe_file(p.rsplit("/", 1)[-1])]
    present = [p for p in retired if fs.exists(p)]
    if present:
        fs.rm(present)
        log.info("embedpipe: retired %d files of the previous run %s",
                 len(present), (previous.manifest or {}).get("run_id"))


def _strip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs._strip_protocol(path).rstrip("/")  # fsspec's own normal form
