"""The errors users meet, in one light module, and the exit code of each.

Every command turns these into one line on stderr and the exit code below (see ``padim.cli``);
the modules that raise them import them from here, so the command line can catch them without
importing torch or the rest of the machinery.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A data set on disk is missing, incomplete or malformed; the message names the file."""

    def __init__(self, message: str = ""):
        # torch's DataLoader re-raises an error from a decoding worker as
        # DatasetError("Caught DatasetError in DataLoader worker process N. Original Traceback ...");
        # keep only the original message so the user never sees the worker's stack trace
        if message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            message = message.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class ReportError(Exception):
    """A run folder lacks a file the report needs, or the file is malformed; the message names it."""


class ModelFileError(ValueError):
    """A model file is missing, truncated, tampered or from an incompatible version."""


class BackboneError(RuntimeError):
    """A backbone or its weights cannot be had; the message says how to get them."""


class DownloadError(Exception):
    """The archive could not be fetched or stored (no network, server error, local disk)."""


class ClusterError(RuntimeError):
    """The cluster cannot be reached or its workers cannot run this version of the package."""


EXIT_USAGE = 2
# most specific class first: the first match decides
EXIT_CODES: dict[type[BaseException], int] = {
    ClusterError: EXIT_USAGE,
    DatasetError: 3,
    ReportError: 3,
    ModelFileError: 4,
    BackboneError: 5,
    # input images cannot hold NaN; non-finite features come from the backbone's weights
    FloatingPointError: 5,
    DownloadError: 6,
}


def exit_code(exc: BaseException) -> int | None:
    """The documented exit code of an expected error, or None for anything else (a bug)."""
    for kind, code in EXIT_CODES.items():
        if isinstance(exc, kind):
            return code
    return None
