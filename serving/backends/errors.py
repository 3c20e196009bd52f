"""Backend failures, each carrying the gRPC status and the public sentence a caller gets
for it. The details (Triton's message, the URL) stay in the exception text, which goes
to the log only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import grpc

from export.rollout import ModelRefused
from model.user_index import UserIndexError


class BackendError(RuntimeError):
    """The backend failed on a call, and not through the caller's fault."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    public: ClassVar[str] = "the model failed on this call"


class BackendUnavailable(BackendError):
    """The backend cannot be reached, or has no model loaded."""

    code = grpc.StatusCode.UNAVAILABLE
    public = "the model backend is unavailable; retry later"


class BackendTimeout(BackendError):
    """No answer within the call's deadline (not retried: the work may be running still)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    public = "no answer from the model within {timeout_s:g}s"


class InvalidRequest(BackendError):
    """The backend rejected the batch's tensors (dtype, shape, missing input)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    public = "the model refused the batch's tensors"


class VersionNotLoaded(BackendError):
    """A call pinned an FM version that is not loaded (pruned, or never published): it
    is refused, never answered by another version. The message is public: it names only
    version numbers."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    public = "{message}"

    def __init__(self, asked: int, available: Sequence[int]):
        self.asked, self.available = asked, tuple(available)
        listed = ", ".join(map(str, self.available)) or "none"
        super().__init__(f"FM version {asked} is not loaded; the loaded versions are {listed}")


class ModelLoadError(BackendError, ModelRefused):
    """The backend could not load a model version (what rollout calls `ModelRefused`)."""


def status_of(error: Exception, timeout_s: float) -> tuple[grpc.StatusCode, str]:
    """A failed backend call -> (the caller's status, the public sentence). A batch the
    backend cannot take (`ValueError`, which our own user-index check raises naming the
    input) is the caller's, never an internal failure."""
    if isinstance(error, BackendError):
        return error.code, error.public.format(timeout_s=timeout_s, message=error)
    if isinstance(error, UserIndexError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"the batch's user rows do not hold together: {error}"
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, "the model refused the batch"
    return grpc.StatusCode.INTERNAL, BackendError.public
