"""The ``embedpipe`` command line (see the README and ``shared/design/contract.md``).

::

    embedpipe run    --config FILE [--input URL] [--output URL] [--set KEY=VALUE]... [BEAM OPTIONS]...
    embedpipe plan   --config FILE [--input URL] [--set KEY=VALUE]... [--json] [BEAM OPTIONS]...
    embedpipe verify OUTPUT_URL [--json]
    embedpipe serve-local [--host 127.0.0.1] [--port 8089] [--dim 256]

Arguments ``run`` does not know are Beam pipeline options, passed to ``PipelineOptions`` as given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pipeline.exit_codes import EXIT_CONFIG, EXIT_OK


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("embedpipe").setLevel(logging.WARNING if quiet else logging.INFO)
    logging.getLogger("transforms").setLevel(logging.WARNING if quiet else logging.INFO)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--input", help="override input.path (fsspec URL or glob)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a dotted config key (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedpipe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="embed a corpus (unknown options go to Beam)")
    _config_args(run)
    run.add_argument("--output", help="override output.path (fsspec URL)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an output that already holds a finished run")
    run.add_argument("--quiet", action="store_true", help="no progress lines or summary")

    plan = sub.add_parser("plan", help="read and split the corpus, estimate cost; no API calls")
    _config_args(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    # Listed for --help only: these commands own their arguments (see their modules).
    sub.add_parser("verify", help="check a finished output (exit 1 with the problems)",
                   add_help=False)
    sub.add_parser("serve-local", help="run the embedded OpenAI-compatible server", add_help=False)
    return parser


def _load(args: argparse.Namespace):
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if args.input:
        overrides.append(f"input.path={args.input}")
    if getattr(args, "output", None):
        overrides.append(f"output.path={args.output}")
    if getattr(args, "overwrite", False):
        overrides.append("output.overwrite=true")
    return load_config(args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve-local"]:
        from pipeline.local_server import serve_local_main

        return serve_local_main(argv[1:])
    if argv[:1] == ["verify"]:
        from pipeline.verify import verify_main

        return verify_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _setup_logging(getattr(args, "quiet", False))

    from transforms.errors import ConfigError

    try:
        if args.command == "plan":
            from pipeline.plan import make_plan, plan_lines

            plan = make_plan(_load(args), extra)
            print(json.dumps(plan, indent=2) if args.json else "\n".join(plan_lines(plan)))
            return EXIT_OK
        from pipeline.run import RunRequest, execute

        return execute(RunRequest(cfg=_load(args), beam_args=extra, quiet=args.quiet))
    except ConfigError as exc:
        print(f"embedpipe: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
