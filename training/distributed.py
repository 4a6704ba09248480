"""Several training processes, one per GPU (or CPU processes on gloo): set-up and a launcher.

`torchrun --nproc_per_node=K -m dli.train ...` and `dli train --devices K ...` run the same job:
K processes, each told its place by torchrun's environment contract (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which join one process group (NCCL on GPUs, gloo on CPUs)
and train with `DistributedDataParallel` (`dli.training.trainer.Trainer`).

`dli train --devices K` starts the processes with `launch`, a few lines of its own rather than
torchrun's elastic agent: when one process fails it stops the others and returns that exit
status, so a bad input ends with `dli train`'s one-line error instead of torchrun's failure
report. Everything else (rendezvous on a local port, held for the launch by `reserved_port`, and
one process per local device) is what `torchrun --standalone` does.

What a multi-process run asks of its flags and shares between its processes: `check_batch_split`
(the global batch divides evenly), `check_last_batch` (the last incomplete batch is dropped) and
`rank0_value` (rank 0's value of something, e.g. the default run folder's name, on every process).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from dli.common.errors import DliError

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
STOP_GRACE_S = 10.0
"""How long a stopped process may take to exit after SIGTERM before it is killed."""


@dataclass(frozen=True)
class ProcessPlace:
    """Where this process sits in a multi-process run."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ProcessPlace | None:
        """The place torchrun (or `launch`) gave this process; None outside such a launch."""
        if "WORLD_SIZE" not in environ:
            return None
        values: dict[str, int] = {}
        for key in ENV_KEYS:
            raw = environ.get(key, "0" if key == "LOCAL_RANK" else None)
            try:
                values[key] = int(raw) if raw is not None else -1
            except ValueError:
                raise DliError(f"environment {key}={raw!r}: expected an integer") from None
        place = cls(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])
        if place.world_size < 1 or not 0 <= place.rank < place.world_size or place.local_rank < 0:
            raise DliError(
                f"environment RANK={environ.get('RANK')} LOCAL_RANK={environ.get('LOCAL_RANK')} "
                f"WORLD_SIZE={environ.get('WORLD_SIZE')}: need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
            )
        return place


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_process_group(place: ProcessPlace, device_type: str) -> None:
    """Join the run's process group (rendezvous from MASTER_ADDR/MASTER_PORT)."""
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        torch.cuda.set_device(place.local_rank)  # NCCL collectives use the current device
    dist.init_process_group(backend_for(device_type), rank=place.rank, world_size=place.world_size)


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP port for a local rendezvous, held for the duration of the block.

    A port merely found free can be taken by another program before the run's rank 0 listens
    on it (seconds later, after importing torch). Here a socket stays bound to it (with
    SO_REUSEADDR, not listening) while the block runs: no other `bind` to port 0 is handed the
    port and a plain `bind` to it fails, while torch's rendezvous server, which also sets
    SO_REUSEADDR, can still bind it and listen.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind((host, 0))
        yield int(holder.getsockname()[1])


def process_env(rank: int, world_size: int, port: int, *, cpu: bool) -> dict[str, str]:
    """The environment of process `rank`: torchrun's variables, and a fair share of CPU threads."""
    env = dict(os.environ)
    env |= {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    if cpu and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world_size))
    return env


class _Terminated(Exception):
    """SIGTERM reached the launcher (e.g. from a job scheduler)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def launch(command: Sequence[str], processes: int, *, cpu: bool) -> int:
    """Run `command` in `processes` processes of one run; return the run's exit status.

    Each process gets its place in its environment (`process_env`). 0 when every process exits
    with 0. When one fails, the others are stopped (SIGTERM, then SIGKILL after `STOP_GRACE_S`)
    and its status is returned. Ctrl-C (130) or a SIGTERM to the launcher (143) stops them all:
    no process is left behind to wait forever for the others.
    """
    if processes < 1:
        raise DliError(f"--devices {processes}: must be an integer >= 1")
    with reserved_port() as port:
        return _run_processes(
            command, [process_env(rank, processes, port, cpu=cpu) for rank in range(processes)]
        )


def _run_processes(command: Sequence[str], envs: Sequence[Mapping[str, str]]) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()  # where handlers may be set
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    children: list[subprocess.Popen] = []
    try:
        with _signals_held(in_main_thread):
            for env in envs:
                children.append(subprocess.Popen(list(command), env=env))
        return _wait_for(children)
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)  # a second signal while stopping acts as it would have
        _stop(
            children
        )  # whatever ended the launch (a failure, a signal, an error starting one) stops them all


def _wait_for(children: Sequence[subprocess.Popen]) -> int:
    """0 once every process exited with 0; the first failure's status as soon as one fails."""
    while True:
        codes = [child.poll() for child in children]
        failed = [code for code in codes if code not in (None, 0)]
        if failed:
            return failed[0] if failed[0] > 0 else 128 - failed[0]  # -N: killed by signal N
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.2)


@contextlib.contextmanager
def _signals_held(active: bool) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the block runs, then act on the first one as it ends.

    Raised inside `subprocess.Popen` (between the fork and its return), a signal's exception would
    leave that process started but unknown to the launcher, which could then not stop it. Held,
    the signal is raised again once the block has listed every process. Handlers are the main
    thread's to set (`active`); exec resets caught signals, so the processes start with the
    defaults.
    """
    if not active:
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    saved = {signum: signal.signal(signum, lambda signum, _: caught.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    if caught:
        signal.raise_signal(caught[0])  # now handled as if it had arrived here


def _stop(children: Sequence[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def check_last_batch(last_batch: str | None, world_size: int) -> None:
    """Several processes must drop the last incomplete batch (a ragged one could leave a process
    without a batch while the others wait for its gradients)."""
    if world_size > 1 and last_batch == "keep":
        raise DliError(
            f"--last-batch keep: training in {world_size} processes drops the last incomplete batch; "
            "pass --last-batch drop"
        )


def check_batch_split(batch_size: int, world_size: int) -> int:
    """Images per process of a global batch; `DliError` when the processes cannot share it evenly."""
    if batch_size % world_size:
        raise DliError(
            f"--batch-size {batch_size}: the global batch must be a multiple of the {world_size} processes"
        )
    return batch_size // world_size


def rank0_value(value: str) -> str:
    """Rank 0's `value`, on every process (e.g. the default run folder, named after the time)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
