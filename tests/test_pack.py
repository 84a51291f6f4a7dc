"""Packing invariants: every chunk once, in order, every batch within every cap."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fakes import make_chunk
from transforms.pack import BatchCaps, RequestPacker, make_request_batch


def pack(chunks, caps):
    packer = RequestPacker(caps)
    out = [b for c in chunks for b in packer.add(c)]
    return out + list(packer.flush())


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 400), st.integers(1, 300)), max_size=120),
    max_inputs=st.integers(1, 20),
    max_tokens=st.integers(50, 1000),
    max_bytes=st.integers(400, 5000),
)
def test_packing_invariants(sizes, max_inputs, max_tokens, max_bytes) -> None:
    chunks = [make_chunk("d", i, "x" * nbytes, ntok) for i, (ntok, nbytes) in enumerate(sizes)]
    caps = BatchCaps(max_inputs, max_tokens, max_bytes)
    batches = pack(chunks, caps)
    assert [c for b in batches for c in b.chunks] == chunks
    for b in batches:
        assert 1 <= len(b) <= max_inputs
        if len(b) > 1:  # a single chunk above a cap still gets its own request
            assert b.n_tokens <= max_tokens
            assert b.n_bytes <= max_bytes
    # Greedy: no two neighbouring batches could have been one.
    for a, b in itertools.pairwise(batches):
        assert (len(a) + len(b) > max_inputs or a.n_tokens + b.n_tokens > max_tokens
                or a.n_bytes + b.n_bytes > max_bytes)


def test_bundle_id_depends_only_on_chunk_ids() -> None:
    chunks = tuple(make_chunk("d", i) for i in range(3))
    assert make_request_batch(chunks).batch_id == make_request_batch(chunks).batch_id
    assert make_request_batch(chunks).batch_id != make_request_batch(chunks[:2]).batch_id
