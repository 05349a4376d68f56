"""An idempotent command service on PostgreSQL, the usual way to build one.

Each `POST /commands` runs one transaction on a pool of asyncpg
connections: `INSERT ... ON CONFLICT (key) DO NOTHING` into
`idempotency_keys`, and when the key is new, the command row into
`commands`. PostgreSQL commits it durably with its defaults
(`synchronous_commit = on`, `fsync = on`), so a 201 means the row is on
disk, as with cmdlog. A key already stored with the same type and payload
returns 200 with the stored command; with another payload, 422. A
concurrent request with the same key waits on the row lock of the first
insert and then reads the committed row. `POST /commands/batch` does the same for
every item in one transaction, with one statement per table.

Unlike cmdlog, it keeps no derived state (no balances): it stores the
commands and nothing is folded.

Run `python -m bench.peers.pg_service --dsn DSN --listen 127.0.0.1:0
[--reset]` from the repository root; it prints `pg_service listening on
URL` when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from aiohttp import web

from bench.peers.service import (
    BadRequest,
    check_command,
    check_key,
    error_body,
    error_response,
    fingerprint,
    json_response,
    parse_json,
    serve,
)

POOL_CONNECTIONS = 16

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS commands_id_seq;
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key text PRIMARY KEY,
    fingerprint bytea NOT NULL,
    command_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS commands (
    id bigint PRIMARY KEY,
    type text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""

DROP = """
DROP TABLE IF EXISTS idempotency_keys, commands;
DROP SEQUENCE IF EXISTS commands_id_seq;
"""

INSERT_KEY = """
INSERT INTO idempotency_keys (key, fingerprint, command_id)
VALUES ($1, $2, nextval('commands_id_seq'))
ON CONFLICT (key) DO NOTHING
RETURNING command_id
"""

INSERT_COMMAND = """
INSERT INTO commands (id, type, payload) VALUES ($1, $2, $3::jsonb)
RETURNING extract(epoch from created_at)::float8
"""

SELECT_STORED = """
SELECT k.key, k.fingerprint, c.id, c.type, c.payload::text AS payload,
       extract(epoch from c.created_at)::float8 AS created_at
FROM idempotency_keys k JOIN commands c ON c.id = k.command_id
WHERE k.key = ANY($1::text[])
"""

INSERT_KEYS_BATCH = """
INSERT INTO idempotency_keys (key, fingerprint, command_id)
SELECT key, fingerprint, nextval('commands_id_seq')
FROM unnest($1::text[], $2::bytea[]) AS item(key, fingerprint)
ON CONFLICT (key) DO NOTHING
RETURNING key, command_id
"""

INSERT_COMMANDS_BATCH = """
INSERT INTO commands (id, type, payload)
SELECT id, type, payload::jsonb
FROM unnest($1::bigint[], $2::text[], $3::text[]) AS item(id, type, payload)
"""

POOL = web.AppKey("pool", asyncpg.Pool)


def _view(
    key: str, type_name: str, payload: Any, command_id: int, created_at: float
) -> dict[str, Any]:
    return {
        "id": key,
        "type": type_name,
        "payload": payload,
        "seq": command_id,
        "created_at": created_at,
        "outcome": {"status": "applied", "result": None, "reason": None},
    }


def _stored_result(row: asyncpg.Record, given_fingerprint: bytes) -> tuple[int, Any]:
    """Return the status and body for a key that was already stored."""
    if bytes(row["fingerprint"]) != given_fingerprint:
        error = BadRequest(422, f"key {row['key']!r} is used with another payload")
        return error.status, error_body(error)
    payload = json.loads(row["payload"])
    view = _view(row["key"], row["type"], payload, row["id"], row["created_at"])
    return 200, view


async def post_command(request: web.Request) -> web.Response:
    try:
        key = check_key(request.headers.get("Idempotency-Key"))
        type_name, payload = check_command(parse_json(await request.read()))
    except BadRequest as error:
        return error_response(error)
    given = fingerprint(type_name, payload)
    payload_text = json.dumps(payload, separators=(",", ":"))

    async with request.app[POOL].acquire() as conn, conn.transaction():
        command_id = await conn.fetchval(INSERT_KEY, key, given)
        if command_id is not None:
            created_at = await conn.fetchval(
                INSERT_COMMAND, command_id, type_name, payload_text
            )
            view = _view(key, type_name, payload, command_id, created_at)
            return json_response(view, 201)
        row = await conn.fetchrow(SELECT_STORED, [key])
    status, body = _stored_result(row, given)
    if status == 200:
        response = json_response(body, 200)
        response.headers["Idempotent-Replayed"] = "true"
        return response
    return json_response(body, status)


async def post_batch(request: web.Request) -> web.Response:
    try:
        body = parse_json(await request.read())
        if type(body) is not list:
            raise BadRequest(400, "a batch must be an array of maps")
    except BadRequest as error:
        return error_response(error)

    # Per item: its key and fingerprint when it is valid, else its error
    # status and body. The first item with a key is the one that is stored.
    slots: list[tuple[str, bytes] | tuple[int, Any]] = []
    first: dict[str, tuple[str, dict[str, Any], bytes]] = {}
    for item in body:
        try:
            if type(item) is not dict:
                raise BadRequest(400, "a batch item must be a map")
            key = check_key(item.get("id"))
            type_name, payload = check_command(item)
        except BadRequest as error:
            slots.append((error.status, error_body(error)))
            continue
        given = fingerprint(type_name, payload)
        slots.append((key, given))
        first.setdefault(key, (type_name, payload, given))

    keys = list(first)
    created: dict[str, int] = {}
    stored: dict[str, asyncpg.Record] = {}
    async with request.app[POOL].acquire() as conn, conn.transaction():
        now = await conn.fetchval("SELECT extract(epoch from now())::float8")
        fingerprints = [first[key][2] for key in keys]
        for row in await conn.fetch(INSERT_KEYS_BATCH, keys, fingerprints):
            created[row["key"]] = row["command_id"]
        await conn.execute(
            INSERT_COMMANDS_BATCH,
            list(created.values()),
            [first[key][0] for key in created],
            [json.dumps(first[key][1], separators=(",", ":")) for key in created],
        )
        old_keys = [key for key in keys if key not in created]
        if old_keys:
            for row in await conn.fetch(SELECT_STORED, old_keys):
                stored[row["key"]] = row

    answers = []
    answered: set[str] = set()
    for slot in slots:
        if isinstance(slot[0], int):
            answers.append({"status": slot[0], "body": slot[1]})
            continue
        key, given = slot
        if key not in created:
            status, view = _stored_result(stored[key], given)
            answers.append({"status": status, "body": view})
            continue
        # A key repeated inside the batch is a retry of its first item, or a
        # reuse with another payload when the fingerprints differ.
        type_name, payload, stored_fingerprint = first[key]
        if key in answered and given != stored_fingerprint:
            error = BadRequest(422, f"key {key!r} is used with another payload")
            answers.append({"status": error.status, "body": error_body(error)})
            continue
        status = 200 if key in answered else 201
        view = _view(key, type_name, payload, created[key], now)
        answers.append({"status": status, "body": view})
        answered.add(key)
    return json_response({"results": answers})


async def get_status(request: web.Request) -> web.Response:
    async with request.app[POOL].acquire() as conn:
        count = await conn.fetchval("SELECT count(*) FROM idempotency_keys")
    return json_response({"commands": count})


async def _pool_context(
    app: web.Application, dsn: str, reset: bool
) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(
        dsn, min_size=POOL_CONNECTIONS, max_size=POOL_CONNECTIONS
    )
    async with pool.acquire() as conn:
        if reset:
            await conn.execute(DROP)
        await conn.execute(SCHEMA)
        if reset:
            # Start every run from a checkpoint, so no run inherits another's
            # dirty buffers and pays for their write-out.
            await conn.execute("CHECKPOINT")
    app[POOL] = pool
    yield
    await pool.close()


def create_app(dsn: str, *, reset: bool) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app.cleanup_ctx.append(lambda app: _pool_context(app, dsn, reset))
    app.router.add_post("/commands", post_command)
    app.router.add_post("/commands/batch", post_batch)
    app.router.add_get("/status", get_status)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="PostgreSQL connection URL")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT")
    parser.add_argument(
        "--reset", action="store_true", help="drop and recreate the tables first"
    )
    args = parser.parse_args()
    asyncio.run(
        serve(create_app(args.dsn, reset=args.reset), args.listen, "pg_service")
    )


if __name__ == "__main__":
    main()
