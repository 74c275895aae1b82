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
