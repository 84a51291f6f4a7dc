"""The splitter: the chunk invariants as properties, boundary choice by example, the Beam step."""

from __future__ import annotations

import hashlib
import itertools
import random

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import SplitConfig
from transforms.split import SPLIT_FAILED, SplitChunks, split_document
from transforms.tokens import Tokenizer, TokenOffsets, get_tokenizer
from transforms.types import STAGE_SPLIT, Chunk, Document, Reject

_pieces = st.one_of(
    st.sampled_from(["the", "quick", "Fox", "données", "naïve", "3.14", "e.g.", "x"]),
    st.sampled_from([" ", " ", " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n \n ", "\u3000", "\xa0"]),
    st.sampled_from([".", "!", "?", "。", "！", "？", ",", '."', ")"]),
    st.sampled_from(
        ["中文", "日本語のテキスト", "한국어", "😀", "👩‍👩‍👧", "🇫🇷", "e\u0301", "\ud83d"]
    ),
    # Long runs without whitespace, which only a token boundary can cut.
    st.builds(str.__mul__, st.sampled_from(["x", "ab", "中", "😀", "-", " "]), st.integers(1, 400)),
    st.text(max_size=12),
)
texts = st.lists(_pieces, max_size=150).map("".join)
tokenizer_names = st.sampled_from(["cl100k_base", "o200k_base", "chars"])


@st.composite
def budgets(draw: st.DrawFn) -> tuple[int, int]:
    max_tokens = draw(st.integers(8, 300))
    return max_tokens, draw(st.integers(0, max_tokens - 1))


def make_doc(text: str, doc_id: str = "doc-1") -> Document:
    return Document(
        doc_id=doc_id,
        text=text,
        source_url="s3://bucket/corpus.jsonl",
        position=7,
        metadata=(("lang", "en"), ("year", 2024)),
    )


def assert_chunk_invariants(
    doc: Document, chunks: list[Chunk], tokenizer: Tokenizer, max_tokens: int, overlap: int
) -> None:
    text = doc.text
    if not text.strip():
        assert chunks == []
        return
    assert chunks, "a non-blank document gives at least one chunk"
    for index, chunk in enumerate(chunks):
        assert chunk.chunk_index == index
        assert chunk.chunk_id == f"{doc.doc_id}#{index}"
        assert chunk.doc_id == doc.doc_id
        assert text[chunk.char_start : chunk.char_end] == chunk.text
        assert chunk.text and chunk.text == chunk.text.strip()
        assert chunk.n_tokens == tokenizer.count(chunk.text) <= max_tokens
        expected_sha = hashlib.sha256(chunk.text.encode("utf-8", "surrogatepass")).hexdigest()
        assert chunk.content_sha256 == expected_sha
        assert (chunk.source, chunk.metadata) == (doc.source, doc.metadata)
    # Coverage: outside the chunks there is only whitespace.
    assert not text[: chunks[0].char_start].strip()
    assert not text[chunks[-1].char_end :].strip()
    for before, after in itertools.pairwise(chunks):
        assert before.char_start < after.char_start
        assert before.char_end < after.char_end
        if overlap == 0:
            assert before.char_end <= after.char_start
        if after.char_start >= before.char_end:
            assert not text[before.char_end : after.char_start].strip()
        else:
            shared = text[after.char_start : before.char_end]
            assert tokenizer.count(shared) <= overlap


@settings(max_examples=250, deadline=None)
@given(text=texts, name=tokenizer_names, budget=budgets())
def test_chunk_invariants_hold_for_any_text(text: str, name: str, budget: tuple[int, int]) -> None:
    tokenizer = get_tokenizer(name)
    max_tokens, overlap = budget
    doc = make_doc(text)
    chunks = split_document(doc, tokenizer, max_tokens, overlap)
    assert_chunk_invariants(doc, chunks, tokenizer, max_tokens, overlap)
    assert split_document(doc, tokenizer, max_tokens, overlap) == chunks  # Deterministic.


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=400), name=tokenizer_names, budget=budgets())
def test_chunk_invariants_hold_for_arbitrary_unicode(
    text: str, name: str, budget: tuple[int, int]
) -> None:
    tokenizer = get_tokenizer(name)
    max_tokens, overlap = budget
    doc = make_doc(text)
    assert_chunk_invariants(
        doc, split_document(doc, tokenizer, max_tokens, overlap), tokenizer, max_tokens, overlap
    )


@settings(max_examples=60, deadline=None)
@given(text=texts, name=tokenizer_names)
def test_a_document_that_fits_is_one_chunk_of_its_stripped_text(text: str, name: str) -> None:
    tokenizer = get_tokenizer(name)
    stripped = text.strip()
    if not stripped:
        return
    chunks = split_document(make_doc(text), tokenizer, max(tokenizer.count(stripped), 1), 0)
    assert [chunk.text for chunk in chunks] == [stripped]
    assert chunks[0].char_start == len(text) - len(text.lstrip())


def test_blank_document_gives_no_chunks() -> None:
    assert split_document(make_doc(" \n\t "), get_tokenizer("cl100k_base"), 16, 4) == []


def ends(chunks: list[Chunk], text: str) -> list[str]:
    """What follows each chunk but the last: the boundary it was cut at."""
    return [text[c.char_end : c.char_end + 2] for c in chunks[:-1]]


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_cuts_at_paragraph_breaks_before_lines(newline: str) -> None:
    paragraph = f"One line of the paragraph.{newline}Another line, a little longer than the first."
    text = (newline * 2).join([paragraph] * 12)
    chunks = split_document(make_doc(text), get_tokenizer("cl100k_base"), 60, 0)
    assert len(chunks) > 3
    assert all(text[c.char_end :].startswith(newline * 2) for c in chunks[:-1])


def test_cuts_at_line_breaks_before_sentence_ends() -> None:
    line = "First sentence here. Second sentence follows, and it keeps going for a while."
    text = "\n".join([line] * 12)
    chunks = split_document(make_doc(text), get_tokenizer("cl100k_base"), 50, 0)
    assert len(chunks) > 3
    assert all(end.startswith("\n") for end in ends(chunks, text))


def test_cuts_at_sentence_ends_before_spaces() -> None:
    text = " ".join(["This sentence has exactly eight words in it."] * 30)
    chunks = split_document(make_doc(text), get_tokenizer("cl100k_base"), 40, 0)
    assert len(chunks) > 3
    assert all(chunk.text.endswith(".") for chunk in chunks)


def test_cuts_after_full_width_stops_without_spaces() -> None:
    text = "这是一个没有空格的中文句子，用来测试分割。" * 40
    chunks = split_document(make_doc(text), get_tokenizer("cl100k_base"), 50, 0)
    assert len(chunks) > 3
    assert all(chunk.text.endswith("。") for chunk in chunks)


def test_cuts_at_spaces_when_there_is_no_punctuation() -> None:
    text = " ".join(f"word{i}" for i in range(400))
    chunks = split_document(make_doc(text), get_tokenizer("cl100k_base"), 30, 0)
    assert all(end.startswith(" ") for end in ends(chunks, text))
    assert " ".join(chunk.text for chunk in chunks) == text


def test_a_long_word_is_cut_at_token_boundaries_as_a_last_resort() -> None:
    word = "".join(random.Random(3).choices("abcdefghijklmnopqrstuvwxyz", k=5_000))
    text = f"Before it. {word} after it."
    tokenizer = get_tokenizer("cl100k_base")
    chunks = split_document(make_doc(text), tokenizer, 64, 0)
    assert "".join(chunk.text for chunk in chunks[1:-1]) in word
    assert all(chunk.n_tokens <= 64 for chunk in chunks)
    # Pieces of the word are close to the budget, not cut short at character granularity.
    assert all(chunk.n_tokens >= 60 for chunk in chunks[1:-2])


def test_overlap_starts_the_next_chunk_at_a_sentence() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(60))
    tokenizer = get_tokenizer("cl100k_base")
    chunks = split_document(make_doc(text), tokenizer, 48, 16)
    for before, after in itertools.pairwise(chunks):
        assert after.char_start < before.char_end  # Sentences are short: there is overlap.
        assert after.text.startswith("Sentence number")


def test_a_long_whitespace_run_does_not_trap_the_overlap() -> None:
    # The window from an overlapping start ends inside the run, where no chunk may end: the
    # next chunk must start after the run instead of repeating the end of the previous one.
    text = "Alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu." + " " * 2_000
    doc = make_doc(text + "Omega is the end.")
    tokenizer = get_tokenizer("cl100k_base")
    chunks = split_document(doc, tokenizer, 16, 8)
    assert [chunk.text for chunk in chunks] == [text.strip(), "Omega is the end."]
    assert_chunk_invariants(doc, chunks, tokenizer, 16, 8)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (-3, 0), (10, 10), (10, -1)])
def test_rejects_invalid_budgets(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        split_document(make_doc("some text"), get_tokenizer("chars"), max_tokens, overlap)


def test_a_character_larger_than_the_budget_raises() -> None:
    with pytest.raises(ValueError, match="alone is more than max_tokens=1"):
        split_document(make_doc("ok 😀"), get_tokenizer("cl100k_base"), 1, 0)


class CountingTokenizer(Tokenizer):
    """Wraps a tokenizer and records how much text the splitter asks it to look at."""

    def __init__(self, inner: Tokenizer) -> None:
        self.name = inner.name
        self.inner = inner
        self.counted_chars = 0
        self.offset_calls = 0

    def count(self, text: str) -> int:
        self.counted_chars += len(text)
        return self.inner.count(text)

    def token_offsets(self, text: str) -> TokenOffsets:
        self.offset_calls += 1
        return self.inner.token_offsets(text)


def english_document(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocabulary = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "data", "with"]
    paragraphs, size = [], 0
    while size < n_chars:
        sentences = [
            " ".join(rng.choices(vocabulary, k=rng.randint(5, 25))).capitalize() + "."
            for _ in range(rng.randint(2, 8))
        ]
        paragraphs.append(" ".join(sentences))
        size += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs)


def test_a_2mb_document_is_tokenized_once_and_counted_in_linear_work() -> None:
    text = english_document(2_000_000)
    doc = make_doc(text)
    tokenizer = CountingTokenizer(get_tokenizer("cl100k_base"))
    chunks = split_document(doc, tokenizer, 512, 64)
    assert tokenizer.offset_calls == 1
    assert tokenizer.counted_chars < 1.5 * len(text)
    assert_chunk_invariants(doc, chunks, get_tokenizer("cl100k_base"), 512, 64)


def test_split_chunks_transform_emits_chunks_and_rejects() -> None:
    cfg = SplitConfig(max_tokens=1, overlap_tokens=0, tokenizer="cl100k_base")
    splittable = [make_doc("a b c d", "plain"), make_doc("x\ny", "two")]
    too_big = make_doc("🙂", "emoji")  # Two tokens: no chunk of one token can hold it.
    tokenizer = get_tokenizer(cfg.tokenizer)
    expected_chunks = [c for doc in splittable for c in split_document(doc, tokenizer, 1, 0)]

    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        split = pipeline | beam.Create([*splittable, too_big]) | SplitChunks(cfg)
        assert (split["chunks"].element_type, split["rejects"].element_type) == (Chunk, Reject)
        assert_that(split["chunks"], equal_to(expected_chunks), label="CheckChunks")
        rejects = split["rejects"] | beam.Map(
            lambda r: (r.id, r.doc_id, r.source, r.stage, r.reason, r.detail.split(":")[0])
        )
        assert_that(
            rejects,
            equal_to([("emoji", "emoji", too_big.source, STAGE_SPLIT, SPLIT_FAILED, "ValueError")]),
            label="CheckRejects",
        )
