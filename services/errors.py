"""The errors domain code raises; the transport maps each class to one gRPC status."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, named by its path in the request (e.g. `user.email`)."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted limit: who it applies to (`user:<id>`) and what it limits."""

    subject: str
    description: str


class DomainError(Exception):
    """Base of every expected failure. `reason` is an UPPER_SNAKE code clients can match."""

    reason = "ERROR"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = metadata or {}


class InvalidArgument(DomainError):
    """The request is malformed; `violations` name the offending fields."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], *, reason: str | None = None) -> None:
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(message or "invalid request", reason=reason)
        self.violations = violations

    @classmethod
    def of(cls, field: str, description: str) -> "InvalidArgument":
        """An error about a single field."""
        return cls([FieldViolation(field, description)])


class NotFound(DomainError):
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    reason = "ABORTED"


class Cancelled(DomainError):
    """The work was stopped on request (an agent run its owner cancelled)."""

    reason = "CANCELLED"


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    reason = "UNAUTHENTICATED"


class Unavailable(DomainError):
    reason = "UNAVAILABLE"


class ResourceExhausted(DomainError):
    """A limit was hit; `retry_after` (seconds) says when trying again can succeed."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        violations: list[QuotaViolation] | None = None,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after
        self.violations = violations or []


@dataclass
class Violations:
    """Collects field violations while validating a request, then raises them together."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(list(self.items))
