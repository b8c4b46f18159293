"""A `kill -9`ed run of the embedded default: found, marked failed, its `gpu` slot freed, the rerun proceeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

JOB = textwrap.dedent(
    """
    import os, sys, time
    from dagster import DagsterInstance, job, op

    @op(pool="gpu")
    def gpu_step():
        if sys.argv[1] == "hang":
            open(sys.argv[2], "w").write(str(os.getpid()))
            time.sleep(600)

    @job
    def gpu_job():
        gpu_step()

    with DagsterInstance.get() as instance:
        result = gpu_job.execute_in_process(instance=instance, raise_on_error=False)
        print("success" if result.success else "failure", flush=True)
    """
)
DAGSTER_YAML = """
telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1
"""


@pytest.fixture
def dagster_home(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    (tmp_path / "job.py").write_text(JOB)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def _slots_in_use(instance) -> int:
    info = instance.event_log_storage.get_concurrency_info("gpu")
    return sum(1 for s in info.claimed_slots)


def test_a_killed_run_is_marked_failed_and_its_gpu_slot_freed(dagster_home, tmp_path):
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    from synthvlm_assets.recovery import recover_dead_runs

    started = tmp_path / "started"
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home)}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "job.py"), "hang", str(started)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the job never reached its gpu step"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # kill -9: no handler runs, the run stays STARTED
        proc.wait(30)

    with DagsterInstance.get() as instance:
        [run] = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
        assert _slots_in_use(instance) == 1  # what blocked every later run before
        lines: list[str] = []
        assert recover_dead_runs(instance, lines.append) == [run.run_id]
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
        assert _slots_in_use(instance) == 0
        [line] = lines
        assert run.run_id in line and f"process {proc.pid}, which is gone" in line and "marked failed" in line
        assert recover_dead_runs(instance, lines.append) == []  # once only

    rerun = subprocess.run(
        [sys.executable, str(tmp_path / "job.py"), "quick", ""], env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.stdout.strip().endswith("success"), rerun.stderr[-2000:]


def test_live_and_foreign_runs_are_left_alone(dagster_home):
    from synthvlm_assets.recovery import process_alive

    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid, time.time())
        assert not process_alive(child.pid, time.time() - 3600)  # a pid reused since the run started
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)
