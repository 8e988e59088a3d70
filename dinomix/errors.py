"""Errors a user can cause. The command line prints their message (never a traceback) and exits non-zero."""


class DinomixError(Exception):
    """A problem the user can fix: the message says what is wrong and, where possible, what to do."""

    exit_code = 2


class InputImageError(DinomixError):
    """The input image is missing, unreadable or not a 3D scalar CT."""


class NotCTError(InputImageError):
    """The image does not look like a CT in Hounsfield units (an MR, say)."""


class ModelFileError(DinomixError):
    """A model file is missing, corrupt, truncated, tampered with, of a wrong format or from a newer version."""


class OutputError(DinomixError):
    """An output path cannot be written."""


class Cancelled(DinomixError):
    """The run was cancelled (SIGINT/SIGTERM or a Cancel button)."""

    exit_code = 130
