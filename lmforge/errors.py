"""``UserError``: a problem with what the user gave (a file, a key, a value), as opposed to a bug.

The CLI prints a UserError as one line naming the file, line, key or value and what would be valid,
and exits 2; any other exception is a bug in lmforge and is shown with its traceback (exit 1).
It subclasses ValueError, so library callers that catch ValueError keep working.
"""


class UserError(ValueError):
    """Bad input from the user: the message names what is wrong and what would be valid."""
