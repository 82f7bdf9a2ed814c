"""A one-node SLURM cluster on localhost (munged, slurmctld, slurmd on 127.0.0.1) for trying and testing the SLURM
profile on a machine without one: Debian's slurm-wlm and munge (`apt-get install slurm-wlm munge`), run as root.

As a script:
    python tests/slurm_local.py up      # write /etc/slurm/slurm.conf, start the daemons, wait for the node
    python tests/slurm_local.py down    # cancel every job, stop the daemons (by their PIDs), remove the config
Between the two, `sinfo`, `sbatch` and `snakemake --profile profiles/slurm --slurm-no-account
--slurm-status-command squeue` work. tests/test_slurm.py starts and stops the same cluster around its tests.

The configuration goes to /etc/slurm/slurm.conf (the executor plugin's job step drops SLURM_CONF before its nested
srun), marked as this file's; a configuration of a real installation is never replaced. Everything else (state,
spool, logs, PIDs, munge's key and socket) lives in one temporary directory named in that file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# one-node test cluster written by kalmanrl tests/slurm_local.py"
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "srun")


class Unavailable(RuntimeError):
    """This machine cannot run the local cluster (the message says why)."""


def slurm_conf(state: Path, memory_mb: int, cpus: int, munge_socket: Path) -> str:
    return f"""{MARKER}
ClusterName=kalmanrl
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def check_machine() -> None:
    """Raise Unavailable unless this machine can run the cluster: Linux, root, the packages, no real SLURM config."""
    if sys.platform != "linux" or os.geteuid() != 0:
        raise Unavailable("a local SLURM needs Linux and root (slurmd starts jobs as their users)")
    missing = [name for name in COMMANDS if shutil.which(name) is None]
    if missing:
        raise Unavailable(f"SLURM not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge")
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
        raise Unavailable(f"{SLURM_CONF} belongs to a real SLURM installation (or another test cluster); not "
                          f"replacing it")


def node_idle() -> bool:
    result = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.strip() in ("idle", "mixed", "allocated")


def _wait_for(check, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    raise Unavailable(f"SLURM could not start on localhost: {what} not ready after {timeout:.0f} s\n{tails}")


def start(*, detach: bool = False) -> tuple[Path, list[int]]:
    """Write the config and start munged, slurmctld and slurmd; return the state directory and the daemons' PIDs once
    the node takes jobs. `detach`: the daemons outlive this process (the `up` command). On failure whatever started
    is stopped again."""
    check_machine()
    # Not under pytest's tmp_path: its 0700 parents would keep the munge user from its socket.
    state = Path(tempfile.mkdtemp(prefix="kalmanrl-slurm-"))
    state.chmod(0o755)
    munge_dir = state / "munge"
    munge_dir.mkdir()
    shutil.chown(munge_dir, "munge", "munge")
    socket = munge_dir / "munge.socket"
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    cpus = int(re.search(r"CPUs=(\d+)", node).group(1))
    memory_mb = int(re.search(r"RealMemory=(\d+)", node).group(1)) - 512
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(slurm_conf(state, memory_mb, cpus, socket))

    pids: list[int] = []
    logs = [munge_dir / "munged.log", state / "slurmctld.log", state / "slurmd.log"]
    options = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
               "start_new_session": detach}
    try:
        pids.append(subprocess.Popen(
            ["munged", "--foreground", f"--socket={socket}", f"--pid-file={munge_dir}/munged.pid",
             f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"],
            user="munge", group="munge", extra_groups=[], **options).pid)
        _wait_for(socket.exists, 20, "munged", logs[:1])
        pids.append(subprocess.Popen(["slurmctld", "-D", "-i"], **options).pid)
        pids.append(subprocess.Popen(["slurmd", "-D", "-N", "localhost"], **options).pid)
        (state / "daemons.pid").write_text(" ".join(map(str, pids)))
        _wait_for(node_idle, 60, "node localhost", logs)
    except BaseException:
        stop(state, pids)
        raise
    return state, pids


def queue() -> list[tuple[str, str, str]]:
    """(job id, state, comment) of every job SLURM still lists."""
    result = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], capture_output=True, text=True)
    return [tuple(line.split("|", 2)) for line in result.stdout.splitlines()] if result.returncode == 0 else []


def _gone(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid  # a child of this process: reap it
    except ChildProcessError:
        return not Path(f"/proc/{pid}").exists()


def stop(state: Path, pids: list[int]) -> None:
    """Cancel every job, stop the daemons by PID (slurmd and slurmctld first, munged last), remove config and state."""
    if pids:
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and queue():
            time.sleep(0.5)
    for pid in reversed(pids):
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not _gone(pid):
                time.sleep(0.2)
            if _gone(pid):
                break
    if SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text():
        SLURM_CONF.unlink()
    shutil.rmtree(state, ignore_errors=True)


def running() -> tuple[Path, list[int]] | None:
    """The state directory and daemon PIDs of a cluster `up` started, from the config it wrote."""
    if not SLURM_CONF.exists() or MARKER not in SLURM_CONF.read_text():
        return None
    state = Path(re.search(r"^StateSaveLocation=(.*)/ctld$", SLURM_CONF.read_text(), re.M).group(1))
    pid_file = state / "daemons.pid"
    return state, [int(pid) for pid in pid_file.read_text().split()] if pid_file.exists() else []


def main(argv: list[str]) -> int:
    if argv not in (["up"], ["down"]):
        print(__doc__, file=sys.stderr)
        return 2
    if argv == ["up"]:
        if running():
            print(f"already up ({SLURM_CONF}); `down` first", file=sys.stderr)
            return 1
        try:
            state, pids = start(detach=True)
        except Unavailable as err:
            print(err, file=sys.stderr)
            return 1
        print(f"one-node SLURM up: state and logs in {state}, daemons {pids}")
        return 0
    found = running()
    if found is None:
        print(f"no cluster of this script is configured at {SLURM_CONF}", file=sys.stderr)
        return 1
    stop(*found)
    print("one-node SLURM stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
