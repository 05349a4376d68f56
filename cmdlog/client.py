"""The client library: safe retries by default.

One logical operation gets one Idempotency-Key, created when the operation
starts and sent unchanged on every retry, whichever node the retry goes to.
A request is retried after a timeout, a connection failure, a 5xx, 409 or
503 answer, with capped exponential backoff and jitter, moving to the next
node of the list after each failure. A 4xx other than those is the
caller's mistake and raises `RequestError` at once.

The client shares only the command model and codec with the server.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import structlog

from cmdlog import codec
from cmdlog.errors import MalformedBody
from cmdlog.model import Command, Outcome

log = structlog.get_logger(__name__)

RETRY_AFTER_S_MAX = 30.0
"""Maximum wait a server's Retry-After can impose on one retry."""
RETRY_STATUSES = frozenset({409, 429})
"""4xx statuses worth a retry; every 5xx is retried too."""
MSGPACK = "application/msgpack"


class ClientFailure(Exception):
    """Base class of the errors the client raises."""


class RequestError(ClientFailure):
    """The node rejected the request itself (a 4xx that a retry cannot fix)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class Unreachable(ClientFailure):
    """Every attempt failed with a retryable error."""


@dataclass(frozen=True, slots=True)
class Submitted:
    """A command the cluster has durably stored, and its outcome when answered."""

    command: Command
    outcome: Outcome
    replayed: bool
    node_url: str

    @property
    def id(self) -> str:
        return self.command.id


def new_key() -> str:
    """Return a fresh idempotency key for one logical operation."""
    return str(uuid.uuid4())


def _command_from_view(view: Mapping[str, Any]) -> tuple[Command, Outcome]:
    outcome = view["outcome"]
    command = Command(
        view["id"], view["type"], view["payload"], view["stamp"], view["origin"]
    )
    return command, Outcome(
        outcome["status"], outcome.get("result"), outcome.get("reason")
    )


def _seconds(value: str | None) -> float | None:
    """Parse a Retry-After header given in seconds (the form cmdlog sends)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _decode_body(raw: bytes, content_type: str) -> Any:
    """Decode a response body; a body that does not decode (say, a proxy's
    HTML error page) gives None, and the status alone decides what follows."""
    if not raw:
        return None
    try:
        if content_type == MSGPACK:
            return codec.unpack(raw)
        return json.loads(raw)
    except (ValueError, MalformedBody):
        return None


class Client:
    """An async client for one cmdlog cluster (a list of node URLs)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        token: str | None = None,
        timeout_s: float = 10.0,
        attempts_max: int = 10,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        redirects_max: int = 3,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if not urls:
            raise ValueError("a client needs at least one node URL")
        self.urls = [url.rstrip("/") for url in urls]
        self._headers = {"Accept": MSGPACK}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.attempts_max = attempts_max
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.redirects_max = redirects_max
        self._session = session
        self._owns_session = session is None
        self._next = random.randrange(len(self.urls))
        self._retry_after_s: float | None = None
        self.retries = 0
        """Attempts that failed and were retried, over the client's lifetime."""

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def submit(
        self,
        type_name: str,
        payload: Mapping[str, Any],
        *,
        key: str | None = None,
        node_url: str | None = None,
    ) -> Submitted:
        """Send one command, retrying until a node has stored it.

        `key` defaults to a new UUID, made once here and reused on every
        retry. Raises `RequestError` for a 4xx (other than 409) and
        `Unreachable` when every attempt failed.
        """
        key = key or new_key()
        body = codec.pack({"type": type_name, "payload": dict(payload)})
        headers = {**self._headers, "Content-Type": MSGPACK, "Idempotency-Key": key}
        status, data, url = await self._request(
            "POST", "/commands", body=body, headers=headers, node_url=node_url
        )
        command, outcome = _command_from_view(data)
        return Submitted(command, outcome, replayed=status == 200, node_url=url)

    async def get(self, command_id: str) -> tuple[Command, Outcome] | None:
        """Return a command and its current outcome, or None if absent."""
        try:
            _status, data, _url = await self._request(
                "GET", "/commands/" + urllib.parse.quote(command_id, safe="")
            )
        except RequestError as error:
            if error.status == 404:
                return None
            raise
        return _command_from_view(data)

    async def query(self, name: str, **args: str) -> Any:
        _status, data, _url = await self._request(
            "GET", f"/queries/{name}", params=args
        )
        return data["result"]

    async def status(self, node_url: str) -> dict[str, Any]:
        _status, data, _url = await self._request("GET", "/status", node_url=node_url)
        result: dict[str, Any] = data
        return result

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        node_url: str | None = None,
    ) -> tuple[int, Any, str]:
        session = self._get_session()
        headers = headers or self._headers
        backoff_s = self.backoff_initial_s
        last_error = "no attempt made"
        for attempt in range(self.attempts_max):
            wait_s = backoff_s * random.uniform(0.5, 1.0)
            url = node_url if node_url and attempt == 0 else self._pick()
            try:
                status, data, final_url = await self._send(
                    session, method, url + path, body, headers, params
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last_error = f"{url}: {type(exc).__name__}: {exc}"
            else:
                if status < 400:
                    return status, data, final_url
                error = data.get("error", {}) if isinstance(data, dict) else {}
                code = error.get("code", "unknown")
                message = error.get("message", "")
                if status < 500 and status not in RETRY_STATUSES:
                    raise RequestError(status, code, message)
                last_error = f"{url}: {status} {code}: {message}"
                retry_after_s = self._retry_after_s
                if retry_after_s is not None:
                    wait_s = max(wait_s, min(retry_after_s, RETRY_AFTER_S_MAX))
            self.retries += 1
            log.debug("request_retried", attempt=attempt + 1, error=last_error)
            await asyncio.sleep(wait_s)
            backoff_s = min(backoff_s * 2, self.backoff_max_s)
        raise Unreachable(f"{self.attempts_max} attempts failed; last: {last_error}")

    async def _send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None,
    ) -> tuple[int, Any, str]:
        """Send one request, following up to `redirects_max` 307 redirects
        with the same method, body and key."""
        self._retry_after_s = None
        for _hop in range(self.redirects_max + 1):
            async with session.request(
                method,
                url,
                data=body,
                headers=headers,
                params=params,
                allow_redirects=False,
            ) as response:
                if response.status == 307 and "Location" in response.headers:
                    target = urllib.parse.urljoin(url, response.headers["Location"])
                    headers = self._redirect_headers(url, target, headers)
                    url = target
                    continue
                self._retry_after_s = _seconds(response.headers.get("Retry-After"))
                raw = await response.read()
                data = _decode_body(raw, response.content_type)
                base = url.split("/", 3)
                return response.status, data, "/".join(base[:3])
        raise RequestError(
            307, "too_many_redirects", f"more than {self.redirects_max} redirects"
        )

    def _redirect_headers(
        self, source: str, target: str, headers: Mapping[str, str]
    ) -> Mapping[str, str]:
        """Keep the token only for a redirect to one of the client's own nodes,
        and never from https down to http."""
        source_scheme = urllib.parse.urlsplit(source).scheme
        target_parts = urllib.parse.urlsplit(target)
        if source_scheme == "https" and target_parts.scheme != "https":
            raise RequestError(
                307, "insecure_redirect", f"refusing to follow https to {target}"
            )
        origin = f"{target_parts.scheme}://{target_parts.netloc}"
        if origin in self.urls:
            return headers
        return {
            name: value for name, value in headers.items() if name != "Authorization"
        }

    def _pick(self) -> str:
        url = self.urls[self._next % len(self.urls)]
        self._next += 1
        return url
