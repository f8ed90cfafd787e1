"""User-facing errors.

Every mistake a user can make in their data or configuration raises one of these. The CLI turns them
into one line on stderr and exit code 2 (never a traceback); the Python API lets them propagate.
"""

from __future__ import annotations


class DpolabError(Exception):
    """An error the user can fix. ``str(err)`` is one line that says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(DpolabError):
    """A configuration value is invalid: names the field, what was found, and the fix."""

    def __init__(self, field: str, problem: str, fix: str = ""):
        self.field, self.problem, self.fix = field, problem, fix
        msg = f"config error: '{field}': {problem}"
        super().__init__(msg + (f" ({fix})" if fix else ""))


class DataError(DpolabError):
    """A data source is unusable: names the file, the 1-based row, the field, and the fix."""

    def __init__(self, path: str, problem: str, *, row: int | None = None, field: str | None = None,
                 fix: str = ""):
        self.path, self.row, self.field, self.problem, self.fix = path, row, field, problem, fix
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        msg = f"data error: {where}: {problem}"
        super().__init__(" ".join((msg + (f" ({fix})" if fix else "")).split()))


class TrainingStopped(DpolabError):
    """The run stopped before its end (interrupted, or diverged); the message says how to continue."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
