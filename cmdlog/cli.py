"""The `cmdlog` command line: serve, replay, status, demo and node tools."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import math
import os
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from cmdlog.app import App
from cmdlog.errors import CmdlogError, StartupError

if TYPE_CHECKING:
    from cmdlog.store import Store

DEFAULT_APP = "cmdlog.apps.example:app"
_Value = TypeVar("_Value", int, float)


def load_app(spec: str) -> App:
    """Import `MODULE:ATTR` and return the `App` it names.

    Raises `StartupError`, so the command exits 2 like any other error that
    stops it, never 1, which `replay` uses for digests that differ.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise StartupError(f"--app must look like MODULE:ATTR, found {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StartupError(f"--app {spec}: cannot import {module_name}: {exc}") from exc
    if not hasattr(module, attr):
        raise StartupError(f"--app {spec}: {module_name} has no attribute {attr!r}")
    app = getattr(module, attr)
    if not isinstance(app, App):
        raise StartupError(
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
    passes = "one pass" if report.passes == 1 else "two passes"
    print(f"took           {report.seconds:.2f} s ({rate:,.0f} entries/s, {passes})")
    print(f"digests        {verdict}")
    return 0 if report.matches else 1


def _open_stopped_node(data_dir: str) -> Store:
    """Open the existing data directory of a stopped node for writing.

    Raises `StartupError` if it contains no cmdlog data, or if a running
    process has its lock, and `VersionMismatch` if its format is older.
    """
    from pathlib import Path

    from cmdlog.store import Store, require_store

    # Store would create a missing directory; these commands only edit
    # existing ones.
    require_store(Path(data_dir))
    # A writable store takes the directory's lock, so this fails with an
    # error next to a live node: it would keep the node ID it read at its
    # start and write its peer records back. Only `cmdlog serve` upgrades a
    # store of an older format, because the upgrade cannot be undone.
    return Store(data_dir, [], upgrade=False)


def _peers(args: argparse.Namespace) -> int:
    from cmdlog.peering import normalize_url

    store = _open_stopped_node(args.data)
    try:
        with store.read() as txn:
            stored = txn.peers()
        if args.forget is None:
            if not stored:
                print(f"no peers stored in {args.data}")
            for url, record in sorted(stored.items()):
                node = record.get("node") or "-"
                print(f"{url}  node={node}  cursor={record.get('cursor', 0)}")
            return 0
        url = normalize_url(args.forget)
        if url not in stored:
            if stored:
                hint = f"(stored: {', '.join(sorted(stored))}); pass one of those URLs"
            else:
                hint = "(it stores none); there is nothing to forget"
            print(
                f"cmdlog: {url} is not a stored peer of {args.data} {hint}",
                file=sys.stderr,
            )
            return 1
        store.write(lambda txn: txn.peer_delete(url))
        print(f"forgot {url}")
        return 0
    finally:
        store.close()


def _identity(args: argparse.Namespace) -> int:
    from cmdlog.database import new_identity

    store = _open_stopped_node(args.data)
    try:
        with store.read() as txn:
            node_id = txn.meta_get("node_id") or "-"
            log_instance = txn.meta_get("log_instance") or "-"
        if not args.regenerate:
            print(f"node ID       {node_id}")
            print(f"log instance  {log_instance}")
            return 0
        new_node_id, new_log_instance = store.write(new_identity)
    finally:
        store.close()
    print(f"node ID       {node_id} -> {new_node_id}")
    print(f"log instance  {log_instance} -> {new_log_instance}")
    return 0


def _env(name: str, default: str | None = None) -> str | None:
    """Return `CMDLOG_{name}`, or `default` when it is unset or empty."""
    return os.environ.get(f"CMDLOG_{name}") or default


def _limit(flag_value: int | None, name: str, default: int) -> int:
    """Return a limit from its flag, else from `CMDLOG_{name}`, else `default`."""
    return _setting(flag_value, name, default, _positive_int)


def _setting(
    flag_value: _Value | None,
    name: str,
    default: _Value,
    parse: Callable[[str], _Value],
) -> _Value:
    """Return a setting from its flag, else from `CMDLOG_{name}` read with
    `parse`, else `default`.

    The variable is read here, not as the flag's parser default, so an
    invalid value stops only `serve`, with a `StartupError` (exit 2).
    """
    if flag_value is not None:
        return flag_value
    value = _env(name)
    if value is None:
        return default
    try:
        return parse(value)
    except argparse.ArgumentTypeError as exc:
        raise StartupError(f"CMDLOG_{name} {exc}") from None


def _positive_int(text: str) -> int:
    """Parse a limit: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of 1 or more, found {text!r}"
        )
    return value


def _positive_seconds(text: str) -> float:
    """Parse a duration: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0, found {text!r}"
        )
    return value


def _read_secret(path: str | None, flag: str, env_name: str) -> str | None:
    """Read a token from the file `path`, else from `CMDLOG_{env_name}`."""
    from cmdlog.auth import read_text_file

    fix = f"pass a file that contains the token, or set CMDLOG_{env_name}"
    if not path:
        return _env(env_name)
    secret = read_text_file(path, flag, fix).strip()
    if not secret:
        raise StartupError(f"{flag} {path} is empty; {fix}")
    return secret


def _read_token(args: argparse.Namespace) -> str | None:
    return _read_secret(args.token_file, "--token-file", "TOKEN")


def _credentials(args: argparse.Namespace) -> Any:
    from cmdlog.auth import DEFAULT_PRINCIPAL, Credentials, read_tokens_file

    principals: dict[str, str] = {}
    if args.tokens_file:
        principals = read_tokens_file(args.tokens_file)
    token = _read_token(args)
    if token:
        principals[token] = DEFAULT_PRINCIPAL
    peer_token = _read_secret(args.peer_token_file, "--peer-token-file", "PEER_TOKEN")
    return Credentials(principals, peer_token)


def _node_url(name: str, url: str) -> str:
    """Return `url` without a trailing slash; raise `StartupError` naming `name`."""
    from cmdlog.errors import InvalidArgument
    from cmdlog.peering import normalize_url

    try:
        return normalize_url(url)
    except InvalidArgument as exc:
        raise StartupError(
            f"{name}: {exc.message}; pass a node's base URL, for example "
            "http://10.0.0.5:7001"
        ) from exc


def _peer_urls(args: argparse.Namespace) -> tuple[str, ...]:
    """Return the peers in CMDLOG_PEERS followed by those of the --peer flags.

    Unlike other flags, --peer adds to its variable instead of overriding it,
    as deploy/cmdlog.env.example documents.
    """
    named = [("CMDLOG_PEERS", url) for url in (_env("PEERS") or "").split(",")]
    named += [("--peer", url) for url in args.peer]
    return tuple(_node_url(name, url) for name, url in named if url.strip())


def _check_ca_file(path: str | None) -> None:
    """Raise `StartupError` unless `path` is None or a loadable PEM CA bundle."""
    import ssl

    if path is None:
        return
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(
            f"cannot load --tls-ca {path}: {exc.strerror or exc}; pass a PEM file "
            "of CA certificates"
        ) from exc


def _serve(args: argparse.Namespace) -> int:
    from cmdlog.config import HttpConfig
    from cmdlog.logs import configure_logging
    from cmdlog.node import NodeConfig
    from cmdlog.server import Server

    configure_logging(args.log_level)
    defaults = HttpConfig()
    _check_ca_file(args.tls_ca)
    advertise = _node_url("--advertise", args.advertise) if args.advertise else None
    config = NodeConfig(
        data_dir=args.data,
        app_spec=args.app,
        peers=_peer_urls(args),
        http=HttpConfig(
            body_bytes_max=_limit(
                args.body_bytes_max, "BODY_BYTES_MAX", defaults.body_bytes_max
            ),
            batch_items_max=_limit(
                args.batch_items_max, "BATCH_ITEMS_MAX", defaults.batch_items_max
            ),
            connections_max=_limit(
                args.connections_max, "CONNECTIONS_MAX", defaults.connections_max
            ),
            requests_in_flight_max=_limit(
                args.requests_max, "REQUESTS_MAX", defaults.requests_in_flight_max
            ),
            shutdown_timeout_s=_setting(
                args.shutdown_timeout_s,
                "SHUTDOWN_TIMEOUT_S",
                defaults.shutdown_timeout_s,
                _positive_seconds,
            ),
            idle_timeout_s=_setting(
                args.idle_timeout_s,
                "IDLE_TIMEOUT_S",
                defaults.idle_timeout_s,
                _positive_seconds,
            ),
            body_timeout_s=_setting(
                args.body_timeout_s,
                "BODY_TIMEOUT_S",
                defaults.body_timeout_s,
                _positive_seconds,
            ),
        ),
        credentials=_credentials(args),
        advertise_url=advertise,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key or args.tls_cert,
        tls_ca=args.tls_ca,
    )
    server = Server(config, load_app(args.app), args.listen)
    asyncio.run(server.serve_until_signalled())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cmdlog.demo import main as demo_main
    from cmdlog.logs import configure_logging

    configure_logging("warning")
    return demo_main()


def _read_lock_file(path: str) -> dict[str, str]:
    """Read a handler lock file; raise `StartupError` naming the problem."""
    import json

    from cmdlog.auth import read_text_file

    fix = "write it with 'cmdlog handlers lock --lock FILE'"
    text = read_text_file(path, "--lock", fix)
    try:
        locked = json.loads(text)
    except ValueError as exc:
        raise StartupError(f"--lock {path} is not JSON ({exc}); {fix}") from exc
    if type(locked) is not dict or not all(
        type(value) is str for value in locked.values()
    ):
        raise StartupError(f"--lock {path} is not a map of type to fingerprint; {fix}")
    return locked


def _handlers(args: argparse.Namespace) -> int:
    import json

    from cmdlog import catalog
    from cmdlog.store import Store

    app = load_app(args.app)
    current = catalog.app_fingerprints(app)
    if args.action == "lock":
        text = json.dumps(current, indent=2, sort_keys=True) + "\n"
        if args.lock:
            with open(args.lock, "w", encoding="utf-8") as handle:
                handle.write(text)
        else:
            print(text, end="")
        return 0
    if args.action == "check":
        if not args.lock:
            raise StartupError(
                "handlers check needs --lock FILE, a file written by "
                "'cmdlog handlers lock --lock FILE'"
            )
        recorded = _read_lock_file(args.lock)
    elif args.data:
        store = Store(args.data, list(app.domains), readonly=True)
        with store.read() as txn:
            recorded = txn.catalog()
        store.close()
    else:
        recorded = {}

    failed = False
    for entry in catalog.compare(recorded, current):
        print(
            f"{entry.state:8s} {entry.type_name:32s} "
            f"recorded={entry.recorded or '-'} current={entry.current or '-'}"
        )
        if entry.state in ("CHANGED", "removed"):
            failed = True
            if args.action == "check":
                print(
                    f"  {catalog.changed_message(entry)}"
                    if entry.state == "CHANGED"
                    else f"  {entry.type_name} was removed; keep its handler"
                )
    return 1 if failed else 0


def _status(args: argparse.Namespace) -> int:
    from cmdlog.status_view import show_status

    _check_ca_file(args.tls_ca)
    url = args.url.rstrip("/")
    # show_status appends /status itself, so accept the URL of that page too.
    if urllib.parse.urlsplit(url).path.endswith("/status"):
        url = url.removesuffix("/status")
    return show_status(url, token=_read_token(args), ca_file=args.tls_ca)


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run a node",
        description="Run a cmdlog node. Every flag can also be set by the "
        "environment variable named in its help.",
    )
    serve.add_argument(
        "--data",
        default=_env("DATA"),
        required=_env("DATA") is None,
        help="data directory, created if missing (CMDLOG_DATA)",
    )
    serve.add_argument(
        "--listen",
        default=_env("LISTEN", "127.0.0.1:7001"),
        help="HOST:PORT to listen on (CMDLOG_LISTEN, default 127.0.0.1:7001); "
        "a non-loopback host needs a token",
    )
    serve.add_argument(
        "--peer",
        action="append",
        default=[],
        help="URL of a peer to replicate from; repeat per peer (CMDLOG_PEERS, "
        "comma-separated; --peer flags add to it)",
    )
    serve.add_argument(
        "--app",
        default=_env("APP", DEFAULT_APP),
        help=f"MODULE:ATTR of the app to serve (CMDLOG_APP, default {DEFAULT_APP})",
    )
    serve.add_argument(
        "--advertise",
        default=_env("ADVERTISE"),
        help="URL peers use to reach this node, announced to each peer it pulls "
        "from (CMDLOG_ADVERTISE, default http://HOST:PORT of --listen)",
    )
    serve.add_argument(
        "--token-file",
        default=_env("TOKEN_FILE"),
        help="file holding the bearer token clients must send (CMDLOG_TOKEN_FILE; "
        "or the token itself in CMDLOG_TOKEN)",
    )
    serve.add_argument(
        "--tokens-file",
        default=_env("TOKENS_FILE"),
        help="file of 'PRINCIPAL TOKEN' lines, one client per line; with several "
        "principals each Idempotency-Key is scoped by its principal "
        "(CMDLOG_TOKENS_FILE)",
    )
    serve.add_argument(
        "--peer-token-file",
        default=_env("PEER_TOKEN_FILE"),
        help="file holding the token nodes send each other on /replicate "
        "(CMDLOG_PEER_TOKEN_FILE, or CMDLOG_PEER_TOKEN; default: the client token)",
    )
    serve.add_argument(
        "--tls-cert",
        default=_env("TLS_CERT"),
        help="PEM certificate chain; serves HTTPS when set (CMDLOG_TLS_CERT)",
    )
    serve.add_argument(
        "--tls-key",
        default=_env("TLS_KEY"),
        help="PEM private key of --tls-cert (CMDLOG_TLS_KEY; default: in the "
        "certificate file)",
    )
    serve.add_argument(
        "--tls-ca",
        default=_env("TLS_CA"),
        help="PEM CA bundle to verify https peers with (CMDLOG_TLS_CA; default: "
        "the system store)",
    )
    serve.add_argument(
        "--body-bytes-max",
        type=_positive_int,
        default=None,
        help="largest request body in bytes, 413 above it (CMDLOG_BODY_BYTES_MAX, "
        "default 1048576)",
    )
    serve.add_argument(
        "--batch-items-max",
        type=_positive_int,
        default=None,
        help="most items in one batch request (CMDLOG_BATCH_ITEMS_MAX, default 1000)",
    )
    serve.add_argument(
        "--connections-max",
        type=_positive_int,
        default=None,
        help="open client connections before requests get 503 "
        "(CMDLOG_CONNECTIONS_MAX, default 1024)",
    )
    serve.add_argument(
        "--requests-max",
        type=_positive_int,
        default=None,
        help="requests handled at once before more get 503 "
        "(CMDLOG_REQUESTS_MAX, default 2048)",
    )
    serve.add_argument(
        "--shutdown-timeout-s",
        type=_positive_seconds,
        default=None,
        help="seconds SIGTERM waits for running requests, their bodies included, "
        "before requests still waiting for a body get 503 and the node exits "
        "(CMDLOG_SHUTDOWN_TIMEOUT_S, default 10)",
    )
    serve.add_argument(
        "--idle-timeout-s",
        type=_positive_seconds,
        default=None,
        help="seconds a client connection may stay open without a request "
        "before the node closes it (CMDLOG_IDLE_TIMEOUT_S, default 30)",
    )
    serve.add_argument(
        "--body-timeout-s",
        type=_positive_seconds,
        default=None,
        help="seconds a request body may stop arriving before the request gets "
        "408 and its connection closes (CMDLOG_BODY_TIMEOUT_S, default 30)",
    )
    serve.set_defaults(run=_serve)


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

    _add_serve(commands)

    demo = commands.add_parser(
        "demo",
        help="run a three-node payments demo through a flaky network and report",
        description="Start a local cluster on 127.0.0.1, drive a payments workload "
        "through connections that drop requests and responses, add a fourth node "
        "midway, and check that every promise held. Exits 1 if one did not.",
    )
    demo.set_defaults(run=_demo)

    handlers = commands.add_parser(
        "handlers",
        help="list handler fingerprints, or check them against a lock file",
        description="list: each type's recorded fingerprint (from --data) next to "
        "the app's current one. lock: write the app's fingerprints as JSON. check: "
        "exit 1 when a type in --lock FILE changed or was removed, for an app's CI.",
    )
    handlers.add_argument(
        "action", nargs="?", default="list", choices=["list", "lock", "check"]
    )
    handlers.add_argument("--data", help="a node's data directory, for list")
    handlers.add_argument("--lock", help="lock file to write (lock) or compare (check)")
    handlers.add_argument(
        "--app",
        default=DEFAULT_APP,
        help=f"MODULE:ATTR of the app (default {DEFAULT_APP})",
    )
    handlers.set_defaults(run=_handlers)

    peers = commands.add_parser(
        "peers",
        help="list a stopped node's stored peers, or forget one",
        description="With the node stopped: list the peers stored in its data "
        "directory (configured with --peer or learned from announcements), or "
        "with --forget URL remove one, for example a node taken out of the "
        "cluster. Drop the URL from every node's --peer flags too; a node that "
        "still runs and pulls from this one announces itself again.",
    )
    peers.add_argument("--data", required=True, help="the node's data directory")
    peers.add_argument("--forget", metavar="URL", help="the peer URL to remove")
    peers.set_defaults(run=_peers)

    identity = commands.add_parser(
        "identity",
        help="show a stopped node's node ID and log instance, or give it new ones",
        description="With the node stopped: print the node ID and log instance "
        "stored in its data directory, or with --regenerate replace both with "
        "new random ones. A copy of a data directory (a disk or VM clone, a "
        "backup restored on a second machine) has the node ID of its original, "
        "so give it new ones before it runs beside the original. Its commands "
        "keep their origin, and its peers read its log again from the start, "
        "so they get every command it stores.",
    )
    identity.add_argument("--data", required=True, help="the node's data directory")
    identity.add_argument(
        "--regenerate",
        action="store_true",
        help="replace the node ID and log instance with new random ones",
    )
    identity.set_defaults(run=_identity)

    status = commands.add_parser(
        "status", help="show a readable view of a node's /status"
    )
    status.add_argument("url", help="the node's base URL, e.g. http://127.0.0.1:7001")
    status.add_argument(
        "--token-file",
        default=_env("TOKEN_FILE"),
        help="file holding the node's bearer token (or set CMDLOG_TOKEN)",
    )
    status.add_argument(
        "--tls-ca", default=_env("TLS_CA"), help="PEM CA bundle for an https node"
    )
    status.set_defaults(run=_status)
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
