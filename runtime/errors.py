"""The project's error types: the command line turns them into one line and an exit status."""
from __future__ import annotations

import errno


class BadInputError(Exception):
    """An input the user can fix (missing folder, unreadable image, wrong checkpoint): one-line message."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint was written (exit status 130)."""


def disk_full(error: OSError) -> str | None:
    """The one line to print for a write that found the disk or the quota full (one not made through atomic_write,
    which says so itself: a figure, a manifest's line); None for any other OSError, which stays a traceback."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return f"could not write {error.filename or 'a file'} ({error.strerror}): free some space"
