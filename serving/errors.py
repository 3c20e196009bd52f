"""How the front end refuses a call: a precise gRPC status, a short message with user
input cut to a bounded length, `google.rpc.BadRequest` field violations in the status
details, and a request id that ties the reply to the server's log.

Replies never carry tracebacks, file paths, node names or internal addresses: the
server logs those (with the request id) and the caller gets a fixed sentence.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from gem.knowledge.wire import cut
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

log = logging.getLogger("ray.serve")

# Whole status messages are cut to this (well under gRPC's 8 KiB metadata limit).
MAX_MESSAGE = 1024
MAX_VIOLATIONS = 16
# The trailer clients read rich status details from (grpcio-status, grpc-go, ...).
DETAILS_KEY = "grpc-status-details-bin"
# The trailer of the server's retry-after, in ms (gRFC A6's name; gem.knowledge.client reads it).
PUSHBACK_KEY = "retry-pushback-ms"


def quote(name: object) -> str:
    """A user-given name, quoted and bounded: for messages."""
    return repr(cut(name))


__all__ = ["Refusal", "Violation", "cut", "internal", "pushback_ms", "quote", "refuse", "status_details"]


@dataclass(frozen=True)
class Violation:
    """One `google.rpc.BadRequest.FieldViolation`: `field` is a path into the request
    (`features["ad_id"]`, `shared["user_id"]`, `outputs`), `description` says why."""

    field: str
    description: str


@dataclass
class Refusal(Exception):
    """A call the front end refuses, with the status it gets."""

    code: grpc.StatusCode
    message: str
    violations: Sequence[Violation] = field(default_factory=tuple)
    # Set on a refusal that a retry after this long may pass (admission control).
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return self.message


def status_details(
    code: grpc.StatusCode, message: str, violations: Sequence[Violation], retry_after_s: float | None = None
) -> bytes:
    """The serialized `google.rpc.Status` for the details trailer."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(pushback_ms(retry_after_s))
        status.details.add().Pack(retry)
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=cut(v.field, 200), description=cut(v.description, 300)
                )
                for v in violations[:MAX_VIOLATIONS]
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad)
        status.details.append(detail)
    return status.SerializeToString()


def request_id() -> str:
    """The id Ray Serve gave this call (it also returns it in the `request_id` trailer)."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # outside a replica (unit tests)
        rid = ""
    return rid or uuid.uuid4().hex


def pushback_ms(seconds: float) -> int:
    return max(round(seconds * 1000), 1)


def refuse(
    context,
    code: grpc.StatusCode,
    message: str,
    violations: Sequence[Violation] = (),
    retry_after_s: float | None = None,
) -> str:
    """Sets code, bounded message and details (with the retry-after, if any, also as
    `retry-pushback-ms`) on the (Ray Serve) gRPC context; returns the message sent."""
    rid = request_id()
    message = cut(" ".join(str(message).split()), MAX_MESSAGE - 60) + f" (request id {rid})"
    context.set_code(code)
    context.set_details(message)
    trailer: list[tuple[str, str | bytes]] = [(DETAILS_KEY, status_details(code, message, violations, retry_after_s))]
    if retry_after_s is not None:
        trailer.append((PUSHBACK_KEY, str(pushback_ms(retry_after_s))))
    context.set_trailing_metadata(trailer)
    return message


def internal(context, code: grpc.StatusCode, public: str, error: BaseException | str) -> str:
    """A failure that is not the caller's fault: the details go to the log under the
    request id, the caller gets `public` and the id."""
    message = refuse(context, code, public)
    log.warning("%s: %s", message, error)
    return message
