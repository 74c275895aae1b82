"""Errors a user can fix. The CLI prints them as one line (``error: ...``) and exits non-zero."""


class UserError(Exception):
    """Bad input: a config value, a path, a request the machine cannot serve.

    The message names the key or file and what is allowed, in one line.
    """


class TrainingError(Exception):
    """Training stopped for a reason that retrying will not fix (a non-finite loss, say).

    Raised on every rank at the same step, so all ranks stop together.
    """


class LaunchError(Exception):
    """The workers could not finish: they crashed more often than ``trainer.max_restarts`` allows."""


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its first), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
