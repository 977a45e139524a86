"""A single-node SLURM cluster on localhost for the tests: munge, slurmctld and slurmd started from Debian's
``slurm-wlm`` and ``munge`` packages (installed with apt-get when missing) with a minimal configuration
(/etc/slurm/slurm.conf, put back as it was afterwards; state, spool, logs and the munge key under a temporary
folder), stopped by process id.

    with LocalSlurm(tmp_path) as cluster:     # raises SlurmUnavailable with the reason when it cannot start
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "sacct"]


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here (packages missing and not installable, not root, or a daemon did not start)."""


def ensure_packages() -> None:
    """Install slurm-wlm and munge with apt when their programs are missing (as root); else SlurmUnavailable."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(f"SLURM programs missing ({', '.join(b for b in BINARIES if not shutil.which(b))}) "
                               "and apt-get cannot install them here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], capture_output=True,
                         text=True, env=env, timeout=900)
    if run.returncode != 0:
        update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=900)
        run = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                             capture_output=True, text=True, env=env, timeout=900)
        if run.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {(update.stderr + run.stderr)[-800:]}")
    if not all(shutil.which(b) for b in BINARIES):
        raise SlurmUnavailable("slurm-wlm installed but its programs are not on PATH")


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmUnavailable("cannot read the memory size from /proc/meminfo")


class LocalSlurm:
    """The cluster: one node (this host: its CPUs, 90% of its memory) in each of ``partitions`` (the first is the
    default)."""

    def __init__(self, root: Path, partitions: tuple[str, ...] = ("debug",)):
        self.root = Path(root)
        self.partitions = partitions
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.memory_mb = int(_memory_mb() * 0.9)
        self.pids: list[int] = []
        # srun inside a job step reads the default path (a job does not see the SLURM_CONF of its submitter), so
        # the configuration goes to /etc/slurm/slurm.conf; a file already there is put back by stop()
        self.conf = Path("/etc/slurm/slurm.conf")
        self.saved = self.root / "slurm.conf.before"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for folder in ("state", "spool", "log", "munge"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        if self.conf.exists() and not self.saved.exists():
            shutil.copy2(self.conf, self.saved)
        self.conf.write_text(f"""ClusterName=spinessl
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# finished jobs stay visible (squeue, scontrol) for 2 hours: the plugin's squeue status checks need them for a few
# minutes, and the test asks scontrol for every job's partition after a run that can take 20 minutes on 2 cores
MinJobAge=7200
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}
SlurmdLogFile={self.root / 'log' / 'slurmd.log'}
NodeName={self.host} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
""" + "".join(f"PartitionName={name} Nodes={self.host} Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE "
                  "State=UP\n" for i, name in enumerate(self.partitions)))

    def _start(self, command: list[str], pidfile: Path) -> None:
        run = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if run.returncode != 0:
            raise SlurmUnavailable(f"{command[0]} did not start: {(run.stdout + run.stderr)[-800:]}")
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                self.pids.append(int(pidfile.read_text().split()[0]))
                return
            time.sleep(0.1)
        raise SlurmUnavailable(f"{command[0]} wrote no process id to {pidfile}")

    def __enter__(self) -> LocalSlurm:
        ensure_packages()
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting munged, slurmctld and slurmd needs root")
        self.write_config()
        munge = self.root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        try:
            self._start(["munged", "--force", f"--key-file={key}", f"--socket={munge / 'munge.socket'}",
                         f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                         f"--seed-file={munge / 'munged.seed'}"], munge / "munged.pid")
            # slurmctld/slurmd find munge's socket through their AuthInfo
            with open(self.conf, "a") as handle:
                handle.write(f"AuthInfo=socket={munge / 'munge.socket'}\n")
            self._start(["slurmctld", "-f", str(self.conf)], self.root / "slurmctld.pid")
            self._start(["slurmd", "-f", str(self.conf), "-N", self.host], self.root / "slurmd.pid")
            self.wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            run = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env)
            state = run.stdout.split("\n")[0].strip()
            if state in ("idle", "mix", "alloc"):
                return
            if state.startswith("down") or state.startswith("drain"):
                subprocess.run(["scontrol", "update", f"NodeName={self.host}", "State=RESUME"], env=self.env,
                               capture_output=True)
            time.sleep(1)
        log = (self.root / "log" / "slurmd.log")
        raise SlurmUnavailable(f"the node did not become idle within {timeout:.0f} s (state {state!r}); "
                               f"slurmd log: {log.read_text()[-800:] if log.exists() else 'none'}")

    def stop(self) -> None:
        """Stop what this object started, by process id (latest first)."""
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.pids.clear()
        if self.saved.exists():
            shutil.copy2(self.saved, self.conf)
            self.saved.unlink()
        elif self.conf.exists() and f"StateSaveLocation={self.root / 'state'}" in self.conf.read_text():
            self.conf.unlink()

    def __exit__(self, *exc: object) -> None:
        self.stop()
