"""Groups of accounts: administrators create them and manage every group's members; a
group's managers add and remove its members; every user sees the groups they belong to.

Who may do what (the RPC access table lets administrators alone create, rename and
delete groups; the membership rules are decided here, per group):
- an administrator: anything, in every group;
- a manager: add members (as members), remove members, step down or leave; never make a
  manager, demote or remove another manager, so the managers stay an administrator's
  choice and a manager cannot hand the group to someone else;
- a member: see the group and its members, and leave it.

A group the caller neither belongs to nor administers is NOT_FOUND, exactly as a group
that does not exist: its id reveals nothing. A member who is refused a manager's action
gets PERMISSION_DENIED (they can see the group), and the refusal is audited.

Writes read the group's row FOR UPDATE first, so a membership change and the group's
deletion (or two changes to one member) run one after the other.
"""

import enum
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, delete, func, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from services.audit.trail import Actor, AuditAction, AuditTrail, Outcome
from services.auth.models import User
from services.auth.principal import Principal
from services.db import parse_uuid, utcnow
from services.errors import AlreadyExists, NotFound, PermissionDenied, Violations
from services.pagination import Cursor, decode_cursor, encode_cursor, page_size
from services.teams.models import Group, GroupMember

MAX_NAME = 100
MAX_DESCRIPTION = 1000
# Line breaks and tabs are text in a description; other control characters are not.
DESCRIPTION_CONTROLS = frozenset("\n\t")


class GroupRole(enum.StrEnum):
    """`group_members.role`."""

    MEMBER = "member"
    MANAGER = "manager"


@dataclass(frozen=True)
class GroupView:
    """A group as one caller sees it: with its size and the caller's own role there."""

    group: Group
    member_count: int
    caller_role: GroupRole | None  # None: not a member (an administrator's view)


@dataclass(frozen=True)
class MemberView:
    user_id: uuid.UUID
    email: str
    full_name: str
    role: GroupRole
    added_at: datetime


@dataclass(frozen=True)
class GroupPage:
    groups: list[GroupView]
    next_page_token: str


@dataclass(frozen=True)
class MemberPage:
    members: list[MemberView]
    next_page_token: str


@dataclass(frozen=True)
class GroupChanges:
    """New values for the fields to change; None leaves a field as it is."""

    name: str | None = None
    description: str | None = None


def clean_name(raw: str, violations: Violations, *, field: str = "name") -> str:
    name = raw.strip()
    if not name:
        violations.add(field, "is required")
    elif len(name) > MAX_NAME:
        violations.add(field, f"must be at most {MAX_NAME} characters")
    elif any(unicodedata.category(c).startswith("C") for c in name):
        violations.add(field, "must not contain control characters")
    return name


def clean_description(raw: str, violations: Violations, *, field: str = "description") -> str:
    description = raw.strip()
    if len(description) > MAX_DESCRIPTION:
        violations.add(field, f"must be at most {MAX_DESCRIPTION} characters")
    elif any(
        unicodedata.category(c).startswith("C") and c not in DESCRIPTION_CONTROLS
        for c in description
    ):
        violations.add(field, "must not contain control characters other than line breaks")
    return description


def name_key(name: str) -> str:
    """What group names are unique by: "Sales" and "sales" are one name."""
    return name.casefold()


def uuid_field(raw: str, field: str, violations: Violations) -> uuid.UUID:
    parsed = parse_uuid(raw)
    if parsed is None:
        violations.add(field, "must be a UUID")
        return uuid.UUID(int=0)
    return parsed


def _actor(principal: Principal) -> Actor:
    return Actor(principal.user_id, principal.key_id)


def _not_found() -> NotFound:
    return NotFound("group not found", reason="GROUP_NOT_FOUND")


def _group_query(caller: uuid.UUID) -> Select[Any]:
    """Groups with their member count and the caller's role in each (None: not a member)."""
    mine = aliased(GroupMember)
    count = (
        select(func.count())
        .select_from(GroupMember)
        .where(GroupMember.group_id == Group.id)
        .correlate(Group)
        .scalar_subquery()
    )
    return select(Group, count, mine.role).outerjoin(
        mine, and_(mine.group_id == Group.id, mine.user_id == caller)
    )


def _view(row: Any) -> GroupView:
    group, count, role = row
    return GroupView(group, int(count), GroupRole(role) if role is not None else None)


class GroupService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], audit: AuditTrail) -> None:
        self._sessions = sessions
        self._audit = audit

    # --- groups --------------------------------------------------------------------------

    async def create(self, principal: Principal, *, name: str, description: str) -> GroupView:
        """A new group with no members (administrators: the access table says so)."""
        violations = Violations()
        name = clean_name(name, violations)
        description = clean_description(description, violations)
        violations.raise_if_any()
        now = utcnow()
        group = Group(
            name=name,
            name_key=name_key(name),
            description=description,
            created_at=now,
            updated_at=now,
        )
        try:
            async with self._sessions.begin() as s:
                await self._check_name_free(s, group.name_key)
                s.add(group)
        except IntegrityError:  # created concurrently
            raise self._name_taken() from None
        await self._audit.record(
            AuditAction.GROUP_CREATED,
            actor=_actor(principal),
            target_type="group",
            target_id=group.id,
            data={"name": name},
        )
        return GroupView(group, 0, None)

    async def get(self, principal: Principal, raw_group_id: str) -> GroupView:
        """A group the caller belongs to, or any group for an administrator."""
        violations = Violations()
        group_id = uuid_field(raw_group_id, "group_id", violations)
        violations.raise_if_any()
        async with self._sessions() as s:
            return await self._visible(s, principal, group_id)

    async def list(
        self, principal: Principal, *, requested_page_size: int, page_token: str
    ) -> GroupPage:
        """A page of the groups the caller can see, oldest first."""
        size = page_size(requested_page_size)
        cursor = decode_cursor(page_token)
        query = _group_query(principal.user_id).order_by(Group.created_at, Group.id).limit(size + 1)
        if not principal.is_admin:
            query = query.where(
                Group.id.in_(
                    select(GroupMember.group_id).where(GroupMember.user_id == principal.user_id)
                )
            )
        if cursor is not None:
            query = query.where(tuple_(Group.created_at, Group.id) > (cursor.at, cursor.id))
        async with self._sessions() as s:
            views = [_view(row) for row in (await s.execute(query)).all()]
        if len(views) <= size:
            return GroupPage(views, "")
        last = views[size - 1].group
        return GroupPage(views[:size], encode_cursor(Cursor(last.created_at, last.id)))

    async def update(
        self, principal: Principal, raw_group_id: str, changes: GroupChanges
    ) -> GroupView:
        """Rename a group or change its description (administrators)."""
        violations = Violations()
        group_id = uuid_field(raw_group_id, "group.group_id", violations)
        values: dict[str, str] = {}
        if changes.name is None and changes.description is None:
            violations.add("update_mask", "name at least one of: description, name")
        if changes.name is not None:
            values["name"] = clean_name(changes.name, violations, field="group.name")
        if changes.description is not None:
            values["description"] = clean_description(
                changes.description, violations, field="group.description"
            )
        violations.raise_if_any()
        try:
            async with self._sessions.begin() as s:
                group = await s.get(Group, group_id, with_for_update=True)
                if group is None:
                    raise _not_found()
                if "name" in values and name_key(values["name"]) != group.name_key:
                    await self._check_name_free(s, name_key(values["name"]))
                    group.name_key = name_key(values["name"])
                for field, value in values.items():
                    setattr(group, field, value)
                group.updated_at = utcnow()
                await s.flush()
                view = await self._visible(s, principal, group_id)
        except IntegrityError:  # the name was taken concurrently
            raise self._name_taken() from None
        await self._audit.record(
            AuditAction.GROUP_UPDATED,
            actor=_actor(principal),
            target_type="group",
            target_id=group_id,
            data={"fields": sorted(values)},
        )
        return view

    async def delete(self, principal: Principal, raw_group_id: str) -> None:
        """Delete a group; its memberships go with it (administrators)."""
        violations = Violations()
        group_id = uuid_field(raw_group_id, "group_id", violations)
        violations.raise_if_any()
        async with self._sessions.begin() as s:
            group = await s.get(Group, group_id, with_for_update=True)
            if group is None:
                raise _not_found()
            name = group.name
            await s.execute(delete(Group).where(Group.id == group_id))
        await self._audit.record(
            AuditAction.GROUP_DELETED,
            actor=_actor(principal),
            target_type="group",
            target_id=group_id,
            data={"name": name},
        )

    # --- members -------------------------------------------------------------------------

    async def members(
        self,
        principal: Principal,
        raw_group_id: str,
        *,
        requested_page_size: int,
        page_token: str,
    ) -> MemberPage:
        """A page of a group's members in the order they joined (its members and
        administrators)."""
        violations = Violations()
        group_id = uuid_field(raw_group_id, "group_id", violations)
        violations.raise_if_any()
        size = page_size(requested_page_size)
        cursor = decode_cursor(page_token)
        query = (
            select(GroupMember, User.email, User.full_name)
            .join(User, User.id == GroupMember.user_id)
            .where(GroupMember.group_id == group_id)
            .order_by(GroupMember.added_at, GroupMember.user_id)
            .limit(size + 1)
        )
        if cursor is not None:
            query = query.where(
                tuple_(GroupMember.added_at, GroupMember.user_id) > (cursor.at, cursor.id)
            )
        async with self._sessions() as s:
            await self._visible(s, principal, group_id)
            rows = (await s.execute(query)).all()
        members = [
            MemberView(m.user_id, email, full_name, GroupRole(m.role), m.added_at)
            for m, email, full_name in rows
        ]
        if len(members) <= size:
            return MemberPage(members, "")
        last = members[size - 1]
        return MemberPage(members[:size], encode_cursor(Cursor(last.added_at, last.user_id)))

    async def add_member(
        self,
        principal: Principal,
        raw_group_id: str,
        raw_user_id: str,
        role: GroupRole | None,
    ) -> MemberView:
        """Add an account to a group: administrators with either role, managers as a
        member."""
        violations = Violations()
        group_id = uuid_field(raw_group_id, "group_id", violations)
        user_id = uuid_field(raw_user_id, "user_id", violations)
        violations.raise_if_any()
        role = role or GroupRole.MEMBER
        action = AuditAction.GROUP_MEMBER_ADDED
        try:
            async with self._sessions.begin() as s:
                caller_role = (await self._locked(s, principal, group_id)).caller_role
                if not principal.is_admin:
                    self._require_manager(caller_role)
                    if role is GroupRole.MANAGER:
                        raise self._admin_required("only administrators make group managers")
                user = await s.get(User, user_id)
                if user is None:
                    raise NotFound("user not found", reason="USER_NOT_FOUND")
                if await s.get(GroupMember, (group_id, user_id)) is not None:
                    raise self._already_member()
                member = GroupMember(
                    group_id=group_id, user_id=user_id, role=role.value, added_at=utcnow()
                )
                s.add(member)
        except IntegrityError:  # added concurrently
            raise self._already_member() from None
        except PermissionDenied as refusal:
            await self._refused(principal, action, group_id, user_id, refusal)
            raise
        await self._audit.record(
            action,
            actor=_actor(principal),
            target_type="group",
            target_id=group_id,
            data={"user_id": str(user_id), "role": role.value},
        )
        return MemberView(user_id, user.email, user.full_name, role, member.added_at)

    async def remove_member(
        self, principal: Principal, raw_group_id: str, raw_user_id: str
    ) -> None:
        """Remove an account from a group: administrators anyone, managers members and
        themselves, members themselves."""
        violations = Violations()
        group_id = uuid_field(raw_group_id, "group_id", violations)
        user_id = uuid_field(raw_user_id, "user_id", violations)
        violations.raise_if_any()
        action = AuditAction.GROUP_MEMBER_REMOVED
        myself = user_id == principal.user_id
        try:
            async with self._sessions.begin() as s:
                caller_role = (await self._locked(s, principal, group_id)).caller_role
                if not (principal.is_admin or myself):
                    self._require_manager(caller_role)
                member = await self._member(s, group_id, user_id)
                if not (principal.is_admin or myself) and member.role == GroupRole.MANAGER:
                    raise self._admin_required("only administrators remove a group manager")
                role = member.role
                await s.delete(member)
        except PermissionDenied as refusal:
            await self._refused(principal, action, group_id, user_id, refusal)
            raise
        await self._audit.record(
            action,
            actor=_actor(principal),
            target_type="group",
            target_id=group_id,
            data={"user_id": str(user_id), "role": role, "self": myself},
        )

    async def set_role(
        self,
        principal: Principal,
        raw_group_id: str,
        raw_user_id: str,
        role: GroupRole | None,
    ) -> MemberView:
        """Make a member a manager or a manager a member: administrators for anyone; a
        manager only steps down."""
        violations = Violations()
        group_id = uuid_field(raw_group_id, "group_id", violations)
        user_id = uuid_field(raw_user_id, "user_id", violations)
        if role is None:
            violations.add("role", "must be GROUP_ROLE_MEMBER or GROUP_ROLE_MANAGER")
        violations.raise_if_any()
        assert role is not None
        action = AuditAction.GROUP_MEMBER_ROLE_CHANGED
        try:
            async with self._sessions.begin() as s:
                caller_role = (await self._locked(s, principal, group_id)).caller_role
                stepping_down = user_id == principal.user_id and role is GroupRole.MEMBER
                if not principal.is_admin:
                    self._require_manager(caller_role)
                    if not stepping_down:
                        raise self._admin_required(
                            "only administrators change a member's role; a manager may step down"
                        )
                member = await self._member(s, group_id, user_id)
                previous = member.role
                member.role = role.value
                user = await s.get(User, user_id)
                assert user is not None  # the membership's foreign key holds it
        except PermissionDenied as refusal:
            await self._refused(principal, action, group_id, user_id, refusal)
            raise
        if previous != role.value:
            await self._audit.record(
                action,
                actor=_actor(principal),
                target_type="group",
                target_id=group_id,
                data={"user_id": str(user_id), "from": previous, "to": role.value},
            )
        return MemberView(user_id, user.email, user.full_name, role, member.added_at)

    # --- checks --------------------------------------------------------------------------

    async def _visible(
        self, s: AsyncSession, principal: Principal, group_id: uuid.UUID
    ) -> GroupView:
        """The group as the caller sees it; NOT_FOUND if it does not exist or, for anyone
        but an administrator, if the caller is not a member."""
        row = (await s.execute(_group_query(principal.user_id).where(Group.id == group_id))).first()
        view = _view(row) if row is not None else None
        if view is None or (view.caller_role is None and not principal.is_admin):
            raise _not_found()
        return view

    async def _locked(
        self, s: AsyncSession, principal: Principal, group_id: uuid.UUID
    ) -> GroupView:
        """`_visible`, with the group's row held until commit (PostgreSQL)."""
        if await s.get(Group, group_id, with_for_update=True) is None:
            raise _not_found()
        return await self._visible(s, principal, group_id)

    @staticmethod
    async def _member(s: AsyncSession, group_id: uuid.UUID, user_id: uuid.UUID) -> GroupMember:
        member = await s.get(GroupMember, (group_id, user_id), with_for_update=True)
        if member is None:
            raise NotFound("the account is not a member", reason="GROUP_MEMBER_NOT_FOUND")
        return member

    @staticmethod
    def _require_manager(caller_role: GroupRole | None) -> None:
        if caller_role is not GroupRole.MANAGER:
            raise PermissionDenied(
                "only the group's managers and administrators change its members",
                reason="GROUP_MANAGER_REQUIRED",
            )

    @staticmethod
    def _admin_required(message: str) -> PermissionDenied:
        return PermissionDenied(message, reason="ADMIN_REQUIRED")

    @staticmethod
    def _already_member() -> AlreadyExists:
        return AlreadyExists("the account is a member already", reason="ALREADY_A_MEMBER")

    @staticmethod
    def _name_taken() -> AlreadyExists:
        return AlreadyExists("a group with this name exists", reason="GROUP_NAME_TAKEN")

    async def _check_name_free(self, s: AsyncSession, key: str) -> None:
        if await s.scalar(select(Group.id).where(Group.name_key == key)) is not None:
            raise self._name_taken()

    async def _refused(
        self,
        principal: Principal,
        action: AuditAction,
        group_id: uuid.UUID,
        user_id: uuid.UUID,
        refusal: PermissionDenied,
    ) -> None:
        """A member of the group tried a manager's or an administrator's change."""
        await self._audit.record(
            action,
            actor=_actor(principal),
            outcome=Outcome.FAILURE,
            target_type="group",
            target_id=group_id,
            data={"user_id": str(user_id), "reason": refusal.reason},
        )
