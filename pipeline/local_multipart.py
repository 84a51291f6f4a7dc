"""``multipart/form-data`` bodies for the local Files API, on the standard library alone.

OpenAI's ``POST /v1/files`` takes the batch input file as a multipart upload. The project does
not depend on ``python-multipart``, and :mod:`email` alone parses a whole body into
:class:`email.message.Message` objects (slow and memory-hungry for a file of up to 200 MB), so
this module splits the body on its boundary itself and leaves only each part's few header lines
to :mod:`email`. It accepts what httpx, requests and curl send (RFC 7578), and refuses anything
else with a 400 :class:`~pipeline.local_base.ApiError` that says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import HTTP

from pipeline.local_base import ApiError

__all__ = ["FormData", "FormFile", "parse_multipart"]


@dataclass(frozen=True, slots=True)
class FormFile:
    """One uploaded file: its name as the client gave it, its bytes and declared type."""

    filename: str
    content: bytes
    content_type: str = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class FormData:
    """A parsed form: text fields by name and files by field name (the last one wins)."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, FormFile] = field(default_factory=dict)


def _content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """``multipart/form-data; boundary="x"`` -> ``("multipart/form-data", {"boundary": "x"})``."""
    message = Message()
    message["content-type"] = value
    params = {str(key).lower(): str(val) for key, val in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


def parse_multipart(body: bytes, content_type: str) -> FormData:
    """Parse a ``multipart/form-data`` body given its request's ``Content-Type`` header.

    >>> form = parse_multipart(
    ...     b'--b\\r\\nContent-Disposition: form-data; name="purpose"\\r\\n\\r\\nbatch\\r\\n'
    ...     b'--b\\r\\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\\r\\n'
    ...     b'Content-Type: application/jsonl\\r\\n\\r\\n{}\\n\\r\\n--b--\\r\\n',
    ...     'multipart/form-data; boundary=b')
    >>> form.fields, form.files["file"].filename, form.files["file"].content
    ({'purpose': 'batch'}, 'in.jsonl', b'{}\\n')
    """
    kind, params = _content_type_params(content_type)
    if kind != "multipart/form-data":
        raise ApiError(400, f"send the upload as multipart/form-data, not {kind!r}")
    boundary = params.get("boundary", "")
    if not boundary:
        raise ApiError(400, "the multipart Content-Type header has no boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(b"\r\n" + delimiter)
    # The first delimiter has no CRLF before it (unless a preamble precedes it).
    first = chunks[0]
    if first.startswith(delimiter):
        chunks[0] = first[len(delimiter):]
    else:
        chunks = chunks[1:]  # a preamble, which RFC 2046 says to ignore
    if not chunks or not chunks[-1].startswith(b"--"):
        raise ApiError(400, "the multipart body is truncated: its closing boundary is missing")
    form = FormData()
    for chunk in chunks[:-1]:
        _add_part(form, chunk)
    return form


def _add_part(form: FormData, chunk: bytes) -> None:
    """Add one part (the bytes between two delimiters) to ``form``."""
    if not chunk.startswith(b"\r\n"):
        raise ApiError(400, "a multipart boundary is not followed by a line break")
    head, sep, content = chunk[2:].partition(b"\r\n\r\n")
    if not sep:
        raise ApiError(400, "a multipart part has no blank line after its headers")
    headers = BytesHeaderParser(policy=HTTP).parsebytes(head + b"\r\n\r\n")
    disposition = headers.get("content-disposition", "")
    if not disposition:
        raise ApiError(400, "a multipart part has no Content-Disposition header")
    message = Message()
    message["content-disposition"] = str(disposition)
    name = message.get_param("name", header="content-disposition")
    filename = message.get_filename()
    if not isinstance(name, str) or not name:
        raise ApiError(400, "a multipart part has no name in its Content-Disposition header")
    if filename is None:
        form.fields[name] = content.decode("utf-8", errors="replace")
    else:
        declared = str(headers.get("content-type", "application/octet-stream"))
        form.files[name] = FormFile(filename, content, declared)
