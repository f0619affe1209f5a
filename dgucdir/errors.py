"""The one base class of the errors a user can fix (bad config, data, checkpoint, input file).

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; every other
exception is a bug or an environment failure and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user gave us; the message says which file/key and what to do."""


class DataError(UserError):
    """A packed dataset (manifest, domain, image) that cannot be used as asked."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the job resuming from it."""
