"""Bearer-token authentication: principals for clients, a token for peers.

A node has no token (loopback use), one cluster token (principal
`default`), or a tokens file naming a principal per token. With several
principals, every Idempotency-Key is scoped by the principal that sent it:
the command ID is `principal/key`, so no client can read or replay another
client's command by guessing its key. IDs derived from a natural key are
not scoped, since the payload fields already name the transaction.

Peers authenticate on `GET /replicate` with the peer token when one is set.
Without one, the cluster token (a node's only principal) serves peers too;
a node with several principals then rejects every stream, since a stream
carries every principal's commands and its announce makes the node pull
from the announced URL. Tokens are compared in constant time and never
logged.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cmdlog.errors import StartupError

DEFAULT_PRINCIPAL = "default"
PRINCIPAL_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SCOPE_SEPARATOR = "/"


@dataclass(frozen=True, slots=True)
class Credentials:
    """The tokens a node accepts, and which principal each one stands for."""

    principals: Mapping[str, str] = field(default_factory=dict)
    """Client token -> principal."""
    peer_token: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.principals) or self.peer_token is not None

    @property
    def scoped(self) -> bool:
        """True when keys are scoped by principal (several principals)."""
        return len(set(self.principals.values())) > 1

    def principal(self, authorization: str | None) -> str | None:
        """Return the principal of a client's `Authorization` header, or None."""
        given = _bearer(authorization)
        found = None
        for token, principal in self.principals.items():
            # Every token is compared, so timing does not reveal which matched.
            if hmac.compare_digest(given, token.encode()):
                found = principal
        return found

    def is_peer(self, authorization: str | None) -> bool:
        if self.peer_token is not None:
            return hmac.compare_digest(_bearer(authorization), self.peer_token.encode())
        if self.scoped:
            return False  # no principal may read the others' commands
        return self.principal(authorization) is not None

    def outgoing_peer_token(self) -> str | None:
        """Return the token this node sends to its peers, or None."""
        if self.peer_token is not None:
            return self.peer_token
        tokens = list(self.principals)
        return tokens[0] if len(tokens) == 1 else None


def _bearer(authorization: str | None) -> bytes:
    if not authorization:
        return b""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return b""
    # Header bytes that are not UTF-8 arrive as surrogate escapes; they can
    # only fail the comparison, never raise.
    return token.strip().encode("utf-8", "surrogateescape")


def scope_key(key: str, principal: str | None, credentials: Credentials) -> str:
    """Return the command ID for a client key sent by `principal`."""
    if not credentials.scoped or principal is None:
        return key
    prefix = principal + SCOPE_SEPARATOR
    return key if key.startswith(prefix) else prefix + key


def read_text_file(path: str | Path, name: str, fix: str) -> str:
    """Read a UTF-8 file of credentials.

    Raises `StartupError` naming the file as `name` (a flag, say) and ending
    with `fix` when the file is missing, unreadable or not UTF-8.
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StartupError(
            f"cannot read {name} {path}: {exc.strerror or exc}; {fix}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise StartupError(f"{name} {path} is not UTF-8 text; {fix}") from exc


def read_tokens_file(path: str | Path) -> dict[str, str]:
    """Read `principal token` lines (blank lines and `#` comments allowed).

    Returns token -> principal. Raises `StartupError` naming the line on a
    malformed entry, a repeated token, or a principal with other characters
    than letters, digits and `._-`.
    """
    tokens: dict[str, str] = {}
    fix = "pass a file of 'PRINCIPAL TOKEN' lines"
    lines = read_text_file(path, "the tokens file", fix).splitlines()
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2:
            raise StartupError(
                f"{path} line {number}: expected 'PRINCIPAL TOKEN', found "
                f"{len(parts)} fields"
            )
        principal, token = parts
        if not PRINCIPAL_PATTERN.fullmatch(principal):
            raise StartupError(
                f"{path} line {number}: principal {principal!r} may use only "
                "letters, digits and . _ - (1 to 64 characters)"
            )
        if token in tokens:
            raise StartupError(f"{path} line {number}: this token is listed twice")
        tokens[token] = principal
    if not tokens:
        raise StartupError(f"the tokens file {path} lists no tokens")
    return tokens
