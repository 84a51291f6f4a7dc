"""Generate the sample corpus in ``examples/sample``: realistic text with known bad records.

The demo (``make run``, ``configs/local.yaml``) and the end-to-end tests need a corpus that looks
like real input (several formats, topics, languages, a few long documents) and contains one of
every kind of bad record, with the expected reject reasons written down. Writing it by a seeded
program instead of by hand keeps it reproducible and lets ``README.md`` state exact counts.

Documents of one topic are composed from that topic's vocabulary (canned sentences, and
sentences assembled from subjects, verbs, objects and details; the tables are in the sibling
``sample_vocabulary.py``), so they are lexically closer to each other than to other topics: a
similarity search over the embedded corpus should return documents of the query's topic first.

Usage::

    python examples/make_sample_corpus.py [--out DIR]     # default: examples/sample

Re-running it rewrites byte-identical files (fixed seed; gzip without a timestamp), and
``tests/test_local_server.py`` checks that the committed copy is what this script produces.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

# The data tables live in the sibling sample_vocabulary.py. Put this folder on the import path so
# they are found however this file is loaded: as a script, or by path (tests/test_local_server.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_vocabulary import (
    AWKWARD_NOTES,
    CJK_SOURCES,
    GENERIC_SENTENCES,
    PAGES,
    TITLE_OPENERS,
    TOPIC_BY_NAME,
    TOPICS,
    CjkSource,
    Topic,
)

SEED = 20_240_611
DEFAULT_OUT = Path(__file__).resolve().parent / "sample"

N_ARTICLES = 250
N_LONG = 20
N_EMOJI = 6
LONG_WORDS = (3_000, 8_000)
MAX_DOCUMENT_BYTES = 200_000  # validate.max_document_bytes in configs/local.yaml

ARTICLES = "articles.jsonl.gz"
NOTES = "notes.csv"


@dataclass(frozen=True)
class BadRecord:
    """A record the pipeline must reject, where it is, and why (listed in README.md).

    ``record_id`` is the id the reject carries: None where the record has none or cannot be
    parsed. ``position`` is the 1-based JSONL line or CSV data row, 0 until it is known.
    """

    file: str
    record_id: str | None
    stage: str
    reason: str
    what: str
    position: int = 0


@dataclass(frozen=True)
class _Line:
    data: bytes
    bad: BadRecord | None = None


# --- composing text ----------------------------------------------------------------------------


def _sentence(rng: random.Random, topic: Topic) -> str:
    roll = rng.random()
    if roll < 0.08:
        return rng.choice(GENERIC_SENTENCES)
    if roll < 0.5:
        return rng.choice(topic.sentences)
    subject = rng.choice(topic.subjects)
    parts = (subject, rng.choice(topic.verbs), rng.choice(topic.objects), rng.choice(topic.details))
    return f"{subject[0].upper()}{subject[1:]} {' '.join(parts[1:])}."


def _paragraph(rng: random.Random, topic: Topic, emoji: bool = False) -> str:
    n = rng.randint(3, 7)
    sentences: list[str] = []
    while len(sentences) < n:  # no sentence twice in a paragraph, as a writer would not
        sentence = _sentence(rng, topic)
        if sentence not in sentences:
            sentences.append(sentence)
    if emoji:
        sentences = [f"{s} {rng.choice(topic.emoji)}" if rng.random() < 0.4 else s
                     for s in sentences]
    return " ".join(sentences)


def _title(rng: random.Random, topic: Topic) -> str:
    return f"{rng.choice(TITLE_OPENERS)} {rng.choice(topic.objects)}"


def _article(rng: random.Random, doc_id: str, topic: Topic, kind: str) -> dict[str, str]:
    title = _title(rng, topic)
    if kind == "long":
        target = rng.randint(*LONG_WORDS)
        paragraphs: list[str] = []
        words = 0
        while words < target:
            paragraphs.append(_paragraph(rng, topic))
            words += len(paragraphs[-1].split())
        title = f"The long read: {title[0].lower()}{title[1:]}"
    else:
        n = rng.choices((1, 2, 3, 4), weights=(3, 4, 3, 2))[0]
        paragraphs = [_paragraph(rng, topic, emoji=kind == "emoji") for _ in range(n)]
        if kind == "emoji":
            title = f"{title} {rng.choice(topic.emoji)}"
    return {"id": doc_id, "title": title, "text": "\n\n".join(paragraphs), "lang": "en",
            "topic": topic.name}


def _cjk_article(rng: random.Random, doc_id: str, source: CjkSource) -> dict[str, str]:
    paragraphs = ["".join(rng.sample(source.sentences, 4)) for _ in range(2)]
    return {"id": doc_id, "title": source.title, "text": "\n\n".join(paragraphs),
            "lang": source.lang, "topic": source.topic}


def _json_line(record: object) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


# --- the files ---------------------------------------------------------------------------------


def _bad(record_id: str | None, stage: str, reason: str, what: str) -> BadRecord:
    return BadRecord(ARTICLES, record_id, stage, reason, what)


def _article_lines(rng: random.Random) -> list[_Line]:
    """The good articles, with the JSONL bad records spread between them."""
    cjk_ids = rng.sample(range(N_ARTICLES), len(CJK_SOURCES))
    rest = [i for i in range(N_ARTICLES) if i not in cjk_ids]
    special = rng.sample(rest, N_LONG + N_EMOJI)
    kinds = dict.fromkeys(special[:N_LONG], "long") | dict.fromkeys(special[N_LONG:], "emoji")
    topics = [TOPICS[i % len(TOPICS)] for i in range(N_ARTICLES)]
    rng.shuffle(topics)

    articles: list[dict[str, str]] = []
    for i in range(N_ARTICLES):
        doc_id = f"art-{i + 1:04d}"
        if i in cjk_ids:
            articles.append(_cjk_article(rng, doc_id, CJK_SOURCES[cjk_ids.index(i)]))
        else:
            articles.append(_article(rng, doc_id, topics[i], kinds.get(i, "regular")))
    lines = [_Line(_json_line(article)) for article in articles]

    duplicated = articles[41]
    second_version = _article(rng, duplicated["id"], TOPIC_BY_NAME["music"], "regular")
    repeated = "The quarterly statement repeats this sentence to make the record far too large. "
    too_large_text = repeated * (MAX_DOCUMENT_BYTES // len(repeated) + 50)
    filler = _article(rng, "", TOPIC_BY_NAME["cooking"], "regular")  # text for id-less records
    bad_lines = [
        _Line(b'{"id": "art-broken-json", "text": "the closing brace and quote are missing\n',
              _bad(None, "read", "malformed_record", "a line that is not JSON (unterminated)")),
        _Line(_json_line(["art-array", "a JSON array where an object belongs"]),
              _bad(None, "read", "malformed_record", "a JSON line that is an array")),
        _Line(b'{"id": "art-latin1", "text": "Caf\xe9 cr\xe8me br\xfbl\xe9e, written in '
              b'Latin-1 bytes"}\n',
              _bad(None, "read", "invalid_utf8", "a line with invalid UTF-8 bytes (Latin-1)")),
        _Line(_json_line({"title": filler["title"], "text": filler["text"], "lang": "en",
                          "topic": "cooking"}),
              _bad(None, "validate", "missing_id", "a record without an id field")),
        _Line(_json_line({"id": "", "title": "An empty id", "text": filler["text"], "lang": "en",
                          "topic": "cooking"}),
              _bad(None, "validate", "missing_id", 'a record whose id is ""')),
        _Line(_json_line({"id": "art-numeric-text", "title": "A number", "text": 42,
                          "lang": "en", "topic": "finance"}),
              _bad("art-numeric-text", "validate", "not_text", "text is the number 42")),
        _Line(_json_line({"id": "art-null-text", "title": "Null", "text": None, "lang": "en",
                          "topic": "music"}),
              _bad("art-null-text", "validate", "empty_text", "text is null")),
        _Line(_json_line({"id": "art-empty-text", "title": "Empty", "text": "", "lang": "en",
                          "topic": "music"}),
              _bad("art-empty-text", "validate", "empty_text", 'text is ""')),
        _Line(_json_line({"id": "art-blank-text", "title": "Blank", "text": " \n\t  \n",
                          "lang": "en", "topic": "gardening"}),
              _bad("art-blank-text", "validate", "empty_text", "text is whitespace only")),
        _Line(_json_line({"id": "art-too-large", "title": "Too large", "text": too_large_text,
                          "lang": "en", "topic": "finance"}),
              _bad("art-too-large", "validate", "too_large",
                   f"text of {len(too_large_text.encode())} bytes, over {MAX_DOCUMENT_BYTES}")),
        _Line(_json_line(second_version),
              _bad(duplicated["id"], "validate", "duplicate_id",
                   "a second, different record with an id used earlier in the file")),
    ]
    # Spread the bad records evenly; the duplicate goes last, well after the first version.
    stride = N_ARTICLES // len(bad_lines)
    for n, line in reversed(list(enumerate(bad_lines))):
        lines.insert((n + 1) * stride, line)
    return lines


def _notes(rng: random.Random) -> tuple[bytes, int, list[BadRecord]]:
    """notes.csv: short notes, some needing CSV quoting, one row without an id, one blank."""
    notes = list(AWKWARD_NOTES)
    for _ in range(19):
        topic = rng.choice(TOPICS)
        sentences = [_sentence(rng, topic) for _ in range(rng.randint(1, 2))]
        notes.append((topic.name, " ".join(sentences)))
    rng.shuffle(notes)
    rows: list[list[str]] = [[f"note-{i + 1:02d}", text, topic] for i, (topic, text) in
                             enumerate(notes)]
    bad = [
        BadRecord(NOTES, None, "validate", "missing_id", "a row whose id column is empty", 11),
        BadRecord(NOTES, "note-blank", "validate", "empty_text", "text is whitespace only", 23),
    ]
    rows.insert(bad[0].position - 1, ["", "Remember to water the seedlings first.", "gardening"])
    rows.insert(bad[1].position - 1, ["note-blank", "   ", "music"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "text", "topic"])
    writer.writerows(rows)
    return out.getvalue().encode("utf-8"), len(rows), bad


def _page(rng: random.Random, topic: Topic, markdown: bool) -> str:
    title = _title(rng, topic)
    sections = rng.sample(topic.objects, 3)
    if markdown:
        parts = [f"# {title}"]
        for heading in sections:
            parts += [f"## {heading[0].upper()}{heading[1:]}", _paragraph(rng, topic),
                      _paragraph(rng, topic)]
    else:
        parts = [f"{title}\n{'=' * len(title)}"]
        parts += [_paragraph(rng, topic) for _ in range(5)]
    return "\n\n".join(parts) + "\n"


def build_corpus() -> dict[str, bytes]:
    """Every file of the corpus, README.md included, by path relative to the output directory.

    Everything comes from one RNG in a fixed order, so the output depends on nothing else.
    """
    rng = random.Random(SEED)
    lines = _article_lines(rng)
    bad = [replace(line.bad, position=position)
           for position, line in enumerate(lines, start=1) if line.bad is not None]
    notes, n_notes, notes_bad = _notes(rng)
    bad += notes_bad
    files = {
        ARTICLES: gzip.compress(b"".join(line.data for line in lines), compresslevel=9, mtime=0),
        NOTES: notes,
    }
    for path, topic, markdown in PAGES:
        files[f"pages/{path}"] = _page(rng, TOPIC_BY_NAME[topic], markdown).encode("utf-8")
    records = {ARTICLES: len(lines), NOTES: n_notes, "pages/": len(PAGES)}
    files["README.md"] = _readme(records, bad).encode("utf-8")
    return files


def _readme(records: dict[str, int], bad: list[BadRecord]) -> str:
    total = sum(records.values())
    reasons = Counter(record.reason for record in bad)
    expected = {
        "records": total,
        "records_by_file": records,
        "valid_documents": total - len(bad),
        "rejects": len(bad),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "bad_records": [
            {"file": r.file, "position": r.position, "id": r.record_id, "stage": r.stage,
             "reason": r.reason}
            for r in bad
        ],
    }
    table = "\n".join(
        f"| `{r.file}` | {r.position} | {f'`{r.record_id}`' if r.record_id else '—'} | "
        f"{r.what} | {r.stage} | `{r.reason}` |"
        for r in bad
    )
    return f"""# Sample corpus

Generated by `python examples/make_sample_corpus.py` (fixed seed; do not edit by hand: change the
script and re-run it, and `tests/test_local_server.py` checks that the two agree). It is the
input of `configs/local.yaml`, which sets `validate.max_document_bytes: {MAX_DOCUMENT_BYTES}`.

- `{ARTICLES}`, {records[ARTICLES]} lines: {N_ARTICLES} articles
  `{{"id", "title", "text", "lang", "topic"}}`, mostly 1–4 paragraphs, on {len(TOPICS)} topics:
  {", ".join(t.name for t in TOPICS)}.
  {N_LONG} are long reads of {LONG_WORDS[0]:,}–{LONG_WORDS[1]:,} words (several 512-token chunks
  each), {len(CJK_SOURCES)} are in Chinese or Japanese and {N_EMOJI} carry emoji. Plus the bad
  records below.
- `{NOTES}`, {records[NOTES]} data rows: short notes `id,text,topic`, some with commas, quotes
  and newlines inside quoted fields.
- `pages/`, {records["pages/"]} files: one document per `.md` or `.txt` file, whose id is its
  path below `pages/` (one is in `pages/guides/`).

Documents of one topic are built from that topic's vocabulary, so they are lexically closer to
each other than to other topics, which the local hashing embedder reflects.

## Bad records

Positions are 1-based JSONL lines or CSV data rows (the header is row 0). The duplicate id keeps
its first version (the earlier line); the later one is rejected.

| file | position | id in the reject | record | stage | reason |
| --- | --- | --- | --- | --- | --- |
{table}

## Expected counts

A record is a non-blank JSONL line, a CSV data row or a page file, bad ones included.

```json
{_json_block(expected)}
```
"""


def _json_block(expected: dict[str, object]) -> str:
    """JSON with one top-level key per line and one bad record per line: diffable, readable."""
    lines = []
    for key, value in expected.items():
        if isinstance(value, list):
            items = ",\n".join(f"    {json.dumps(item)}" for item in value)
            lines.append(f'  "{key}": [\n{items}\n  ]')
        else:
            lines.append(f'  "{key}": {json.dumps(value)}')
    return "{\n" + ",\n".join(lines) + "\n}"


def write_corpus(out: Path) -> list[Path]:
    """Write the corpus under ``out`` (created if needed); returns the files written."""
    written = []
    for relative, data in build_corpus().items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    written = write_corpus(args.out)
    size = sum(path.stat().st_size for path in written)
    print(f"wrote {len(written)} files, {size:,} bytes, under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
