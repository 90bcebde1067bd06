"""The one exception type a user sees: the CLI prints its message on one line, no traceback."""


class OffloadgenError(Exception):
    """Bad input or an impossible configuration, with a message that says what was expected."""
