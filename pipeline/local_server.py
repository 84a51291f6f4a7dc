"""An OpenAI-compatible embedding server on loopback: the default provider of embedpipe.

``embedpipe serve-local``, the demo and the test suite need an embedding API that runs offline,
answers in milliseconds and returns vectors that *mean* something, so that a demo search finds
the right documents and a test can tell one chunk's vector from its neighbour's. This is that
server, on the standard library and numpy only, in four parts; this module gathers their public
names, so ``from pipeline.local_server import EmbeddingServer`` is all a caller needs:

- :mod:`pipeline.local_model`: the model, :class:`HashingEmbedder` (feature hashing and a fixed
  random rotation: texts that share words and spellings are close; not a semantic model), the
  server's own :func:`count_tokens`, and the ``dimensions`` truncation and vector encodings;
- :mod:`pipeline.local_base`: :class:`LoopbackServer`, the dialect-free base (lifecycle,
  :class:`ServerStats`, the authorize-then-route protocol, :class:`ApiError`), with the one
  :class:`FaultSchedule` and the one :class:`Poison` facility every dialect uses; its bytes on
  the wire are in :mod:`pipeline.local_wire`;
- :mod:`pipeline.local_openai`: :class:`EmbeddingServer`, OpenAI's dialect, as strict as OpenAI;
- :mod:`pipeline.local_batch`: :class:`BatchServer`, the same plus OpenAI's Files and Batches API,
  with batch faults and accounting (for ``provider.mode: batch``);
- :mod:`pipeline.local_cli`: ``embedpipe serve-local`` (also ``python -m pipeline.local_server``).

Test servers for other dialects and faults build on the same base (``tests/support/``)::

    with EmbeddingServer(poison="<<bad>>") as server:
        server.schedule(None, error_reply(429, "slow down", error_type="rate_limit_error"))
        ...  # point the client at server.base_url: the 2nd request is throttled
"""

from __future__ import annotations

import sys

from pipeline.local_base import (
    ApiError,
    FaultSchedule,
    Injection,
    LoopbackServer,
    Poison,
    Reply,
    ServerStats,
    error_reply,
)
from pipeline.local_batch import BatchServer, BatchStats
from pipeline.local_cli import DEFAULT_CLI_PORT, serve_local_main, serve_until_interrupted
from pipeline.local_model import (
    DEFAULT_DIM,
    DEFAULT_MODEL,
    HashingEmbedder,
    count_tokens,
    encode_embedding,
    truncate_dimensions,
)
from pipeline.local_openai import EmbeddingRequest, EmbeddingServer, parse_embedding_request

__all__ = [
    "DEFAULT_CLI_PORT",
    "DEFAULT_DIM",
    "DEFAULT_MODEL",
    "ApiError",
    "BatchServer",
    "BatchStats",
    "EmbeddingRequest",
    "EmbeddingServer",
    "FaultSchedule",
    "HashingEmbedder",
    "Injection",
    "LoopbackServer",
    "Poison",
    "Reply",
    "ServerStats",
    "count_tokens",
    "encode_embedding",
    "error_reply",
    "parse_embedding_request",
    "serve_local_main",
    "serve_until_interrupted",
    "truncate_dimensions",
]

if __name__ == "__main__":
    sys.exit(serve_local_main())
