"""A bare aiohttp service: parses each command as cmdlog would and stores nothing.

It is the ceiling for a one-process aiohttp server on the same machine and
the same requests. `POST /commands` returns 201 with a small JSON body, and
`POST /commands/batch` returns one such result per item. Nothing is
stored, synced or deduplicated.

Run `python -m bench.peers.bare_aiohttp --listen 127.0.0.1:0` from the
repository root; it prints `bare_aiohttp listening on URL` when ready.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from aiohttp import web

from bench.peers.service import (
    BadRequest,
    check_command,
    check_key,
    error_body,
    error_response,
    json_response,
    parse_json,
    serve,
)


def _view(key: str, type_name: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"id": key, "type": type_name, "payload": payload, "status": "accepted"}


async def post_command(request: web.Request) -> web.Response:
    try:
        key = check_key(request.headers.get("Idempotency-Key"))
        type_name, payload = check_command(parse_json(await request.read()))
    except BadRequest as error:
        return error_response(error)
    return json_response(_view(key, type_name, payload), 201)


async def post_batch(request: web.Request) -> web.Response:
    try:
        body = parse_json(await request.read())
        if type(body) is not list:
            raise BadRequest(400, "a batch must be an array of maps")
    except BadRequest as error:
        return error_response(error)
    results = []
    for item in body:
        try:
            if type(item) is not dict:
                raise BadRequest(400, "a batch item must be a map")
            key = check_key(item.get("id"))
            type_name, payload = check_command(item)
        except BadRequest as error:
            results.append({"status": error.status, "body": error_body(error)})
            continue
        results.append({"status": 201, "body": _view(key, type_name, payload)})
    return json_response({"results": results})


def create_app() -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/commands", post_command)
    app.router.add_post("/commands/batch", post_batch)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT")
    args = parser.parse_args()
    asyncio.run(serve(create_app(), args.listen, "bare_aiohttp"))


if __name__ == "__main__":
    main()
