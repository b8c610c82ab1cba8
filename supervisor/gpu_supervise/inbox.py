"""What wakes the main loop: signals (recorded by their handlers, or taken by a thread for the
faults) and a self-pipe that handlers (via set_wakeup_fd) and threads write to, so that the loop
can sleep in select() and still wake at once for a signal, a probe result or a finished scan."""

from __future__ import annotations

import os
import select
import signal
import threading
from collections import deque
from collections.abc import Iterator

from . import child, signals


class Inbox:
    """The signals that arrived, in order, and the pipe the loop sleeps on."""

    def __init__(self) -> None:
        self.signals: deque[int] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _record(self, signum: int, _frame: object) -> None:
        """Signal handler: only record. All work happens in the loop (loguru is not
        re-entrant; a handler that logs can deadlock)."""
        self.signals.append(signum)

    def install(self) -> None:
        # PID 1 gets no default actions: every signal we forward needs a handler of its own.
        for sig in (*signals.FORWARDED, signal.SIGCHLD):
            signal.signal(sig, self._record)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        # The faults stay blocked (a handler would make a real one of ours loop forever): those
        # sent from outside are taken by a thread of their own (signals.FAULTS).
        threading.Thread(target=self._take_faults, name="faults", daemon=True).start()

    def _take_faults(self) -> None:
        """Thread: hand each fault signal another process sent to the loop, as a handler
        would."""
        while True:
            self.signals.append(signals.take_fault())
            self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the loop is already due to wake

    def sleep(self, seconds: float) -> None:
        """Until `seconds` pass or something wakes the loop; what woke it is consumed."""
        if seconds > 0:
            try:
                select.select([self._wake_r], [], [], seconds)
            except InterruptedError:
                pass
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def take_signals(self) -> Iterator[tuple[int, str, bool]]:
        """Each signal that arrived, in order, and one that arrives meanwhile: (signal, name,
        whether it asks for a stop: SIGTERM or SIGINT the caller did not ignore). SIGCHLD is
        left out: reaping follows in the loop."""
        while self.signals:
            sig = self.signals.popleft()
            if sig != signal.SIGCHLD:
                stop = sig in (signal.SIGTERM, signal.SIGINT) and sig not in signals.caller.ignored
                yield sig, child.signame(sig), stop

    def stop_asked(self) -> bool:
        """Whether a SIGTERM or SIGINT waits to be handled."""
        return signal.SIGTERM in self.signals or signal.SIGINT in self.signals
