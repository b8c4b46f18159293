"""Progress lines of long steps: time-based cadence (an injected clock, no waiting), rate and ETA."""

from __future__ import annotations

from synthvlm_assets.progress import ProgressLog, elapsed_text


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_line_first_then_every_interval_and_at_the_end():
    clock, lines = Clock(), []
    log = ProgressLog(lines.append, "sdxl_images s1", "images", every_s=20, clock=clock)
    log(100, 475)  # 100 reused: the baseline, not speed
    for step in range(1, 31):  # a batch of 5 images every 2 s
        clock.t += 2
        log(100 + 5 * step, 475)
    clock.t += 2
    log(475, 475)
    log(475, 475)  # a repeated end writes nothing more
    assert lines[0] == "sdxl_images s1: 100/475 images (21%), 100 reused from earlier work"
    # the cadence: a line each 20 s of work (t = 20, 40, 60), then the last one at 62 s
    assert len(lines) == 5
    assert lines[1] == "sdxl_images s1: 150/475 images (31%), 2.5 images/s, 20s elapsed, ETA 2m10s"
    assert lines[3].startswith("sdxl_images s1: 250/475 images (52%), 2.5 images/s, 1m00s elapsed, ETA 1m30s")
    assert lines[4] == "sdxl_images s1: 475/475 images (100%), 6.05 images/s, 1m02s elapsed"


def test_cadence_zero_logs_every_call_and_a_stalled_step_says_eta_unknown():
    clock, lines = Clock(), []
    log = ProgressLog(lines.append, "judge", "captions", every_s=0, clock=clock)
    log(0, 10)
    clock.t += 5
    log(0, 10)
    log(4, 10)
    assert lines[0] == "judge: 0/10 captions (0%)"
    assert lines[1].endswith("0 captions/s, 5s elapsed, ETA unknown")
    assert len(lines) == 3


def test_an_already_complete_step_logs_one_line():
    lines = []
    log = ProgressLog(lines.append, "image_scores s1", "images", clock=Clock())
    log(12, 12)
    log(12, 12)
    assert lines == ["image_scores s1: 12/12 images (100%)"]


def test_elapsed_text():
    assert [elapsed_text(s) for s in (0, 42.4, 182, 7500)] == ["0s", "42s", "3m02s", "2h05m"]
