"""Who is calling: the authenticated user and their role."""

import enum
import uuid
from dataclasses import dataclass


class Role(enum.StrEnum):
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """The caller of an RPC, as proven by their access token or API key."""

    user_id: uuid.UUID
    role: Role
    # The account's auth_version when the call began: raised by every change to the account
    # (services/auth/auth_state.py), so what was read at one version is current while the
    # principal still names it. None when unknown (nothing cached by version is trusted).
    version: int | None = None
    # The API key the call presented; None: an access token.
    key_id: uuid.UUID | None = None
    # A read-only API key's call may only use the methods that change nothing.
    read_only: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN
