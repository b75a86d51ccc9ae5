"""Errors the client's use cases raise, each with a message a radiologist can act on."""

from __future__ import annotations


class RadcryptError(Exception):
    """Base of every expected failure of a use case; str() is the plain message."""


class RepositoryNotFound(RadcryptError):
    pass


class RepositoryExists(RadcryptError):
    pass


class AccessDenied(RadcryptError):
    """Wrong password, or no grant for this user."""


class IntegrityError(RadcryptError):
    """A stored object failed authentication: altered, truncated, swapped or moved."""


class ServiceError(RadcryptError):
    """The search service could not be reached or refused the request."""


class Cancelled(RadcryptError):
    """The user cancelled a long operation; what was finished is kept."""


class WrongPassword(AccessDenied):
    """The password does not unlock the identity on this workstation."""


class IncompleteAnswer(RadcryptError):
    """The search service did not search every segment the verified log holds
    (docs/FORMAT-2.md 6.3): a search fails on it unless the caller allows a marked, partial answer.

    ``expected``: live segments of ``key_version`` at the head the answer was judged at;
    ``searched``: segments the service says it searched; ``missing``: the live ids it did
    not search, sorted. Ids are public object names, never secrets."""

    def __init__(self, key_version: int, expected: int, searched: int,
                 missing: list[str]) -> None:
        self.key_version = key_version
        self.expected = expected
        self.searched = searched
        self.missing = list(missing)
        shown = ", ".join(self.missing[:3]) + (", ..." if len(self.missing) > 3 else "")
        super().__init__(
            f"search incomplete: the service searched {searched:,} of the {expected:,} "
            f"segments of key version {key_version} ({len(self.missing):,} missing, first: "
            f"{shown}); pass --allow-incomplete to see the partial answer")
