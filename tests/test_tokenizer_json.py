"""``split.tokenizer`` as a Hugging Face ``tokenizer.json``: chunks counted in the model's tokens.

all-MiniLM-L6-v2 reads at most 256 word pieces, its two special tokens included; split at 512
cl100k tokens, 86% of a corpus's chunks were cut by the server without a word. With the model's
own ``tokenizer.json`` as ``split.tokenizer``, every chunk is at most ``split.max_tokens`` of the
model's tokens, [CLS] and [SEP] included.

The tokenizer here is a real one: a BERT-style WordPiece trained in the test on a tiny corpus
with the ``tokenizers`` package (a small vocabulary, so words break into several pieces), saved
with truncation and padding switched on, as model repositories often ship it.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import threading
from pathlib import Path
from typing import Any

import fsspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from pipeline.config import parse_config
from pipeline.local_server import EmbeddingServer, Reply
from pipeline.run import PREFLIGHT_TEXT, RunRequest, execute
from tests.support.corpus import TOPICS, corpus_patterns, long_text, write_corpus
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, make_config, read_output
from transforms.errors import ConfigError
from transforms.split import split_document
from transforms.tokens import TOKENIZER_NAMES, HuggingFaceTokenizer, get_tokenizer
from transforms.types import Document

SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]


def train_wordpiece(path: Path, vocab_size: int = 200) -> Path:
    """A BERT-style tokenizer.json (lower-casing normaliser, [CLS] x [SEP]), written to ``path``."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    corpus = [long_text(topic, 4, seed) for topic in TOPICS for seed in range(3)]
    tokenizer.train_from_iterator(
        corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    # As model repositories ship it: a reader that kept these would count 64 at most.
    tokenizer.enable_truncation(max_length=64)
    tokenizer.enable_padding(pad_token="[PAD]", pad_id=tokenizer.token_to_id("[PAD]"))
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_wordpiece(tmp_path_factory.mktemp("model") / "tokenizer.json")


def reference(path: Path) -> Tokenizer:
    """The model's own tokenizer, as the server would run it, without truncation or padding."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def model_count(path: Path, text: str) -> int:
    """What the model reads for ``text``: its word pieces and its special tokens."""
    return len(reference(path).encode(text).ids)


TEXTS = [
    "The telescope tracked the comet past Jupiter.",
    long_text("cooking", 3, 7),
    "  leading and trailing spaces  ",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. 東京は晴れ。 🙂🙂",
    "x" * 300,
]


@pytest.mark.parametrize("text", TEXTS)
def test_counts_are_the_models_own_special_tokens_included(tokenizer_json: Path,
                                                           text: str) -> None:
    tokenizer = get_tokenizer(str(tokenizer_json))
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert tokenizer.special_tokens == 2  # [CLS] and [SEP]
    assert tokenizer.count(text) == model_count(tokenizer_json, text)
    assert tokenizer.count_many([text, "a", text]) == [tokenizer.count(text), 3,
                                                       tokenizer.count(text)]


def test_the_files_truncation_and_padding_are_not_applied(tokenizer_json: Path) -> None:
    text = long_text("space", 5, 1)
    assert get_tokenizer(str(tokenizer_json)).count(text) > 300  # not 64, not padded


@pytest.mark.parametrize("text", TEXTS)
def test_token_offsets_start_each_word_piece(tokenizer_json: Path, text: str) -> None:
    tokenizer = get_tokenizer(str(tokenizer_json))
    offsets = tokenizer.token_offsets(text)
    pieces = reference(tokenizer_json).encode(text, add_special_tokens=False)
    assert len(offsets) == len(pieces.ids) == tokenizer.count(text) - 2
    assert offsets[0] == 0  # the first token owns any leading whitespace
    assert all(a <= b for a, b in itertools.pairwise(offsets))
    assert list(offsets[1:]) == [start for start, _ in pieces.offsets[1:]]


def test_lone_surrogates_count_as_one_character(tokenizer_json: Path) -> None:
    tokenizer = get_tokenizer(str(tokenizer_json))
    text = "before \ud800 after"
    assert tokenizer.count(text) == model_count(tokenizer_json, "before \ufffd after")
    assert len(tokenizer.token_offsets(text)) == tokenizer.count(text) - 2


def test_it_pickles_as_its_path_and_loads_once_per_process(tokenizer_json: Path) -> None:
    tokenizer = get_tokenizer(str(tokenizer_json))
    data = pickle.dumps(tokenizer)
    assert len(data) < 500  # the spec travels, not the vocabulary
    assert pickle.loads(data) is tokenizer


def test_it_is_read_through_fsspec(tokenizer_json: Path) -> None:
    url = "memory://models/minilm/tokenizer.json"
    with fsspec.open(url, "wb") as f:
        f.write(tokenizer_json.read_bytes())
    text = TEXTS[1]
    assert get_tokenizer(url).count(text) == model_count(tokenizer_json, text)


@pytest.mark.parametrize("max_tokens", [8, 16, 40])
@pytest.mark.parametrize("text", TEXTS[1:])
def test_chunks_fit_in_the_models_tokens(tokenizer_json: Path, text: str, max_tokens: int) -> None:
    tokenizer = get_tokenizer(str(tokenizer_json))
    chunks = split_document(Document("d", text, "s", None), tokenizer, max_tokens, 2)
    assert chunks
    covered = set()
    for chunk in chunks:
        assert text[chunk.char_start:chunk.char_end] == chunk.text
        assert chunk.n_tokens == model_count(tokenizer_json, chunk.text) <= max_tokens
        covered.update(range(chunk.char_start, chunk.char_end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abcdefghij klmnop.\n,?é東🙂")), min_size=1,
               max_size=400),
       st.integers(min_value=4, max_value=30))
def test_any_text_splits_within_budget(tokenizer_json: Path, text: str, max_tokens: int) -> None:
    tokenizer = get_tokenizer(str(tokenizer_json))
    chunks = split_document(Document("d", text, "s", None), tokenizer, max_tokens, 1)
    for chunk in chunks:
        assert chunk.n_tokens == tokenizer.count(chunk.text) <= max_tokens
    covered = {i for c in chunks for i in range(c.char_start, c.char_end)}
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


# -- the config edge --------------------------------------------------------------------------

BASE: dict[str, Any] = {"input": {"path": "c/*.jsonl"}}


def test_the_config_accepts_a_path_and_checks_it_loads(tokenizer_json: Path,
                                                       tmp_path: Path) -> None:
    cfg = parse_config({**BASE, "split": {"tokenizer": str(tokenizer_json), "max_tokens": 256}})
    assert cfg.split.tokenizer == str(tokenizer_json)
    with pytest.raises(ConfigError, match=r"split\.tokenizer: cannot load .*missing\.json"):
        parse_config({**BASE, "split": {"tokenizer": str(tmp_path / "missing.json")}})
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"split\.tokenizer: cannot load .*bad\.json"):
        parse_config({**BASE, "split": {"tokenizer": str(tmp_path / "bad.json")}})


def test_an_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "split": {"tokenizer": "cl100k"}})
    message = str(info.value)
    assert "split.tokenizer" in message
    assert all(name in message for name in TOKENIZER_NAMES)
    assert "tokenizer.json" in message


def test_max_tokens_must_leave_room_beside_the_special_tokens(tokenizer_json: Path) -> None:
    with pytest.raises(ConfigError, match=r"split\.max_tokens: .*2 special tokens"):
        parse_config({**BASE, "split": {"tokenizer": str(tokenizer_json), "max_tokens": 2,
                                        "overlap_tokens": 0}})
    with pytest.raises(ConfigError, match=r"split\.overlap_tokens"):
        parse_config({**BASE, "split": {"tokenizer": str(tokenizer_json), "max_tokens": 10,
                                        "overlap_tokens": 8}})


# -- end to end -------------------------------------------------------------------------------


class TruncatingServer(EmbeddingServer):
    """A server whose model reads at most ``LIMIT`` of its tokens per input ([CLS] and [SEP]
    included), cuts longer inputs without a word, and reports the tokens it embedded."""

    LIMIT = 16
    tokenizer_path = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_tokenizer = reference(Path(self.tokenizer_path))
        self.cut: set[str] = set()  # the texts it cut (the preflight's own text among them)
        self._cut_lock = threading.Lock()

    def handle_embeddings(self, payload: dict[str, Any], headers) -> Reply:
        reply = super().handle_embeddings(payload, headers)
        if reply.status != 200:
            return reply
        texts = payload["input"]
        lengths = [len(e.ids) for e in self.model_tokenizer.encode_batch(texts)]
        with self._cut_lock:
            self.cut.update(t for t, n in zip(texts, lengths, strict=True) if n > self.LIMIT)
        embedded = sum(min(n, self.LIMIT) for n in lengths)
        usage = {"prompt_tokens": embedded, "total_tokens": embedded}
        return Reply(200, {**reply.body, "usage": usage}, reply.headers)


def run_against(tmp_path: Path, serve: Serve, tokenizer_json: Path, split: dict[str, Any],
                caplog: pytest.LogCaptureFixture) -> tuple[TruncatingServer, Any, Any]:
    root = str(tmp_path / "corpus")
    write_corpus(root)
    output = str(tmp_path / "out")
    TruncatingServer.tokenizer_path = str(tokenizer_json)
    server = serve(TruncatingServer, dim=32, model=MODEL)
    cfg = make_config(corpus_patterns(root), output, server.base_url, split=split,
                      provider={"max_inputs_per_request": 2},
                      output={"include_text": True})
    with caplog.at_level(logging.WARNING):
        assert execute(RunRequest(cfg, quiet=True)) == 0
    manifest, tables = read_output(output)
    return server, manifest, tables


def test_a_run_split_by_the_models_tokenizer_fits_it(
        tmp_path: Path, serve: Serve, tokenizer_json: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Every chunk is at most max_tokens of the model's tokens, counted as the model counts
    them; the server cuts nothing and no ceiling is warned about."""
    split = {"tokenizer": str(tokenizer_json), "max_tokens": 16, "overlap_tokens": 4}
    server, manifest, tables = run_against(tmp_path, serve, tokenizer_json, split, caplog)
    rows = tables["vectors"].to_pylist()
    assert manifest["counts"]["chunks_failed"] == 0
    assert len(rows) == manifest["counts"]["chunks"] > 100
    model = reference(tokenizer_json)
    for row in rows:
        assert row["n_tokens"] == len(model.encode(row["text"]).ids) <= 16, row["id"]
    assert server.cut - {PREFLIGHT_TEXT} == set()
    assert not [r for r in caplog.records if "per input" in r.getMessage()]


def test_a_run_split_by_another_tokenizer_is_cut_and_warned(
        tmp_path: Path, serve: Serve, tokenizer_json: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The same server, split at 16 cl100k tokens: chunks run past the model's 16 and are cut,
    and the answers' ceiling is warned about once per session."""
    split = {"tokenizer": "cl100k_base", "max_tokens": 16, "overlap_tokens": 4}
    server, _manifest, tables = run_against(tmp_path, serve, tokenizer_json, split, caplog)
    texts = set(tables["vectors"].column("text").to_pylist())
    assert len(server.cut & texts) > len(texts) // 2  # about 3 in 4 of the chunk texts
    warned = [r.getMessage() for r in caplog.records if "per input" in r.getMessage()]
    assert 1 <= len(warned) <= 2, warned  # the preflight's session never sees a ceiling
    assert "exactly 16 tokens per input" in warned[0] and "split.tokenizer" in warned[0]
