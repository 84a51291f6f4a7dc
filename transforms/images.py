"""The image stage of a multimodal run: documents in, one chunk per record with its image checked.

In a multimodal run (``input.image_field`` with ``provider.multimodal``) a record's text and
image are fused by the provider into one vector, so a record is one chunk: it is never split,
and its text is never cut. A caption over the model's per-input token limit is a ``too_large``
reject (stage ``split``), not a silent cut; a record without an image is sent as its text alone.

Each image reference is resolved and checked here, before anything is sent:

- a path relative to the record's own file (``img/1.png`` beside ``corpus.jsonl``), or an
  fsspec URL (``s3://``, ``gs://``, ``file://``, an absolute local path), is read through fsspec
  with ``input.storage_options``, at most :data:`MAX_IMAGE_BYTES` + 1 bytes: its header is
  read by Pillow and the whole image verified, its bytes hashed (sha256);
- a ``data:`` URL is decoded and checked the same way;
- an ``http(s)`` URL is passed to the provider as is: embedpipe never fetches it, so it has no
  hash, and its token estimate is the cap.

Rejects (stage ``image``): ``image_unreadable`` (missing, refused by storage, a malformed
``data:`` URL), ``invalid_image`` (not an image Pillow can read, corrupt, or a format the APIs do
not take) and ``image_too_large`` (over :data:`MAX_IMAGE_BYTES` or :data:`MAX_IMAGE_PIXELS`);
each detail names the record and the reference.

The bytes do not travel with the chunk (see :class:`~transforms.types.ImagePart`): the embed
stage reads them again through :class:`ImageLoader`, which checks them against the hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import posixpath
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import apache_beam as beam
import fsspec
from apache_beam.pvalue import TaggedOutput
from PIL import Image, UnidentifiedImageError

from transforms import tags
from transforms.errors import ImageError, option_strings, redact
from transforms.outputs import in_global_window
from transforms.tokens import Tokenizer, get_tokenizer
from transforms.types import (
    FINGERPRINT_MODULUS,
    IMAGE_TOO_LARGE,
    IMAGE_UNREADABLE,
    INVALID_IMAGE,
    STAGE_SPLIT,
    TOO_LARGE,
    Chunk,
    Document,
    ImagePart,
    Reject,
    fingerprint,
)

#: Reject stage of an image that cannot be used (contract extension, multimodal runs only).
STAGE_IMAGE = "image"

#: The caps of Ark's multimodal endpoint, which the envelope API is held to as well.
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 36_000_000
#: Ark bills an image about width × height / 784 tokens, at most 1312.
PIXELS_PER_TOKEN = 784
MAX_IMAGE_TOKENS = 1312

#: Pillow's format → the MIME type sent in the ``data:`` URL; formats Ark documents.
ACCEPTED_FORMATS: Mapping[str, str] = {
    "JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
    "BMP": "image/bmp", "TIFF": "image/tiff", "ICO": "image/x-icon",
}

_READ_BLOCK = 1024 * 1024


def image_tokens(width: int, height: int) -> int:
    """The tokens an image of ``width`` × ``height`` costs, as Ark documents the estimate."""
    return max(1, min(MAX_IMAGE_TOKENS, math.ceil(width * height / PIXELS_PER_TOKEN)))


def is_remote(reference: str) -> bool:
    """An http(s) URL: the provider fetches it itself."""
    return reference.lower().startswith(("http://", "https://"))


def resolve(reference: str, source_url: str) -> str:
    """Where to read ``reference``: a URL as is, a relative path beside ``source_url``.

    >>> resolve("img/a.png", "s3://bucket/corpus/part-1.jsonl")
    's3://bucket/corpus/img/a.png'
    >>> resolve("../a.png", "file:///data/corpus/x.jsonl")
    'file:///data/a.png'
    """
    if "://" in reference or reference.startswith(("data:", "/")):
        return reference
    protocol, sep, path = source_url.rpartition("://")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), reference))
    return f"{protocol}{sep}{joined}" if sep else joined


@dataclass(frozen=True, slots=True)
class ImageCaps:
    """The byte and pixel caps an image must be within (the API's, by default)."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS


def inspect_image(data: bytes, caps: ImageCaps = ImageCaps()) -> tuple[str, int, int]:
    """``(mime, width, height)`` of an image, checked whole; raises :class:`ImageError`.

    The header gives the size, which is checked against the pixel cap before anything is
    decoded (a PNG that declares a billion pixels costs nothing); then ``verify`` reads the
    rest, so a truncated or corrupt file is refused here, not by the provider.
    """
    if len(data) > caps.max_bytes:
        raise ImageError(IMAGE_TOO_LARGE, f"is over {caps.max_bytes:,} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                kind = image.format or ""
                if width * height > caps.max_pixels:
                    raise ImageError(IMAGE_TOO_LARGE, f"is {width}x{height} = {width * height:,} "
                                     f"pixels, over the cap of {caps.max_pixels:,}")
                image.verify()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(IMAGE_TOO_LARGE, f"is over the pixel cap ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(INVALID_IMAGE, "is not an image (Pillow knows no format of it)") from exc
    except Exception as exc:  # Pillow raises many types for a corrupt file
        raise ImageError(INVALID_IMAGE, f"is a corrupt image ({type(exc).__name__}: {exc})"
                         ) from exc
    mime = ACCEPTED_FORMATS.get(kind)
    if mime is None:
        raise ImageError(INVALID_IMAGE, f"is a {kind or 'unknown'} image; the API takes "
                         f"{', '.join(ACCEPTED_FORMATS)}")
    return mime, width, height


def decode_data_url(url: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a ``data:`` URL (base64 or percent-encoded); raises :class:`ImageError`."""
    head, comma, payload = url.partition(",")
    if not comma:
        raise ImageError(IMAGE_UNREADABLE, "is a data: URL without a ',' before its data")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageError(IMAGE_TOO_LARGE, f"is over {max_bytes:,} bytes")
    if head.lower().endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(IMAGE_UNREADABLE, "is a data: URL whose base64 is not valid"
                             ) from exc
    return unquote_to_bytes(payload)


def read_capped(url: str, storage_options: Mapping[str, Any], max_bytes: int) -> bytes:
    """At most ``max_bytes`` bytes of ``url`` (streamed); raises :class:`ImageError`.

    One byte more than the cap is read to tell "at the cap" from "over it", so a file whose
    size storage misreports still costs at most the cap in memory.
    """
    buffer = bytearray()
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            while len(buffer) <= max_bytes:
                block = f.read(min(_READ_BLOCK, max_bytes + 1 - len(buffer)))
                if not block:
                    break
                buffer += block
    except FileNotFoundError as exc:
        raise ImageError(IMAGE_UNREADABLE, "does not exist") from exc
    except Exception as exc:  # any storage failure costs this record only
        message = redact(str(exc), *option_strings(storage_options))
        raise ImageError(IMAGE_UNREADABLE, f"cannot be read ({type(exc).__name__}: "
                         f"{message[:300]})") from exc
    if len(buffer) > max_bytes:
        raise ImageError(IMAGE_TOO_LARGE, f"is over {max_bytes:,} bytes")
    return bytes(buffer)


@dataclass(frozen=True, slots=True)
class ImageLoader:
    """Reads a checked image again in the embed stage, as the URL the provider is sent.

    Picklable (storage options as a tuple); shipped to the workers in the embed settings.
    """

    storage_options: tuple[tuple[str, Any], ...] = ()
    caps: ImageCaps = ImageCaps()

    def load(self, reference: str, source_url: str) -> tuple[ImagePart, bytes | None]:
        """Resolve, read and check one reference: its part and bytes (None when remote)."""
        if is_remote(reference):
            part = ImagePart(reference=reference, url=reference, sha256=None, mime=None,
                             est_tokens=MAX_IMAGE_TOKENS)
            return part, None
        url = resolve(reference, source_url)
        if url.lower().startswith("data:"):
            data = decode_data_url(url, self.caps.max_bytes)
        else:
            data = read_capped(url, dict(self.storage_options), self.caps.max_bytes)
        mime, width, height = inspect_image(data, self.caps)
        part = ImagePart(reference=reference, url=url, sha256=hashlib.sha256(data).hexdigest(),
                         mime=mime, width=width, height=height, n_bytes=len(data),
                         est_tokens=image_tokens(width, height))
        return part, data

    def url_to_send(self, part: ImagePart) -> str:
        """What goes in the ``image_url`` part: the URL as is, or the bytes as a ``data:`` URL.

        The bytes are read again and must hash as they did when checked; an image changed or
        gone since is an :class:`ImageError` (that record's reject), never another image's
        vector under this record's hash.
        """
        if part.remote:
            return part.url
        if part.url.lower().startswith("data:"):
            data = decode_data_url(part.url, self.caps.max_bytes)
        else:
            data = read_capped(part.url, dict(self.storage_options), self.caps.max_bytes)
        if hashlib.sha256(data).hexdigest() != part.sha256:
            raise ImageError(IMAGE_UNREADABLE, f"image {part.reference!r} changed after it was "
                             "checked (its sha256 differs); run again")
        return f"data:{part.mime};base64,{base64.b64encode(data).decode('ascii')}"


def content_key(text: str, image: ImagePart | None) -> str:
    """The sha256 a multimodal chunk is cached under: its text and its image's bytes.

    A record without an image keys as its text alone (so as a text chunk would); a remote image
    keys by its URL, the only thing embedpipe knows of it.
    """
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass"))
    if image is not None:
        digest.update(b"\x00image\x00")
        digest.update((image.sha256 or f"url:{image.url}").encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def record_chunk(doc: Document, text: str, n_text_tokens: int,
                 image: ImagePart | None) -> Chunk:
    """The one chunk of a multimodal record: its stripped text and its image."""
    start = len(doc.text) - len(doc.text.lstrip()) if text else 0
    chunk_id = f"{doc.doc_id}#0"
    source = doc.source
    return Chunk(
        chunk_id=chunk_id, doc_id=doc.doc_id, chunk_index=0, char_start=start,
        char_end=start + len(text),
        n_tokens=n_text_tokens + (image.est_tokens if image is not None else 0),
        content_sha256=content_key(text, image), text=text, source=source,
        metadata=doc.metadata, fingerprint=fingerprint(chunk_id, source), image=image)


class _CheckImagesFn(beam.DoFn):
    """Documents → one chunk each, or a reject; counts chunks for the run's accounting."""

    _tokenizer: Tokenizer

    def __init__(self, tokenizer: str, max_text_tokens: int, loader: ImageLoader) -> None:
        self._tokenizer_name = tokenizer
        self._max_text_tokens = max_text_tokens
        self._loader = loader
        self._images = beam.metrics.Metrics.counter("embedpipe", "images")

    def setup(self) -> None:
        self._tokenizer = get_tokenizer(self._tokenizer_name)

    def start_bundle(self) -> None:
        self._made = 0
        self._checksum = 0

    def finish_bundle(self) -> Iterator[object]:
        # As the splitter does: one (count, checksum) element per bundle (transforms.manifest).
        yield from in_global_window(
            [TaggedOutput(tags.TOTALS, (self._made, self._checksum % FINGERPRINT_MODULUS))])

    def process(self, doc: Document) -> Iterator[object]:
        text = doc.text.strip()
        n_text = self._tokenizer.count(text) if text else 0
        if n_text > self._max_text_tokens:
            yield TaggedOutput(tags.REJECTS, Reject(
                id=doc.doc_id, doc_id=doc.doc_id, source=doc.source, stage=STAGE_SPLIT,
                reason=TOO_LARGE,
                detail=(f"text is {n_text} tokens, over the model's per-input limit of "
                        f"{self._max_text_tokens}; a multimodal record is one input, never "
                        "split or cut: shorten its text")))
            return
        image = None
        if doc.image is not None:
            try:
                image, _ = self._loader.load(doc.image, doc.source_url)
            except ImageError as exc:
                yield TaggedOutput(tags.REJECTS, Reject(
                    id=doc.doc_id, doc_id=doc.doc_id, source=doc.source, stage=STAGE_IMAGE,
                    reason=exc.reason,
                    detail=f"image {_shown(doc.image)} of record {doc.doc_id!r} {exc.message}"))
                return
            self._images.inc()
        chunk = record_chunk(doc, text, n_text, image)
        self._made += 1
        self._checksum += chunk.fingerprint
        yield chunk


def _shown(reference: str) -> str:
    """A reference fit for a reject detail: a ``data:`` URL by its head only."""
    if reference.lower().startswith("data:"):
        return repr(reference.partition(",")[0] + ",...")
    return repr(reference[:300])


class CheckImages(beam.PTransform):
    """``Document`` → ``{"chunks": Chunk, "rejects": Reject, "totals"}``, as SplitChunks.

    The multimodal run's stage in place of the splitter: one chunk per record (see the module
    docstring). ``max_text_tokens`` is the model's per-input limit on a record's text.
    """

    def __init__(self, tokenizer: str, max_text_tokens: int, loader: ImageLoader) -> None:
        super().__init__()
        self._fn = _CheckImagesFn(tokenizer, max_text_tokens, loader)

    def expand(self, documents: beam.PCollection) -> dict[str, beam.PCollection]:
        outputs = documents | "CheckRecordImages" >> beam.ParDo(self._fn).with_outputs(
            tags.REJECTS, tags.TOTALS, main=tags.CHUNKS)
        return {tag: outputs[tag] for tag in (tags.CHUNKS, tags.REJECTS, tags.TOTALS)}
