"""Every table of the product, imported in one place for Alembic's autogenerate."""

from services.agent.models import Conversation, Message
from services.analytics.models import Event
from services.auth.models import RefreshToken, User
from services.db import Base
from services.feedback.models import Feedback
from services.knowledge.models import Document, DocumentUpload

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
