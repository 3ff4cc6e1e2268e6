"""``scale_study.py --launcher slurm``: every grid point as its own SLURM batch job.

For each point that has to run, a batch script ``<run_dir>/slurm.sbatch`` is written (its
``#SBATCH`` lines carry that point's resources; ``sbatch`` it by hand to rerun one point) and
submitted with ``sbatch --parsable``; the job id goes to ``<run_dir>/slurm_job.json``. The
study then polls ``squeue`` (and ``sacct`` for jobs that have left the queue, where accounting
exists) until every job has ended, with a progress bar or, with ``--no_progress``, a line per
state change and a periodic summary line. Run directories must be on a file system that the
compute nodes share with the submitting machine.

Resuming: a point with a ``run_summary.json`` is finished and skipped; one whose recorded job
is still pending or running is waited for, not resubmitted; one whose job ended without a
summary is failed (``failed.json``, written by the job script or, for jobs that SLURM killed,
by the study with the SLURM state) and is resubmitted only with ``--retry-failed``.

Run as a script, this module is the job script's helper: ``python _slurm.py mark-failed
RUN_DIR RETURNCODE START_EPOCH`` writes ``failed.json`` for a run whose command failed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCRIPT_FILE = "slurm.sbatch"
JOB_FILE = "slurm_job.json"
FAILED_FILE = "failed.json"
SUMMARY_FILE = "run_summary.json"
PROGRESS_FILE = "progress.jsonl"
LOG_FILE = "train.log"
COMMAND_FILE = "command.txt"

# squeue/sacct states after which a job does not run again (everything else is still queued/active)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
SHORT = {"PENDING": "PD", "RUNNING": "R", "COMPLETING": "CG", "CONFIGURING": "CF", "SUSPENDED": "S",
         "REQUEUED": "RQ"}


class SlurmError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    g = p.add_argument_group(
        "SLURM (--launcher slurm)",
        "One batch job per grid point. Resource options take one value for every job, or per-size values "
        "such as 'tiny=0,60m=1,1b=8' (a bare value is the default for the sizes not named).")
    g.add_argument("--slurm-partition", "--slurm_partition", dest="slurm_partition", default=None,
                   help="partition (sbatch --partition)")
    g.add_argument("--slurm-gpus-per-job", "--slurm_gpus_per_job", dest="slurm_gpus_per_job", default="0",
                   help="GPUs per node of each job (sbatch --gres=gpu:N; 0: none); also the processes per "
                        "node unless --nproc_per_node is given")
    g.add_argument("--slurm-nodes", "--slurm_nodes", dest="slurm_nodes", default="1",
                   help="nodes per job; above 1 the job starts torchrun on every node with srun")
    g.add_argument("--slurm-srun", "--slurm_srun", dest="slurm_srun", action="store_true",
                   help="start the processes through srun + torchrun's c10d rendezvous also on one node (the "
                        "multi-node launch line; default on one node: python, or torchrun --standalone)")
    g.add_argument("--slurm-cpus-per-task", "--slurm_cpus_per_task", dest="slurm_cpus_per_task", default=None,
                   help="CPUs per node of each job (sbatch --cpus-per-task; also sets OMP_NUM_THREADS)")
    g.add_argument("--slurm-time", "--slurm_time", dest="slurm_time", default=None,
                   help="time limit of each job (sbatch --time, e.g. 04:00:00 or 'tiny=00:10:00,1b=2-00:00:00')")
    g.add_argument("--slurm-mem", "--slurm_mem", dest="slurm_mem", default=None, help="memory per node (sbatch --mem)")
    g.add_argument("--slurm-account", "--slurm_account", dest="slurm_account", default=None)
    g.add_argument("--slurm-qos", "--slurm_qos", dest="slurm_qos", default=None)
    g.add_argument("--slurm-extra", "--slurm_extra", dest="slurm_extra", action="append", default=[],
                   help="more sbatch options, written as one '#SBATCH ...' line each (repeatable), "
                        "e.g. --slurm-extra=--constraint=a100 --slurm-extra=--exclusive")
    g.add_argument("--slurm-setup", "--slurm_setup", dest="slurm_setup", action="append", default=[],
                   help="shell lines the job runs before training (repeatable), e.g. "
                        "'module load cuda/12.4' or 'source ~/venvs/hf_am/bin/activate'")
    g.add_argument("--slurm-python", "--slurm_python", dest="slurm_python", default=None,
                   help="the Python the jobs run (default: the one running this script; 'python3' to take it "
                        "from the job's PATH after --slurm-setup)")
    g.add_argument("--slurm-job-prefix", "--slurm_job_prefix", dest="slurm_job_prefix", default="scale-",
                   help="job names are <prefix><run name>")
    g.add_argument("--slurm-rdzv-port", "--slurm_rdzv_port", dest="slurm_rdzv_port", type=int, default=29500,
                   help="torchrun rendezvous port on the first node of a multi-node job")
    g.add_argument("--slurm-poll-interval", "--slurm_poll_interval", dest="slurm_poll_interval", type=float,
                   default=15.0, help="seconds between squeue polls")
    g.add_argument("--slurm-no-wait", "--slurm_no_wait", dest="slurm_no_wait", action="store_true",
                   help="submit and return; rerun the same command later to wait again or collect the results")
    g.add_argument("--retry-failed", "--retry_failed", dest="retry_failed", action="store_true",
                   help="resubmit the grid points whose earlier job failed (default: report them as failed)")


def per_size(text, size: str, name: str):
    """``'4'`` -> '4'; ``'1,1b=8'`` -> '8' for size 1b, '1' for others; None stays None."""
    if text is None:
        return None
    default = None
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            key, value = item.split("=", 1)
            if key.strip() == size:
                return value.strip()
        elif default is None:
            default = item
        else:
            raise SlurmError(f"--slurm-{name}: more than one default value in {text!r}")
    return default


def resources(args, size: str) -> dict:
    def num(name, text):
        value = per_size(text, size, name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise SlurmError(f"--slurm-{name}: {value!r} is not a whole number") from None

    gpus = num("gpus-per-job", args.slurm_gpus_per_job) or 0
    nodes = num("nodes", args.slurm_nodes) or 1
    nproc = args.nproc_per_node or (gpus if gpus > 0 else 1)
    return dict(gpus=gpus, nodes=nodes, nproc=nproc, cpus=num("cpus-per-task", args.slurm_cpus_per_task),
                time=per_size(args.slurm_time, size, "time"), mem=per_size(args.slurm_mem, size, "mem"))


# --------------------------------------------------------------------------------------
# job scripts
# --------------------------------------------------------------------------------------


def launch_line(args, res: dict, recipe_cmd: list[str]) -> str:
    """The shell line that starts the recipe inside the job (``recipe_cmd``: recipe path + flags)."""
    py = args.slurm_python or sys.executable
    tail = shlex.join(recipe_cmd)
    if res["nodes"] > 1 or args.slurm_srun:
        return ('head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
                # since SLURM 22.05 srun does not inherit sbatch's --cpus-per-task: pass it on
                'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 '
                '${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} '
                f'--kill-on-bad-exit=1 {shlex.quote(py)} '
                f'-m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node={res["nproc"]} '
                f'--rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_node:{args.slurm_rdzv_port}" '
                f'{tail}')
    if res["nproc"] > 1:
        return f"{shlex.quote(py)} -m torch.distributed.run --standalone --nproc_per_node={res['nproc']} {tail}"
    return f"{shlex.quote(py)} {tail}"


def job_script(args, run: dict, run_dir: Path, recipe_cmd: list[str], root: Path) -> str:
    res = resources(args, run["size"])
    q = shlex.quote
    py = args.slurm_python or sys.executable
    sb = [f"--job-name={args.slurm_job_prefix}{run['name']}", f"--output={run_dir / LOG_FILE}",
          f"--chdir={root}", f"--nodes={res['nodes']}", "--ntasks-per-node=1"]
    if res["cpus"]:
        sb.append(f"--cpus-per-task={res['cpus']}")
    if args.slurm_partition:
        sb.append(f"--partition={args.slurm_partition}")
    if res["gpus"]:
        sb.append(f"--gres=gpu:{res['gpus']}")
    if res["time"]:
        sb.append(f"--time={res['time']}")
    if res["mem"]:
        sb.append(f"--mem={res['mem']}")
    if args.slurm_account:
        sb.append(f"--account={args.slurm_account}")
    if args.slurm_qos:
        sb.append(f"--qos={args.slurm_qos}")
    sb += [x.strip() for x in args.slurm_extra if x.strip()]
    threads = ('if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then '
               f'export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / {res["nproc"]} > 0 ? '
               f'SLURM_CPUS_PER_TASK / {res["nproc"]} : 1 )); fi')
    lines = [
        "#!/bin/bash",
        f"# scale study grid point {run['name']}: size {run['size']}, optimizer {run['optim']}, "
        f"{run['variant']}, seed {run['seed']}",
        "# written by recipes/scale_study.py --launcher slurm; to rerun only this point:",
        f"#   sbatch {run_dir / SCRIPT_FILE}",
        *[f"#SBATCH {x}" for x in sb],
        "",
        f"RUN_DIR={q(str(run_dir))}",
        "export PYTHONUNBUFFERED=1",
        threads,
        *args.slurm_setup,
        f'rm -f "$RUN_DIR/{FAILED_FILE}" "$RUN_DIR/{PROGRESS_FILE}"',
        "start=$(date +%s)",
        'echo "[slurm] job $SLURM_JOB_ID on $(hostname): $SLURM_JOB_NUM_NODES node(s), '
        f'{res["nproc"]} process(es) per node"',
        launch_line(args, res, recipe_cmd),
        "rc=$?",
        f'if [ "$rc" -eq 0 ] && [ -f "$RUN_DIR/{SUMMARY_FILE}" ]; then exit 0; fi',
        'if [ "$rc" -eq 0 ]; then rc=1; fi',
        f'{q(py)} {q(str(Path(__file__).resolve()))} mark-failed "$RUN_DIR" "$rc" "$start"',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def write_failed(run_dir: Path, returncode, wall_seconds=None, **extra) -> None:
    try:
        tail = (run_dir / LOG_FILE).read_text(errors="replace").splitlines()[-30:]
    except OSError:
        tail = []
    try:
        command = (run_dir / COMMAND_FILE).read_text().strip()
    except OSError:
        command = None
    record = {"returncode": returncode, "command": command, "wall_seconds": wall_seconds, **extra,
              "log_tail": tail}
    (run_dir / FAILED_FILE).write_text(json.dumps(record, indent=1))


# --------------------------------------------------------------------------------------
# talking to SLURM
# --------------------------------------------------------------------------------------


def require_slurm() -> None:
    missing = [b for b in ("sbatch", "squeue") if shutil.which(b) is None]
    if missing:
        raise SlurmError(
            f"--launcher slurm needs the SLURM client commands, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH. Run the study on a login node of a SLURM "
            "cluster (after e.g. 'module load slurm'), install the client (Debian/Ubuntu: apt-get install "
            "slurm-client), or add --dry_run to only write the job scripts (<run_dir>/slurm.sbatch).")


def _slurm(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def submit(script: Path) -> str:
    proc = _slurm(["sbatch", "--parsable", str(script)])
    if proc.returncode != 0:
        raise SlurmError((proc.stderr or proc.stdout).strip() or f"sbatch exited with {proc.returncode}")
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0].strip()
    if not job_id:
        raise SlurmError(f"sbatch printed no job id: {proc.stdout!r}")
    return job_id


def query_states(job_ids: list[str]) -> dict[str, dict]:
    """{job_id: {"state", "reason"}} for the jobs SLURM still knows (squeue, then sacct)."""
    states: dict[str, dict] = {}
    if not job_ids:
        return states
    proc = _slurm(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"])
    if proc.returncode != 0 and "invalid job id" not in proc.stderr.lower():
        raise SlurmError(f"squeue failed: {proc.stderr.strip()}")
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0] in job_ids:
            states[parts[0]] = {"state": parts[1].split()[0], "reason": parts[2] if len(parts) > 2 else ""}
    gone = [j for j in job_ids if j not in states]
    if gone and shutil.which("sacct"):
        try:
            proc = _slurm(["sacct", "-n", "-P", "-X", "-j", ",".join(gone), "-o", "JobIDRaw,State,ExitCode"])
        except subprocess.TimeoutExpired:
            return states
        if proc.returncode == 0:
            for line in proc.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) >= 2 and parts[0] in gone:
                    states[parts[0]] = {"state": parts[1].split()[0], "reason": "",
                                        "exit_code": parts[2] if len(parts) > 2 else ""}
    return states


def read_job(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / JOB_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _progress(run_dir: Path) -> tuple[int, int, float | None]:
    step, total, loss = 0, 0, None
    try:
        lines = (run_dir / PROGRESS_FILE).read_text().splitlines()
    except OSError:
        return step, total, loss
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        step, total = row.get("step", step), row.get("max_steps", total)
        loss = row.get("loss", loss)
    return step, total, loss


# --------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------


def _say(msg: str, bar=None) -> None:
    if bar is not None:
        bar.write(msg)
    else:
        print(msg, flush=True)


def dry_run(args, runs, out_dir: Path, recipe_command, root: Path) -> None:
    for run in runs:
        run_dir = out_dir / "runs" / run["name"]
        if (run_dir / SUMMARY_FILE).exists():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        script = run_dir / SCRIPT_FILE
        script.write_text(job_script(args, run, run_dir, recipe_command(run, run_dir), root))
        print(f"sbatch {script}")


def finalize(run_dir: Path, job_id: str, info: dict | None) -> str:
    """'done' or 'failed' for a run whose job has ended (writes failed.json when the job could not)."""
    if (run_dir / SUMMARY_FILE).exists():
        return "done"
    if not (run_dir / FAILED_FILE).exists():
        state = (info or {}).get("state") or "unknown (no longer known to squeue or sacct)"
        job = read_job(run_dir) or {}
        write_failed(run_dir, None, time.time() - job.get("submitted_at", time.time()), slurm_job_id=job_id,
                     slurm_state=state, slurm_reason=(info or {}).get("reason", ""))
    else:
        try:
            record = json.loads((run_dir / FAILED_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and "slurm_job_id" not in record:
            record.update(slurm_job_id=job_id, slurm_state=(info or {}).get("state"))
            (run_dir / FAILED_FILE).write_text(json.dumps(record, indent=1))
    return "failed"


def run_study(args, runs: list[dict], out_dir: Path, recipe_command, root: Path, check_optims=None) -> dict:
    """Submit / wait for the grid on SLURM. Returns {"submitted", "failed", "done", "waited"} (run names)."""
    require_slurm()
    run_dirs = {r["name"]: out_dir / "runs" / r["name"] for r in runs}
    done = [r for r in runs if (run_dirs[r["name"]] / SUMMARY_FILE).exists()]
    rest = [r for r in runs if r not in done]
    jobs = {r["name"]: read_job(run_dirs[r["name"]]) for r in rest}
    known = query_states([j["job_id"] for j in jobs.values() if j])
    attach, failed, todo = [], [], []
    for r in rest:
        run_dir, job = run_dirs[r["name"]], jobs[r["name"]]
        info = known.get(job["job_id"]) if job else None
        if job and info and info["state"] not in TERMINAL:
            attach.append(r)  # still pending/running from an earlier invocation
            continue
        if job and not (run_dir / FAILED_FILE).exists():
            finalize(run_dir, job["job_id"], info)  # its job ended (or vanished) without a summary
        if (run_dir / FAILED_FILE).exists():
            (todo if args.retry_failed else failed).append(r)
        else:
            todo.append(r)
    print(f"[scale_study] {len(runs)} runs in the grid: {len(done)} finished, {len(attach)} still queued or "
          f"running, {len(failed)} failed earlier"
          + (" (not resubmitted; add --retry-failed)" if failed else "")
          + f", {len(todo)} to submit -> {out_dir}", flush=True)
    for r in failed:
        print(f"[scale_study]   failed earlier: {r['name']} (see {run_dirs[r['name']] / FAILED_FILE})", flush=True)

    # a typo in --optims should not cost a queue wait per job: check the names on this machine
    # first (except those that already finished a run of this study)
    unchecked = sorted({r["optim"] for r in todo} - {r["optim"] for r in done})
    if unchecked and check_optims is not None:
        check_optims(unchecked)
    for r in todo:  # a malformed per-size value stops the study before anything is submitted
        resources(args, r["size"])
    watch: dict[str, str] = {}  # job id -> run name
    for r in attach:
        watch[jobs[r["name"]]["job_id"]] = r["name"]
    submitted = []
    for r in todo:
        run_dir = run_dirs[r["name"]]
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in (PROGRESS_FILE, JOB_FILE):
            (run_dir / name).unlink(missing_ok=True)
        cmd = recipe_command(r, run_dir)
        (run_dir / COMMAND_FILE).write_text(launch_line(args, resources(args, r["size"]), cmd) + "\n")
        script = run_dir / SCRIPT_FILE
        script.write_text(job_script(args, r, run_dir, cmd, root))
        try:
            job_id = submit(script)
        except (SlurmError, subprocess.TimeoutExpired) as e:
            # most likely the options (partition, account, limits): the same for the other points,
            # so stop here; this point stays as it was (unsubmitted, or failed for --retry-failed)
            before = f"; the {len(watch)} jobs submitted or queued before keep running" if watch else ""
            raise SlurmError(f"sbatch refused {script}: {e}{before}. Fix the --slurm-* options and rerun "
                             "the same command: finished and queued points are not submitted again") from None
        (run_dir / FAILED_FILE).unlink(missing_ok=True)  # the earlier attempt's, once this one is in
        (run_dir / JOB_FILE).write_text(json.dumps(
            {"job_id": job_id, "submitted_at": time.time(), "script": str(script),
             "resources": resources(args, r["size"])}, indent=1))
        watch[job_id] = r["name"]
        submitted.append(r["name"])
    if submitted:
        print(f"[scale_study] submitted {len(submitted)} jobs: "
              + ", ".join(f"{j} ({n})" for j, n in watch.items() if n in submitted), flush=True)
    result = {"submitted": submitted, "failed": [r["name"] for r in failed],
              "done": [r["name"] for r in done], "waited": [r["name"] for r in attach]}
    if not watch:
        return result
    if args.slurm_no_wait:
        print(f"[scale_study] not waiting (--slurm-no-wait): {len(watch)} jobs in SLURM; rerun the same command "
              "to wait for them and collect the results", flush=True)
        return result
    newly_done, newly_failed = wait(args, watch, run_dirs)
    result["done"] += newly_done
    result["failed"] += newly_failed
    return result


def wait(args, watch: dict[str, str], run_dirs: dict[str, Path]) -> tuple[list[str], list[str]]:
    from tqdm.auto import tqdm

    t0 = time.time()
    last: dict[str, str] = {}
    pending = dict(watch)
    done, failed = [], []
    grace: dict[str, float] = {}
    gone: dict[str, int] = {}
    interval = max(0.2, args.slurm_poll_interval)
    heartbeat = max(60.0, 4 * interval)
    last_beat = time.time()
    bar = None if args.no_progress else tqdm(total=len(watch), desc="slurm jobs", unit="job", dynamic_ncols=True)
    try:
        while pending:
            try:
                states = query_states(list(pending))
            except (SlurmError, subprocess.TimeoutExpired) as e:
                _say(f"[scale_study] WARNING: {e}; retrying", bar)
                time.sleep(interval)
                continue
            for job_id, name in list(pending.items()):
                run_dir = run_dirs[name]
                info = states.get(job_id)
                state = info["state"] if info else "GONE"
                if state != last.get(job_id):
                    if state not in TERMINAL and state != "GONE":
                        reason = f" ({info['reason']})" if info.get("reason") not in (None, "", "None") else ""
                        _say(f"[scale_study] job {job_id} {name}: {state}{reason}", bar)
                    last[job_id] = state
                if state not in TERMINAL and state != "GONE":
                    continue
                if state == "GONE" and not (run_dir / SUMMARY_FILE).exists():
                    # not in squeue (nor sacct): purged after MinJobAge, or a glitch of the
                    # controller; believe it on the second poll in a row
                    gone[job_id] = gone.get(job_id, 0) + 1
                    if gone[job_id] < 2:
                        continue
                if state == "COMPLETED" and not (run_dir / SUMMARY_FILE).exists():
                    # the job script exits 0 only after seeing run_summary.json: a shared file system
                    # that has not shown it here yet; give it a moment
                    grace.setdefault(job_id, time.time())
                    if time.time() - grace[job_id] < 60:
                        continue
                outcome = finalize(run_dir, job_id, info)
                del pending[job_id]
                elapsed = f"{time.time() - t0:.0f}s since start"
                if outcome == "done":
                    done.append(name)
                    _say(f"[scale_study] finished {name} (job {job_id}, {elapsed})", bar)
                else:
                    failed.append(name)
                    _say(f"[scale_study] run {name} FAILED (job {job_id}: {state}), see {run_dir / LOG_FILE}", bar)
                if bar is not None:
                    bar.update(1)
            counts: dict[str, int] = {}
            for job_id in pending:
                s = last.get(job_id, "?")
                counts[SHORT.get(s, s)] = counts.get(SHORT.get(s, s), 0) + 1
            running = [n for j, n in pending.items() if last.get(j) == "RUNNING"]
            if bar is not None:
                text = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                text += f" ok={len(done)} failed={len(failed)}"
                if running:
                    n = running[0]
                    step, total, loss = _progress(run_dirs[n])
                    text += f" | {n} {step}/{total or '?'}" + (f" loss {float(loss):.3f}" if loss is not None else "")
                bar.set_postfix_str(text, refresh=True)
            elif pending and time.time() - last_beat >= heartbeat:
                last_beat = time.time()
                steps = ", ".join(f"{n} step {s}/{t or '?'}" for n in running for s, t, _ in [_progress(run_dirs[n])])
                _say(f"[scale_study] {time.time() - t0:.0f}s: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                     + f", {len(done)} finished, {len(failed)} failed" + (f"; {steps}" if steps else ""))
            if pending:
                time.sleep(interval)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"\n[scale_study] interrupted; the {len(pending)} jobs keep running in SLURM "
              f"({', '.join(pending)}). Rerun the same command to wait for them and collect the results, "
              f"or cancel them: scancel {' '.join(pending)}", flush=True)
        raise SystemExit(130)
    if bar is not None:
        bar.close()
    print(f"[scale_study] {len(watch)} jobs ended in {time.time() - t0:.0f}s: {len(done)} finished, "
          f"{len(failed)} failed", flush=True)
    return done, failed


def check_optims(optims: list[str], repo_root: Path) -> None:
    """Warn about ``--optim`` names that TrainingArguments rejects after ``import hf_am`` (one
    subprocess for all of them: a typo is caught here, not in every job of the grid)."""
    code = (
        "import json, sys, tempfile; sys.path.append(%r)\n"
        "try:\n    import hf_am\nexcept Exception as e:\n    print('import hf_am failed:', e, file=sys.stderr)\n"
        "from transformers import TrainingArguments\n"
        "bad = {}\n"
        "for name in %r:\n"
        "    try:\n"
        "        TrainingArguments(output_dir=tempfile.mkdtemp(), optim=name, report_to='none')\n"
        "    except Exception as e:\n"
        "        why = (str(e).strip().splitlines() or [type(e).__name__])[-1]\n"
        "        bad[name] = why if len(why) < 160 else why[:160] + ' ...'\n"
        "print(json.dumps(bad))\n"
    ) % (str(repo_root), list(optims))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        bad = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        why = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        print(f"[scale_study] WARNING: could not check the --optim names ({why})", flush=True)
        return
    for optim, why in bad.items():
        print(f"[scale_study] WARNING: --optim {optim} is not available ({why}); its runs will fail", flush=True)


def _main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "mark-failed":
        run_dir, rc, start = Path(argv[1]), int(argv[2]), float(argv[3])
        write_failed(run_dir, rc, time.time() - start, slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                     slurm_node=os.environ.get("SLURMD_NODENAME"))
        return 0
    usage = ("usage: _slurm.py mark-failed RUN_DIR RETURNCODE START_EPOCH\n\n"
             "Called by the SLURM job scripts that scale_study.py writes: records a run that exited with\n"
             "RETURNCODE as failed in RUN_DIR (not meant to be run by hand).")
    if argv in (["--help"], ["-h"]):
        print(usage)
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
