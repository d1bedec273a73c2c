"""Errors a user can cause and fix; the CLI prints them as one line (no traceback) and exits 2."""


class ClipsvdError(Exception):
    """A problem in the user's config, data, model choice or files."""


class ConfigError(ClipsvdError):
    """The study configuration is invalid; the message names the file and key."""


class DataError(ClipsvdError):
    """A dataset cannot be read or sampled as configured; the message names the file(s)."""


class ModelError(ClipsvdError):
    """A model or adapter cannot be loaded as asked; the message says how to provide it."""


class TrainingError(ClipsvdError):
    """Training cannot go on (for example a non-finite loss); the message suggests a fix."""


class GpuMemoryError(ClipsvdError):
    """The GPU ran out of memory; the message names the batch-size key to lower."""


class OutputError(ClipsvdError, OSError):
    """An output cannot be written (full disk, read-only or unwritable folder).

    Also an OSError, so code that tolerates a failed write (a cache) keeps tolerating it.
    """

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(errno, message)

    def __str__(self) -> str:
        return str(self.strerror)
