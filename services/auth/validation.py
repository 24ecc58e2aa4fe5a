"""Checks and normalization of account fields supplied by users."""

import unicodedata

from email_validator import EmailNotValidError, validate_email

from services.errors import Violations

MAX_FULL_NAME = 200


def _normalized(raw: str) -> str:
    """The stored form of an email address; raises EmailNotValidError when malformed."""
    return validate_email(raw.strip(), check_deliverability=False).normalized.lower()


def normalize_email(raw: str, violations: Violations, *, field: str = "email") -> str:
    """The lower-cased email in `raw`; a malformed one is recorded as a violation."""
    if not raw.strip():
        violations.add(field, "is required")
        return ""
    try:
        return _normalized(raw)
    except EmailNotValidError as exc:
        violations.add(field, f"is not a valid email address: {exc}")
        return ""


def canonical_email(raw: str) -> str:
    """The form `normalize_email` stores, or the trimmed lower-cased input when it is not a
    valid address (for lookups, which must not reveal why an address matches nothing)."""
    try:
        return _normalized(raw)
    except EmailNotValidError:
        return raw.strip().lower()


def clean_full_name(raw: str, violations: Violations, *, field: str = "full_name") -> str:
    """`raw` without surrounding space; control characters and over-long names are violations."""
    name = raw.strip()
    if len(name) > MAX_FULL_NAME:
        violations.add(field, f"must be at most {MAX_FULL_NAME} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        violations.add(field, "must not contain control characters")
    return name
