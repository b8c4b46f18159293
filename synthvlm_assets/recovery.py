"""Runs of the embedded default whose process died (`kill -9`, out of memory, a closed laptop).

A deployment's daemon monitors runs: a run whose worker is gone is marked failed and its concurrency
slots (the one `gpu` pool slot) are freed. The embedded default has no daemon: `synthvlm` runs jobs in
its own process, so a killed `synthvlm materialize` leaves its run STARTED, holding its slot, and the next
run waits for that slot forever. `recover_dead_runs` is what the CLI does first: every STARTED run that was
executed in a process of this host (the in-process executor records the pid) whose process is gone is
reported failed, its slots are freed, and one line says so.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

HOST_TAG = "synthvlm/host"  # optional: the host a run was started on; runs of other hosts are left alone


def _process_start(pid: int) -> float | None:
    """When a process started (epoch seconds) and None if unknown; -1.0 for a zombie (it is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    if fields[0] in ("Z", "X"):
        return -1.0
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int, since: float | None = None) -> bool:
    """Whether `pid` is a live process of this host that could be the one started before `since`."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    started = _process_start(pid)
    if started == -1.0:
        return False
    # The pid was reused when its process started after the run did (2 s of clock-tick rounding).
    return started is None or since is None or started <= since + 2


def _run_pid(instance: Any, run_id: str) -> int | None:
    """The pid the in-process executor recorded for the run ("Executing steps in process (pid: N)")."""
    from dagster import DagsterEventType

    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        data = getattr(entry.dagster_event, "event_specific_data", None)
        pid = (getattr(data, "metadata", None) or {}).get("pid")
        if pid is not None:
            try:
                return int(getattr(pid, "value", pid))
            except (TypeError, ValueError):
                continue
    return None


def recover_dead_runs(instance: Any, say: Callable[[str], None] = print) -> list[str]:
    """Mark failed every STARTED run executed on this host whose process is gone, free its concurrency
    slots and say so (one line per run). Runs launched by a deployment (they have a code location origin:
    its daemon monitors them) and runs of other hosts are left alone. Returns the recovered run ids."""
    from dagster import DagsterRunStatus, RunsFilter

    recovered = []
    host = socket.gethostname()
    for record in instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        run = record.dagster_run
        if (
            getattr(run, "remote_job_origin", None) is not None
            or getattr(run, "external_job_origin", None) is not None
        ):
            continue
        if run.tags.get(HOST_TAG, host) != host:
            continue
        pid = _run_pid(instance, run.run_id)
        if pid is None or process_alive(pid, record.start_time):
            continue
        message = (
            f"run {run.run_id} ({run.job_name}) was left STARTED by process {pid}, which is gone (killed?):"
            " marked failed and its concurrency slots freed"
        )
        instance.report_run_failed(run, message=message)
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        say(message)
        recovered.append(run.run_id)
    return recovered
