"""A real single-node SLURM cluster on this machine, for the pipeline's SLURM integration test.

Debian's `slurmctld slurmd munge` (installed with apt-get when missing, as root), one node with the
machine's CPUs and one GPU of type a100 whose device file is a character device node made with
mknod (`/dev/fake_nvidia0`): SLURM schedules it and binds it to jobs (`CUDA_VISIBLE_DEVICES=0`),
while no CUDA driver exists, so the stages run on CPU. No accounting (no slurmdbd): Snakemake's
executor then needs `--slurm-status-command squeue --slurm-no-account`.

State, spool and daemon logs live in a temporary directory. The configuration goes to the default
place, /etc/slurm (Snakemake's job step drops SLURM_* variables, SLURM_CONF included, before its
inner `srun`); whatever was there before is put back on stop. The daemons run in the foreground as
children of the test and are stopped by their own process ids.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "munge", "slurm-client")
GPU_TYPE = "a100"
PARTITION = "gpu"  # the partition name workflow/profiles/slurm asks for
FAKE_GPU = Path("/dev/fake_nvidia0")
ETC = Path("/etc/slurm")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here (the reason is the message)."""


def _run(cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def ensure_installed() -> None:
    """Install the Debian packages when a daemon is missing (root only)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "sinfo")):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = _run(cmd, timeout=900, env=env)
        if result.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {result.stderr.strip()[-500:]}")


def _make_fake_gpu() -> None:
    if FAKE_GPU.exists():
        if not FAKE_GPU.is_char_device():
            raise ClusterUnavailable(f"{FAKE_GPU} exists and is not a character device")
        return
    try:
        os.mknod(FAKE_GPU, 0o666 | 0o020000, os.makedev(195, 0))  # 195: the NVIDIA device major
    except OSError as err:
        raise ClusterUnavailable(f"cannot create the device node {FAKE_GPU}: {err}") from err


@dataclass
class SlurmCluster:
    """A running single-node cluster; use as a context manager."""

    root: Path  # directory for configuration, state, spool and daemon logs
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    memory_mb: int = 8000
    node: str = field(default_factory=lambda: platform.node().split(".")[0])
    processes: dict = field(default_factory=dict)  # daemon name -> Popen
    saved: dict = field(default_factory=dict)  # /etc/slurm file -> its previous text (None: absent)

    @property
    def conf(self) -> Path:
        return ETC / "slurm.conf"

    @property
    def env(self) -> dict:
        """The environment for SLURM clients (sbatch, squeue, srun, Snakemake)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        state, spool, log = self.root / "state", self.root / "spool", self.root / "log"
        for d in (ETC, state, spool, log):
            d.mkdir(parents=True, exist_ok=True)
        for path in (self.conf, ETC / "gres.conf"):
            self.saved[path] = path.read_text() if path.is_file() else None
        self.conf.write_text(f"""\
# Written by the pipeline's SLURM integration test (tests/slurm_cluster.py); restored afterwards.
ClusterName=alphatoken-test
SlurmctldHost={self.node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={log}/slurmctld.log
SlurmdLogFile={log}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=600
GresTypes=gpu
NodeName={self.node} CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:{GPU_TYPE}:1 State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        (ETC / "gres.conf").write_text(f"NodeName={self.node} Name=gpu Type={GPU_TYPE} File={FAKE_GPU}\n")

    def _start(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        self.processes[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise ClusterUnavailable("starting slurmctld/slurmd/munged needs root")
        ensure_installed()
        _make_fake_gpu()
        self.write_config()
        if not Path("/etc/munge/munge.key").is_file():
            result = _run(["mungekey", "--create"])
            if result.returncode != 0:
                raise ClusterUnavailable(f"cannot create a munge key: {result.stderr.strip()}")
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        if _run(["munge", "-n"]).returncode != 0:  # no munged answering yet: start ours
            self._start("munged", ["munged", "--foreground", "--force"])
            self._wait(lambda: _run(["munge", "-n"]).returncode == 0, timeout, "munged")
        self._start("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._wait(lambda: _run(["sinfo", "-h"], env=self.env).returncode == 0, timeout, "slurmctld")
        self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_idle, timeout, "slurmd (node idle)")
        return self

    def _node_idle(self) -> bool:
        result = _run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited with {proc.returncode}: {self.daemon_log(name)}")
            if ready():
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"{what} not ready after {timeout:.0f} s: {self.daemon_log(what.split()[0])}")

    def daemon_log(self, name: str, tail: int = 2000) -> str:
        texts = []
        for path in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"):
            if path.is_file():
                texts.append(path.read_text()[-tail:])
        return "\n".join(texts)

    def stop(self) -> None:
        """Stop the daemons this object started, by process id, newest first."""
        for name in reversed(list(self.processes)):
            proc = self.processes[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes.clear()
        for path, text in self.saved.items():
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(text)
        self.saved.clear()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
