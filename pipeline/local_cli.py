"""``embedpipe serve-local``: the local OpenAI-compatible server in the foreground.

:func:`serve_local_main` parses the command line and serves :class:`~pipeline.local_openai.
EmbeddingServer` until Ctrl-C or SIGTERM; :func:`serve_until_interrupted` is the foreground loop,
shared with the test servers' own command lines (``python -m tests.support.fault_server``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from pipeline.exit_codes import EXIT_CONFIG, EXIT_OK
from pipeline.local_base import LoopbackServer
from pipeline.local_batch import BatchServer
from pipeline.local_model import DEFAULT_DIM, DEFAULT_MODEL
from pipeline.local_openai import EmbeddingServer
from transforms.providers.config import looks_like_a_key

__all__ = ["DEFAULT_CLI_PORT", "serve_local_main", "serve_until_interrupted"]

DEFAULT_CLI_PORT = 8089

def serve_local_main(argv: list[str] | None = None) -> int:
    """``embedpipe serve-local``: serve in the foreground until Ctrl-C or SIGTERM, then exit 0.

    Exits 2 when the arguments are invalid, the key variable is unset or the port is taken.
    """
    parser = argparse.ArgumentParser(
        prog="embedpipe serve-local",
        description="Serve deterministic hashing embeddings on an OpenAI-compatible API "
        f"(model {DEFAULT_MODEL!r}). For demos and tests: vectors reflect shared words and "
        "spellings, not meaning.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_CLI_PORT, help="0 picks a free port")
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM, help="embedding dimension")
    parser.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="require 'Authorization: Bearer <key>', the key read from this environment variable",
    )
    parser.add_argument(
        "--batch", action="store_true",
        help="also serve OpenAI's Files and Batches API (for provider.mode: batch); each batch "
        "moves one state per --batch-step-s seconds")
    parser.add_argument("--batch-step-s", type=float, default=1.0, metavar="S",
                        help="seconds per batch state with --batch (default 1)")
    args = parser.parse_args(argv)
    if args.dim < 1:
        parser.error(f"--dim must be at least 1, got {args.dim}")
    api_key = None
    if args.api_key_env and looks_like_a_key(args.api_key_env):
        # The usual mistake is the key itself: never repeat it (it would reach logs and CI).
        print("embedpipe serve-local: --api-key-env must be the NAME of the environment "
              "variable that holds the key, not the key itself; the value given looks like a "
              "key and is not repeated here. Export the key in a variable and give that "
              "variable's name", file=sys.stderr)
        return EXIT_CONFIG
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(
                f"embedpipe serve-local: environment variable {args.api_key_env} is not set or "
                f"empty; export the key in it, or drop --api-key-env",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    try:
        server = (BatchServer(args.host, args.port, args.dim, api_key, progress="time",
                              step_s=args.batch_step_s)
                  if args.batch else EmbeddingServer(args.host, args.port, args.dim, api_key))
    except OSError as exc:
        print(
            f"embedpipe serve-local: cannot listen on {args.host}:{args.port}: {exc.strerror}; "
            f"choose another --port",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    batch = " with the Files and Batches API" if args.batch else ""
    print(f"embedpipe local server on {server.base_url} (dim={server.dim}){batch}", flush=True)
    serve_until_interrupted(server)
    return EXIT_OK


def serve_until_interrupted(server: LoopbackServer) -> None:
    """Serve in the foreground until Ctrl-C or SIGTERM, then stop.

    SIGTERM is what process managers and ``kill`` send, and a server started in the background
    by a script inherits an ignored SIGINT: both must stop it cleanly, like Ctrl-C in a terminal.
    """
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()

