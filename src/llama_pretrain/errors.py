"""The one exception type for user errors.

Anything the user can fix (a bad flag, a bad config value, a missing or corrupt file) raises
``UserError``; the CLI prints its message as one line and exits with code 2. Bugs raise anything
else and keep their traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback.

    ``alike_on_every_rank``: the error follows from the command line and config alone (read the
    same by every rank under torchrun), so only rank 0 reports it instead of every rank."""

    alike_on_every_rank = False


def alike_on_every_rank(error: UserError) -> UserError:
    """``error``, marked as one every torchrun rank raises identically (see ``UserError``)."""
    error.alike_on_every_rank = True
    return error
