"""Every table of the product, imported in one place for Alembic's autogenerate."""

from services.agent.a2a_task_models import A2aTask
from services.agent.models import Conversation, Message
from services.audit.models import AuditRecord
from services.auth.models import ApiKey, Invitation, RefreshToken, User
from services.db import Base
from services.feedback.models import Feedback
from services.knowledge.models import (
    Collection,
    CollectionDocument,
    CollectionGrant,
    Document,
    DocumentUpload,
)
from services.teams.models import Group, GroupMember
from services.usage_events.models import Event

__all__ = [
    "A2aTask",
    "ApiKey",
    "AuditRecord",
    "Base",
    "Collection",
    "CollectionDocument",
    "CollectionGrant",
    "Conversation",
    "Document",
    "DocumentUpload",
    "Event",
    "Feedback",
    "Group",
    "GroupMember",
    "Invitation",
    "Message",
    "RefreshToken",
    "User",
]
