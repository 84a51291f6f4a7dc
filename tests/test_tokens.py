"""The tokenizer registry and the two tokenizer kinds: counts, offsets, caching, pickling."""

from __future__ import annotations

import functools
import pickle

import bpe_openai
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import SplitConfig
from transforms.errors import ConfigError
from transforms.tokens import (
    CHARS_PER_TOKEN,
    TOKENIZER_NAMES,
    Tokenizer,
    count_tokens,
    get_tokenizer,
)

BPE_NAMES = ("cl100k_base", "o200k_base")

# Text that stresses byte-level BPE: multi-byte and multi-token characters, joiners, whitespace.
awkward_text = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(
            ["😀", "👩‍👩‍👧", "🇫🇷", "e\u0301", "中", "\u3000", "\r\n", "  ", "\U0002a6a5"]
        ),
    ),
    max_size=60,
).map("".join)


@functools.cache
def reference_encoding(name: str) -> bpe_openai.Encoding:
    return bpe_openai.get_encoding(name)


def reference_offsets(name: str, text: str) -> list[int]:
    """Offsets as bpe_openai's own (slow, one-shot) decode_with_offsets reports them."""
    encoding = reference_encoding(name)
    return encoding.decode_with_offsets(encoding.encode_ordinary(text))[1]


def test_registry_matches_the_config_choices() -> None:
    # split.tokenizer is a string since it may also name a tokenizer.json: every built-in name
    # validates, and a name that is neither a built-in nor a file is refused with the choices.
    for name in TOKENIZER_NAMES:
        assert SplitConfig(tokenizer=name).tokenizer == name
    with pytest.raises(pydantic.ValidationError, match="choose one of cl100k_base"):
        SplitConfig(tokenizer="cl100k")


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_get_tokenizer_caches_one_instance_per_process(name: str) -> None:
    tokenizer = get_tokenizer(name)
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.name == name
    assert get_tokenizer(name) is tokenizer


def test_unknown_tokenizer_is_a_config_error_naming_key_and_choices() -> None:
    with pytest.raises(ConfigError) as info:
        get_tokenizer("gpt2")
    assert info.value.key == "split.tokenizer"
    message = str(info.value)
    assert "'gpt2'" in message
    assert all(name in message for name in TOKENIZER_NAMES)


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_pickles_by_name_to_the_cached_instance(name: str) -> None:
    tokenizer = get_tokenizer(name)
    payload = pickle.dumps(tokenizer)
    assert len(payload) < 200  # The name, not the vocabulary.
    assert pickle.loads(payload) is tokenizer


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_empty_text(name: str) -> None:
    tokenizer = get_tokenizer(name)
    assert tokenizer.count("") == 0
    assert len(tokenizer.token_offsets("")) == 0


def test_known_counts() -> None:
    assert count_tokens("cl100k_base", "hello world") == 2
    assert count_tokens("o200k_base", "hello world") == 2
    assert count_tokens("chars", "hello world") == 3


@pytest.mark.parametrize("name", BPE_NAMES)
@settings(max_examples=150, deadline=None)
@given(text=awkward_text)
def test_bpe_offsets_and_count_agree_with_the_encoder(name: str, text: str) -> None:
    tokenizer = get_tokenizer(name)
    offsets = tokenizer.token_offsets(text).tolist()
    assert offsets == reference_offsets(name, text)
    assert tokenizer.count(text) == len(offsets)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=50))
def test_chars_is_one_token_per_four_characters(text: str) -> None:
    tokenizer = get_tokenizer("chars")
    assert tokenizer.count(text) == -(-len(text) // CHARS_PER_TOKEN)
    assert tokenizer.token_offsets(text).tolist() == list(range(0, len(text), CHARS_PER_TOKEN))


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_lone_surrogates_count_as_replacement_characters(name: str) -> None:
    tokenizer = get_tokenizer(name)
    text = "broken \ud83d pair and \udfff here"
    replaced = "broken \ufffd pair and \ufffd here"
    assert tokenizer.count(text) == tokenizer.count(replaced)
    assert tokenizer.token_offsets(text).tolist() == tokenizer.token_offsets(replaced).tolist()


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.\n" * 30_000,  # 1.35 M characters
        "汉字" * 260_000,  # No whitespace at all; over 200,000 tokens.
    ],
    ids=["english", "unspaced"],
)
def test_bpe_handles_text_beyond_the_encoder_limits(text: str) -> None:
    tokenizer = get_tokenizer("cl100k_base")
    offsets = tokenizer.token_offsets(text)
    assert offsets[0] == 0
    assert (offsets[1:] >= offsets[:-1]).all()
    assert offsets[-1] < len(text)
    # Segments are tokenized separately, so the estimate may differ from the exact count slightly.
    assert abs(tokenizer.count(text) - len(offsets)) <= len(text) // 10_000


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_batched_counts_equal_the_encoders_own(name: str) -> None:
    """Counts come from toktok-rs (batched) and offsets from bpe-openai: the two must agree on
    every kind of text, or the splitter's budget would be off."""
    import bpe_openai

    encoding = bpe_openai.get_encoding(name)
    texts = ["", " ", "hello world", "naïve café — 北京是中华人民共和国的首都。", "🙂" * 30,
             "x" * 5000, "a\n\n b\t\tc  ", "\ud800 lone surrogate", "<|endoftext|> is text",
             "  ".join(f"word{i}" for i in range(3000)), "1234567890" * 300]
    tokenizer = get_tokenizer(name)
    expected = [len(encoding.encode_ordinary(t.replace("\ud800", "\ufffd"))) for t in texts]
    assert tokenizer.count_many(texts) == expected
    assert [tokenizer.count(t) for t in texts] == expected
