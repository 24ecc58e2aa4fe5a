"""Who is calling: the authenticated user and their role."""

import enum
import uuid
from dataclasses import dataclass


class Role(enum.StrEnum):
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """The caller of an RPC, as proven by their access token."""

    user_id: uuid.UUID
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN
