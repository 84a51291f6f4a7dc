"""Split documents into token-bounded chunks, cutting at the most natural boundary in reach.

A chunk is the unit that gets one vector, so it must fit the model (``split.max_tokens``, checked
by counting the chunk's own text) and should read as a whole: cuts go at a paragraph break if one
is in reach, else a line break, a sentence end, a space, and only inside a word (at a token
boundary) when a window holds no space at all, as in a long URL or an unspaced script.
Consecutive chunks share up to ``split.overlap_tokens`` tokens so that text near a cut is
embedded with some context on both sides.

How, in one pass over the document:

1. Tokenize once (:meth:`Tokenizer.token_offsets`). The token offsets turn "the next
   ``max_tokens`` tokens" into a character limit by index arithmetic.
2. From the chunk's start, look for the best boundary in the second half of the window up to that
   limit, then anywhere in the window, then fall back to the last token start.
3. Count the chunk text. Token counts are not additive (BPE merges across a cut, segments are
   tokenized separately), so if the count is over, shrink the window by the excess and repeat.
4. Start the next chunk at the best boundary within the last ``overlap_tokens`` tokens.

Work per chunk is proportional to the chunk, so a document splits in time linear in its length.

Rejects: a document the splitter cannot handle (in practice one character that alone encodes to
more than ``max_tokens`` tokens, with a tiny ``max_tokens``) becomes a ``split_failed`` reject
instead of failing the bundle that holds it.
"""

from __future__ import annotations

import hashlib
import re
import typing
from collections.abc import Iterator

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import TaggedOutput

from transforms import tags
from transforms.outputs import in_global_window
from transforms.sections import SplitConfig
from transforms.tokens import Tokenizer, get_tokenizer
from transforms.types import (
    FINGERPRINT_MODULUS,
    SPLIT_FAILED,
    STAGE_SPLIT,
    Chunk,
    Document,
    Reject,
    fingerprint,
)

# Ranks of the boundaries found by _BREAK; a space, below them all, is looked for separately.
_PARAGRAPH, _LINE, _SENTENCE = 3, 2, 1

_LINE_BREAK_CHARS = "\n\x0b\x0c\r\x1c\x1d\x1e\x85\u2028\u2029"  # As in str.splitlines.
_LINE_BREAKS = re.compile(rf"\r\n|[{_LINE_BREAK_CHARS}]")
# Breaks better than a space. Every alternative starts with one character of the leading class, so the
# regex engine skips other text at C speed. A line break takes the rest of its whitespace run, which
# then holds every break of the run and tells a paragraph (a blank line) from a line.
_BREAK = re.compile(
    rf"[{_LINE_BREAK_CHARS}.!?。！？]"
    rf"(?:(?<=[{_LINE_BREAK_CHARS}])\s*"  # Line break(s).
    r"|[\"'”’)\]」』]?(?=\s)"  # A sentence end, maybe closing a quote, then whitespace.
    r"|(?<=[。！？]))"  # A full-width stop: CJK text puts no space after it.
)
# Where whitespace follows text, and the reverse: the lowest-ranked boundaries.
_TEXT_AFTER_SPACE = re.compile(r"(?<=\s)(?=\S)")
_LAST_SPACE_AFTER_TEXT = re.compile(r"(?s:.*)(?<=\S)(?=\s)")  # Greedy: matches up to the last one.

# Token offsets come from tokenizing the whole document in segments, which can differ from counting
# one slice of it by a token or two at each slice edge and segment seam. A remainder estimated
# within this margin of the budget is counted exactly before it is split, so text that fits is
# not split.
_FIT_MARGIN_TOKENS = 8

# English runs ~4 characters a token; a text with more than this many characters per token of
# the budget almost never fits in one chunk.
_FAST_PATH_CHARS_PER_TOKEN = 8


def split_document(
    doc: Document, tokenizer: Tokenizer, max_tokens: int, overlap_tokens: int,
    *, whole_tokens: int | None = None,
) -> list[Chunk]:
    """Cut ``doc`` into chunks of at most ``max_tokens`` tokens, in document order.

    Guarantees: ``doc.text[c.char_start:c.char_end] == c.text``; ``c.n_tokens`` is
    ``tokenizer.count(c.text)`` and at most ``max_tokens``; every non-whitespace character is in
    some chunk; no chunk starts or ends with whitespace; both ``char_start`` and ``char_end``
    strictly increase from one chunk to the next; a document that fits is one chunk (its text,
    stripped). The result depends only on the arguments. A blank document gives no chunks.

    ``whole_tokens``, when given, is ``tokenizer.count(doc.text.strip())``, counted by the
    caller in a batch with other documents.

    Raises:
        ValueError: ``max_tokens`` < 1 or ``overlap_tokens`` not in ``[0, max_tokens)``; or one
            character alone is more than ``max_tokens`` tokens.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(
            f"overlap_tokens must be in [0, max_tokens={max_tokens}), got {overlap_tokens}"
        )
    # Most documents fit in one chunk: one count (in Rust) decides it, where the splitter would
    # tokenise the whole text into offsets first and then count the chunk again. Texts of more
    # than _FAST_PATH_CHARS_PER_TOKEN characters a token of budget go straight to the splitter,
    # so a long document is never counted whole for nothing.
    stripped = doc.text.strip()
    if not stripped:
        return []
    if whole_tokens is not None or fast_path(stripped, max_tokens):
        n_tokens = tokenizer.count(stripped) if whole_tokens is None else whole_tokens
        if n_tokens <= max_tokens:
            start = len(doc.text) - len(doc.text.lstrip())
            return [_make_chunk(doc, 0, start, start + len(stripped), n_tokens)]
    spans = _Splitter(doc.text, tokenizer, max_tokens, overlap_tokens).spans()
    source = doc.source
    return [_make_chunk(doc, index, *span, source=source) for index, span in enumerate(spans)]


def fast_path(stripped: str, max_tokens: int) -> bool:
    """Whether a document is worth one count to see if it fits whole (see split_document)."""
    return len(stripped) <= max_tokens * _FAST_PATH_CHARS_PER_TOKEN


#: Documents counted in one batched call by the split DoFn.
COUNT_BATCH = 256


class SplitChunks(beam.PTransform):
    """``PCollection[Document]`` → ``{"chunks": PCollection[Chunk], "rejects": PCollection[Reject]}``.

    Example::

        split = documents | "SplitChunks" >> SplitChunks(cfg.split)
        chunks, rejects = split["chunks"], split["rejects"]
    """

    def __init__(self, cfg: SplitConfig) -> None:
        super().__init__()
        self._cfg = cfg

    def expand(self, documents: beam.PCollection[Document]) -> dict[str, beam.PCollection]:
        split = (
            beam.ParDo(_SplitDocumentFn(self._cfg))
            .with_input_types(Document)
            .with_output_types(Chunk, **{tags.REJECTS: Reject, tags.TOTALS: typing.Any})
        )
        outputs = documents | "SplitDocuments" >> split.with_outputs(
            tags.REJECTS, tags.TOTALS, main=tags.CHUNKS)
        return {tag: outputs[tag] for tag in (tags.CHUNKS, tags.REJECTS, tags.TOTALS)}


class _SplitDocumentFn(beam.DoFn):
    """Runs :func:`split_document` with the worker's cached tokenizer; failures become rejects."""

    _tokenizer: Tokenizer

    def __init__(self, cfg: SplitConfig) -> None:
        self._cfg = cfg
        self._chunks = beam.metrics.Metrics.counter("embedpipe", "chunks")

    def setup(self) -> None:
        self._tokenizer = get_tokenizer(self._cfg.tokenizer)

    def start_bundle(self) -> None:
        self._batch: list[Document] = []
        self._made = 0
        self._checksum = 0

    def finish_bundle(self) -> Iterator[object]:
        yield from in_global_window(self._split_batch())
        # The run's accounting (see transforms.manifest): counted here, where chunks are made,
        # one element per Beam bundle, so counting costs nothing per chunk downstream.
        yield from in_global_window(
            [TaggedOutput(tags.TOTALS, (self._made, self._checksum % FINGERPRINT_MODULUS))])

    def process(self, doc: Document) -> Iterator[Chunk | TaggedOutput]:
        self._batch.append(doc)
        if len(self._batch) >= COUNT_BATCH:
            yield from self._split_batch()

    def _split_batch(self) -> Iterator[Chunk | TaggedOutput]:
        """Split the waiting documents, counting those that may fit whole in one call.

        A document that fits whole (most of them) becomes its one chunk right here, from the
        batched count: this loop runs once per document of the corpus, and the general
        splitter's checks and calls would cost more than making the chunk.
        """
        docs, self._batch = self._batch, []
        max_tokens = self._cfg.max_tokens
        stripped = [d.text.strip() for d in docs]
        candidates = [i for i, text in enumerate(stripped) if text and fast_path(text, max_tokens)]
        counted = dict(zip(candidates, self._tokenizer.count_many([stripped[i] for i in candidates]),
                           strict=True))
        made = checksum = 0
        for i, doc in enumerate(docs):
            whole = counted.get(i)
            if whole is not None and whole <= max_tokens:
                text = stripped[i]
                start = len(doc.text) - len(doc.text.lstrip())
                chunk = _make_chunk(doc, 0, start, start + len(text), whole, text, doc.source)
                made += 1
                checksum += chunk.fingerprint
                yield chunk
                continue
            try:
                chunks = split_document(doc, self._tokenizer, max_tokens,
                                        self._cfg.overlap_tokens, whole_tokens=whole)
            except Exception as exc:  # noqa: BLE001
                # Any failure, not only ValueError: one bad document must not fail (and endlessly
                # retry) the bundle that holds it. The reject row says what went wrong.
                yield TaggedOutput(
                    tags.REJECTS,
                    Reject(
                        id=doc.doc_id,
                        doc_id=doc.doc_id,
                        source=doc.source,
                        stage=STAGE_SPLIT,
                        reason=SPLIT_FAILED,
                        detail=f"{type(exc).__name__}: {exc}",
                    ),
                )
                continue
            made += len(chunks)
            checksum += sum(c.fingerprint for c in chunks)
            yield from chunks
        self._chunks.inc(made)
        self._made += made
        self._checksum = (self._checksum + checksum) % FINGERPRINT_MODULUS


def _make_chunk(doc: Document, index: int, start: int, end: int, n_tokens: int,
                text: str | None = None, source: str | None = None) -> Chunk:
    """Chunk ``index`` of ``doc``: ``doc.text[start:end]`` (``text``, when the caller has it)."""
    if text is None:
        text = doc.text[start:end]
    if source is None:
        source = doc.source
    chunk_id = f"{doc.doc_id}#{index}"
    return Chunk(
        chunk_id=chunk_id,
        doc_id=doc.doc_id,
        chunk_index=index,
        char_start=start,
        char_end=end,
        n_tokens=n_tokens,
        # surrogatepass: a lone surrogate must not make hashing fail; it hashes as its raw bytes.
        content_sha256=hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
        text=text,
        source=source,
        metadata=doc.metadata,
        fingerprint=fingerprint(chunk_id, source),
    )


class _Splitter:
    """The chunk spans of one text. Positions are code point offsets; a span is ``[start, end)``.

    Invariants kept between chunks: ``start`` is on a non-whitespace character, ``end`` is just
    after one, and every new chunk ends after the previous one (``floor``), so no chunk is
    contained in the one before it.
    """

    def __init__(self, text: str, tokenizer: Tokenizer, max_tokens: int, overlap_tokens: int):
        self._text = text
        self._tokenizer = tokenizer
        self._max_tokens = max_tokens
        # The model's special tokens ([CLS], [SEP]) are in every count but in no offset: aim
        # the first window at the text tokens that fit beside them, and leave them out of the
        # overlap, which counts shared text.
        self._special_tokens = tokenizer.special_tokens
        self._overlap_tokens = overlap_tokens
        self._offsets = tokenizer.token_offsets(text)
        self._text_end = len(text.rstrip())

    def spans(self) -> list[tuple[int, int, int]]:
        """``(start, end, n_tokens)`` of every chunk, in order."""
        start = self._skip_space(0)
        prev_end = start
        spans: list[tuple[int, int, int]] = []
        if start == self._text_end:
            return spans
        while True:
            chunk = self._fit_chunk(start, floor=max(start, prev_end) + 1)
            if chunk is None and start < prev_end:
                # The overlap left no room to get past the previous chunk: start after it instead.
                start = self._skip_space(prev_end)
                chunk = self._fit_chunk(start, floor=start + 1)
            if chunk is None:
                raise ValueError(
                    f"the character at offset {start} alone is more than max_tokens="
                    f"{self._max_tokens} tokens"
                )
            end, n_tokens = chunk
            spans.append((start, end, n_tokens))
            if end == self._text_end:
                return spans
            start = self._next_start(start, end)
            prev_end = end

    def _fit_chunk(self, start: int, floor: int) -> tuple[int, int] | None:
        """``(end, n_tokens)`` of the best chunk from ``start`` that ends at ``floor`` or later;
        None if even the shortest such chunk is over budget."""
        first_token = self._token_at(start)
        if self._tokens_between(start, self._text_end) <= self._max_tokens + _FIT_MARGIN_TOKENS:
            end: int | None = self._text_end
        else:
            end = self._best_end(start, floor, self._char_limit(
                first_token, self._max_tokens - self._special_tokens))
        while end is not None:
            n_tokens = self._tokenizer.count(self._text[start:end])
            if n_tokens <= self._max_tokens:
                return end, n_tokens
            # Over budget: aim lower by the excess, but always strictly below this end, so the
            # loop ends; below ``floor`` there is nothing left to try.
            budget = self._tokens_between(start, end) - (n_tokens - self._max_tokens)
            limit = min(end - 1, max(self._char_limit(first_token, budget), floor))
            end = self._best_end(start, floor, limit)
        return None

    def _best_end(self, start: int, floor: int, limit: int) -> int | None:
        """Where a chunk from ``start`` should end, in ``[floor, limit]``; None if nowhere.

        The highest-ranked boundary in the second half of the window wins, so chunks stay close
        to the budget; then the highest-ranked anywhere; then the last token start.
        """
        if limit < floor:
            return None
        half_window = self._tokens_between(start, limit) // 2
        second_half = max(self._offset(self._token_at(start) + half_window), floor)
        best = self._last_best_boundary(second_half, limit)
        if best is None and second_half > floor:
            best = self._last_best_boundary(floor, limit)
        return best if best is not None else self._inside_word_end(floor, limit)

    def _last_best_boundary(self, low: int, limit: int) -> int | None:
        """The furthest chunk end of the highest rank in ``[low, limit]``."""
        best_rank, best_end = 0, None
        for rank, end, _ in self._breaks(low, limit):
            if low <= end <= limit and rank >= best_rank:
                best_rank, best_end = rank, end
        return best_end if best_end is not None else self._last_space(low, limit)

    def _inside_word_end(self, floor: int, limit: int) -> int | None:
        """The last resort, when no boundary is in reach: the last token start up to ``limit``,
        which splits a long word where the tokenizer does."""
        token_start = self._offset(int(np.searchsorted(self._offsets, limit, "right")) - 1)
        if token_start >= floor and not self._text[token_start - 1].isspace():
            return token_start
        end = limit
        while end >= floor and self._text[end - 1].isspace():
            end -= 1
        return end if end >= floor else None

    def _next_start(self, start: int, end: int) -> int:
        """Where the chunk after ``[start, end)`` starts.

        With overlap, at the best boundary among the chunk's last ``overlap_tokens`` tokens (the
        highest rank, and the earliest of that rank) whose text really counts at most that many;
        always after ``start``, so the splitter progresses. Otherwise, or if there is none, at
        the first character after ``end``.
        """
        if self._overlap_tokens > 0:
            tokens_before_end = int(np.searchsorted(self._offsets, end, "left"))
            first_overlap_token = max(tokens_before_end - self._overlap_tokens, 0)
            low = max(self._offset(first_overlap_token), start + 1)
            while (candidate := self._overlap_start(low, end)) is not None:
                shared = self._tokenizer.count(self._text[candidate:end]) - self._special_tokens
                if shared <= self._overlap_tokens:
                    return candidate
                low = candidate + 1
        return self._skip_space(end)

    def _overlap_start(self, low: int, end: int) -> int | None:
        """The best start in ``[low, end)`` for a chunk that overlaps one ending at ``end``."""
        best = self._first_best_start(low, end)
        if best is None and not self._text[end].isspace():
            # Cut inside a word or an unspaced script: overlap by whole tokens instead.
            token_start = self._offset(int(np.searchsorted(self._offsets, low, "left")))
            if token_start < end:
                return token_start
        return best

    def _first_best_start(self, low: int, end: int) -> int | None:
        """The earliest chunk start of the highest rank in ``[low, end)``."""
        best_rank, best_start = 0, None
        for rank, _, start in self._breaks(self._run_start(low), end - 1):
            if low <= start < end and rank > best_rank:
                best_rank, best_start = rank, start
        return best_start if best_start is not None else self._first_word_start(low, end)

    def _breaks(self, scan_from: int, scan_to: int) -> Iterator[tuple[int, int, int]]:
        """``(rank, end, next_start)`` of each break better than a space that begins in
        ``[scan_from, scan_to]``: a chunk may end at ``end`` and the next one start at
        ``next_start``. Callers check that these fall in their window."""
        # The bound keeps the scan inside the window. It hides only sentence ends whose chunk
        # would end past scan_to, and may cut a run of line breaks short, hence the skip_space.
        for match in _BREAK.finditer(self._text, scan_from, scan_to + 1):
            if match.group()[0].isspace():
                run_end = self._skip_space(match.end())
                breaks = len(_LINE_BREAKS.findall(self._text, match.start(), run_end))
                yield (_PARAGRAPH if breaks > 1 else _LINE), self._run_start(match.start()), run_end
            else:
                yield _SENTENCE, match.end(), self._skip_space(match.end())

    def _last_space(self, low: int, limit: int) -> int | None:
        """The furthest chunk end in ``[low, limit]`` that is followed by whitespace."""
        match = _LAST_SPACE_AFTER_TEXT.match(self._text, low, limit + 1)
        return match.end() if match else None

    def _first_word_start(self, low: int, end: int) -> int | None:
        """The earliest chunk start in ``[low, end)`` that follows whitespace."""
        match = _TEXT_AFTER_SPACE.search(self._text, low, end)
        return match.start() if match else None

    def _token_at(self, position: int) -> int:
        """Index of the (first) token that starts the character at ``position``, or else of the
        token that contains it."""
        index = int(np.searchsorted(self._offsets, position, "left"))
        return index if self._offset(index) == position else index - 1

    def _tokens_between(self, start: int, end: int) -> int:
        """Estimated tokens in ``text[start:end]``: the tokens that overlap it."""
        return int(np.searchsorted(self._offsets, end, "left")) - self._token_at(start)

    def _char_limit(self, first_token: int, budget: int) -> int:
        """The furthest end of a chunk that starts in ``first_token`` and spans ``budget`` tokens."""
        return min(self._offset(first_token + max(budget, 0)), self._text_end)

    def _offset(self, token: int) -> int:
        """Start of ``token``; the end of the text past the last token."""
        offsets = self._offsets
        return int(offsets[token]) if token < len(offsets) else len(self._text)

    def _skip_space(self, position: int) -> int:
        while position < self._text_end and self._text[position].isspace():
            position += 1
        return position

    def _run_start(self, position: int) -> int:
        while position > 0 and self._text[position - 1].isspace():
            position -= 1
        return position
