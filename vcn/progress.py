"""Progress of long work, shown where its user looks: bars on a terminal, periodic lines in a log.

A stage opens a :class:`Progress` with the sinks that should see it; each long
loop in it reports through a :class:`Meter`, which is a ``(done, total)``
callback like the ``progress`` arguments of the core's long functions. Meters
forward at most every :data:`MIN_INTERVAL_S` seconds (and always at the end),
so a loop may call them on every frame.

- :class:`TerminalBars`: a tqdm bar per meter with its rate and estimated time left;
- :class:`LogLines`: a plain line every ``every_s`` seconds and one at the end, for
  output that is not a terminal (a CI log, ``nohup``) and for the Dagster run log.

The sinks ``vcn process`` adds for its own console are set for the duration of a
``with console(...)`` block (:func:`console_sinks` chooses them), so the stages of
a run launched elsewhere (the Dagster UI, the daemon) report to their run log only.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TextIO

#: Callback of the core's long functions: ``progress(done, total)``; ``total`` 0 when unknown.
ProgressCallback = Callable[[int, int], None]
#: A meter forwards at most this often (seconds), besides its final count.
MIN_INTERVAL_S = 0.25
#: Seconds between two lines of :class:`LogLines` on a console that is not a terminal.
CONSOLE_LINE_EVERY_S = 30.0


class Sink(Protocol):
    """Shows progress: called with the meter's state; ``end`` is None until the meter closes, then once
    ``"done"`` or ``"stopped"`` (its work failed)."""

    def show(self, label: str, done: int, total: int, unit: str, elapsed_s: float, end: str | None) -> None: ...


class Meter:
    """The progress of one loop: call it as ``meter(done, total)``; :meth:`close` (or the ``with`` block) ends it.

    Args:
        label: What is counted, with the stage's name (``"face_detections: frames decoded"``).
        unit: The unit counted (``"frames"``).
        sinks: Where it goes.
    """

    def __init__(self, label: str, unit: str, sinks: Sequence[Sink]) -> None:
        self.label, self.unit, self.sinks = label, unit, tuple(sinks)
        self.started = time.monotonic()
        self.done = self.total = 0
        self._shown_at = float("-inf")
        self._closed = False

    def __call__(self, done: int, total: int = 0) -> None:
        self.done, self.total = int(done), int(total)
        now = time.monotonic()
        if now - self._shown_at >= MIN_INTERVAL_S:
            self._shown_at = now
            self._show(now, None)

    def close(self, stopped: bool = False) -> None:
        """Shows the final count (once): ``done``, or ``stopped`` when the work failed."""
        if not self._closed:
            self._closed = True
            self._show(time.monotonic(), "stopped" if stopped else "done")

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(stopped=kind is not None)

    def _show(self, now: float, end: str | None) -> None:
        for sink in self.sinks:
            sink.show(self.label, self.done, self.total, self.unit, now - self.started, end)


class Progress:
    """Where one stage's progress goes.

    Args:
        stage: The stage's name, leading every label.
        sinks: Where its meters report.
    """

    def __init__(self, stage: str, sinks: Sequence[Sink]) -> None:
        self.stage, self.sinks = stage, tuple(sinks)
        self.meters: list[Meter] = []

    def meter(self, what: str, unit: str) -> Meter:
        """A meter of ``what`` (``"frames decoded"``), counted in ``unit``; :meth:`close` ends it if nothing else did."""
        meter = Meter(f"{self.stage}: {what}", unit, self.sinks)
        self.meters.append(meter)
        return meter

    def close(self, stopped: bool = False) -> None:
        """Ends every meter still open."""
        for meter in self.meters:
            meter.close(stopped)


def time_left_s(done: int, total: int, elapsed_s: float) -> float | None:
    """Seconds left at the rate so far; None while it cannot be told (nothing done, or no total)."""
    if done <= 0 or total <= 0 or elapsed_s <= 0:
        return None
    return max(0.0, elapsed_s * (total - done) / done)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(label: str, done: int, total: int, unit: str, elapsed_s: float, end: str | None) -> str:
    """``"face_detections: frames decoded 1,200 / 7,200 frames (16.7 %), 0:45 elapsed, about 3:45 left"``."""
    if total > 0:
        count = f"{done:,} / {total:,} {unit} ({100.0 * done / total:.1f} %)"
    else:
        count = f"{done:,} {unit}"
    line = f"{label} {count}, {_clock(elapsed_s)} elapsed"
    if end is not None:
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        return f"{line}, {end} ({rate:,.1f} {unit}/s)"
    left = time_left_s(done, total, elapsed_s)
    return f"{line}, about {_clock(left)} left" if left is not None else line


class LogLines:
    """A line per meter every ``every_s`` seconds, and one when it ends.

    Args:
        emit: Writes one line (``print``, a logger's ``info``, Dagster's ``context.log.info``).
        every_s: Seconds between two lines of one meter.
    """

    def __init__(self, emit: Callable[[str], None], every_s: float) -> None:
        self.emit, self.every_s = emit, every_s
        self._last: dict[str, float] = {}

    def show(self, label: str, done: int, total: int, unit: str, elapsed_s: float, end: str | None) -> None:
        last = self._last.get(label, 0.0)
        if end is not None:
            self._last.pop(label, None)
        elif elapsed_s - last < self.every_s:
            return
        else:
            self._last[label] = elapsed_s
        self.emit(progress_line(label, done, total, unit, elapsed_s, end))


class TerminalBars:
    """A tqdm bar per meter on ``stream``, with its rate and estimated time left; it stays when its meter ends."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._bars: dict[str, object] = {}

    def show(self, label: str, done: int, total: int, unit: str, elapsed_s: float, end: str | None) -> None:
        from tqdm import tqdm

        bar = self._bars.get(label)
        if bar is None:
            bar = self._bars[label] = tqdm(
                total=total or None, desc=label, unit=f" {unit}", file=self.stream or sys.stderr,
                dynamic_ncols=True, mininterval=MIN_INTERVAL_S, smoothing=0.1,
            )
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if end is not None:
            if end != "done":
                bar.set_postfix_str(end)
            bar.close()
            del self._bars[label]


def console_sinks(stream: TextIO | None = None) -> list[Sink]:
    """Bars when ``stream`` (default stderr) is a terminal; otherwise a plain line every
    :data:`CONSOLE_LINE_EVERY_S` seconds."""
    stream = stream or sys.stderr
    if stream.isatty():
        return [TerminalBars(stream)]
    return [LogLines(lambda line: print(line, file=stream, flush=True), every_s=CONSOLE_LINE_EVERY_S)]


_console: contextvars.ContextVar[tuple[Sink, ...]] = contextvars.ContextVar("vcn_progress_console", default=())


@contextlib.contextmanager
def console(sinks: Sequence[Sink]) -> Iterator[None]:
    """Stages run inside the block also report to ``sinks`` (:func:`console_sinks`)."""
    token = _console.set(tuple(sinks))
    try:
        yield
    finally:
        _console.reset(token)


def console_now() -> tuple[Sink, ...]:
    """The console sinks of the enclosing :func:`console` block (none outside one)."""
    return _console.get()
