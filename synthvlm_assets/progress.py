"""Progress of a long step (done / total, rate, ETA) as log lines at a steady, time-based cadence.

The domain stages take a plain `progress(done, total)` callback and call it as work completes (per batch);
`ProgressLog` turns those calls into a line at most every `every_s` seconds, plus the first and the last,
so a step of hours logs a few hundred lines and a step of seconds logs two. No Dagster here: the assets
pass `context.log.info` as the sink.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Progress = Callable[[int, int], None]  # (done, total), called by the stages as work completes
EVERY_S = 20.0  # a line at least this often while work completes (the UI's "is it moving?" question)


def no_progress(done: int, total: int) -> None:
    """The default callback: report nothing."""


class ProgressLog:
    """A `Progress` callback that writes `<label>: 128/475 images (27%), 1.9 images/s, ETA 3m02s` lines.

    The rate counts only what this run did (the first call's `done` is the baseline: work reused from an
    earlier run is not speed). A line is written on the first call, then when `every_s` seconds have passed
    since the last line (default `EVERY_S`), and once when done reaches total. `clock` is injectable for tests."""

    def __init__(
        self,
        sink: Callable[[str], None],
        label: str,
        unit: str = "items",
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink, self.label, self.unit, self.clock = sink, label, unit, clock
        self.every_s = EVERY_S if every_s is None else every_s
        self.start: float | None = None
        self.baseline = 0
        self.last_line: float | None = None
        self.finished = False

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self.start is None:
            self.start, self.baseline = now, done
            self._line(done, total, now, first=True)
        elif done >= total and not self.finished:
            self._line(done, total, now)
        elif now - self.last_line >= self.every_s and not self.finished:
            self._line(done, total, now)

    def _line(self, done: int, total: int, now: float, first: bool = False) -> None:
        self.last_line, self.finished = now, done >= total
        pct = f" ({100 * done // total}%)" if total else ""
        text = f"{self.label}: {done}/{total} {self.unit}{pct}"
        if first:
            if done and done < total:
                text += f", {done} reused from earlier work"
            self.sink(text)
            return
        elapsed = now - self.start
        rate = (done - self.baseline) / elapsed if elapsed > 0 else 0.0
        text += f", {rate:.3g} {self.unit}/s, {elapsed_text(elapsed)} elapsed"
        if done < total:
            text += f", ETA {elapsed_text((total - done) / rate) if rate > 0 else 'unknown'}"
        self.sink(text)


def elapsed_text(seconds: float) -> str:
    """`42s`, `3m02s`, `2h05m`."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
