"""The one base class of the errors a user can fix (bad config, data, checkpoint, input file).

The CLI turns a :class:`UserError` into one line on stderr and its ``exit_code`` (2 unless the
error says otherwise); every other exception is a bug or an environment failure and keeps its
traceback. A full disk is the one environment failure recognised here (:func:`space_error`): a run
can stop on it cleanly and resume.
"""

import errno

EXIT_USER_ERROR = 2
EXIT_RESUMABLE = 75  # EX_TEMPFAIL: the run stopped after its last complete checkpoint; run it again with --resume


class UserError(Exception):
    """A problem with what the user gave us; the message says which file/key and what to do."""

    exit_code = EXIT_USER_ERROR


class DataError(UserError):
    """A packed dataset (manifest, domain, image) that cannot be used as asked."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the job resuming from it."""


class CheckpointSpaceError(CheckpointError):
    """A checkpoint could not be written for lack of space; the previous one is intact, so the run is resumable."""

    exit_code = EXIT_RESUMABLE


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, for errors whose text (torch's, pickle's) runs over many."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# what SQLite (an MLflow store) says when its disk is full; it raises no OSError of its own
SQLITE_FULL = "database or disk is full"


def space_error(exc: BaseException) -> OSError | None:
    """The out-of-space ``OSError`` behind ``exc`` (torch and MLflow wrap it in errors of their own), if any;
    SQLite's "database or disk is full" counts as one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return seen
        if SQLITE_FULL in str(seen):
            return OSError(errno.ENOSPC, f"No space left on device ({SQLITE_FULL})")
        seen = seen.__cause__ or seen.__context__
    return None
