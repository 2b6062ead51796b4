"""User-facing errors.

Anything a user can cause (a bad file, a wrong format, a missing checkpoint, a config that does
not match) raises a subclass of ChatforgeError with one line that names the file or field and
what was expected. The CLI prints that line and exits with status 2 instead of a traceback.
"""


class ChatforgeError(Exception):
    """An error caused by user input; its message is shown as is."""


class DataError(ChatforgeError):
    """A data file is missing, empty or malformed."""


class CheckpointError(ChatforgeError):
    """A checkpoint directory is missing files or does not match the expected config."""


class ConfigError(ChatforgeError):
    """A configuration value is invalid or does not match what was saved."""


class RequestError(ChatforgeError):
    """A generation request is invalid; `param` names the offending parameter (the API reports it)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code
