"""The one exception type for user errors.

Anything the user can fix (a bad flag, a bad config value, a missing or corrupt file) raises
``UserError``; the CLI prints its message as one line and exits with code 2. Bugs raise anything
else and keep their traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
