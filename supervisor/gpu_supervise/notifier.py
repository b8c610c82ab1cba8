"""systemd's notify socket, as the main loop uses it: READY, STATUS and STOPPING, and the
watchdog's keep-alive."""

from __future__ import annotations

import os

from . import report


class Notifier:
    """What systemd hears from us. WATCHDOG=1 goes out at half the watchdog's period from the
    loop (`keep_alive`): a loop that hangs stops sending it, and systemd kills and restarts the
    unit (WatchdogSec=)."""

    def __init__(self, socket: str | None) -> None:
        self.socket = socket
        self.watchdog = report.watchdog_period(os.environ) if socket else None
        self.watchdog_at = 0.0  # the next WATCHDOG=1

    def notify(self, **fields: str) -> None:
        report.sd_notify(self.socket, **fields)

    def keep_alive(self, now: float) -> None:
        """WATCHDOG=1 when due."""
        if self.watchdog is None or now < self.watchdog_at:
            return
        self.notify(WATCHDOG="1")
        self.watchdog_at = now + self.watchdog / 2

    def wake_at(self) -> list[float]:
        return [self.watchdog_at] if self.watchdog is not None else []
