"""Listing for the read stage: the files an ``input.path`` entry names, and every path it
matched that is not one, as a reject.

Split from :mod:`transforms.read_formats` (the readers) so that each module reads in one sitting.
"""

from __future__ import annotations

import itertools
import posixpath
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from fsspec.core import has_magic, url_to_fs
from fsspec.spec import AbstractFileSystem

from transforms.errors import InputError
from transforms.read_formats import (
    _CODEC_BY_SUFFIX,
    _FORMAT_BY_EXTENSION,
    _STREAMED_FORMATS,
    UNKNOWN_FORMAT,
    _describe,
    _file_reject,
)
from transforms.types import UNREADABLE_FILE, Reject, SourceFile

# --- Listing -----------------------------------------------------------------------------------


def expand_pattern(
    pattern: str, storage_options: Mapping[str, Any], fmt: str
) -> list[SourceFile | Reject]:
    """The files one ``input.path`` entry names, sorted by URL so that every run sees one order.

    A glob (``*``, ``?``, ``[``) names the files it matches, a directory every file below it at
    any depth, anything else the one file. Directories, and the empty "folder" objects that
    object stores keep, are not files. ``fmt`` is ``input.format``: with ``auto`` each file's
    format comes from its extension once a compression suffix is removed, and a file it cannot
    place gets :data:`UNKNOWN_FORMAT`.

    Every path the listing meets is accounted for: a symlink to a file is that file (under the
    link's URL); a dangling symlink, a symlink to a folder (not followed: links can loop), a
    FIFO, socket or device (never opened: reading a FIFO waits for a writer for ever) and a
    folder that cannot be listed are each an ``unreadable_file`` :class:`Reject` naming the path.

    An empty list means that nothing matched; the caller decides what that means. A listing that
    fails (no such bucket, no permission, unknown protocol) raises :class:`InputError`.

    Example::

        expand_pattern("s3://corpus/2024/**/*.jsonl.gz", {"anon": True}, "auto")
    """
    try:
        fs, path = url_to_fs(pattern, **storage_options)
        unlisted: list[Reject] = []
        root, entries = _list(fs, path, unlisted)
        found: list[SourceFile | Reject] = list(unlisted)
        for entry in entries:
            entry, problem = _resolve(fs, entry)
            url = fs.unstrip_protocol(entry["name"])
            if problem is not None:
                found.append(_file_reject(url, UNREADABLE_FILE, problem))
            elif _is_file(entry):
                found.append(SourceFile(
                    url=url,
                    root=fs.unstrip_protocol(root),
                    format=fmt if fmt != "auto" else _infer_format(entry["name"]),
                    size=int(entry.get("size") or 0),
                ))
        if not found:
            _check_top_exists(fs, path)
        return sorted(found, key=lambda item: item.url if isinstance(item, SourceFile)
                      else item.source)
    # Backends raise OSError, their client's own errors, ValueError for an unknown protocol or
    # ImportError for a missing package: translate them all, once, here.
    except Exception as exc:
        raise InputError(f"cannot list {pattern}: {_describe(exc, storage_options)}") from exc


def _list(
    fs: AbstractFileSystem, path: str, unlisted: list[Reject]
) -> tuple[str, Iterable[dict[str, Any]]]:
    """The root that text-document ids are relative to, and the entries ``path`` names.

    A folder below ``path`` that cannot be listed is added to ``unlisted`` as a reject. fsspec's
    own walk (local and memory filesystems, among others) leaves such a folder out in silence
    (its ``on_error`` does not reach the folders below the first), so there the folders are
    walked here; other backends list a prefix in one go, which fails as a whole or not at all.
    """
    walked = type(fs).find is AbstractFileSystem.find
    if has_magic(path):
        literal = "/".join(itertools.takewhile(lambda part: not has_magic(part), path.split("/")))
        entries = fs.glob(path, detail=True).values()
        if walked:  # the folders the glob searched: all below its root for "**", else to its depth
            depth = None if "**" in path else path[len(literal):].strip("/").count("/") + 1
            _walk(fs, literal or fs.root_marker, depth, unlisted)
        return literal or fs.root_marker, entries
    try:
        entry = fs.info(path)
    except FileNotFoundError:
        return posixpath.dirname(path), []
    if entry["type"] == "directory":
        if walked:
            return path, _walk(fs, path, None, unlisted)
        return path, fs.find(path, detail=True).values()
    return posixpath.dirname(path), [entry]


def _walk(
    fs: AbstractFileSystem, top: str, depth: int | None, unlisted: list[Reject]
) -> list[dict[str, Any]]:
    """Every entry but the folders below ``top``, to ``depth`` levels; unlistable folders to
    ``unlisted``."""
    entries: list[dict[str, Any]] = []
    folders = [(top.rstrip("/") or fs.root_marker, 1)]
    while folders:
        folder, level = folders.pop()
        try:
            listing = fs.ls(folder, detail=True)
        except FileNotFoundError:  # a glob's root that does not exist: nothing matched
            continue
        except OSError as exc:
            unlisted.append(_file_reject(fs.unstrip_protocol(folder), UNREADABLE_FILE,
                                         f"cannot list this folder: {_describe(exc, {})}"))
            continue
        for info in listing:
            name = info["name"].rstrip("/")
            if info["type"] != "directory":
                entries.append(info)
            elif name != folder and (depth is None or level < depth):
                folders.append((name, level + 1))
    return entries


def _resolve(fs: AbstractFileSystem, entry: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A listed entry as a file or a folder, or why it is neither (a reason for its reject).

    Listings report a symlink, or anything that is not a file or a folder, as ``other``; the
    entry's own ``info`` follows the link to say what it is.
    """
    if entry.get("type") != "other":
        return entry, None
    try:
        target = fs.info(entry["name"])
    except FileNotFoundError:
        return entry, "a symlink whose target does not exist"
    except OSError as exc:
        return entry, _describe(exc, {})
    if target["type"] == "file":
        return {**target, "name": entry["name"]}, None
    if target["type"] == "directory":
        return entry, ("a symlink to a directory, which is not followed (links can loop): "
                       "list its target in input.path")
    kind = _SPECIAL_FILES.get(stat.S_IFMT(int(target.get("mode") or 0)), "special file")
    return entry, f"not a regular file but a {kind}; it is never opened"


_SPECIAL_FILES = {stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
                  stat.S_IFBLK: "block device"}


def _check_top_exists(fs: AbstractFileSystem, path: str) -> None:
    """Raise when the first folder of ``path`` (an object store's bucket) does not exist.

    A pattern that matches nothing in an existing bucket is ``no_files_matched``; one in a bucket
    that does not exist is a listing that failed, whatever the backend returned for it.
    """
    top = path.lstrip("/").split("/", 1)[0]
    if top and not has_magic(top) and not fs.exists(fs.root_marker + top):
        raise FileNotFoundError(f"{fs.unstrip_protocol(fs.root_marker + top)} does not exist "
                                "(no such bucket or folder)")


def _is_file(entry: Mapping[str, Any]) -> bool:
    # Object stores list "folder/" placeholder keys as files; no real file name ends with "/".
    return entry["type"] == "file" and not entry["name"].endswith("/")


def _infer_format(path: str) -> str:
    stem, extension = posixpath.splitext(path.lower())
    compressed = extension in _CODEC_BY_SUFFIX
    if compressed:
        extension = posixpath.splitext(stem)[1]
    fmt = _FORMAT_BY_EXTENSION.get(extension, UNKNOWN_FORMAT)
    return UNKNOWN_FORMAT if compressed and fmt not in _STREAMED_FORMATS else fmt
