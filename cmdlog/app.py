"""The handler registry: domains, their command types and their queries.

An app is a set of domains. Each domain owns one state database, the
command types that write to it and the queries that read it. A command
type has three parts:

- `validate(payload) -> payload`: runs once, on the node that accepts the
  command from a client. It raises `ValidationError` naming the field, and
  returns the payload to store (for example with a username already in its
  canonical form), so the fold never has to recompute anything that could
  differ between nodes.
- `apply(state, command) -> result`: pure. It reads and writes only its
  domain's state through `state`, may use `command.stamp` as the time, and
  either returns a JSON-ready result or raises `Rejected(reason)`.
- `natural_key`: payload fields that identify the real-world transaction.
  When a payload carries all of them, the command ID is derived from the
  type and those fields, so a retry under a new Idempotency-Key is still a
  retry.

Behaviour grows by accretion: to change what a type does, register a new
type next to it. A handler that has run is never edited.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cmdlog import codec
from cmdlog.errors import NotFound
from cmdlog.model import NATURAL_ID_SEPARATOR, Command


class State(Protocol):
    """A domain's key-value state as a handler sees it."""

    def get(self, key: str) -> Any: ...

    def put(self, key: str, value: Any) -> None: ...

    def delete(self, key: str) -> None: ...


class StateReader(Protocol):
    """A domain's key-value state as a query sees it."""

    def get(self, key: str) -> Any: ...


class Rejected(Exception):
    """Raised by a handler to reject a command with a reason code.

    A rejected command stays in the log; rejection is its outcome.
    """

    def __init__(self, reason: str, detail: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


Validator = Callable[[dict[str, Any]], dict[str, Any]]
Handler = Callable[[State, Command], Any]
QueryFunction = Callable[[StateReader, Mapping[str, str]], Any]


@dataclass(frozen=True, slots=True)
class CommandType:
    """A registered command type: validation, pure apply and optional natural key."""

    name: str
    domain: str
    apply: Handler
    validate: Validator
    natural_key: tuple[str, ...] = ()

    def natural_id(self, payload: Mapping[str, Any]) -> str | None:
        """Return the ID derived from the natural key fields, or None if absent."""
        if not self.natural_key:
            return None
        values = [payload.get(name) for name in self.natural_key]
        if any(value is None for value in values):
            return None
        digest = hashlib.blake2b(codec.canonical(values), digest_size=16).hexdigest()
        return f"{self.name}{NATURAL_ID_SEPARATOR}{digest}"


@dataclass(frozen=True, slots=True)
class Query:
    """A registered read-only query over one domain's state."""

    name: str
    domain: str
    run: QueryFunction


def _accept_any(payload: dict[str, Any]) -> dict[str, Any]:
    return payload


@dataclass
class Domain:
    """A group of command types and queries that share one state database."""

    name: str
    types: dict[str, CommandType] = field(default_factory=dict)
    queries: dict[str, Query] = field(default_factory=dict)

    def command(
        self,
        name: str,
        *,
        validate: Validator = _accept_any,
        natural_key: Iterable[str] = (),
    ) -> Callable[[Handler], Handler]:
        """Register the decorated function as the apply handler of type `name`."""

        def register(apply: Handler) -> Handler:
            if name in self.types:
                raise ValueError(f"command type {name!r} is registered twice")
            self.types[name] = CommandType(
                name, self.name, apply, validate, tuple(natural_key)
            )
            return apply

        return register

    def extended(self) -> Domain:
        """Return a new domain with this one's types and queries, to add more to.

        A later app version registers its new types on the copy, so the
        earlier app keeps exactly the types it had.
        """
        return Domain(self.name, dict(self.types), dict(self.queries))

    def query(self, name: str) -> Callable[[QueryFunction], QueryFunction]:
        """Register the decorated function as the query `name`."""

        def register(run: QueryFunction) -> QueryFunction:
            if name in self.queries:
                raise ValueError(f"query {name!r} is registered twice")
            self.queries[name] = Query(name, self.name, run)
            return run

        return register


class App:
    """The set of domains a node serves."""

    def __init__(self, domains: Iterable[Domain]) -> None:
        self.domains = {domain.name: domain for domain in domains}
        self.types: dict[str, CommandType] = {}
        self.queries: dict[str, Query] = {}
        for domain in self.domains.values():
            for type_name, command_type in domain.types.items():
                if type_name in self.types:
                    raise ValueError(f"command type {type_name!r} is in two domains")
                self.types[type_name] = command_type
            for query_name, query in domain.queries.items():
                if query_name in self.queries:
                    raise ValueError(f"query {query_name!r} is in two domains")
                self.queries[query_name] = query

    def type_names(self) -> list[str]:
        return sorted(self.types)

    def query(self, name: str) -> Query:
        query = self.queries.get(name)
        if query is None:
            raise NotFound(
                f"no query named {name!r}; this node has "
                f"{', '.join(sorted(self.queries)) or 'none'}"
            )
        return query
