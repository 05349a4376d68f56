"""The `cmdlog` command line: serve, replay, status, submit and demo."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cmdlog.app import App
from cmdlog.errors import CmdlogError

DEFAULT_APP = "cmdlog.apps.example:app"


def load_app(spec: str) -> App:
    """Import `MODULE:ATTR` and return the `App` it names."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--app must look like MODULE:ATTR, found {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"--app {spec}: cannot import {module_name}: {exc}") from exc
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise SystemExit(
            f"--app {spec}: {module_name}.{attr} is {type(app).__name__}, "
            "expected a cmdlog.app.App"
        )
    return app


def _replay(args: argparse.Namespace) -> int:
    from cmdlog.logs import configure_logging
    from cmdlog.replay import replay

    configure_logging(args.log_level)
    report = replay(args.data, load_app(args.app))
    verdict = "match" if report.matches else "DIFFER"
    print(f"log entries    {report.log_entries}")
    print(f"commands       {report.commands}")
    print(f"applied        {report.applied}")
    print(f"state digest   {report.state_digest}")
    print(f"  recorded     {report.recorded_state_digest}")
    print(f"log digest     {report.log_digest}")
    print(f"  recorded     {report.recorded_log_digest}")
    rate = report.log_entries / report.seconds if report.seconds else 0.0
    print(f"took           {report.seconds:.2f} s ({rate:,.0f} entries/s)")
    print(f"digests        {verdict}")
    return 0 if report.matches else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmdlog",
        description="A replicated command log for APIs whose actions must never "
        "take effect twice.",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="lowest level of log events to print (default: info)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    replay = commands.add_parser(
        "replay",
        help="rebuild a stopped node's state from its log and compare digests",
        description="Fold the log of a stopped node into scratch state, print both "
        "digests next to the ones the node recorded, and exit 0 when they match, "
        "1 when they differ.",
    )
    replay.add_argument("--data", required=True, help="the node's data directory")
    replay.add_argument(
        "--app",
        default=DEFAULT_APP,
        help=f"MODULE:ATTR of the app (default {DEFAULT_APP})",
    )
    replay.set_defaults(run=_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except CmdlogError as exc:
        print(f"cmdlog: {exc.message}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
