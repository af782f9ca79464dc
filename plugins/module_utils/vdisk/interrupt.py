"""Termination signals as an exception, so an interrupted command cleans up as after an error.

SIGTERM (what ``timeout``, systemd and CI runners send) and SIGHUP (a closed terminal or SSH
session) would otherwise end the process at once and leave a temporary output behind.  Inside
:func:`signals_raise` they raise :class:`Terminated` in the main thread instead: it unwinds through
the same ``except BaseException`` paths as SIGINT's KeyboardInterrupt (``io.AtomicOutput.abort``
removes the temporary file).  A signal that was ignored when the block started (``nohup``) stays
ignored; a second signal while the first unwinds is ignored, so the clean-up completes.
"""
import contextlib
import signal
import threading
from typing import Iterator, Tuple

SIGNALS: Tuple[int, ...] = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
# every signal that ends a command, SIGINT (Ctrl-C) included
INTERRUPTS: Tuple[int, ...] = (signal.SIGINT,) + SIGNALS


def main_thread_only() -> None:
    """Block the interrupting signals in the calling worker thread (a thread pool's initializer).

    The kernel gives a process-directed signal to any thread that does not block it.  Python runs
    its handler in the main thread, but a signal taken by a worker does not interrupt the main
    thread's wait on a lock or a queue, so a Ctrl-C could go unseen until the work was done (and
    the command then exit 0).  Blocked in the workers, the signals reach the main thread."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)


class Terminated(BaseException):
    """A termination signal arrived.  A BaseException, as KeyboardInterrupt: ``except Exception`` lets it pass."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return "signal %d" % self.signum

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended."""
        return 128 + self.signum

    def __str__(self) -> str:
        return "terminated by %s" % self.name


@contextlib.contextmanager
def signals_raise(signums: Tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """Within the block, *signums* raise :class:`Terminated` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"raised": False}

    def handler(signum, frame):
        if state["raised"]:
            return          # already unwinding: let the clean-up finish
        state["raised"] = True
        raise Terminated(signum)

    previous = {}
    for signum in signums:
        try:
            if signal.getsignal(signum) == signal.SIG_IGN:
                continue    # nohup and the like: the caller asked for it to be ignored
            previous[signum] = signal.signal(signum, handler)
        except (ValueError, OSError, TypeError):
            continue
    try:
        yield
    finally:
        for signum, old in previous.items():
            try:
                signal.signal(signum, old if old is not None else signal.SIG_DFL)
            except (ValueError, OSError, TypeError):
                pass
