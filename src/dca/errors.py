"""dca's own errors. The command line prints these as one line (no traceback); anything else is a bug."""

from __future__ import annotations


class DCAError(Exception):
    """A failure dca explains itself: bad input, a damaged file, a run that cannot go on."""

    exit_code = 1


class ArgumentError(DCAError, ValueError):
    """An argument that makes no sense, found before any heavy work. `argument` names it (a field name).

    The message reads as a sentence after the name: ``ArgumentError("lr", "must be > 0, got inf")``.
    """

    exit_code = 2

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument} {message}")
        self.message = message
        self.argument = argument


class TrainingDiverged(DCAError, RuntimeError):
    """Too many consecutive optimiser steps with a non-finite loss or gradient."""


class NonFiniteError(DCAError, ValueError):
    """A tensor with NaN or inf where only finite values may be written or loaded."""


class ResourceError(DCAError, RuntimeError):
    """A model or corpus that is not installed here or cannot be loaded."""


class DataError(DCAError, ValueError):
    """Training or evaluation text that cannot be used as asked (malformed, or too little of it)."""
