"""A small progress bar on stderr for long export steps (no dependency; quiet when not a TTY
except for one line per step)."""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    def __init__(self, label: str, total: float | None = None, *, stream=None, enabled: bool = True):
        self.label, self.total, self.done = label, total, 0.0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()  # TensorRT calls its progress monitor from several threads

    def __enter__(self):
        if self.enabled and not self.tty:
            print(f"{self.label} ...", file=self.stream, flush=True)
        self._draw(force=True)
        self._stop = threading.Event()
        if self.enabled and self.tty:  # keep the clock moving while the main thread is busy in one call
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        return self

    def _tick(self):
        while not self._stop.wait(0.5):
            with self._lock:
                self._draw()

    def update(self, n: float = 1, *, total: float | None = None, note: str | None = None):
        with self._lock:
            if total is not None:
                self.total = total
            self.done += n
            if note is not None:
                self.note = note
            self._draw()

    def _draw(self, force=False):
        if not (self.enabled and self.tty):
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        elapsed = now - self.start
        note = getattr(self, "note", "")
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            text = f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}% {elapsed:6.1f}s {note}"
        else:
            text = f"\r{self.label} {elapsed:6.1f}s {note}"
        self.stream.write(text[:160].ljust(100))
        self.stream.flush()

    def __exit__(self, exc_type, *_):
        self._stop.set()
        if not self.enabled:
            return False
        elapsed = time.monotonic() - self.start
        status = "failed" if exc_type else "done"
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
        print(f"{self.label}: {status} in {elapsed:.1f}s", file=self.stream, flush=True)
        return False
