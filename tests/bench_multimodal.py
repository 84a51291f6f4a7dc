"""One real multimodal run against the loopback Ark server, with its figures.

    .venv/bin/python -m tests.bench_multimodal [--records 200] [--rpm 6000] [--concurrency 8]

Writes a corpus of records (about 60% with an image beside the corpus, PNG and JPEG of varied
sizes, a few broken), runs the whole pipeline through ``pipeline.run.execute`` and prints the
records, images, requests, tokens by kind (as Ark's loopback server billed them and as the
output's usage says) and the wall time.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline.run import RunRequest, execute
from tests.support.harness import read_output
from tests.support.multimodal_server import ArkMultimodalServer
from tests.test_multimodal import mm_config


def image_bytes(rng: random.Random, kind: str) -> bytes:
    size = (rng.randint(16, 320), rng.randint(16, 320))
    color = tuple(rng.randint(0, 255) for _ in range(3))
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, kind)  # type: ignore[arg-type]
    return buffer.getvalue()


def write_corpus(root: Path, n: int, seed: int = 14) -> tuple[int, int]:
    """``(records, images referenced)``; every 40th image reference is missing."""
    rng = random.Random(seed)
    (root / "img").mkdir(parents=True)
    images = 0
    with open(root / "records.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            record: dict = {"id": f"r{i}", "text": f"product {i}: " + " ".join(
                rng.choice(("red", "chair", "oak", "lamp", "steel", "soft")) for _ in range(
                    rng.randint(0, 30)))}
            if rng.random() < 0.6:
                images += 1
                kind = rng.choice(("PNG", "JPEG"))
                name = f"img/{i}.{kind.lower()}"
                if images % 40:
                    (root / name).write_bytes(image_bytes(rng, kind))
                record["image"] = name
                if rng.random() < 0.2:
                    record["text"] = ""  # an image alone
            f.write(json.dumps(record) + "\n")
    return n, images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--rpm", type=float, default=6000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ArkMultimodalServer() as server:
        root = Path(tmp) / "corpus"
        records, images = write_corpus(root, args.records)
        output = str(Path(tmp) / "out")
        cfg = mm_config(str(root), output, server.base_url,
                        limits={"requests_per_minute": args.rpm,
                                "max_concurrency": args.concurrency})
        t0 = time.monotonic()
        code = execute(RunRequest(cfg, quiet=True))
        wall = time.monotonic() - t0
        manifest, tables = read_output(output)
        ok = [u for u in tables["usage"].to_pylist() if u["outcome"] == "ok"]
        billed = server.billed
        print(json.dumps({
            "exit_code": code,
            "records": records,
            "images_referenced": images,
            "vectors": manifest["counts"]["chunks_embedded"],
            "vectors_with_image": sum(1 for v in tables["vectors"].column("image").to_pylist()
                                      if v is not None),
            "rejects_by_reason": manifest["rejects_by_reason"],
            "requests": manifest["counts"]["requests"],
            "usage_tokens": manifest["usage"],
            "server_billed": {"requests": len(billed),
                              "text_tokens": sum(b.text_tokens for b in billed),
                              "image_tokens": sum(b.image_tokens for b in billed)},
            "ok_rows_match_server": (
                sum(u["text_tokens"] for u in ok) == sum(b.text_tokens for b in billed)
                and sum(u["image_tokens"] for u in ok) == sum(b.image_tokens for b in billed)),
            "limits": {"requests_per_minute": args.rpm, "max_concurrency": args.concurrency},
            "wall_s": round(wall, 2),
        }, indent=2))


if __name__ == "__main__":
    main()
