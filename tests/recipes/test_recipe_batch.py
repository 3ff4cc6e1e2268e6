"""The recipe's batch arithmetic (``plan_batch``): global batch, tokens per step and gradient
accumulation for every launch, including one process driving several GPUs, where the
Trainer wraps the model in ``nn.DataParallel`` and loads ``per_device x n_gpu`` sequences
per micro-batch."""

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import TrainingArguments  # noqa: E402

import pretrain_llama_c4 as recipe  # noqa: E402  (recipes/ is on pytest's pythonpath)


def test_single_process_cpu():
    plan = recipe.plan_batch(4, world_size=1, n_gpu=0, seq_len=256, global_batch_size=8)
    assert plan.gradient_accumulation_steps == 2
    assert plan.global_batch == 8 and plan.tokens_per_step == 8 * 256
    assert plan.data_parallel_size == 1 and plan.launch == "single"


@pytest.mark.parametrize("per_device, n_gpu, accum", [(64, 8, 1), (32, 8, 2), (16, 8, 4), (64, 2, 4), (16, 4, 8)])
def test_one_process_many_gpus_counts_dataparallel(per_device, n_gpu, accum):
    # before: accumulation = 512 / (per_device x world_size 1), so 8 GPUs trained on 8 x 512
    plan = recipe.plan_batch(per_device, world_size=1, n_gpu=n_gpu, seq_len=256, global_batch_size=512)
    assert plan.gradient_accumulation_steps == accum
    assert plan.micro_batch_per_process == per_device * n_gpu
    assert plan.global_batch == 512 and plan.tokens_per_step == 512 * 256
    assert plan.data_parallel_size == n_gpu and plan.launch == "dataparallel"


@pytest.mark.parametrize("per_device, world, accum", [(64, 8, 1), (16, 8, 4), (16, 16, 2), (4, 2, 1)])
def test_distributed_one_gpu_per_process(per_device, world, accum):
    plan = recipe.plan_batch(per_device, world_size=world, n_gpu=1, seq_len=256, global_batch_size=512 if world > 2 else 8)
    assert plan.gradient_accumulation_steps == accum
    assert plan.global_batch == (512 if world > 2 else 8)
    assert plan.data_parallel_size == world and plan.launch == "distributed"


def test_micro_batch_is_what_the_trainer_loads():
    # the Trainer's own per-process batch (its DataParallel case) is the plan's micro-batch
    for per_device, n_gpu in [(64, 8), (16, 4), (4, 0), (4, 1)]:
        args = SimpleNamespace(per_device_train_batch_size=per_device, n_gpu=n_gpu)
        trainer_batch = TrainingArguments.train_batch_size.fget(args)
        plan = recipe.plan_batch(per_device, world_size=1, n_gpu=n_gpu, seq_len=256)
        assert plan.micro_batch_per_process == trainer_batch


def test_no_global_batch_keeps_the_accumulation_and_counts_every_replica():
    plan = recipe.plan_batch(8, world_size=2, n_gpu=1, seq_len=128, gradient_accumulation_steps=3)
    assert plan.gradient_accumulation_steps == 3 and plan.global_batch == 8 * 2 * 3
    dp = recipe.plan_batch(8, world_size=1, n_gpu=4, seq_len=128, gradient_accumulation_steps=3)
    assert dp.global_batch == 8 * 4 * 3 and dp.tokens_per_step == 8 * 4 * 3 * 128


def test_mismatches_are_refused():
    with pytest.raises(ValueError, match="192"):  # 64 x 3 GPUs does not divide 512
        recipe.plan_batch(64, world_size=1, n_gpu=3, seq_len=256, global_batch_size=512)
    with pytest.raises(ValueError, match="contradicts"):
        recipe.plan_batch(16, world_size=1, n_gpu=8, seq_len=256, global_batch_size=512,
                          gradient_accumulation_steps=32, accumulation_given=True)
    ok = recipe.plan_batch(16, world_size=1, n_gpu=8, seq_len=256, global_batch_size=512,
                           gradient_accumulation_steps=4, accumulation_given=True)
    assert ok.gradient_accumulation_steps == 4


def test_flag_given_sees_both_spellings():
    assert recipe._flag_given(["--gradient_accumulation_steps", "4"], "--gradient_accumulation_steps")
    assert recipe._flag_given(["--gradient_accumulation_steps=4"], "--gradient_accumulation_steps")
    assert not recipe._flag_given(["--gradient_accumulation_steps_x", "4"], "--gradient_accumulation_steps")
