"""``UserError``: a problem with what the user gave (a file, a key, a value), as opposed to a bug.

The CLI prints a UserError as one line naming the file, line, key or value and what would be valid,
and exits 2; any other exception is a bug in lmforge and is shown with its traceback (exit 1).
It subclasses ValueError, so library callers that catch ValueError keep working.
"""


class UserError(ValueError):
    """Bad input from the user: the message names what is wrong and what would be valid."""


def unicode_problem(text: str) -> str | None:
    """``"lone surrogate U+D800 at character 4"`` when ``text`` holds half a UTF-16 pair (JSON's ``\\ud800`` escape
    can spell one; no tokenizer can encode it), else None. The one check the readers, the tokenizer and the server
    share."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"lone surrogate U+{ord(text[e.start]):04X} at character {e.start}"
    return None
