"""``--optim am_adamw`` / ``am_sgd`` with a real ``transformers.Trainer`` in one process.

Registration and ``--optim_args`` parsing run in this process; trainings run in a
fresh subprocess each (``tests/integrations/workers/trainer_worker.py``), on a tiny
``LlamaForCausalLM`` and local random tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
from trainer_harness import REPO, SCRIPT, run_command, run_worker, subprocess_env  # noqa: E402

import hf_am  # noqa: E402
from hf_am.integrations import callback, trainer as integration  # noqa: E402
from hf_am.integrations.deepspeed import arrange_param_groups_for_deepspeed  # noqa: E402
from hf_am.integrations.optim_args import parse_optim_args  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Trainers built in this process leave accelerate's singletons behind; clear them for later tests."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_model():
    from transformers import LlamaForCausalLM
    from trainer_common import tiny_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config())


# ------------------------------------------------------------------------- registration
def test_import_registers_lazily_without_importing_the_trainer():
    code = (
        "import sys, hf_am\n"
        "assert 'transformers.trainer' not in sys.modules, 'import hf_am must not import the Trainer'\n"
        "from transformers import HfArgumentParser, Trainer, TrainingArguments\n"
        "import transformers.trainer as t\n"
        "from transformers.training_args import OptimizerNames\n"
        "assert OptimizerNames('am_adamw').value == 'am_adamw' and OptimizerNames.AM_SGD.value == 'am_sgd'\n"
        "assert [c.__name__ for c in t.DEFAULT_CALLBACKS].count('AMTrainerCallback') == 1\n"
        "a, = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(['--optim', 'am_adamw'])\n"
        "cls, kw = Trainer.get_optimizer_cls_and_kwargs(a)\n"
        "print('OK', cls.__name__, sorted(kw))\n"
    )
    out = run_command([sys.executable, "-c", code], timeout=120)
    assert "OK AMAdamWForTrainer ['betas', 'eps', 'lr', 'weight_decay']" in out, out


def test_register_is_idempotent_and_keeps_other_optimizers(tmp_path):
    from transformers import HfArgumentParser, Trainer, TrainingArguments
    import transformers.trainer as trainer_module
    from transformers.training_args import OptimizerNames

    n_members = len(OptimizerNames)
    assert integration.register() is True and integration.register() is True
    assert len(OptimizerNames) == n_members
    assert trainer_module.DEFAULT_CALLBACKS.count(integration.AMTrainerCallback) == 1
    assert OptimizerNames("am_adamw") is OptimizerNames.AM_ADAMW and "am_sgd" in [m.value for m in OptimizerNames]

    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--optim", "am_sgd", "--output_dir", str(tmp_path)])
    assert args.optim == "am_sgd"
    with pytest.raises(SystemExit):  # argparse still rejects unknown names
        parser.parse_args_into_dataclasses(["--optim", "am_adamx", "--output_dir", str(tmp_path)])

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(str(tmp_path), optim="adamw_torch"))
    assert cls is torch.optim.AdamW and "hf_am_deepspeed" not in kwargs


# ----------------------------------------------------------------------------- optim_args
def test_parse_optim_args_types():
    got = parse_optim_args("am_adamw", " lam=1, scope=group ,restart_threshold=None,foreach=false,beta_min=0 ")
    assert got == {"lam": 1.0, "scope": "group", "restart_threshold": None, "foreach": False, "beta_min": 0.0}
    assert isinstance(got["lam"], float) and isinstance(got["beta_min"], float)
    assert parse_optim_args("am_sgd", "momentum=0.8,restart_threshold=0.3,foreach=True,loss_estimate=linear") == {
        "momentum": 0.8,
        "restart_threshold": 0.3,
        "foreach": True,
        "loss_estimate": "linear",
    }
    assert parse_optim_args("am_adamw", None) == {} and parse_optim_args("am_adamw", "") == {}


@pytest.mark.parametrize(
    "optim,text,expected",
    [
        ("am_adamw", "foo=1", ["unknown key 'foo'", "Allowed keys: lam"]),
        ("am_adamw", "momentum=0.9", ["unknown key 'momentum'", "restart_threshold"]),
        ("am_adamw", "lr=0.1", ["unknown key 'lr'", "--learning_rate"]),
        ("am_adamw", "betas=0.9", ["--adam_beta1"]),
        ("am_adamw", "weight_decay=0.1", ["--weight_decay"]),
        ("am_adamw", "scope=layer", ["bad value 'layer' for 'scope'", "'model', 'group', 'tensor'"]),
        ("am_adamw", "lam=-1", ["bad value '-1' for 'lam'", "lam >= 0"]),
        ("am_adamw", "lam=abc", ["bad value 'abc' for 'lam'"]),
        ("am_adamw", "beta_min=nan", ["bad value 'nan' for 'beta_min'"]),
        ("am_adamw", "restart_threshold=0", ["bad value '0' for 'restart_threshold'", "None or 0 < restart_threshold <= 1"]),
        ("am_adamw", "loss_estimate=exact", ["bad value 'exact'", "without a loss closure"]),
        ("am_adamw", "foreach=maybe", ["bad value 'maybe' for 'foreach'"]),
        ("am_sgd", "momentum=0.8,beta_min=0.85", ["bad value '0.85' for 'beta_min'", "beta_max = 0.8"]),
        ("am_adamw", "lam", ["malformed item 'lam'", "key=value"]),
        ("am_adamw", "lam=0.1,lam=0.2", ["key 'lam' given twice"]),
        ("am_sgd", "momentum=1.0", ["bad value '1.0' for 'momentum'", "0 <= beta_max < 1"]),
    ],
)
def test_parse_optim_args_errors(optim, text, expected):
    with pytest.raises(ValueError) as info:
        parse_optim_args(optim, text)
    message = str(info.value)
    assert f"--optim {optim}" in message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("optim", ["am_adamw", "am_sgd"])
def test_optim_args_accept_exactly_what_the_constructor_accepts(optim):
    """The --optim_args checks are the constructor's rules: every value either both accept or both refuse."""
    import hf_am

    cls = {"am_adamw": hf_am.AMAdamW, "am_sgd": hf_am.AMSGD}[optim]
    values = {
        "lam": ["0", "0.5", "-0.1", "abc"],
        "beta_min": ["0", "0.9", "0.95", "-0.1"],
        "restart_threshold": ["None", "0.5", "1", "0", "1.5"],
        "foreach": ["true", "false", "None", "maybe"],
        "scope": ["model", "group", "tensor", "layer"],
    }
    for key, texts in values.items():
        for text in texts:
            try:
                kwargs = parse_optim_args(optim, f"{key}={text}")
                parsed = True
            except ValueError:
                parsed = False
            try:
                value = {"None": None, "true": True, "false": False}.get(text, text)
                value = float(value) if key not in ("scope", "foreach") and isinstance(value, str) and value.replace(".", "").replace("-", "").isdigit() else value
                cls([torch.nn.Parameter(torch.zeros(2))], **{key: value})
                built = True
            except (ValueError, TypeError):
                built = False
            assert parsed == built, (key, text, parsed, built)
            if parsed:
                assert kwargs[key] == value


def test_bad_optim_args_fail_when_the_arguments_are_built(tmp_path):
    """Before a script loads any data: TrainingArguments itself refuses, and so does the parser."""
    from transformers import HfArgumentParser, TrainingArguments

    with pytest.raises(ValueError, match="bad value 'layer' for 'scope'"):
        TrainingArguments(str(tmp_path), optim="am_adamw", optim_args="scope=layer", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="bad value '-1' for 'lam'"):
        TrainingArguments(str(tmp_path), optim="am_sgd", optim_args="lam=-1", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=r"bad value '0.95' for 'beta_min'.*beta_max = 0.9"):  # checked against --adam_beta1
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "am_adamw", "--optim_args", "beta_min=0.95", "--use_cpu"]
        )
    args = TrainingArguments(str(tmp_path), optim="am_adamw", optim_args="beta_min=0.95", adam_beta1=0.99, use_cpu=True)
    assert args.optim_args == "beta_min=0.95"
    TrainingArguments(str(tmp_path), optim="adamw_torch", optim_args="anything=goes", use_cpu=True)  # not ours


# ---------------------------------------------------------------- what the Trainer builds
def test_trainer_flags_and_decay_split_reach_am_adamw(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        str(tmp_path), optim="am_adamw", learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
        weight_decay=0.05, optim_args="lam=0.3,beta_min=0.1,restart_threshold=0.5,scope=group",
        use_cpu=True, report_to=[],
    )  # fmt: skip
    trainer = Trainer(model=tiny_model(), args=args)
    opt = trainer.create_optimizer()
    assert type(opt) is hf_am.AMAdamW and opt.scope == "group" and opt.process_group is None
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert len(opt.param_groups) == 2
    for group in opt.param_groups:
        in_decay = {names[id(p)] in decay for p in group["params"]}
        assert in_decay == ({True} if group["weight_decay"] == 0.05 else {False}), group["weight_decay"]
        assert group["lr"] == 3e-3 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
        assert (group["lam"], group["beta_min"], group["restart_threshold"]) == (0.3, 0.1, 0.5)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}


def test_am_sgd_defaults_and_momentum(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(tmp_path), optim="am_sgd", optim_args="momentum=0.8", learning_rate=0.1, use_cpu=True, report_to=[])
    opt = Trainer(model=tiny_model(), args=args).create_optimizer()
    assert type(opt) is hf_am.AMSGD and opt.scope == "model"
    assert all(g["momentum"] == 0.8 and g["lr"] == 0.1 and g["lam"] == 0.1 for g in opt.param_groups)


def test_arrange_param_groups_for_deepspeed():
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (2, 3, 4))
    groups = [{"params": [a, b], "weight_decay": 0.1}, {"params": [c], "weight_decay": 0.0}, {"params": [], "weight_decay": 0.0}]
    per_tensor = arrange_param_groups_for_deepspeed(groups, "tensor")
    assert [(g["params"], g["weight_decay"]) for g in per_tensor] == [([a], 0.1), ([b], 0.1), ([c], 0.0)]
    assert [len(g["params"]) for g in arrange_param_groups_for_deepspeed(groups, "group")] == [2, 1]
    same = [{"params": [a, b], "weight_decay": 0.0}, {"params": [c], "weight_decay": 0.0}]
    merged = arrange_param_groups_for_deepspeed(same, "model")
    assert len(merged) == 1 and merged[0]["params"] == [a, b, c] and merged[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError) as info:
        arrange_param_groups_for_deepspeed(groups, "model")
    assert "weight_decay=0.1" in str(info.value) and "weight_decay=0.0" in str(info.value)
    assert "scope=tensor" in str(info.value) and "--weight_decay 0" in str(info.value)
    with pytest.raises(ValueError, match="Invalid scope: 'layer'"):
        arrange_param_groups_for_deepspeed(groups, "layer")


# ----------------------------------------------------------------------------- training
def _pinned_runs():
    """AM with the coefficient pinned (lam=0, beta_min=beta_max) must be exactly AdamW / SGD through every
    Trainer feature: float64 parameters make the comparison exact."""
    combos = {
        "accum_clip_cosine_warmup": {"gradient_accumulation_steps": 2, "max_grad_norm": 0.5, "lr_scheduler_type": "cosine", "warmup_steps": 2},
        "linear_no_warmup_no_clip": {"max_grad_norm": 0.0, "lr_scheduler_type": "linear"},
        "constant_with_warmup": {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 3, "max_grad_norm": 1.0},
    }
    runs = []
    for name, extra in combos.items():
        runs.append({"name": f"am_{name}", "dtype": "float64", "args": {**extra, "optim_args": "lam=0,beta_min=0.9"}})
        runs.append({"name": f"torch_{name}", "dtype": "float64", "args": {**extra, "optim": "adamw_torch"}})
    sgd = {"gradient_accumulation_steps": 2, "lr_scheduler_type": "linear", "warmup_steps": 2, "learning_rate": 0.05}
    runs.append({"name": "am_sgd", "dtype": "float64", "args": {**sgd, "optim": "am_sgd", "optim_args": "lam=0,beta_min=0.9,momentum=0.9"}})
    runs.append({"name": "torch_sgd", "dtype": "float64", "torch_sgd": {"momentum": 0.9, "dampening": 0.9}, "args": {**sgd, "optim": "sgd"}})
    return runs


def test_pinned_am_equals_torch_through_trainer_features(model_dir, tmp_path):
    got = run_worker(tmp_path, model_dir, _pinned_runs(), launcher="python")
    for name in [n for n in got if n.startswith("am_")]:
        am, ref = got[name], got["torch_" + name[3:]] if name != "am_sgd" else got["torch_sgd"]
        assert am["evidence"]["am_class"] in ("AMAdamW", "AMSGD")
        assert ref["evidence"]["am_class"] is None
        for key in am["params"]:
            assert torch.allclose(am["params"][key], ref["params"][key], rtol=0, atol=1e-12), (name, key)
        am_lr = [h["learning_rate"] for h in am["log_history"] if "loss" in h]
        assert am_lr == [h["learning_rate"] for h in ref["log_history"] if "loss" in h]
        assert all(abs(s[0] - 0.9) < 1e-6 for s in am["steps"])
    # the runs differ from one another (the schedule/clipping/accumulation flags were applied)
    assert not torch.equal(
        got["am_accum_clip_cosine_warmup"]["params"]["lm_head.weight"],
        got["am_linear_no_warmup_no_clip"]["params"]["lm_head.weight"],
    )


def test_logged_beta_statistics_match_the_optimizer(model_dir, tmp_path):
    run = {"name": "log", "steps": 6, "args": {"optim_args": "restart_threshold=0.7", "logging_steps": 3}}
    got = run_worker(tmp_path, model_dir, [run], launcher="python")["log"]
    steps = torch.tensor(got["steps"], dtype=torch.float64)  # [mean, min, max, restarts] read after every step
    logged = [h for h in got["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [3, 6]
    for entry, window in zip(logged, (slice(0, 3), slice(3, 6))):
        assert set(callback.LOG_KEYS) <= entry.keys()
        assert entry["am_beta"] == pytest.approx(steps[window, 0].mean().item(), abs=1e-6)
        assert entry["am_beta_min"] == pytest.approx(steps[window, 1].min().item(), abs=1e-7)
        assert entry["am_beta_max"] == pytest.approx(steps[window, 2].max().item(), abs=1e-7)
        assert entry["am_restarts"] == int(steps[window.stop - 1, 3])
    assert logged[-1]["am_restarts"] > 0, "restart_threshold=0.7 should restart"
    # callbacks after hf_am's (as the report_to integrations are) receive the same keys
    seen = [log for log in got["callback_logs"] if "loss" in log]
    assert [{k: log[k] for k in callback.LOG_KEYS} for log in seen] == [
        {k: h[k] for k in callback.LOG_KEYS} for h in logged
    ]
    order = got["callback_order"]
    assert order.index("AMTrainerCallback") < order.index("Recorder")
    # the train summary entry and non-AM runs get nothing
    assert "am_beta" not in got["log_history"][-1]


def test_bf16_training(model_dir, tmp_path):
    runs = [
        {"name": "bf16", "args": {"bf16": True, "optim_args": "lam=0.1"}},
        {"name": "fp32", "args": {"optim_args": "lam=0.1"}},
    ]
    got = run_worker(tmp_path, model_dir, runs, launcher="python")
    bf16, fp32 = got["bf16"], got["fp32"]
    assert all(torch.isfinite(p).all() for p in bf16["params"].values())
    betas = torch.tensor(bf16["steps"])
    assert (betas[:, 1] >= 0).all() and (betas[:, 2] <= 0.9 + 1e-6).all() and betas[1:, 0].std() > 0
    assert all("am_beta" in h for h in bf16["log_history"] if "loss" in h)
    losses = lambda r: [h["loss"] for h in r["log_history"] if "loss" in h]  # noqa: E731
    assert losses(bf16) != losses(fp32), "bf16 autocast did not engage"
    assert max((bf16["params"][k] - fp32["params"][k]).abs().max().item() for k in fp32["params"]) < 5e-2


def test_resume_from_checkpoint_is_bit_for_bit(model_dir, tmp_path):
    """Stop after step 3 of 6 (cosine schedule with warmup, so the previous lr matters), resume in a fresh Trainer."""
    run = {
        "name": "resume",
        "resume_from": 3,
        "save_optimizer_state": True,
        "args": {"optim_args": "lam=0.1,restart_threshold=0.6", "lr_scheduler_type": "cosine", "warmup_steps": 2},
    }
    got = run_worker(tmp_path, model_dir, [run], launcher="python")["resume"]
    full, resumed = got["uninterrupted"], got["resumed"]
    for name in full["params"]:
        assert torch.equal(full["params"][name], resumed["params"][name]), name
    assert resumed["steps"] == full["steps"][3:] and resumed["per_scope"] == full["per_scope"][3:]
    # what made it exact: the AM scalar state and the previous lr are in the checkpoint
    ckpt = torch.load(tmp_path / "resume" / "checkpoint-3" / "optimizer.pt", weights_only=False)
    assert all("am_prev_lr" in g for g in ckpt["param_groups"])
    assert all({"am_prod", "am_beta", "am_restarts"} <= s.keys() for s in ckpt["state"].values())


def test_an_adamw_run_resumes_as_am_adamw(model_dir, tmp_path):
    """--resume_from_checkpoint of an adamw_torch run with --optim am_adamw: the AdamW moments, step
    counts and bias correction carry over (pinned AM-AdamW then equals AdamW going on), and the
    resumed run really trains with AM-AdamW."""
    run = {
        "name": "switch",
        "resume_from": 3,
        "args": {"optim": "adamw_torch", "lr_scheduler_type": "cosine", "warmup_steps": 2},
        "resume_args": {"optim": "am_adamw", "optim_args": "lam=0,beta_min=0.9"},
    }
    got = run_worker(tmp_path, model_dir, [run], launcher="python")["switch"]
    full, resumed = got["uninterrupted"], got["resumed"]
    assert resumed["evidence"]["am_class"] == "AMAdamW" and full["steps"] == []
    assert len(resumed["steps"]) == 3 and all(abs(s[0] - 0.9) < 1e-6 for s in resumed["steps"])
    diff = max((full["params"][k] - resumed["params"][k]).abs().max().item() for k in full["params"])
    assert diff <= 1e-6, diff


# --------------------------------------------------------------------------- hf_am.run
def _script_args(model_dir, tmp_path, *extra):
    return [
        "--model_dir", model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def test_unmodified_script_needs_hf_am_run(model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, *_script_args(model_dir, tmp_path, "--optim", "am_adamw")],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "invalid choice: 'am_adamw'" in proc.stderr, proc.stderr[-2000:]

    out = run_command(
        [sys.executable, "-m", "hf_am.run", SCRIPT,
         *_script_args(model_dir, tmp_path, "--optim", "am_adamw", "--optim_args", "lam=0.2,scope=model")],
        timeout=180,
    )  # fmt: skip
    assert "TRAINED_WITH ['AcceleratedOptimizer', 'AMAdamW']" in out, out[-3000:]
    assert "'am_beta'" in out  # the Trainer's console log line carries the statistics


def test_console_script_entry_point_runs_a_module(model_dir, tmp_path):
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["hf-am-run"] == "hf_am.run:main"
    # what the installed ``hf-am-run`` does: call hf_am.run:main with sys.argv (here the ``-m module`` form)
    code = "import sys; from hf_am.run import main; sys.argv[0] = 'hf-am-run'; sys.exit(main())"
    out = run_command(
        [sys.executable, "-c", code, "-m", "trainer_script",
         *_script_args(model_dir, tmp_path, "--optim", "am_sgd", "--learning_rate", "0.05")],
        timeout=180, cwd=os.path.join(REPO, "tests", "integrations", "workers"),
    )  # fmt: skip
    assert "TRAINED_WITH ['AcceleratedOptimizer', 'AMSGD']" in out, out[-3000:]


def test_run_usage_and_missing_script():
    proc = subprocess.run([sys.executable, "-m", "hf_am.run"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "python -m hf_am.run script.py" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "hf_am.run", "no_such_script.py"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "no such script: 'no_such_script.py'" in proc.stderr
