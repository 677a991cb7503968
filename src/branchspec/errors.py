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


class StopRequest:
    """Ctrl-C as a request: the first SIGINT sets :attr:`requested` (the work under way finishes and saves), a
    second one interrupts at once. ``install``/``restore`` (or ``with``) put the handler in place and back; off
    the main thread, where handlers cannot be set, Ctrl-C keeps its usual meaning."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> "StopRequest":
        import signal
        import threading

        self.requested = False
        if self._previous is None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
