"""Multi-node for real, on one machine: two launcher invocations on 127.0.0.1 act as two nodes.

Each "node" is its own launcher process (``torchrun --nnodes 2 --node_rank {0,1}`` or
``accelerate launch --num_machines 2 --machine_rank {0,1}``), started as two concurrent
subprocesses that meet at ``127.0.0.1:PORT``, one training process per node (gloo on CPU).
Every run trains the tiny Llama of the Trainer tests with a real ``Trainer`` and
``--optim am_adamw`` on the same global batch (4) as a one-process reference run, and must
equal it: final parameters to 1e-6 and every step's beta to 1e-5 (float32). Every test also
asserts which engine really ran (DDP wrapper, DeepSpeed engine at the asked ZeRO stage with the
AM optimizer summing over ZeRO's data-parallel group, DTensor parameters for FSDP2), because on
CPU accelerate may quietly train something else -- and does: with the shipped FSDP2 multi-node
config it trains DDP on CPU (pinned below; the ZeRO-2 config does run DeepSpeed), so ZeRO-2, ZeRO-3
and FSDP2 across two nodes are also tested through ``torchrun`` with the Trainer's own
``deepspeed=`` config and ``distributed_config``, as ``tests/integrations/test_trainer_distributed.py``
does for 2 processes.

The torchrun runs use ``trainer_worker.py`` (full ``assert_same_training``: every step's beta
mean/min/max/restarts and every scope's beta); the accelerate runs use the unmodified
``trainer_script.py`` through ``-m hf_am.run`` and compare every step's beta mean/min/max/restarts
from the Trainer's logs (``--logging_steps 1``).

Both node processes are started in their own session and killed as a group on failure or
timeout; a node that fails stops the other one, and a hang fails the test after ``TIMEOUT``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

import pytest
import torch

from trainer_harness import (  # noqa: E402
    REPO,
    SCRIPT,
    WORKER,
    assert_same_training,
    ds_config,
    free_port,
    max_param_diff,
    run_worker,
    subprocess_env,
)

pytestmark = [pytest.mark.multinode, pytest.mark.multiprocess]

TIMEOUT = 150  # seconds for one two-node launch (a healthy one takes well under a minute on 2 cores)
STEPS = 6
# the reference run: the Trainer's decay/no-decay split, one beta per tensor
OPTIM_ARGS = "lam=0.1,scope=tensor"
RUN = {"name": "tensor", "steps": STEPS, "args": {"optim_args": OPTIM_ARGS}}


def _kill(proc: subprocess.Popen) -> None:
    """Kill one node: its launcher and every process it started (its own session and process group,
    killed even when the launcher itself has exited, which can leave its workers behind)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def run_nodes(
    cmds: Sequence[Sequence[str]], timeout: float = TIMEOUT, env: Optional[dict] = None, cwd: str = REPO, grace: float = 10
) -> List[str]:
    """Start every command at once (one per "node") and wait for all of them.

    A node that exits non-zero gets the others killed after ``grace`` seconds (so their errors
    reach the log too); running past ``timeout`` kills all of them. Either way the test fails
    with every node's output tail. Returns each node's output."""
    env = env or subprocess_env()
    logs = [tempfile.TemporaryFile(mode="w+") for _ in cmds]
    procs: List[subprocess.Popen] = []
    failure = None
    try:
        for cmd, log in zip(cmds, logs):
            procs.append(
                subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            )
        deadline = time.monotonic() + timeout
        failed_at = None
        while True:
            rcs = [p.poll() for p in procs]
            if all(rc is not None for rc in rcs):
                if any(rcs):
                    failure = f"node exit codes {rcs}"
                break
            now = time.monotonic()
            if failed_at is None and any(rc not in (None, 0) for rc in rcs):
                failed_at = now
            if failed_at is not None and now - failed_at > grace:
                failure = f"node exit codes {rcs}: a node failed, the others were killed"
                break
            if now > deadline:
                failure = f"the nodes did not finish within {timeout:.0f} s (exit codes {rcs}): killed"
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            _kill(p)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if failure is not None:
        tails = "\n".join(f"--- node {i}: {' '.join(map(str, c))}\n{o[-4000:]}" for i, (c, o) in enumerate(zip(cmds, outputs)))
        raise AssertionError(f"{failure}\n{tails}")
    return outputs


def torchrun_nodes(port: int, nproc_per_node: int = 1, rdzv: str = "static") -> List[List[str]]:
    """The launcher part of each node's command: ``torchrun`` with static (``--master_addr``) or
    c10d (``--rdzv_endpoint``) rendezvous."""
    cmds = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(nproc_per_node)]
        if rdzv == "static":
            cmd += ["--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        else:  # as under SLURM: every node the same command, the rendezvous assigns the node ranks
            cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "hf_am_multinode"]
        cmds.append(cmd)
    return cmds


def run_worker_nodes(tmp_path, model_dir: str, runs: List[dict], nproc_per_node: int = 1, rdzv: str = "static") -> dict:
    """``trainer_worker.py`` on two torchrun "nodes"; returns global rank 0's results."""
    tmp = str(tmp_path)
    out = os.path.join(tmp, "results.pt")
    spec_path = os.path.join(tmp, "spec.json")
    with open(spec_path, "w") as f:
        json.dump({"model_dir": model_dir, "out": out, "tmp": tmp, "runs": runs}, f)
    cmds = [c + [WORKER, spec_path] for c in torchrun_nodes(free_port(), nproc_per_node, rdzv)]
    run_nodes(cmds)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """One process, no distributed backend, global batch 4."""
    ref = run_worker(tmp_path_factory.mktemp("ref"), model_dir, [dict(RUN)], launcher="python")["tensor"]
    betas = torch.tensor(ref["steps"])
    assert betas.shape == (STEPS, 4) and betas[1:, 0].std() > 0, betas  # beta really moves
    return ref


def _diffs(got: dict, ref: dict) -> tuple:
    """(max parameter difference, max difference of any step's beta mean/min/max/restarts)."""
    p = max_param_diff(got["params"], ref["params"])
    b = (torch.tensor(got["steps"]) - torch.tensor(ref["steps"])).abs().max().item()
    return p, b


def _check_same(label: str, got: dict, ref: dict) -> None:
    p, b = _diffs(got, ref)
    print(f"\n{label}: max param diff {p:.3g}, max beta diff {b:.3g}")
    assert_same_training(got, ref)


def _check_ddp(ev: dict, world_size: int = 2) -> None:
    assert ev["world_size"] == world_size and ev["model_wrapped"] == "DistributedDataParallel", ev
    assert not ev["is_deepspeed"] and not ev["dtensor_params"], ev
    assert not ev["process_group_set"], "DDP replicas must not all-reduce the beta sums"


def _check_deepspeed(ev: dict, stage: int, world_size: int = 2) -> None:
    assert ev["is_deepspeed"] and ev["model_wrapped"] == "DeepSpeedEngine", ev
    assert ev["zero_stage"] == stage and ev["engine_world_size"] == world_size, ev
    assert ev["am_class"] == "AMAdamW" and ev["process_group_is_dp_group"], ev
    # scope=tensor: one group per tensor, each keeping the Trainer's weight decay
    assert set(ev["group_sizes"]) == {1} and ev["group_weight_decays"] == [0.0, 0.1], ev


def _check_fsdp2(ev: dict) -> None:
    assert ev["world_size"] == 2 and ev["dtensor_params"] and not ev["is_deepspeed"], ev
    assert ev["model_wrapped"] != "DistributedDataParallel", ev
    assert ev["am_class"] == "AMAdamW", ev


# ---------------------------------------------------------------- the two-node runner itself


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its parent is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("case", ["hang", "one_node_fails"])
def test_run_nodes_kills_both_nodes_and_fails(tmp_path, case):
    """A hang fails after the timeout, a failed node gets the other killed; either way no process of
    either "node" (the launcher nor the worker it started) survives."""
    pid_files = [str(tmp_path / f"node{i}.pid") for i in range(2)]
    # each "node" starts a child, as a launcher does, writes the child's pid and waits on it
    node = "import subprocess, sys, time; c = subprocess.Popen(['sleep', '300']); open(sys.argv[1], 'w').write(str(c.pid)); {}"
    cmds = [[sys.executable, "-c", node.format("c.wait()"), pid_files[0]]]
    cmds.append([sys.executable, "-c", node.format("c.wait()" if case == "hang" else "time.sleep(0.5); sys.exit(3)"), pid_files[1]])
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_nodes(cmds, timeout=3 if case == "hang" else 60, grace=1)
    assert time.monotonic() - start < 30
    assert ("did not finish within 3 s" if case == "hang" else "a node failed, the others were killed") in str(info.value)
    children = [int(open(f).read()) for f in pid_files]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children), children


# ---------------------------------------------------------------- torchrun, two nodes


def test_torchrun_two_nodes_ddp_equals_one_process(model_dir, reference, tmp_path):
    """``torchrun --nnodes 2 --node_rank {0,1} --master_addr 127.0.0.1``, static rendezvous, DDP on gloo."""
    got = run_worker_nodes(tmp_path, model_dir, [dict(RUN, backend="ddp")])["tensor"]
    _check_ddp(got["evidence"])
    _check_same("torchrun 2x1 DDP", got, reference)


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_torchrun_two_nodes_deepspeed_equals_one_process(model_dir, reference, tmp_path, stage):
    """The Trainer's own ``deepspeed=`` config (as ``test_trainer_distributed.py`` for 2 processes), the
    ranks on two torchrun nodes: ZeRO's data-parallel group, over which the AM sums are all-reduced,
    spans the nodes."""
    got = run_worker_nodes(tmp_path, model_dir, [dict(RUN, backend="deepspeed", deepspeed=ds_config(stage))])["tensor"]
    _check_deepspeed(got["evidence"], stage)
    _check_same(f"torchrun 2x1 ZeRO-{stage}", got, reference)


def test_torchrun_two_nodes_fsdp2_equals_one_process(model_dir, reference, tmp_path):
    """FSDP2 through ``from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))``: one shard per node."""
    got = run_worker_nodes(tmp_path, model_dir, [dict(RUN, backend="fsdp2")])["tensor"]
    _check_fsdp2(got["evidence"])
    _check_same("torchrun 2x1 FSDP2", got, reference)


def test_torchrun_two_nodes_of_two_processes_ddp_c10d_rendezvous(model_dir, reference, tmp_path):
    """2 nodes x 2 processes, the SLURM form: the same command on both nodes with
    ``--rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT`` (the rendezvous assigns the node ranks)."""
    got = run_worker_nodes(tmp_path, model_dir, [dict(RUN, backend="ddp")], nproc_per_node=2, rdzv="c10d")["tensor"]
    _check_ddp(got["evidence"], world_size=4)
    _check_same("torchrun 2x2 DDP (c10d)", got, reference)


# ---------------------------------------------------------------- accelerate launch, two machines


def shipped_config_for_cpu(tmp_path, name: str) -> str:
    """A copy of ``accelerate_configs/NAME`` with only what a CPU run needs changed: ``use_cpu: true``
    (else accelerate looks for GPUs) and ``mixed_precision: 'no'`` where it says bf16 (bf16 autocast is
    not the float32 reference). Address, port, machine rank and counts come from the command line, as
    on a cluster; the DeepSpeed JSON path stays relative to the repository root (the cwd)."""
    import yaml

    with open(os.path.join(REPO, "accelerate_configs", name)) as f:
        cfg = yaml.safe_load(f)
    cfg["use_cpu"] = True
    if cfg.get("mixed_precision", "no") != "no":
        cfg["mixed_precision"] = "no"
    path = os.path.join(str(tmp_path), "cpu_" + name)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def run_accelerate_nodes(tmp_path, model_dir: str, config: str) -> dict:
    """``accelerate launch --config_file CONFIG -m hf_am.run trainer_script.py`` (the unmodified script)
    on two machines of one process each; returns rank 0's results."""
    results = os.path.join(str(tmp_path), "results.pt")
    port = free_port()
    cmds = []
    for machine in range(2):
        cmds.append([
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "-m", "hf_am.run", SCRIPT, "--model_dir", model_dir, "--results", results,
            "--output_dir", str(tmp_path / f"out{machine}"),
            "--optim", "am_adamw", "--optim_args", OPTIM_ARGS, "--weight_decay", "0.1",
            "--learning_rate", "5e-3", "--max_steps", str(STEPS), "--per_device_train_batch_size", "2",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--use_cpu", "--disable_tqdm", "true",
        ])  # fmt: skip
    try:
        outputs = run_nodes(cmds)
    except AssertionError as exc:
        # A known upstream race at interpreter exit (gloo worker threads still holding work when the
        # interpreter finalises: std::terminate, SIGABRT; pytorch/pytorch#179291) after training and
        # destroy_process_group() finished. Seen only with DeepSpeed ZeRO-3 under heavy load; run once more.
        if not (os.path.exists(results) and "terminate called without an active exception" in str(exc)):
            raise
        print("\nnode aborted at interpreter exit after writing its results (upstream teardown race); rerunning once")
        os.remove(results)
        outputs = run_nodes(cmds)
    got = torch.load(results, weights_only=False)
    got["output"] = outputs[0]
    return got


def _check_script_run(label: str, got: dict, ref: dict) -> None:
    """Parameters to 1e-6; with ``--logging_steps 1`` every log entry holds that step's beta
    mean/min/max (and the restart count), which must match the reference's steps to 1e-5."""
    p = max_param_diff(got["params"], ref["params"])
    logged = torch.tensor(
        [[h["am_beta"], h["am_beta_min"], h["am_beta_max"], h["am_restarts"]] for h in got["log_history"] if "loss" in h]
    )
    expected = torch.tensor(ref["steps"])
    assert logged.shape == expected.shape, (logged, expected)
    b = (logged - expected).abs().max().item()
    print(f"\n{label}: max param diff {p:.3g}, max beta diff {b:.3g}")
    assert p <= 1e-6, f"parameters differ by {p:.3g}"
    assert b <= 1e-5, (logged, expected)


def test_accelerate_two_machines_ddp_equals_one_process(model_dir, reference, tmp_path):
    """The shipped ``multi_node_ddp.yaml`` on two machines, with the only overrides a CPU run needs:
    ``use_cpu: true`` (no GPUs) and ``mixed_precision: 'no'`` instead of bf16 (float32, as the
    reference); ``--num_machines 2 --num_processes 2 --machine_rank {0,1} --main_process_ip 127.0.0.1
    --main_process_port P`` on the command line."""
    got = run_accelerate_nodes(tmp_path, model_dir, shipped_config_for_cpu(tmp_path, "multi_node_ddp.yaml"))
    _check_ddp(got["evidence"])
    _check_script_run("accelerate 2x1 DDP", got, reference)


@pytest.mark.parametrize("name", ["multi_node_deepspeed_zero2.yaml", "multi_node_fsdp2.yaml"], ids=["zero2", "fsdp2"])
def test_accelerate_two_machines_sharded_configs_equal_one_process(model_dir, reference, tmp_path, name):
    """The shipped ZeRO-2 / FSDP2 multi-node configs (with ``use_cpu: true``, ``mixed_precision: 'no'``) on
    two machines, through ``-m hf_am.run`` with the script's ``--use_cpu``. ZeRO-2 really runs DeepSpeed
    across the two machines (``hf_am.run`` leaves DeepSpeed launches' accelerate state alone: a CPU-only
    state would make accelerate train DDP). accelerate cannot run FSDP on CPU (it selects FSDP only
    among the GPU-like distributed types), so the FSDP2 config trains plain DDP: pinned here; FSDP2
    itself across two nodes is the torchrun test above. Both are exact."""
    got = run_accelerate_nodes(tmp_path, model_dir, shipped_config_for_cpu(tmp_path, name))
    if "deepspeed" in name:
        _check_deepspeed(got["evidence"], 2)
    else:
        _check_ddp(got["evidence"])
    _check_script_run(f"accelerate 2x1 {name}", got, reference)


def test_accelerate_two_machines_zero3_config_on_cpu_is_never_silently_wrong(model_dir, reference, tmp_path):
    """The shipped ZeRO-3 multi-node config on CPU (``use_cpu: true``). Since ``hf_am.run`` leaves a
    DeepSpeed launch's accelerate state alone, accelerate runs DeepSpeed ZeRO-3 here, which must then be
    exact. Before that, accelerate's CPU state trained DDP on parameters ``deepspeed.zero.Init`` had
    partitioned to empty tensors and the first forward stopped ("'weight' must be 2-D", accelerate 1.15 /
    transformers 5.24): that loud failure, before any result is written, is still accepted; a silent
    wrong result is not. ZeRO-3 across two nodes is also tested through torchrun above."""
    try:
        got = run_accelerate_nodes(tmp_path, model_dir, shipped_config_for_cpu(tmp_path, "multi_node_deepspeed_zero3.yaml"))
    except AssertionError as exc:
        assert "'weight' must be 2-D" in str(exc), str(exc)[-3000:]
        assert not os.path.exists(os.path.join(str(tmp_path), "results.pt"))
        return
    ev = got["evidence"]
    assert ev["world_size"] == 2 and ev["zero_stage"] == 3, ev  # the engine the yaml asks for, not DDP
    _check_script_run("accelerate 2x1 ZeRO-3 yaml", got, reference)
