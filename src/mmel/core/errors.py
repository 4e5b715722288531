"""Exceptions that tell the user what is wrong and where."""

from __future__ import annotations


class MmelError(Exception):
    """Base class of every error mmel raises on purpose."""


class DataError(MmelError, ValueError):
    """Bad input data. The message names the file and, where there is one, the record."""

    def __init__(self, message: str, *, path: object = None, record: object = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if record is not None:
                where += f", record {record}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.record = record


class PathEscapeError(DataError):
    """A path in the data points outside its data root."""


class MismatchError(MmelError):
    """Artifacts that do not belong together (model vs features, index vs model...)."""


class UsageError(MmelError, ValueError):
    """An argument or option the caller got wrong (a value out of range, a missing input, an unknown choice)."""


class NotFoundError(MmelError, KeyError):
    """A name, QID or split that is not there; the message says what is."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])
