"""Request parsing and startup shared by the peer services.

The peers read a command the way cmdlog's HTTP API does: the standard
library's JSON parser, an `Idempotency-Key` header of 1 to 255 printable
ASCII characters, and a body `{"type": str, "payload": map}`. So the load
generator sends every system the same requests, and each one parses them
fully. Only `ledger.deposit` is validated (`account` a string, `amount` a
positive integer), because that is the only type the benchmark sends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
from typing import Any

from aiohttp import web

KEY_CHARS_MAX = 255
_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")
AMOUNT_MAX = 2**53 - 1


class BadRequest(Exception):
    """A rejected request, with the HTTP status to send in `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_key(raw: str | None) -> str:
    if raw is None or not _KEY_PATTERN.fullmatch(raw):
        raise BadRequest(400, "Idempotency-Key must be 1 to 255 printable ASCII")
    return raw


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise BadRequest(400, f"body is not valid JSON: {exc}") from exc


def check_command(body: Any) -> tuple[str, dict[str, Any]]:
    """Return `(type, payload)` of a command map, validated as a deposit."""
    if type(body) is not dict:
        raise BadRequest(400, "a command must be a map with type and payload")
    type_name = body.get("type")
    payload = body.get("payload")
    if type(type_name) is not str or type(payload) is not dict:
        raise BadRequest(400, "field 'type' must be a string, 'payload' a map")
    if type_name != "ledger.deposit":
        raise BadRequest(422, f"unknown command type {type_name!r}")
    account = payload.get("account")
    amount = payload.get("amount")
    if type(account) is not str or not account:
        raise BadRequest(422, "field 'account' must be a non-empty string")
    if type(amount) is not int or not 1 <= amount <= AMOUNT_MAX:
        raise BadRequest(422, "field 'amount' must be an integer from 1 to 2**53-1")
    return type_name, payload


def fingerprint(type_name: str, payload: dict[str, Any]) -> bytes:
    """Hash type and payload with map keys sorted, as cmdlog's fingerprint does."""
    canonical = json.dumps([type_name, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).digest()


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def error_body(error: BadRequest) -> dict[str, Any]:
    return {"error": {"code": str(error.status), "message": error.message}}


def error_response(error: BadRequest) -> web.Response:
    return json_response(error_body(error), error.status)


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"--listen must be on 127.0.0.1, found {listen!r}")
    return host, int(port)


async def serve(app: web.Application, listen: str, name: str) -> None:
    """Serve `app` until SIGTERM or SIGINT, printing the bound URL once ready."""
    host, port = parse_listen(listen)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # aiohttp keeps the asyncio server private
    assert isinstance(server, asyncio.base_events.Server)
    bound_port = server.sockets[0].getsockname()[1]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"{name} listening on http://{host}:{bound_port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
