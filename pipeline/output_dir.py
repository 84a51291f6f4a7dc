"""The output folder's life cycle: who may write it, what is deleted, and when.

An output folder holds the runs of one job, one committed at a time:

- ``manifest.json``: the committed run (``complete`` or ``aborted``); the list of its files is
  authoritative. Written once, when the run commits; a live run never touches the one before.
- ``vectors/``, ``usage/``, ``rejects/``: Parquet files named ``part-RUN_ID-*.parquet``
  (:func:`transforms.manifest.run_of_file`), so one run's files can never be mistaken for
  another's, whatever a glob matches.
- ``aborted-RUN_ID.json``: the manifest of a run that aborted while a complete run was in place.
- ``_temporary/RUN_ID/``: files being written by a live run.
- ``_lease.json``: the live run's lease (run id, host, pid, heartbeat).

Rules, in the order a run applies them (:class:`OutputLease`, :func:`prepare_output`):

1. **One live run per output.** A run takes the lease before it touches anything and renews it
   every :data:`HEARTBEAT_S`; a second run is refused (exit 2, naming the holder) while the
   lease is live. A lease whose heartbeat is older than :data:`LEASE_TTL_S`, or whose process is
   gone from this host, was left by a dead run and is taken over. A renewal never overwrites a
   lease that names another run, and the commit step checks, last, that the lease still names
   its run (:func:`transforms.manifest.check_lease`): a run that stalled past its expiry and
   was taken over does not commit (exit 4).
2. **Only embedpipe's files are deleted.** Under the lease, files with embedpipe's per-run names
   that the committed manifest does not list (left by a crashed, killed or aborted run), the
   temporary files embedpipe names, and ``_temporary/`` are removed. Any other file or folder in
   ``vectors/``, ``usage/`` or ``rejects/`` stops the run (exit 2, naming it) before anything
   is deleted or sent. Nothing else in the folder is touched.
3. **The previous run stays readable until the new one commits.** The committed manifest and
   its files are left alone while the new run works; a run that fails before its commit (a bad
   key at the preflight, a crash) leaves them as they were. Once the new manifest is in place,
   the previous run's files are deleted (:func:`retire_previous`).

How exclusive the lease is: on a local disk it is created with ``O_EXCL``. On S3 (s3fs) it is
created with a conditional write (``If-None-Match: *``), which AWS S3 and most compatible stores
honour; as some do not, and other fsspec stores have no create-if-absent, the lease is read back
:data:`SETTLE_S` after it is written there, so two runs that write it within that time see the
same winner. A stale lease's takeover is confirmed the same way on every store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

from transforms.errors import ConfigError
from transforms.manifest import (
    LEASE_NAME,
    MANIFEST_NAME,
    RUN_ID_PATTERN,
    STATUS_COMPLETE,
    TABLE_KINDS,
    TEMPORARY,
    read_lease,
    read_manifest,
    run_of_file,
    run_of_temporary,
    utc_now,
)

log = logging.getLogger("embedpipe")

KINDS = TABLE_KINDS
#: Seconds between two renewals of a live run's lease.
HEARTBEAT_S = 30.0
#: A lease not renewed for this long belongs to a dead run.
LEASE_TTL_S = 300.0
#: Where a store may let two writers both create the lease, the wait before reading it back.
SETTLE_S = 1.0

# File names of embedpipe versions before per-run names; deleted only in a folder that holds
# an embedpipe manifest (those versions wrote a ``partial`` one when a run started).
_LEGACY_FILE = re.compile(rf"part-(?:[0-9a-f]{{20}}|empty|preflight|duplicates-{RUN_ID_PATTERN})"
                          r"\.parquet")
# What write_json_atomically and the lease leave at the top of the folder when killed mid-write.
_TOP_TEMPORARY = re.compile(
    rf"\.(?:{re.escape(MANIFEST_NAME)}|aborted-{RUN_ID_PATTERN}\.json|{re.escape(LEASE_NAME)}"
    r"\.[0-9a-f]+)\.tmp")


def is_embedpipe_file(name: str) -> bool:
    """Whether a file in a table folder has a name only embedpipe gives: ``part-RUN_ID-*``."""
    return run_of_file(name) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"file", "local"} & set(protocols))


@dataclass
class OutputLease:
    """This run's hold on an output folder; a context manager that renews and releases it."""

    url: str
    storage_options: dict[str, Any]
    run_id: str
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    #: Why this run lost the lease (another run took it over), or None while it holds it.
    lost: str | None = None

    def __post_init__(self) -> None:
        self._fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self._root = root.rstrip("/")
        self._path = f"{self._root}/{LEASE_NAME}"
        self._local = _is_local(self._fs)

    def _record(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "heartbeat": time.time(),
                           "heartbeat_at": utc_now()}).encode()

    def acquire(self) -> None:
        """Take the lease, or raise :class:`ConfigError` naming the live run that holds it."""
        self._fs.makedirs(self._root, exist_ok=True)
        took_over = False
        for _ in range(3):
            if self._create(confirm=took_over):
                break
            holder = read_lease(self._fs, self._root)
            if holder is None:
                continue  # released between our two looks: try again
            if self._is_live(holder):
                raise ConfigError(self._held_by(holder), key="output.path")
            log.warning("embedpipe: taking over the lease of run %s on %s: that run is no "
                        "longer alive", holder.get("run_id", "(unreadable lease)"), self.url)
            self._fs.rm_file(self._path)
            took_over = True
        else:
            raise ConfigError(f"could not take the lease {self._path}: other runs took it at "
                              "the same time; try again", key="output.path")
        self._thread = threading.Thread(target=self._renew, name="embedpipe-lease", daemon=True)
        self._thread.start()

    def _held_by(self, holder: dict[str, Any]) -> str:
        if not holder:
            return (f"{self._path} exists but is not a lease embedpipe can read, and it was "
                    f"modified less than {LEASE_TTL_S:.0f} s ago; if no run is writing "
                    f"{self.url}, delete it")
        heartbeat = holder.get("heartbeat")
        age = (f"{time.time() - heartbeat:.0f} s ago"
               if isinstance(heartbeat, (int, float)) else "recently")
        return (f"{self.url} is being written by run {holder.get('run_id')} (host "
                f"{holder.get('host')}, pid {holder.get('pid')}, lease renewed {age}); wait for it to finish or write to another path. If that run is dead, "
                f"its lease expires {LEASE_TTL_S:.0f} s after its last renewal, or delete "
                f"{self._path}")

    def _create(self, *, confirm: bool) -> bool:
        """Create the lease file if there is none; False if another run's is there."""
        data = self._record()
        try:
            with self._fs.open(self._path, "xb") as handle:
                handle.write(data)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):
            # No exclusive create on this store: look, write, and read back after a while.
            self._fs.invalidate_cache(self._path)
            if self._fs.exists(self._path):
                return False
            self._fs.pipe_file(self._path, data)
            confirm = True
        if confirm or not self._local:
            # A store that ignored the condition, or a takeover another run made at the same
            # time, shows here: the last writer's lease is the one read back.
            time.sleep(SETTLE_S)
        holder = read_lease(self._fs, self._root)
        return holder is not None and holder.get("run_id") == self.run_id

    def _is_live(self, holder: dict[str, Any]) -> bool:
        heartbeat = holder.get("heartbeat")
        if not isinstance(heartbeat, (int, float)):
            try:  # torn or foreign: as old as the file
                heartbeat = self._fs.modified(self._path).timestamp()
            except (FileNotFoundError, NotImplementedError, OSError):
                return True  # cannot tell: never take over a lease that may be live
        if time.time() - float(heartbeat) > LEASE_TTL_S:
            return False
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return _pid_alive(holder["pid"])
        return True

    def renew(self) -> bool:
        """Renew the lease if it still names this run; False (and :attr:`lost` set) if not."""
        holder = read_lease(self._fs, self._root)
        if holder is None or holder.get("run_id") != self.run_id:
            self.lost = (f"the lease {self._path} now names "
                         f"{'no run' if holder is None else holder.get('run_id')}")
            log.error("embedpipe: run %s lost the lease of %s (%s): another run took the "
                      "output over; this run will not commit", self.run_id, self.url, self.lost)
            return False
        data = self._record()
        if self._local:  # atomically, so a run that looks at it never reads half a lease
            tmp = f"{self._root}/.{LEASE_NAME}.{uuid.uuid4().hex[:8]}.tmp"
            self._fs.pipe_file(tmp, data)
            self._fs.mv(tmp, self._path)
        else:  # an object store's PUT replaces the object whole
            self._fs.pipe_file(self._path, data)
        return True

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.renew():
                    return
            except Exception:  # a missed renewal is retried; the run goes on
                log.warning("embedpipe: could not renew the lease %s", self._path, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = read_lease(self._fs, self._root)
            if holder is not None and holder.get("run_id") == self.run_id:
                self._fs.rm_file(self._path)
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
    file or folder in a table folder that embedpipe did not write, before deleting anything.
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
    fs.invalidate_cache()  # listings cached in this process may predate other runs' writes
    root = root.rstrip("/")
    kept = {_strip(fs, p) for p in previous.files}
    leftovers: list[str] = []
    for kind in KINDS:
        folder = f"{root}/{kind}"
        if not fs.exists(folder):
            continue
        for path in sorted(fs.find(folder, withdirs=True)):
            if _strip(fs, path) == _strip(fs, folder) or _strip(fs, path) in kept:
                continue
            name = path.rstrip("/").rsplit("/", 1)[-1]
            ours = (run_of_file(name) or run_of_temporary(name)
                    or (manifest is not None and _LEGACY_FILE.fullmatch(name)))
            if fs.isdir(path) or not ours:
                raise ConfigError(
                    f"{path} was not written by embedpipe; embedpipe deletes only its own "
                    f"files (part-RUN_ID-*.parquet) in {kind}/, so it will not write beside "
                    "another's. Move it away, or choose another output path",
                    key="output.path",
                )
            leftovers.append(path)
    try:
        top = fs.ls(root, detail=False)
    except FileNotFoundError:  # an object store's empty prefix
        top = []
    leftovers += [p for p in top if _TOP_TEMPORARY.fullmatch(p.rstrip("/").rsplit("/", 1)[-1])]
    if leftovers:
        log.info("embedpipe: removing %d files left in %s by runs that did not commit",
                 len(leftovers), url)
        fs.rm(leftovers)
    if fs.exists(f"{root}/{TEMPORARY}"):
        fs.rm(f"{root}/{TEMPORARY}", recursive=True)
    return previous


def retire_previous(url: str, storage_options: dict[str, Any], previous: PreviousRun) -> None:
    """After this run's manifest is in place: delete the files of the run it replaced.

    Those the previous manifest lists, and only in the table folders: a manifest is embedpipe's,
    so the files it lists are too.
    """
    if not previous.files:
        return
    manifest = read_manifest(url, storage_options) or {}
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    fs.invalidate_cache()
    tables = tuple(f"{_strip(fs, root)}/{kind}/" for kind in KINDS)
    listed = {_strip(fs, f["path"]) for f in manifest.get("files", [])}
    retired = [p for p in previous.files
               if _strip(fs, p) not in listed and _strip(fs, p).startswith(tables)]
    present = [p for p in retired if fs.exists(p)]
    if present:
        fs.rm(present)
        log.info("embedpipe: retired %d files of the previous run %s",
                 len(present), (previous.manifest or {}).get("run_id"))


def _strip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return str(fs._strip_protocol(path)).rstrip("/")  # fsspec's own normal form
