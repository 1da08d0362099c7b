"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem with what the user gave us (a file, a line, a config key), not a bug in mtkit."""
