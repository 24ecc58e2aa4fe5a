"""Every table of the product, imported in one place for Alembic's autogenerate."""

from services.agent.models import Conversation, Message
from services.auth.models import RefreshToken, User
from services.db import Base
from services.feedback.models import Feedback
from services.knowledge.models import Document, DocumentUpload
from services.usage_events.models import Event

__all__ = [
    "Base",
    "Conversation",
    "Document",
    "DocumentUpload",
    "Event",
    "Feedback",
    "Message",
    "RefreshToken",
    "User",
]
