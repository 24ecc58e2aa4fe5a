"""A conversation's messages as a tree: the active branch, each message's siblings, and the
leaf a branch leads to. Pure functions over the messages of one conversation."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from services.agent.models import Message


@dataclass(frozen=True)
class Tree:
    """The messages of one conversation, indexed by id and by parent."""

    by_id: dict[uuid.UUID, Message]
    children: dict[uuid.UUID | None, list[uuid.UUID]]
    """Each parent's children, oldest first (None: the first questions)."""

    @classmethod
    def of(cls, messages: Sequence[Message]) -> "Tree":
        """The tree of `messages`, given oldest first."""
        children: dict[uuid.UUID | None, list[uuid.UUID]] = {}
        for message in messages:
            children.setdefault(message.parent_id, []).append(message.id)
        return cls({m.id: m for m in messages}, children)

    def siblings(self, message: Message) -> list[uuid.UUID]:
        """The messages with `message`'s parent, oldest first, itself included."""
        return self.children.get(message.parent_id, [message.id])

    def leaf_under(self, message_id: uuid.UUID) -> uuid.UUID:
        """The end of the branch through `message_id`: its newest child, that one's newest
        child, and so on."""
        leaf = message_id
        while self.children.get(leaf):
            leaf = self.children[leaf][-1]
        return leaf

    def path_to(self, leaf: uuid.UUID | None) -> list[Message]:
        """The messages from the first question to `leaf`, oldest first (empty for None)."""
        path: list[Message] = []
        seen: set[uuid.UUID] = set()
        at = leaf
        while at is not None and at in self.by_id and at not in seen:
            seen.add(at)
            path.append(self.by_id[at])
            at = self.by_id[at].parent_id
        path.reverse()
        return path

    def active_leaf(self, recorded: uuid.UUID | None) -> uuid.UUID | None:
        """The conversation's active leaf: the one it recorded, when it is one of its
        messages; else the end of the newest branch."""
        if recorded is not None and recorded in self.by_id:
            return recorded
        roots = self.children.get(None)
        return self.leaf_under(roots[-1]) if roots else None
