"""A real single-node SLURM cluster on localhost for the ``slurm`` tests.

The fixture ``slurm_cluster`` (one cluster per test module) installs the Debian packages
when they are missing (``apt-get update`` once, then ``apt-get install -y
--no-install-recommends slurmctld slurmd slurm-client munge``; needs root), then starts, all
under one temporary directory:

* ``munged`` as the ``munge`` user, with its own key (``mungekey -c``) and socket;
* ``slurmctld`` and ``slurmd`` in the foreground (children of this process), on a non-default
  port pair and ClusterName, with ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``,
  ``SlurmUser=root``, no accounting, and one node ``localhost`` with ``CPUs=2``.

``SLURM_CONF`` points every SLURM client of the tests (and of the jobs) at it. At the end
every job is cancelled, the three daemons are stopped (SIGTERM, then SIGKILL) and any
``slurmstepd`` left over from this cluster is killed by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "munged", "mungekey"]
CLUSTER = "hfamtest"
PARTITION = "hfamq"
NODE = "localhost"


def _free_port_pair(start: int = 16817, stop: int = 16999) -> tuple[int, int]:
    """Two consecutive free TCP ports on 127.0.0.1 (not SLURM's default 6817/6818)."""
    for port in range(start, stop, 2):
        ok = True
        for p in (port, port + 1):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return port, port + 1
    raise RuntimeError("no free port pair for slurmctld/slurmd")


def _ensure_installed() -> None:
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"SLURM is not installed (missing {missing}) and cannot be installed here "
                    f"(needs root and apt-get): apt-get install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _slurmstepd_pids(conf: str | None = None) -> set[int]:
    """pids of slurmstepd processes; with ``conf``, only those started under that SLURM_CONF."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(b"slurmstepd"):
                continue
            if conf is not None and f"SLURM_CONF={conf}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        pids.add(int(entry.name))
    return pids


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.partition = PARTITION
        self.cluster = CLUSTER
        self.procs: dict[str, subprocess.Popen] = {}
        self.ctld_port, self.slurmd_port = _free_port_pair()
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------- set-up
    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir()
        munge_sock = r / "munge" / "munge.socket.2"
        self.conf.write_text("\n".join([
            f"ClusterName={CLUSTER}",
            f"SlurmctldHost={NODE}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_sock}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # finished jobs stay visible in squeue/scontrol for the whole test session (no sacct here)
            "MinJobAge=3600",
            "ReturnToService=2",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "KillWait=5",
            f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir()
        os.chmod(d, 0o755)  # munged: the socket directory must be searchable by all
        key = d / "munge.key"
        subprocess.run([_which("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
        os.chmod(key, 0o600)
        for p in (d, key):
            shutil.chown(p, "munge", "munge")
        log = open(self.root / "log" / "munged.out", "w")
        self.procs["munged"] = subprocess.Popen(
            [_which("munged"), "--foreground", f"--socket={d / 'munge.socket.2'}", f"--key-file={key}",
             f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"],
            user="munge", group="munge", stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_for(lambda: (d / "munge.socket.2").exists(), "munged socket", 20, "munged")

    def start_slurm(self) -> None:
        env = self.env()
        for name, cmd in (("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)]),
                          ("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])):
            log = open(self.root / "log" / f"{name}.out", "w")
            self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
            if name == "slurmctld":
                self._wait_for(lambda: self._ok(["scontrol", "ping"], "UP"), "slurmctld", 30, name)

        def idle():
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=env)
            return out.returncode == 0 and any(line.split()[-1] in {"idle", "mix", "alloc"}
                                                 for line in out.stdout.splitlines() if line.strip())
        self._wait_for(idle, "node idle", 40, "slurmd")

    def _ok(self, cmd, needle) -> bool:
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env())
        return out.returncode == 0 and needle in out.stdout

    def _wait_for(self, cond, what, timeout, proc_name) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            proc = self.procs.get(proc_name)
            if proc is not None and proc.poll() is not None:
                break
            if cond():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not come up in {timeout}s\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")) + sorted((self.root / "munge").glob("*.log")):
            try:
                parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
            except OSError:
                pass
        return "\n".join(parts)

    # ---------------------------------------------------------------- helpers for tests
    def env(self, **extra) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf), **extra)

    def job_ids(self) -> set[str]:
        """Every job this cluster knows (pending, running, finished: MinJobAge keeps them)."""
        out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True,
                             env=self.env(), check=True)
        return {x.strip() for x in out.stdout.split() if x.strip()}

    def job_states(self) -> dict[str, tuple[str, str]]:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%j|%T"], capture_output=True, text=True,
                             env=self.env(), check=True)
        states = {}
        for line in out.stdout.splitlines():
            if line.strip():
                jid, name, state = line.strip().split("|")
                states[jid] = (name, state)
        return states

    # ---------------------------------------------------------------- tear-down
    def stop(self) -> None:
        env = self.env()
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--quiet", "--user", "root"], capture_output=True, env=env)
            t0 = time.time()
            while time.time() - t0 < 20:
                out = subprocess.run(["squeue", "-h", "-t", "pending,running,completing,configuring", "-o", "%i"],
                                     capture_output=True, text=True, env=env)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        # slurmstepd daemonises away from slurmd: kill the ones of this cluster, by pid
        for pid in _slurmstepd_pids(str(self.conf)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")  # stopped as soon as the module's tests are done, not at session end
def slurm_cluster():
    t0 = time.time()
    _ensure_installed()
    t_install = time.time() - t0
    root = Path(tempfile.mkdtemp(prefix="hfam-slurm-"))
    os.chmod(root, 0o755)  # munged runs as `munge` and must reach its directory
    cluster = SlurmCluster(root)
    old_conf = os.environ.get("SLURM_CONF")
    try:
        cluster.write_config()
        cluster.start_munge()
        cluster.start_slurm()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        cluster.timings = {"install_s": round(t_install, 1), "setup_s": round(time.time() - t0, 1)}
        print(f"\n[slurm fixture] cluster {CLUSTER} up in {cluster.timings['setup_s']}s "
              f"(install {cluster.timings['install_s']}s), ports {cluster.ctld_port}/{cluster.slurmd_port}, {root}")
        yield cluster
    finally:
        cluster.stop()
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if os.environ.get("HFAM_KEEP_SLURM_DIR") != "1":
            shutil.rmtree(root, ignore_errors=True)
