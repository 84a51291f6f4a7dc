"""Small test doubles for pure logic: a fake clock (no test sleeps) and record builders."""

from __future__ import annotations

import hashlib

from transforms.types import Chunk


class FakeClock:
    """A clock whose ``sleep`` only advances time; records every sleep for assertions."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += max(0.0, seconds)


def make_chunk(doc_id: str = "d", index: int = 0, text: str = "hello", n_tokens: int = 1) -> Chunk:
    return Chunk(
        chunk_id=f"{doc_id}#{index}", doc_id=doc_id, chunk_index=index, char_start=0,
        char_end=len(text), n_tokens=n_tokens,
        content_sha256=hashlib.sha256(text.encode()).hexdigest(), text=text, source=f"mem:{doc_id}",
    )
