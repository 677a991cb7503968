"""The one exception type users see.

Public functions check their inputs at the boundary and raise :class:`BranchspecError` with one sentence
that says what was wrong and what to do. The CLI prints it as a single line and exits non-zero.
"""


class BranchspecError(ValueError):
    """Bad input or an unusable environment, explained in one sentence."""
