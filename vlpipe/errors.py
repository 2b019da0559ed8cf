"""The base of every error meant for users.

The command line turns a `VlpipeError` into one line naming the file, option or record at
fault, and exit status 1; any other exception is a bug and keeps its traceback. The subclasses
also derive from the built-in error they refine (ValueError, RuntimeError), so code catching
those keeps working.
"""

from __future__ import annotations


class VlpipeError(Exception):
    """An error in the user's input or environment, with a message that says what to do."""


class ConfigError(VlpipeError, ValueError):
    """An option or config-file value that is not allowed; the message names the option."""


class InputError(VlpipeError, ValueError):
    """A file the user gave (annotations, predictions, answer lists) is malformed or does not
    fit the others; the message names the file and the record."""


class EvaluationError(VlpipeError, ValueError):
    """Predictions that cannot be scored against the ground truth (missing or extra ids, no
    answers); the message names the ids."""


class WeightsError(VlpipeError, RuntimeError):
    """Weights that are missing, unreadable or do not fit the model; names the file and keys."""


class PickleRefused(VlpipeError, PermissionError):
    """A pickle that vlpipe was not allowed to read (unpickling runs code); names the file and
    --allow-pickle."""
