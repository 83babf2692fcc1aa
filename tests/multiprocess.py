"""Launching JAX processes from tests: `python -c SCRIPT PROCESS_ID NUM_PROCESSES PORT ARGS...`.

The multi-host tests run P processes of one script on this machine, each with forced CPU host
devices, joined through a coordinator on a free loopback port (gloo collectives).
"""

import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def xla_flags(*flags: str) -> str:
    """This process's XLA_FLAGS (the suite's, see conftest.py) with `flags` added."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def start_processes(script: str, num_processes: int, *args, devices: int) -> list:
    """Starts `num_processes` copies of `script` on CPU with `devices` forced host devices.

    The script reads `sys.argv[1:4]` = process id, process count, coordinator port, then `args`.
    """
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return [subprocess.Popen([sys.executable, "-c", script, str(i), str(num_processes), port,
                              *map(str, args)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(num_processes)]


def wait_all(procs: list, timeout: int = 600) -> None:
    """Waits for every process; asserts each exits with 0 (a hung one is killed)."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]


def run_processes(script: str, num_processes: int, *args, devices: int, timeout: int = 600):
    """`start_processes`, then `wait_all`."""
    wait_all(start_processes(script, num_processes, *args, devices=devices), timeout)


def running(pid: int) -> bool:
    """Alive and not a zombie (a re-parented child may wait unreaped in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc)."""
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return [c for c in found if running(c)]
