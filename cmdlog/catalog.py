"""The handler catalog: a fingerprint of each type's code, checked at start.

A handler that has applied commands must never change, or replaying the
log would no longer give the state that clients were told about. The first
time a node folds a command of a type, it records a fingerprint of that
type's code; at every start it compares the app's code with the record and
refuses to start on a difference, naming the type.

The fingerprint hashes the syntax tree of the type's validate and apply
functions, so formatting, comments and docstrings do not count, together
with every function of the same package they call (transitively) and the
values of the plain constants they read. Code of other packages (cmdlog's
own field checks, the standard library) is not part of it, so upgrading
those does not stop a node.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cmdlog.app import App, CommandType

_CONSTANT_TYPES = (int, float, str, bytes, bool, type(None))


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """A type's recorded fingerprint next to the one its current code has."""

    type_name: str
    recorded: str | None
    current: str | None

    @property
    def state(self) -> str:
        if self.current is None:
            return "removed"
        if self.recorded is None:
            return "new"
        return "ok" if self.recorded == self.current else "CHANGED"


def handler_fingerprint(command_type: CommandType) -> str:
    """Return the hex fingerprint of a command type's validate and apply code."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(repr(command_type.natural_key).encode())
    for role, function in (
        ("validate", command_type.validate),
        ("apply", command_type.apply),
    ):
        hasher.update(role.encode())
        for part in _code_parts(function, set()):
            hasher.update(part)
    return hasher.hexdigest()


def _code_parts(function: Callable[..., Any], seen: set[int]) -> Iterator[bytes]:
    """Yield the normalized tree of `function` and of what it uses in its module."""
    if id(function) in seen:
        return
    seen.add(id(function))
    tree = _normalized_tree(function)
    yield ast.dump(tree, annotate_fields=False, include_attributes=False).encode()

    package = _package(getattr(function, "__module__", None) or "")
    namespace = getattr(function, "__globals__", {})
    names = sorted({node.id for node in ast.walk(tree) if isinstance(node, ast.Name)})
    for name in names:
        value = namespace.get(name)
        if inspect.isfunction(value) and _package(value.__module__) == package:
            yield from _code_parts(value, seen)
        elif isinstance(value, _CONSTANT_TYPES):
            yield f"{name}={value!r}".encode()
        elif isinstance(value, frozenset | tuple) and all(
            isinstance(item, _CONSTANT_TYPES) for item in value
        ):
            yield f"{name}={sorted(map(repr, value))}".encode()


def _package(module: str) -> str:
    """Return the package a module belongs to (the module itself at top level)."""
    return module.rpartition(".")[0] or module


def _normalized_tree(function: Callable[..., Any]) -> ast.AST:
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        # With no source (a builtin or a generated function), hash the bytecode.
        code = getattr(function, "__code__", None)
        return ast.Constant(code.co_code if code is not None else repr(function))
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.decorator_list = []
            node.returns = None
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.arg):
            node.annotation = None
    return tree


def app_fingerprints(app: App) -> dict[str, str]:
    """Return `{type name: fingerprint}` for every type of `app`."""
    return {name: handler_fingerprint(app.types[name]) for name in app.type_names()}


def compare(recorded: dict[str, str], current: dict[str, str]) -> list[CatalogEntry]:
    """Pair recorded and current fingerprints for every type in either map."""
    return [
        CatalogEntry(name, recorded.get(name), current.get(name))
        for name in sorted(set(recorded) | set(current))
    ]


def changed_message(entry: CatalogEntry) -> str:
    return (
        f"the handler of {entry.type_name} has changed: this node recorded "
        f"fingerprint {entry.recorded} when it first applied the type, and the "
        f"code now has {entry.current}. A handler that has applied commands must "
        f"stay as it was; put the old code back and register the new behaviour "
        f"as a new type (for example {entry.type_name}.v2)"
    )
