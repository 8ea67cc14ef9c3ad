"""Progress meters and where they show: bars on a terminal, periodic lines elsewhere."""

from __future__ import annotations

import io

import pytest

from vcn import progress
from vcn.progress import LogLines, Meter, Progress, TerminalBars, console_sinks, progress_line, time_left_s


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


def test_a_line_says_how_far_how_long_and_how_long_left():
    assert time_left_s(250, 1000, 30.0) == 90.0
    assert time_left_s(0, 1000, 30.0) is None and time_left_s(5, 0, 30.0) is None
    assert progress_line("face_detections: frames decoded", 1200, 7200, "frames", 45.0, None) == (
        "face_detections: frames decoded 1,200 / 7,200 frames (16.7 %), 0:45 elapsed, about 3:45 left"
    )
    assert progress_line("x: crops", 10, 0, "crops", 4000.0, None) == "x: crops 10 crops, 1:06:40 elapsed"
    assert progress_line("x: crops", 10, 10, "crops", 4.0, "done").endswith(", 0:04 elapsed, done (2.5 crops/s)")


def test_log_lines_come_every_period_and_once_at_the_end(clock):
    lines: list[str] = []
    meter = Progress("shots", [LogLines(lines.append, every_s=30.0)]).meter("frames decoded", "frames")
    for second in range(95):
        clock.now = 100.0 + second
        meter(second + 1, 95)
    meter.close()
    meter.close()  # once only
    assert [line.split(" frames (")[0] for line in lines] == [
        "shots: frames decoded 31 / 95",
        "shots: frames decoded 61 / 95",
        "shots: frames decoded 91 / 95",
        "shots: frames decoded 95 / 95",
    ]
    assert lines[0].endswith("0:30 elapsed, about 1:02 left") and lines[-1].endswith("done (1.0 frames/s)")


def test_a_failed_loop_ends_its_meter_as_stopped(clock):
    lines: list[str] = []
    with pytest.raises(RuntimeError):
        with Meter("track_crops: frames decoded", "frames", [LogLines(lines.append, every_s=30.0)]) as meter:
            meter(3, 10)
            raise RuntimeError("corrupt")
    assert len(lines) == 1 and ", stopped (" in lines[0]


def test_a_stage_closes_the_meters_it_opened(clock):
    lines: list[str] = []
    stage = Progress("track_embeddings", [LogLines(lines.append, every_s=30.0)])
    stage.meter("crops embedded", "crops")(512, 1024)
    stage.close()
    assert lines == ["track_embeddings: crops embedded 512 / 1,024 crops (50.0 %), 0:00 elapsed, done (0.0 crops/s)"]


def test_bars_on_a_terminal_lines_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    (sink,) = console_sinks(terminal)
    assert isinstance(sink, TerminalBars)
    meter = Meter("frames: frames decoded", "frames", [sink])
    meter(10, 40)
    meter(40, 40)
    meter.close()
    shown = terminal.getvalue()
    assert "frames: frames decoded: 100%" in shown and "40/40" in shown

    piped = io.StringIO()
    (sink,) = console_sinks(piped)
    assert isinstance(sink, LogLines)
    with Meter("frames: frames decoded", "frames", [sink]) as meter:
        meter(40, 40)
    assert piped.getvalue().startswith("frames: frames decoded 40 / 40 frames (100.0 %)")


def test_console_sinks_hold_inside_their_block_only():
    sinks = [LogLines(print, every_s=1.0)]
    assert progress.console_now() == ()
    with progress.console(sinks):
        assert progress.console_now() == tuple(sinks)
    assert progress.console_now() == ()
