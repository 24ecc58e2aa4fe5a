"""The table of A2A tasks: each is an agent run started over A2A, kept past the run log.

The run log (issue 15) forgets an ended run after its TTL, but an A2A client may read its
task (GetTask, ListTasks) long after: this row is what it reads then. It holds the run's
question, its conversation (the task's context), how it ended and the answer.
"""

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from services.db import Base, UTCDateTime, utcnow


class A2aTask(Base):
    __tablename__ = "a2a_tasks"
    __table_args__ = (Index("ix_a2a_tasks_user_id_created_at", "user_id", "created_at"),)

    # The run's id: the same 128 bits as its 32 hexadecimal digits.
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # No foreign key: a task outlives the conversation its owner deletes (it holds its
    # own question and answer).
    context_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    state: Mapped[str] = mapped_column(String(16))
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text, default="")
    # The stored answer message; None until the run completes.
    answer_message_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    # Why the run did not complete (the error its streams ended with); empty otherwise.
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
