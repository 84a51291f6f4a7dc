"""``make bench-cache``: what the cache saves on re-runs of a large corpus.

Three runs over the same generated corpus (default 100,000 one-chunk documents) against the
embedded local server, sharing one cache: a first run, an unchanged re-run, and a re-run with
``--changed`` (default 5%) of the documents rewritten. Prints wall time, API requests, inputs
sent and cache hits/misses for each.

    python -m tests.bench_cache [--docs 100000] [--changed 0.05]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from pipeline.config import parse_config
from pipeline.local_server import EmbeddingServer
from pipeline.run import RunRequest, execute
from tests.support.harness import read_output

WORDS = ["river", "stone", "bridge", "lantern", "harbour", "meadow", "orchard", "valley", "summit", "glacier", "canyon", "delta", "market", "ledger", "invoice", "tariff", "dividend", "merger", "audit", "pension"]


def write_corpus(path: Path, n: int, changed: set[int], seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(40))
            text = f"Document {i} ({'revised' if i in changed else 'original'}): {words}."
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_cache", description=__doc__)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--changed", type=float, default=0.05)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-cache-") as tmp, \
            EmbeddingServer(dim=64) as server:
        folder = Path(tmp)
        changed = set(random.Random(1).sample(range(args.docs), int(args.docs * args.changed)))
        for name, which in (("first run", set()), ("unchanged re-run", set()),
                            (f"{args.changed:.0%} changed re-run", changed)):
            corpus = folder / "corpus.jsonl"
            write_corpus(corpus, args.docs, which, seed=7)
            cfg = parse_config({
                "input": {"path": str(corpus)},
                "provider": {"base_url": server.base_url, "model": server.model,
                             "api_key_env": None, "max_inputs_per_request": 128},
                "limits": {"requests_per_minute": 10**6, "tokens_per_minute": 10**9,
                           "max_concurrency": 4},
                "output": {"path": str(folder / "out"), "overwrite": True},
                "cache": {"path": str(folder / "cache")},
            })
            before = server.stats
            t0 = time.monotonic()
            code = execute(RunRequest(cfg, quiet=True))
            wall = time.monotonic() - t0
            after = server.stats
            manifest, _ = read_output(str(folder / "out"))
            rows.append((name, code, wall, after.requests - before.requests,
                         after.inputs - before.inputs, manifest["cache"]["hits"],
                         manifest["cache"]["misses"], manifest["counts"]["chunks_embedded"]))
            print(f"  {name}: {wall:.1f}s", flush=True)
    print(f"{'run':<22}{'exit':>5}{'wall s':>9}{'requests':>10}{'inputs sent':>13}"
          f"{'hits':>9}{'misses':>9}{'rows':>9}")
    for name, code, wall, requests, inputs, hits, misses, embedded in rows:
        print(f"{name:<22}{code:>5}{wall:>9.1f}{requests:>10}{inputs:>13}{hits:>9}{misses:>9}"
              f"{embedded:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
