"""``make bench``: how close embedpipe runs to a provider's rate limit, and what it loses.

Against the fault server (:mod:`tests.support.fault_server`, in its own process) with a TPM and an RPM
limit and 60 ms latency, over a generated corpus that needs ``--minutes`` (default 1.1) at the
limit, three clients embed the same chunks:

- ``embedpipe, 1 worker``: the default in-process runner;
- ``embedpipe, 2 workers``: the FnApiRunner in multi_processing mode, two worker processes that
  share the limit (each takes half; AIMD and Retry-After do the rest);
- ``naive``: one request at a time, sleeping Retry-After on a 429 (the usual hand-written loop).

Printed per client: efficiency (tokens served per minute between the server's first and last
successful answer, over the TPM limit), the share of requests answered 429, wall time against
the ideal (total tokens as the server counts them / TPM), and chunks lost (must be 0). The preflight is turned off: it would
open the measured window seconds before the pipeline starts sending.

    python -m tests.bench [--tpm 300000] [--rpm 3000] [--minutes 1.1] [--only embedpipe-1]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipeline.config import parse_config
from pipeline.run import RunRequest, execute
from tests.support.harness import read_output
from transforms.tokens import get_tokenizer

WORDS = ["orbit", "comet", "nebula", "galaxy", "telescope", "survey", "quasar", "pulsar", "photon", "spectrum", "lens", "mirror", "sauce", "butter", "garlic", "thyme", "simmer", "roast", "bake", "knead", "dough", "yeast", "market", "bond", "yield", "equity", "rate", "inflation", "budget", "ledger", "audit", "stadium", "striker", "keeper", "match", "league", "season"]
INPUTS_PER_REQUEST = 16


@dataclass
class Result:
    client: str
    wall_s: float
    ideal_s: float
    efficiency: float | None
    share_429: float
    requests: int
    chunks_lost: int


def make_corpus(folder: Path, total_tokens: int, seed: int = 7) -> tuple[Path, int, int]:
    """Distinct one-chunk documents of about 120 tokens, ``total_tokens`` in all (cl100k)."""
    rng = random.Random(seed)
    tokenizer = get_tokenizer("cl100k_base")
    path = folder / "corpus.jsonl"
    tokens = docs = 0
    with path.open("w", encoding="utf-8") as f:
        while tokens < total_tokens:
            text = f"Record {docs}. " + " ".join(rng.choice(WORDS) for _ in range(110)) + "."
            tokens += tokenizer.count(text)
            f.write(json.dumps({"id": f"doc-{docs}", "text": text}) + "\n")
            docs += 1
    return path, docs, tokens


class FaultServerProcess:
    """The fault server in a subprocess, so client worker processes compete for it fairly."""

    def __init__(self, tpm: int, rpm: int, latency_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fault_server", "--tpm", str(tpm), "--rpm", str(rpm),
             "--latency", str(latency_s)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()

    def report(self) -> dict:
        return httpx.get(f"{self.base_url}/fault/report", timeout=10).json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_embedpipe(name: str, corpus: Path, out: Path, server: FaultServerProcess, tpm: int,
                  rpm: int, beam_args: list[str], n_docs: int) -> tuple[float, int]:
    cfg = parse_config({
        "input": {"path": str(corpus)},
        "split": {"max_tokens": 512, "overlap_tokens": 0},
        "provider": {"base_url": server.base_url, "model": "local-hash-embedding",
                     "api_key_env": None, "max_inputs_per_request": INPUTS_PER_REQUEST,
                     "timeout_s": 30, "preflight": False},
        "limits": {"tokens_per_minute": tpm, "requests_per_minute": rpm, "max_concurrency": 16},
        "output": {"path": str(out)},
        "cache": {"enabled": False},
    })
    t0 = time.monotonic()
    execute(RunRequest(cfg, beam_args=beam_args, quiet=True))
    wall = time.monotonic() - t0
    manifest, _ = read_output(str(out))
    print(f"  {name}: {manifest['counts']}", file=sys.stderr)
    return wall, n_docs - manifest["counts"]["chunks_embedded"]


def run_naive(corpus: Path, server: FaultServerProcess, n_docs: int) -> tuple[float, int]:
    """Sequential requests; on a 429, sleep what Retry-After says and try again."""
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    embedded = 0
    t0 = time.monotonic()
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for start in range(0, len(texts), INPUTS_PER_REQUEST):
            batch = texts[start:start + INPUTS_PER_REQUEST]
            while True:
                r = client.post("/embeddings", json={"model": "local-hash-embedding",
                                                     "input": batch})
                if r.status_code == 429:
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                r.raise_for_status()
                embedded += len(r.json()["data"])
                break
    return time.monotonic() - t0, n_docs - embedded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--tpm", type=int, default=300_000)
    parser.add_argument("--rpm", type=int, default=3_000)
    parser.add_argument("--latency", type=float, default=0.06)
    parser.add_argument("--minutes", type=float, default=1.1,
                        help="corpus size in minutes of the TPM limit")
    parser.add_argument("--only", choices=["embedpipe-1", "embedpipe-2", "naive"],
                        action="append")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-") as tmp:
        folder = Path(tmp)
        corpus, n_docs, tokens = make_corpus(folder, int(args.tpm * args.minutes))
        print(f"corpus: {n_docs} chunks, {tokens} tokens by cl100k; limits {args.tpm} TPM, "
              f"{args.rpm} RPM; latency {args.latency * 1000:.0f} ms", flush=True)
        clients = {
            "embedpipe-1": ("embedpipe, 1 worker", []),
            "embedpipe-2": ("embedpipe, 2 worker processes",
                            ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]),
            "naive": ("naive sequential client", None),
        }
        results = []
        for key in args.only or list(clients):
            name, beam_args = clients[key]
            server = FaultServerProcess(args.tpm, args.rpm, args.latency)
            try:
                if beam_args is None:
                    wall, lost = run_naive(corpus, server, n_docs)
                else:
                    wall, lost = run_embedpipe(name, corpus, folder / key, server, args.tpm,
                                               args.rpm, beam_args, n_docs)
                report = server.report()
            finally:
                server.close()
            # The ideal in the provider's own tokens: the server counts differently from cl100k.
            ideal_s = report["tokens_served"] / args.tpm * 60.0
            results.append(Result(name, wall, ideal_s, report["efficiency"], report["share_429"],
                                  report["requests"], lost))
            print(f"  done: {name} in {wall:.1f}s", file=sys.stderr, flush=True)

    print("ideal = tokens the server counted / TPM; efficiency = served tokens/min between the "
          "first and last ok answer / TPM")
    header = (f"{'client':<32}{'efficiency':>11}{'429 share':>11}{'requests':>10}"
              f"{'wall s':>9}{'ideal s':>9}{'wall/ideal':>11}{'lost':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        eff = f"{r.efficiency:.3f}" if r.efficiency is not None else "n/a"
        print(f"{r.client:<32}{eff:>11}{r.share_429:>10.1%}{r.requests:>10}{r.wall_s:>9.1f}"
              f"{r.ideal_s:>9.1f}{r.wall_s / r.ideal_s:>11.2f}{r.chunks_lost:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
