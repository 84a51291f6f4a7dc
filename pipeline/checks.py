"""Storage checks before any request: every location can be reached, and the written ones written.

A run that cannot keep what it pays for must not start, and a run that cannot read its input
must not end in a traceback. So before the output lease, the preflight or any read,
:func:`check_storage` makes sure that

- every location's filesystem package is installed (``s3://`` needs ``s3fs``): fsspec's own
  registry says which package a protocol needs, and this package's metadata which extra brings
  it, so the error says ``pip install 'embedpipe[s3]'`` instead of an ``ImportError`` traceback;
- the output folder and the cache folder can be written: neither is a file (nor under one), and
  a probe file can be created and removed there, which also catches read-only mounts, missing
  permissions and storage options the backend refuses (clashing S3 credentials).

Each failure is a :class:`~transforms.errors.ConfigError` (exit 2) that names the config key,
the location and the reason, with every storage option value removed from the backend's
message. ``embedpipe plan`` runs the package check on its inputs (:func:`check_filesystems`).
"""

from __future__ import annotations

import importlib.metadata
import posixpath
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.registry import known_implementations

from pipeline.config import Config
from transforms.cache import default_cache_root
from transforms.errors import ConfigError, option_strings, redact

__all__ = ["Location", "check_filesystems", "check_storage", "check_writable", "input_locations",
           "install_hint"]

#: Created and removed in each written location to prove it can be written.
PROBE_PREFIX = ".embedpipe-write-check-"


@dataclass(frozen=True)
class Location:
    """A URL the run uses, with the config key that sets it and its storage options."""

    key: str
    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)


def input_locations(cfg: Config) -> list[Location]:
    """Every ``input.path`` pattern, with the input's storage options."""
    return [Location("input.path", url, cfg.input.storage_options) for url in cfg.input.paths]


def written_locations(cfg: Config) -> list[Location]:
    """The output folder, and the cache folder when the cache is on (the cache is written with
    the output's storage options, as :func:`pipeline.graph.cache_spec` does)."""
    out = [Location("output.path", cfg.output.path, cfg.output.storage_options)]
    if cfg.cache.enabled:
        url = cfg.cache.path or default_cache_root(cfg.output.path)
        out.append(Location("cache.path", url, cfg.output.storage_options))
    return out


def check_storage(cfg: Config) -> None:
    """Every check of this module, for a run: packages for all locations, then that nothing
    written is a file, then the write probes (so a refusal creates no folder it can avoid)."""
    written = written_locations(cfg)
    check_filesystems([*input_locations(cfg), *written])
    for location in written:
        check_writable(location, probe=False)
    for location in written:
        check_writable(location)


def check_filesystems(locations: Sequence[Location]) -> None:
    """Raise :class:`ConfigError` for the first location whose filesystem cannot be loaded."""
    for location in locations:
        for protocol in _protocols(location.url):
            try:
                fsspec.get_filesystem_class(protocol)
            except ImportError as exc:
                package = _package_of(protocol)
                raise ConfigError(
                    f"{location.url} needs the {package} package, which cannot be imported "
                    f"({exc}); install it with: {install_hint(package)}",
                    key=location.key,
                ) from None
            except ValueError:
                raise ConfigError(
                    f"{location.url}: fsspec knows no filesystem for {protocol}://; check the "
                    "URL (s3://, gs://, az://, a local path...)",
                    key=location.key,
                ) from None


def _protocols(url: str) -> Iterator[str]:
    """The protocol of each part of a (possibly chained, ``simplecache::s3://``) URL."""
    for part in url.split("::"):
        protocol, _ = fsspec.core.split_protocol(part)
        yield protocol or "file"


def _package_of(protocol: str) -> str:
    """The top-level package that implements ``protocol``, from fsspec's registry."""
    entry = known_implementations.get(protocol, {})
    return str(entry.get("class", protocol)).split(".", 1)[0]


def install_hint(package: str) -> str:
    """``pip install 'embedpipe[EXTRA]'`` for the extra that requires ``package``, else
    ``pip install PACKAGE``. The extras come from this package's metadata (pyproject.toml), so
    the hint cannot drift from them; the ``test`` extra is never suggested."""
    try:
        requirements = importlib.metadata.requires("embedpipe") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        name, _, marker = requirement.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if (extra and extra.group(1) != "test"
                and re.match(rf"{re.escape(package)}(?![\w.-])", name.strip(), re.IGNORECASE)):
            return f"pip install 'embedpipe[{extra.group(1)}]'"
    return f"pip install {package}"


def check_writable(location: Location, *, probe: bool = True) -> None:
    """Raise :class:`ConfigError` unless ``location`` is a folder this run can write.

    With ``probe``, the folder is created if missing (the run would create it anyway), and a
    probe file is written and removed in it: nothing is left behind. Without, only what can be
    seen without writing: the location, or a folder above it, is a file.
    """
    url = location.url
    try:
        fs, root = fsspec.core.url_to_fs(url, **location.storage_options)
        root = root.rstrip("/") or root
        if fs.isfile(root):
            raise _Unwritable("it is a file, not a folder; give a folder (the file is left as "
                              "it is)")
        blocker = None if probe else _file_above(fs, root)
        if blocker is not None:
            shown = str(fs.unstrip_protocol(blocker)) if "://" in url else blocker
            raise _Unwritable(f"{shown} is a file, so no folder can be made under it")
        if probe:
            fs.makedirs(root, exist_ok=True)
            probe_path = f"{root}/{PROBE_PREFIX}{uuid.uuid4().hex}"
            fs.pipe_file(probe_path, b"")
            fs.rm_file(probe_path)
    except _Unwritable as exc:
        raise ConfigError(f"cannot write to {url}: {exc}", key=location.key) from None
    except Exception as exc:  # noqa: BLE001 - any backend failure means results cannot be kept
        reason = _describe(exc, location.storage_options)
        raise ConfigError(
            f"cannot write to {url}: {reason}; choose a location this run can write, or fix "
            "its storage options",
            key=location.key,
        ) from None


class _Unwritable(Exception):
    """A reason, already worded, why a location cannot be written."""


def _file_above(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The nearest existing ancestor of ``path``, if it is a file (then no folder can be made
    there); None once an existing folder is reached."""
    parent = posixpath.dirname(path)
    while parent and parent != path:
        if fs.exists(parent):
            return parent if fs.isfile(parent) else None
        path, parent = parent, posixpath.dirname(parent)
    return None


def _describe(exc: BaseException, storage_options: Mapping[str, Any]) -> str:
    """The backend's reason without any storage option value (they may hold credentials)."""
    if isinstance(exc, OSError) and exc.strerror:
        message = exc.strerror  # "Read-only file system", "Permission denied"
    else:
        message = f"{type(exc).__name__}: {exc}"
    return redact(message, *(s for s in option_strings(storage_options) if len(s) >= 4))


