"""The one exception type users see, and the logger of the messages a user should see.

Public functions check their inputs at the boundary and raise :class:`BranchspecError` with one sentence
that says what was wrong and what to do. The CLI prints it as a single line and exits non-zero.

Choices made for the user (the execution that "auto" picked, a fallback to a slower path) are logged on
:data:`log`, the ``branchspec`` logger: the CLI prints them as one line each; a library user sees the warnings
(Python's default) and configures ``logging`` to see the rest.
"""

import logging

log = logging.getLogger("branchspec")


class BranchspecError(ValueError):
    """Bad input or an unusable environment, explained in one sentence."""


class Interrupted(Exception):
    """The user pressed Ctrl-C; the run saved its state. The message says how to resume (the CLI prints it)."""
