"""The project's error types: the command line turns them into one line and an exit status."""


class BadInputError(Exception):
    """An input the user can fix (missing folder, unreadable image, wrong checkpoint): one-line message."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint was written (exit status 130)."""
