"""Password hashing (argon2id, off the event loop) and the password policy."""

import asyncio
from concurrent.futures import Executor

import argon2

# OWASP Password Storage Cheat Sheet minimum for argon2id: 19 MiB, 2 passes, 1 lane.
TIME_COST = 2
MEMORY_COST_KIB = 19 * 1024
PARALLELISM = 1

MIN_LENGTH = 10
MAX_LENGTH = 128
MIN_DISTINCT = 5


def password_problems(password: str, *, email: str) -> list[str]:
    """Why `password` is not acceptable for the account `email`; empty when it is.

    The policy follows NIST SP 800-63B: a length floor, a generous ceiling, no composition
    rules, plus two cheap checks against the most guessable choices.
    """
    problems = []
    if len(password) < MIN_LENGTH:
        problems.append(f"must be at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        problems.append(f"must be at most {MAX_LENGTH} characters")
    if len(set(password)) < MIN_DISTINCT:
        problems.append(f"must contain at least {MIN_DISTINCT} different characters")
    local_part = email.partition("@")[0].lower()
    if len(local_part) >= 3 and local_part in password.lower():
        problems.append("must not contain the email address")
    return problems


class PasswordHasher:
    """argon2id hashing on a bounded thread pool, so logins never stall the event loop."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._hasher = argon2.PasswordHasher(
            time_cost=TIME_COST,
            memory_cost=MEMORY_COST_KIB,
            parallelism=PARALLELISM,
            type=argon2.Type.ID,
        )
        self._dummy_hash: str | None = None

    async def hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Whether `password` matches; with no hash (unknown account) it still spends the
        time of a real check, so response times do not reveal which emails exist."""
        if password_hash is None:
            self._dummy_hash = self._dummy_hash or await self.hash("not a real password")
            password_hash = self._dummy_hash
            password = password + "\0"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._verify, password_hash, password)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether the hash was made with weaker parameters than the current ones."""
        return self._hasher.check_needs_rehash(password_hash)
