"""Errors raised by the controller's certificate authority."""

from __future__ import annotations


class CaError(Exception):
    """Base class for CA errors; the message says what the operator must fix."""


class CaStorageError(CaError):
    """The CA's key or certificate files are missing, unreadable, mismatched or too permissive."""


class CsrRejected(CaError):
    """A certificate signing request was refused; ``reason`` is safe to return to the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
