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
