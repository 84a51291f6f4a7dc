"""Token counting, one registry keyed by ``split.tokenizer``.

The splitter needs two things from a tokenizer: an exact count for a piece of text (a chunk must
never exceed ``split.max_tokens``), and where every token of a whole document starts (so it can
find a cut by binary search instead of re-counting the document for every candidate). The bundler
and ``embedpipe plan`` need only the count. :class:`Tokenizer` is that contract; the registry maps
a config name to a lazily built implementation::

    tokenizer = get_tokenizer("cl100k_base")   # in DoFn.setup, never in a constructor
    tokenizer.count("hello world")             # 2

Besides the built-in names, ``split.tokenizer`` may be the path or fsspec URL of a Hugging Face
``tokenizer.json`` (:class:`HuggingFaceTokenizer`): the splitter then counts in the served
model's own tokens, which is what keeps a chunk within the model's limit (all-MiniLM-L6-v2
reads 256 word pieces; a chunk of 512 cl100k tokens is cut by the server without a word).

A BPE tokenizer holds about 100 MB of vocabulary tables, so each is built once per worker process
and cached in this module (:func:`get_tokenizer`). They pickle by name (a ``tokenizer.json`` by
its path or URL) and unpickle to the cached instance, so one that slips into a DoFn's state costs
a few bytes in the graph, not its tables, and each worker loads its own.

Lone surrogates (text decoded with ``surrogateescape`` or from a JSON ``"\\ud800"``) cannot be
encoded as UTF-8; every tokenizer counts each one as U+FFFD. Replacing one code point by one code
point keeps offsets valid for the original text.
"""

from __future__ import annotations

import abc
import functools
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from transforms.errors import ConfigError

TokenOffsets = npt.NDArray[np.int64]
"""Code point offset at which each token starts: 1-D, non-decreasing, ``[0]`` is 0."""

CHARS_PER_TOKEN = 4
"""The ``chars`` approximation: about four characters per token for English text."""

# The bpe_openai encoder refuses a call of 1,000,000 characters or more, or of more than 200,000
# tokens. A character is at most 4 UTF-8 bytes and a token at least one, so 50,000 characters pass.
_SEGMENT_CHARS = 50_000

_SURROGATES = re.compile("[\ud800-\udfff]")
_UTF8_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))


class Tokenizer(abc.ABC):
    """Counts tokens the way an embedding model will, and locates them in a text.

    ``count`` is exact for the text given. ``token_offsets`` tokenizes a long text in segments, so
    near a segment boundary it may differ from one-shot tokenization by a token: use it to
    estimate where a budget ends, and ``count`` to check the text you finally keep.
    """

    name: str
    #: Tokens the model adds to every input ([CLS] and [SEP] for BERT-style models). ``count``
    #: includes them, so a chunk's count is what the model reads; ``token_offsets`` has only
    #: the text's own tokens.
    special_tokens: int = 0

    @abc.abstractmethod
    def count(self, text: str) -> int:
        """Number of tokens ``text`` encodes to, for any length of text."""

    @abc.abstractmethod
    def token_offsets(self, text: str) -> TokenOffsets:
        """Code point offset at which each token of ``text`` starts; empty for empty text.

        A token that begins inside a multi-byte character (byte-level BPE splits rare characters
        and emoji) reports the start of that character, so offsets may repeat.
        """

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """``[count(t) for t in texts]``, in one call where the backend can batch."""
        return [self.count(t) for t in texts]

    def __reduce__(self) -> tuple[Callable[[str], Tokenizer], tuple[str]]:
        return (get_tokenizer, (self.name,))


class BpeTokenizer(Tokenizer):
    """An OpenAI byte-pair encoding (``cl100k_base``, ``o200k_base``), offline.

    Two packages, each for what it does best: ``toktok-rs`` counts (exact, tiktoken-identical,
    never builds the ids, and batches: ~0.8 µs a 60-word text against ~6 µs one at a time), and
    ``bpe-openai`` encodes for the token offsets the splitter needs for texts longer than one
    chunk. The second is loaded on first use: a corpus of short documents never pays its ~1 s and
    ~100 MB.
    """

    def __init__(self, name: str) -> None:
        import toktok

        self.name = name
        self._toktok = toktok
        self._lock = threading.Lock()
        self._offset_tables: tuple[Any, np.ndarray, np.ndarray] | None = None
        toktok.batch_count([""], name, threads=1)  # load (and check) the encoding now

    def count(self, text: str) -> int:
        return int(self._toktok.batch_count([_replace_surrogates(text)], self.name, threads=1)[0])

    def count_many(self, texts: Sequence[str]) -> list[int]:
        # One thread: Beam runs a DoFn per core already, and batches here are small.
        return list(self._toktok.batch_count([_replace_surrogates(t) for t in texts], self.name,
                                             threads=1))

    def _tables(self) -> tuple[Any, np.ndarray, np.ndarray]:
        with self._lock:
            if self._offset_tables is None:
                import bpe_openai  # Deferred: ~1 s and ~100 MB, only for texts that are split.

                encoding = bpe_openai.get_encoding(self.name)
                token_bytes = encoding.token_byte_values()
                # Per token id: how many characters it starts (its non-continuation bytes), and
                # whether it begins inside a character. Offsets follow from a cumulative sum.
                chars_started = np.fromiter(
                    (len(b.translate(None, _UTF8_CONTINUATION_BYTES)) for b in token_bytes),
                    dtype=np.int64, count=len(token_bytes))
                starts_mid_char = np.fromiter(
                    (bool(b) and 0x80 <= b[0] < 0xC0 for b in token_bytes),
                    dtype=np.int64, count=len(token_bytes))
                self._offset_tables = (encoding, chars_started, starts_mid_char)
            return self._offset_tables

    def token_offsets(self, text: str) -> TokenOffsets:
        encoding, chars_started, starts_mid_char = self._tables()
        text = _replace_surrogates(text)
        pieces = [np.zeros(0, dtype=np.int64)]
        for start, end in _segments(text):
            ids = np.asarray(encoding.encode_ordinary(text[start:end]), dtype=np.int64)
            chars = chars_started[ids]
            pieces.append(start + np.cumsum(chars) - chars - starts_mid_char[ids])
        return np.concatenate(pieces)


class CharTokenizer(Tokenizer):
    """One token per :data:`CHARS_PER_TOKEN` characters, rounded up.

    For providers whose tokenizer is unknown or not available offline. It is an approximation:
    English runs near four characters per token, but code, CJK and emoji use more tokens per
    character, so leave headroom under the provider's per-input limit when you choose it.
    """

    name = "chars"

    def count(self, text: str) -> int:
        return -(-len(text) // CHARS_PER_TOKEN)

    def token_offsets(self, text: str) -> TokenOffsets:
        return np.arange(0, len(text), CHARS_PER_TOKEN, dtype=np.int64)


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``: the model's own tokens, read with ``tokenizers``.

    ``name`` is the file's path or fsspec URL; the file is read once per worker process.

    **Counts include the model's special tokens** (:attr:`special_tokens`: [CLS] and [SEP] for
    BERT-style models): a model's limit counts them (BERT reads 512 tokens, all-MiniLM-L6-v2
    256, both with its 2 special tokens), so ``split.max_tokens`` set to the model's limit is
    safe as it is. ``split.overlap_tokens`` counts text tokens only.

    The truncation and padding a ``tokenizer.json`` may carry (model repositories often ship
    ``max_length: 128`` and padding) are switched off: they would hide how long a text is.
    """

    def __init__(self, name: str) -> None:
        try:
            import tokenizers
        except ImportError:
            raise ConfigError(
                f"{name!r} is a Hugging Face tokenizer.json, which needs the tokenizers package: "
                "pip install 'embedpipe[hf]' where the pipeline and its workers run",
                key="split.tokenizer",
            ) from None
        import fsspec

        try:
            with fsspec.open(name, "rb") as handle:
                data = handle.read()
            tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # any failure to read or parse it says the same
            raise ConfigError(
                f"cannot load {name!r} as a Hugging Face tokenizer.json "
                f"({type(exc).__name__}: {exc}); give the path or URL of the served model's "
                "tokenizer.json, or one of " + ", ".join(TOKENIZER_NAMES),
                key="split.tokenizer",
            ) from exc
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.name = name
        self._tokenizer = tokenizer
        self.special_tokens = len(tokenizer.encode("", add_special_tokens=True).ids)

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(_replace_surrogates(text)).ids)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        encoded = self._tokenizer.encode_batch([_replace_surrogates(t) for t in texts])
        return [len(e.ids) for e in encoded]

    def token_offsets(self, text: str) -> TokenOffsets:
        """The start of each of the text's own tokens (no special tokens), in code points.

        Tokens need not cover the text (a WordPiece model drops whitespace), so the first
        token is taken to start at 0, and each token owns the whitespace after it. Offsets
        that a normaliser made run backwards are clamped, so they never decrease.
        """
        text = _replace_surrogates(text)
        pieces = [np.zeros(0, dtype=np.int64)]
        for start, end in _segments(text):
            offsets = self._tokenizer.encode(text[start:end], add_special_tokens=False).offsets
            pieces.append(start + np.fromiter((s for s, _ in offsets), dtype=np.int64,
                                              count=len(offsets)))
        starts = np.maximum.accumulate(np.concatenate(pieces))
        if len(starts):
            starts[0] = 0
        return starts


_FACTORIES: dict[str, Callable[[], Tokenizer]] = {
    "cl100k_base": functools.partial(BpeTokenizer, "cl100k_base"),
    "o200k_base": functools.partial(BpeTokenizer, "o200k_base"),
    "chars": CharTokenizer,
}

TOKENIZER_NAMES: tuple[str, ...] = tuple(_FACTORIES)
"""The built-in values of ``split.tokenizer``; anything else must name a ``tokenizer.json``."""

# The per-process cache: one tokenizer per name, shared by every DoFn instance and thread.
_LOADED: dict[str, Tokenizer] = {}
_LOADED_LOCK = threading.Lock()


def get_tokenizer(name: str) -> Tokenizer:
    """The process-wide tokenizer called ``name``, built on first use.

    ``name`` is one of :data:`TOKENIZER_NAMES` or the path or fsspec URL of a Hugging Face
    ``tokenizer.json`` (:func:`is_tokenizer_file`). Call it from ``DoFn.setup`` (or at the edge,
    for ``plan``), so workers load vocabularies themselves instead of receiving them pickled
    through the graph.

    Raises:
        ConfigError: ``name`` is neither, or its file cannot be read as a tokenizer.
    """
    if name not in _FACTORIES and not is_tokenizer_file(name):
        raise ConfigError(unknown_tokenizer_message(name), key="split.tokenizer")
    with _LOADED_LOCK:
        if name not in _LOADED:
            factory = _FACTORIES.get(name)
            _LOADED[name] = factory() if factory else HuggingFaceTokenizer(name)
        return _LOADED[name]


def is_tokenizer_file(name: str) -> bool:
    """Whether ``split.tokenizer`` names a file (a ``.json`` path or URL) rather than a built-in."""
    return name not in _FACTORIES and (name.endswith(".json") or "/" in name or "\\" in name)


def unknown_tokenizer_message(name: str) -> str:
    return (f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_NAMES)}, or give "
            "the path or fsspec URL of the served model's Hugging Face tokenizer.json")


def count_tokens(name: str, text: str) -> int:
    """Tokens in ``text`` by the tokenizer called ``name``: a shorthand for the bundler and plan."""
    return get_tokenizer(name).count(text)


def _replace_surrogates(text: str) -> str:
    # ASCII text (most corpora) has no surrogate: a 30 ns check instead of a 3 us regex pass.
    return text if text.isascii() else _SURROGATES.sub("\ufffd", text)


def _segments(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` pieces of at most :data:`_SEGMENT_CHARS` that the encoder accepts.

    Each cut goes after a newline or else before a space, in the second half of the piece, where
    the BPE pre-tokenizer would split anyway; so the pieces tokenize (almost always) exactly as
    the whole text would. Text without either is cut at the size limit.
    """
    start = 0
    while len(text) - start > _SEGMENT_CHARS:
        half, limit = start + _SEGMENT_CHARS // 2, start + _SEGMENT_CHARS
        newline = text.rfind("\n", half, limit)
        space = text.rfind(" ", half, limit)
        end = newline + 1 if newline != -1 else space if space != -1 else limit
        yield start, end
        start = end
    if start < len(text):
        yield start, len(text)
