"""The `--devices` launcher without training: its reserved rendezvous port, SIGTERM and Ctrl-C.

The launched processes write their pid to a file and then wait: the tests act once every file
is there (a known point, no polling against a deadline the processes could race past) and
check afterwards that no process is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dli.training.distributed import reserved_port


def test_a_reserved_port_is_given_to_nobody_else_but_the_rendezvous_server_can_listen_on_it():
    import datetime

    import torch.distributed as dist

    with reserved_port() as port:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        handed_out = []
        for _ in range(200):
            with socket.socket() as other:
                other.bind(("127.0.0.1", 0))
                handed_out.append(other.getsockname()[1])
        assert port not in handed_out
        store = dist.TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=30))
        store.set("rendezvous", "ok")
        assert store.get("rendezvous") == b"ok"
        del store


def wait_for(paths: list[Path], process: subprocess.Popen, limit_s: float = 120.0) -> None:
    """Wait until every file exists; the processes cannot move past this point on their own."""
    deadline = time.monotonic() + limit_s
    while not all(p.exists() for p in paths):
        assert process.poll() is None, f"the launcher exited with {process.returncode}"
        assert time.monotonic() < deadline, f"the launched processes never wrote {paths}"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def stop_all(launcher: subprocess.Popen, markers: list[Path]) -> None:
    """Kill whatever a failed test left running: the launcher's group and the launched processes."""
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    for pid in (int(p.read_text()) for p in markers if p.exists()):
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def start_launcher(folder: Path, *, ignore_sigint: bool) -> tuple[subprocess.Popen, list[Path]]:
    """`launch` of 2 processes that write `<rank>.pid` and sleep, itself in a new session."""
    child = textwrap.dedent(f"""
        import os, signal, time
        if {ignore_sigint}:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # leaves Ctrl-C to the launcher
        path = os.path.join({str(folder)!r}, os.environ["RANK"] + ".pid")
        with open(path + ".tmp", "w") as handle:
            handle.write(str(os.getpid()))
        os.rename(path + ".tmp", path)
        time.sleep(600)
    """)
    launcher = (
        "import sys\nfrom dli.training.distributed import launch\n"
        f"sys.exit(launch([sys.executable, '-c', {child!r}], 2, cpu=True))\n"
    )
    process = subprocess.Popen(  # this environment: it imports the dli under test
        [sys.executable, "-c", launcher], start_new_session=True
    )
    return process, [folder / "0.pid", folder / "1.pid"]


def test_sigterm_to_the_launcher_stops_every_process_and_exits_143(tmp_path):
    launcher, markers = start_launcher(tmp_path, ignore_sigint=False)
    try:
        wait_for(markers, launcher)
        pids = [int(p.read_text()) for p in markers]
        launcher.send_signal(signal.SIGTERM)  # as a job scheduler would, to the launcher only
        launcher.wait(timeout=60)
    finally:
        stop_all(launcher, markers)
    assert launcher.returncode == 128 + signal.SIGTERM
    assert all(gone(pid) for pid in pids)


def test_ctrl_c_to_the_launch_stops_every_process_and_exits_130(tmp_path):
    launcher, markers = start_launcher(tmp_path, ignore_sigint=True)
    try:
        wait_for(markers, launcher)
        pids = [int(p.read_text()) for p in markers]
        os.killpg(launcher.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
        launcher.wait(timeout=60)
    finally:
        stop_all(launcher, markers)
    assert launcher.returncode == 130
    assert all(gone(pid) for pid in pids)


def launch_with_event_at_second_start(monkeypatch, event) -> tuple[int, list]:
    """`launch` of 2 sleeping processes where `event(started)` runs inside the second
    `subprocess.Popen` call, after its process has started and before the call returns."""
    from dli.training import distributed

    real_popen = subprocess.Popen
    started: list[subprocess.Popen] = []

    def popen(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        started.append(process)
        if len(started) == 2:
            event(started)
        return process

    monkeypatch.setattr(distributed.subprocess, "Popen", popen)
    try:
        status = distributed.launch([sys.executable, "-c", "import time; time.sleep(600)"], 2, cpu=True)
        return status, [p.poll() for p in started]
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_a_process_is_being_started_still_stops_that_process(monkeypatch, signum, status):
    # Without holding the signal, its exception would leave Popen before the launcher lists the
    # process it had just started: that process would run on, unstopped.
    outcome, codes = launch_with_event_at_second_start(monkeypatch, lambda _: signal.raise_signal(signum))
    assert outcome == status
    assert None not in codes, "a started process was left running"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_error_starting_a_process_stops_the_ones_already_started(monkeypatch):
    from dli.training import distributed

    real_popen = subprocess.Popen
    started: list[subprocess.Popen] = []

    def popen(*args, **kwargs):
        if started:
            raise OSError("no more processes")  # as Popen does when the second cannot start
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(distributed.subprocess, "Popen", popen)
    try:
        with pytest.raises(OSError, match="no more processes"):
            distributed.launch([sys.executable, "-c", "import time; time.sleep(600)"], 2, cpu=True)
        assert started[0].poll() is not None, "the first process was left running"
    finally:
        if started[0].poll() is None:
            started[0].kill()
            started[0].wait()
