"""The errors that are the user's to mend: a config value, a data file, a checkpoint. Each
says what is wrong, where (the key, the file and line, the checkpoint) and the way out, and
reaches the user as that one message, not as a traceback (`USER_ERRORS`). They live apart
from the modules that raise them, so that catching one imports nothing heavy."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value or combination that cannot run, naming its key(s)."""


class DataError(ValueError):
    """A data file or row that cannot be used, with where and why."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or does not match the run it should continue."""


USER_ERRORS = (ConfigError, DataError, CheckpointError)
