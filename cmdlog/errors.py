"""The error hierarchy: every failure cmdlog raises on purpose.

Errors are grouped by who is at fault. A `ClientError` is the caller's
mistake and maps to a 4xx status; `Unavailable` is a temporary condition of
this node (5xx, worth a retry); `DataError` means bytes read from disk or
from a peer are not what this version of cmdlog wrote; `StartupError`
stops a node before it serves. Each message states what was expected, what
was found, and what to do about it.
"""

from __future__ import annotations


class CmdlogError(Exception):
    """Base class of every error cmdlog raises on purpose."""

    code = "error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientError(CmdlogError):
    """The request is wrong; retrying it unchanged gives the same answer."""

    code = "bad_request"
    status = 400


class InvalidKey(ClientError):
    """The Idempotency-Key (or a batch item's id) is missing or malformed."""

    code = "invalid_idempotency_key"


class MalformedBody(ClientError):
    """The body does not decode, or does not have the expected shape."""

    code = "malformed_body"


class MalformedRequest(ClientError):
    """The request is not valid HTTP/1.1, so the HTTP parser rejected it."""

    code = "malformed_request"


class BodyTimeout(ClientError):
    """The request body stopped arriving for longer than the body timeout."""

    code = "body_timeout"
    status = 408
    close_connection = True
    """The rest of the body may still arrive, so the connection cannot be reused."""


class InvalidArgument(ClientError):
    """A query string or path parameter is missing or malformed."""

    code = "invalid_argument"


class ValidationError(ClientError):
    """A command payload breaks a rule of its type."""

    code = "invalid_payload"
    status = 422

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule


class UnknownCommandType(ClientError):
    """The command type is not registered on this node."""

    code = "unknown_command_type"
    status = 422

    def __init__(self, type_name: str, known: list[str]) -> None:
        super().__init__(
            f"unknown command type {type_name!r}; this node knows "
            f"{', '.join(known)}. Send one of those, or upgrade the node "
            "with an app that registers the type"
        )
        self.type_name = type_name
        self.known = known


class KeyReused(ClientError):
    """The command ID is already stored with another type or payload."""

    code = "idempotency_key_reused"
    status = 422


class NotFound(ClientError):
    """The requested command, query or record does not exist."""

    code = "not_found"
    status = 404


class PayloadTooLarge(ClientError):
    """The body or the batch is over its configured limit."""

    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(ClientError):
    """The Content-Type is neither JSON nor msgpack."""

    code = "unsupported_media_type"
    status = 415


class UnsupportedTransferCoding(ClientError):
    """A body with a transfer coding other than chunked. RFC 9112 (section 6.1)
    has a server respond 501 to a transfer coding it does not implement."""

    code = "unsupported_transfer_coding"
    status = 501


class ExpectationFailed(ClientError):
    """The Expect header contains an expectation other than 100-continue."""

    code = "expectation_failed"
    status = 417


class NotAcceptable(ClientError):
    """The Accept header allows neither JSON nor msgpack."""

    code = "not_acceptable"
    status = 406


class Unauthorized(ClientError):
    """The bearer token is missing or wrong."""

    code = "unauthorized"
    status = 401


class Unavailable(CmdlogError):
    """The node cannot take the request now; the same request may succeed later."""

    code = "unavailable"
    status = 503
    retry_after_s = 1


class Overloaded(Unavailable):
    """More requests are in flight than the node's limits allow."""

    code = "overloaded"
    close_connection = False
    """Whether the 503 response closes its connection, to free a connection slot."""


class ShuttingDown(Unavailable):
    """The node is draining and accepts no new writes."""

    code = "shutting_down"


class StorageFull(Unavailable):
    """The disk or the LMDB map has no room for the write."""

    code = "storage_full"
    status = 507


class StorageFailed(Unavailable):
    """A write to the store failed for a reason other than a full disk."""

    code = "storage_failed"


class DataError(CmdlogError):
    """Bytes from disk or from a peer are not what cmdlog writes."""

    code = "bad_data"
    status = 502


class VersionMismatch(DataError):
    """A data directory or a peer speaks a format version this node does not."""

    code = "version_mismatch"


class DuplicateNodeId(CmdlogError):
    """Two running processes have one node ID, so one of them runs on a copy
    of the other's data directory."""

    code = "duplicate_node_id"
    status = 409


class StartupError(CmdlogError):
    """The node cannot start with this configuration or data directory."""

    code = "startup_failed"
