"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad option, missing weights).

    The CLI prints it as one line, ``error: <message>``, on stderr and exits with code 2.
    """
