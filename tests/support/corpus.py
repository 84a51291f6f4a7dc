"""A test corpus with every reject class and every kind of normal document, on any fsspec URL.

``write_corpus`` writes the files and returns what a correct run must produce: the valid
documents (id → text) and the reason expected for each bad record (by ``source``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

MAX_DOCUMENT_BYTES = 20_000

TOPICS = {
    "space": "The telescope tracked the comet past Jupiter while the observatory logged orbits "
             "and the nebula glowed faintly in the infrared survey of the galaxy.",
    "cooking": "Simmer the onions in butter, add garlic and thyme, then deglaze the pan with wine "
               "and let the sauce reduce before seasoning with salt and pepper.",
    "finance": "The central bank raised interest rates as bond yields climbed and equity markets "
               "priced in slower earnings growth for the next fiscal quarter.",
}


def long_text(topic: str, paragraphs: int, seed: int) -> str:
    rng = random.Random(seed)
    words = TOPICS[topic].split()
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(8, 18)))
            sentences.append(sentence.capitalize().rstrip(".,") + ".")
        out.append(" ".join(sentences))
    return "\n\n".join(out)


@dataclass
class ExpectedCorpus:
    """What a correct run over the corpus produces."""

    documents: dict[str, str] = field(default_factory=dict)        # doc_id → text
    metadata: dict[str, Any] = field(default_factory=dict)         # doc_id → lang
    rejects: dict[str, str] = field(default_factory=dict)          # source → reason
    records: int = 0                                               # records in the files

    @classmethod
    def of(cls, documents: Mapping[str, str], *, rejects: Mapping[str, str] | None = None,
           metadata: Mapping[str, Any] | None = None) -> ExpectedCorpus:
        """What a run must produce over a corpus written by hand: one record per document and
        per reject (``source`` → reason); ``metadata`` empty when the records carry none."""
        rejects = dict(rejects or {})
        return cls(dict(documents), dict(metadata or {}), rejects, len(documents) + len(rejects))

    def plus(self, documents: Mapping[str, str], lang: str | None = "en") -> ExpectedCorpus:
        """This corpus with more valid documents appended as records, all in ``lang``."""
        return ExpectedCorpus({**self.documents, **documents},
                              {**self.metadata, **dict.fromkeys(documents, lang)},
                              dict(self.rejects), self.records + len(documents))


def write_corpus(root: str, storage_options: dict[str, Any] | None = None) -> ExpectedCorpus:
    """Write ``docs.jsonl``, ``notes.csv`` and ``pages/guide.txt`` under ``root``."""
    opts = storage_options or {}
    expected = ExpectedCorpus()
    docs_url = f"{root}/docs.jsonl"

    good = [
        ("short-1", "The cat sat on the mat.", "en"),
        ("space-long", long_text("space", 14, 1), "en"),
        ("cooking-long", long_text("cooking", 9, 2), "en"),
        ("finance-1", long_text("finance", 1, 3), "en"),
        ("cjk-1", "北京是中华人民共和国的首都。" * 40 + "東京は日本の首都です。" * 30, "zh"),
        ("emoji-1", "Launch day 🚀✨ the crew waved 👋 and the rocket rose 🔥. " * 12, "en"),
        ("dup", "first version of the duplicated document", "en"),
    ]
    lines: list[bytes] = []

    def add_json(obj: Any) -> int:
        lines.append(json.dumps(obj, ensure_ascii=False).encode())
        return len(lines)

    for doc_id, text, lang in good:
        add_json({"id": doc_id, "text": text, "lang": lang})
        expected.documents[doc_id] = text
        expected.metadata[doc_id] = lang

    def bad(obj: Any, reason: str, raw: bytes | None = None) -> None:
        if raw is not None:
            lines.append(raw)
            line = len(lines)
        else:
            line = add_json(obj)
        expected.rejects[f"{_qualified(docs_url, opts)}:{line}"] = reason

    bad({"text": "a record without an id"}, "missing_id")
    bad({"id": "", "text": "an empty id"}, "missing_id")
    bad({"id": "num", "text": 12345}, "not_text")
    bad({"id": "null-text", "text": None}, "empty_text")
    bad({"id": "empty-text", "text": ""}, "empty_text")
    bad({"id": "blank-text", "text": "  \n\t "}, "empty_text")
    bad(None, "malformed_record", raw=b'{"id": "broken", "text": "cut off')
    bad(None, "malformed_record", raw=b'["an", "array"]')
    bad(None, "invalid_utf8", raw=b'{"id": "latin1", "text": "caf\xe9 au lait"}')
    bad({"id": "big", "text": "x" * (MAX_DOCUMENT_BYTES + 1)}, "too_large")
    bad({"id": "dup", "text": "second version, rejected"}, "duplicate_id")
    expected.records = len(lines)

    with fsspec.open(docs_url, "wb", **opts) as f:
        f.write(b"\n".join(lines) + b"\n")

    csv_rows = [("note-1", "A note, with a comma and \"quotes\"."), ("note-2", "Second note.")]
    with fsspec.open(f"{root}/notes.csv", "w", **opts) as f:
        f.write("id,text,lang\n")
        for doc_id, text in csv_rows:
            f.write(f'{doc_id},"{text.replace(chr(34), chr(34) * 2)}",en\n')
            expected.documents[doc_id] = text
            expected.metadata[doc_id] = "en"
    expected.records += len(csv_rows)

    with fsspec.open(f"{root}/pages/guide.txt", "w", **opts) as f:
        f.write(long_text("space", 2, 9))
    expected.documents["guide.txt"] = long_text("space", 2, 9)
    expected.metadata["guide.txt"] = None
    expected.records += 1
    return expected


def _qualified(url: str, opts: dict[str, Any]) -> str:
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs.unstrip_protocol(path)


def corpus_patterns(root: str) -> list[str]:
    return [f"{root}/*.jsonl", f"{root}/*.csv", f"{root}/pages/"]


def add_poisoned_document(root: str, marker: str) -> dict[str, str]:
    """Append to ``root/docs.jsonl`` a multi-chunk document whose middle paragraph holds
    ``marker`` (a poison the test server refuses): the siblings of its chunk must be embedded."""
    paragraphs = [long_text("finance", 2, 11), f"A {marker} sentence here.",
                  long_text("space", 2, 12)]
    text = "\n\n".join(paragraphs)
    with open(f"{root}/docs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "poisoned", "text": text, "lang": "en"}) + "\n")
    return {"poisoned": text}


def add_short_documents(root: str, n: int) -> dict[str, str]:
    """Append ``n`` one-chunk documents with distinct texts: more requests, so faults show up."""
    docs = {f"short-extra-{i}": f"Note {i}: " + long_text("cooking", 1, 100 + i)[:200]
            for i in range(n)}
    with open(f"{root}/docs.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": doc_id, "text": text, "lang": "en"}) + "\n"
                     for doc_id, text in docs.items())
    return docs
