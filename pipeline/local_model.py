"""The model behind the local embedding server: deterministic hashing embeddings.

The local server (:mod:`pipeline.local_server`) needs vectors that *mean* something, so that a
demo search finds the right documents and a test can tell one chunk's vector from its
neighbour's, computed offline in milliseconds on numpy alone. This module is that model, and the
two helpers every dialect of the server shares: the ``dimensions`` truncation and the wire
encodings of a vector.

The model: :class:`HashingEmbedder`
-----------------------------------
A feature-hashing bag-of-n-grams embedder (the "hashing trick", Weinberger et al. 2009),
followed by a fixed random rotation:

1. **Features.** The text is lower-cased and cut into words (``\\w+``, Unicode-aware, so a run of
   CJK characters is one word). The features are every word, every pair of adjacent words, and
   every character 3-gram of each word padded with boundary markers (``cat`` → ``<ca``, ``cat``,
   ``at>``), so that inflections and typos still share most of their weight.
2. **Weights.** Each distinct feature weighs ``1 + log(tf)`` (sublinear term frequency), so a
   word repeated fifty times does not drown the rest of the text.
3. **Hashing.** Each feature is hashed with keyed BLAKE2b (64 bits, the key is ``seed``): the
   hash modulo ``dim`` picks a bucket and its top bit a sign ±1. A word pair's hash is mixed
   from its two word hashes (splitmix64), which is as good as hashing the pair's string and much
   faster. The signed per-bucket sums are a sparse random projection of the unbounded feature
   space: inner products are preserved in expectation.
4. **Rotation.** The hashed vector is L2-normalised and multiplied by a fixed random orthogonal
   matrix (drawn from ``seed``). Cosines are unchanged, but every coordinate now mixes every
   bucket, so a prefix of the vector is a random projection of the whole. That is what makes the
   ``dimensions`` request parameter (truncate, then re-normalise, like OpenAI's
   text-embedding-3) sound: without it the prefix of a short text would often be all zeros.

A text without word characters (punctuation, emoji, whitespace) is hashed by its raw characters
instead, and if the signed sums of a very short text cancel out exactly, its signs are dropped:
every non-empty text gets a finite unit vector. The same text, ``dim`` and ``seed`` always give
the same vector, whatever else is in the request (bit for bit on one platform; the rotation goes
through BLAS, whose last-bit rounding may differ between builds).

What it is not: a semantic model. Two texts are close when they share words and spellings, not
meaning ("car" and "automobile" are unrelated to it). It is for demos and tests.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "DEFAULT_DIM",
    "DEFAULT_MODEL",
    "HashingEmbedder",
    "count_tokens",
    "encode_embedding",
    "truncate_dimensions",
]

DEFAULT_MODEL = "local-hash-embedding"
DEFAULT_DIM = 256

_WORD_RE = re.compile(r"\w+")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

# Feature namespaces, so that the word "the" and the 3-gram "the" are different features.
_WORD_PREFIX = "w\x1f"
_GRAM_PREFIX = "c\x1f"
_RAW_PREFIX = "r\x1f"

# A word's hashes are memoised: natural text is Zipfian, so after a few documents almost every
# word is a hit. Starting afresh when full is simpler than an LRU and costs one cold document.
_WORD_CACHE_SIZE = 1 << 18

# splitmix64 constants (Steele, Lea & Flood 2014), used to mix two word hashes into a pair hash.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_SIGN_SHIFT = np.uint64(63)


def count_tokens(text: str) -> int:
    """The server's own token count, reported in ``usage``: words plus punctuation marks.

    Deliberately *not* cl100k: the pipeline counts tokens with its own tokenizer to plan
    requests, and a provider's count differs from it. The local server reporting a different
    number keeps the pipeline honest about which count goes into ``usage/``. Any non-empty text
    counts at least one token.
    """
    if not text:
        return 0
    return max(1, len(_TOKEN_RE.findall(text)))


class HashingEmbedder:
    """Deterministic text embeddings by feature hashing; see the module docstring for the model.

    Thread-safe: the only state besides the constants is a memo of word hashes, and concurrent
    writes to it are idempotent.

    >>> vectors = HashingEmbedder(dim=64).embed(["a red apple", "a green apple", "tax return"])
    >>> vectors.shape, vectors.dtype
    ((3, 64), dtype('float32'))
    >>> bool(vectors[0] @ vectors[1] > vectors[0] @ vectors[2])
    True
    """

    def __init__(self, dim: int = DEFAULT_DIM, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"dim must be at least 1, got {dim}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        self.dim = dim
        self.seed = seed
        self._key = seed.to_bytes(8, "little")
        self._rotation = _random_rotation(dim, seed)
        self._word_cache: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` into an ``(n, dim)`` float32 array of unit rows, in input order.

        A text's vector does not depend on the other texts of the call, so how the pipeline
        bundles chunks never changes their vectors. Raises ``ValueError`` for an empty string:
        there is nothing to hash, and the API refuses it before it gets here.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        features: list[np.ndarray] = []
        term_counts: list[np.ndarray] = []
        for row, text in enumerate(texts):
            if not text:
                raise ValueError(f"texts[{row}] is empty; every text must be non-empty")
            distinct, tf = np.unique(self._feature_hashes(text), return_counts=True)
            features.append(distinct)
            term_counts.append(tf)
        hashed = self._bucket_sums(features, term_counts)
        hashed /= np.linalg.norm(hashed, axis=1, keepdims=True)
        rotated: np.ndarray = hashed @ self._rotation
        rotated /= np.linalg.norm(rotated, axis=1, keepdims=True)
        return rotated.astype(np.float32)

    def _bucket_sums(self, features: list[np.ndarray], term_counts: list[np.ndarray]) -> np.ndarray:
        """The signed, sublinearly weighted bucket sums of each text, all texts in one pass.

        One ``bincount`` over ``row * dim + bucket`` replaces a dozen small numpy calls per text,
        which is where the time went when texts were done one by one.
        """
        n_rows = len(features)
        hashes = np.concatenate(features)
        weights = 1.0 + np.log(np.concatenate(term_counts))
        row_offsets = np.arange(n_rows) * self.dim
        n_features = np.fromiter(map(len, features), dtype=np.intp, count=n_rows)
        slots = np.repeat(row_offsets, n_features) + (hashes % np.uint64(self.dim)).astype(np.intp)
        signed = np.where(hashes >> _SIGN_SHIFT, -weights, weights)
        sums = np.bincount(slots, weights=signed, minlength=n_rows * self.dim)
        sums = sums.reshape(n_rows, self.dim)
        cancelled = ~sums.any(axis=1)
        if cancelled.any():
            # A few features whose signed weights cancel exactly; unsigned sums cannot cancel.
            unsigned = np.bincount(slots, weights=weights, minlength=n_rows * self.dim)
            sums[cancelled] = unsigned.reshape(n_rows, self.dim)[cancelled]
        return sums

    def _feature_hashes(self, text: str) -> np.ndarray:
        """Every feature occurrence of ``text`` as a 64-bit hash; repeats encode the tf."""
        words = _WORD_RE.findall(text.lower())
        if not words:
            return np.array([self._hash(_RAW_PREFIX + char) for char in text], dtype=np.uint64)
        cache = self._word_hashes_for(words)
        per_word = list(map(cache.__getitem__, words))
        hashes = np.concatenate(per_word)
        lengths = np.fromiter(map(len, per_word), dtype=np.intp, count=len(per_word))
        unigrams = hashes[np.cumsum(lengths) - lengths]  # each word's own hash comes first
        return np.concatenate([hashes, _mix_pairs(unigrams[:-1], unigrams[1:])])

    def _word_hashes_for(self, words: list[str]) -> dict[str, np.ndarray]:
        """The memo, holding every word in ``words``: its own hash, then its 3-grams' hashes.

        A full memo is replaced, not cleared, so a thread still reading the old one is unharmed.
        """
        cache = self._word_cache
        missing = set(words).difference(cache)
        if len(cache) + len(missing) > _WORD_CACHE_SIZE:
            cache = self._word_cache = {}
            missing = set(words)
        for word in missing:
            padded = f"<{word}>"
            grams = (padded[i : i + 3] for i in range(len(padded) - 2))
            cache[word] = np.array(
                [self._hash(_WORD_PREFIX + word), *(self._hash(_GRAM_PREFIX + g) for g in grams)],
                dtype=np.uint64,
            )
        return cache

    def _hash(self, feature: str) -> int:
        # surrogatepass: JSON may carry lone surrogates, which are still hashable code points.
        data = feature.encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(data, digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "little")


def _mix_pairs(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Order-sensitive 64-bit hashes of (left[i], right[i]) pairs, by the splitmix64 finaliser."""
    z: np.ndarray = left ^ (right * _GOLDEN + _MIX_2)  # uint64 arrays wrap silently, as meant
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    z ^= z >> np.uint64(31)
    return z


@functools.lru_cache(maxsize=8)
def _random_rotation(dim: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal ``dim × dim`` matrix, fixed by ``seed``; read-only.

    Memoised per process: tests start dozens of servers, and a QR decomposition competing for
    cores with other work can take most of a second.
    """
    gaussian = np.random.default_rng(seed).standard_normal((dim, dim))
    q, r = np.linalg.qr(gaussian)
    rotation = q * np.sign(np.diag(r))  # the sign fix makes it uniform (Mezzadri 2007)
    rotation.flags.writeable = False
    return rotation


def truncate_dimensions(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """The first ``dimensions`` values of each row, re-normalised to unit length.

    This is how OpenAI's text-embedding-3 models serve the ``dimensions`` parameter
    (Matryoshka representation learning); :class:`HashingEmbedder` vectors support it because
    their rotation spreads every feature over every coordinate.
    """
    prefix = vectors[:, :dimensions]
    norms = np.linalg.norm(prefix, axis=1, keepdims=True)
    unit: np.ndarray = prefix / np.maximum(norms, np.finfo(np.float32).tiny)
    return unit.astype(np.float32)


def encode_embedding(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One vector as OpenAI sends it: a JSON list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]

