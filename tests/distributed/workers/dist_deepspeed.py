"""Worker: real DeepSpeed ZeRO 1/2/3 engines with an AM client optimizer (launched by torchrun).

Each argument is a case ``<stage>:<adamw|sgd>:<scope>:<one|two|per_tensor>[:<flag>...]``;
flags: ``sub=N`` (ZeRO-3 ``sub_group_size``), ``poison`` (fill the ZeRO-3
padding slots of the fp32 partitions with NaN after attaching, to stand for
the uninitialised memory there, e.g. restored by a checkpoint load),
``nozero`` (the negative control: remove the hook that zeroes them),
``accelerate`` (also attach through accelerate's wrappers), ``hfattach`` (attach
through ``hf_am.attach``), ``noattach`` (no attach at all: the first step must refuse).
Every case builds a fresh model, engine and optimizer, trains a few steps on
each rank's half of every global batch (fp32, ``gradient_clipping=0``) and
compares with the 1-process run; a case whose ``attach_to_deepspeed`` raises
reports the error.
"""

from __future__ import annotations

import sys

import torch

import dist_common as dc
from helpers import deepspeed_config, max_param_diff

STEPS = 4


def ds_config(stage: int, sub_group_size=None) -> dict:
    zero = {}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition even these tiny tensors
        if sub_group_size is not None:
            zero["sub_group_size"] = sub_group_size
    return deepspeed_config(stage, micro_batch=8, **zero)


def run_case(rank, world, case):
    import deepspeed

    from hf_am.integrations.deepspeed import _zero3_padding_spans, attach_to_deepspeed

    stage, name, scope, kind, *flags = case.split(":")
    stage = int(stage)
    sub = next((int(f[4:]) for f in flags if f.startswith("sub=")), None)
    model = dc.make_model()
    opt = dc.make_optimizer(name, dc.grouping(kind, model.named_parameters()), scope)
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, sub))
    zero_opt = engine.optimizer
    if "noattach" in flags:  # no attach_to_deepspeed: the first step must refuse, changing nothing
        assert opt.process_group is None
        before = [p.detach().clone() for p in zero_opt.single_partition_of_fp32_groups] if stage < 3 else []
        x, y = dc.global_batches(1)[0]
        half = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        engine.backward(dc.loss_fn(engine, x[half], y[half]))
        try:
            engine.step()
        except RuntimeError as exc:
            unchanged = all(torch.equal(a, b) for a, b in zip(before, zero_opt.single_partition_of_fp32_groups))
            return {"error": f"RuntimeError: {exc}", "unchanged": unchanged, "state": len(opt.state)}
        return {"error": None}
    elif "hfattach" in flags:  # the public helper users call in custom loops
        import hf_am

        am = hf_am.attach(engine)
        assert am is opt and am.process_group is zero_opt.dp_process_group
    else:
        try:
            am = attach_to_deepspeed(engine)
        except ValueError as exc:
            return {"error": f"ValueError: {exc}"}
        assert attach_to_deepspeed(ds_opt) is am  # idempotent, and finds it through the ZeRO optimizer too
        assert am is opt and am.process_group is zero_opt.dp_process_group
    if "accelerate" in flags:  # what accelerate.prepare() hands the Trainer
        from accelerate.utils.deepspeed import DeepSpeedEngineWrapper, DeepSpeedOptimizerWrapper

        # DeepSpeedOptimizerWrapper.__init__ needs an Accelerator(); the Trainer tests cover that path.
        # Here: the real class, holding the ZeRO optimizer where accelerate puts it.
        wrapped = DeepSpeedOptimizerWrapper.__new__(DeepSpeedOptimizerWrapper)
        wrapped.optimizer = ds_opt
        assert attach_to_deepspeed(wrapped) is am
        assert attach_to_deepspeed(DeepSpeedEngineWrapper(engine)) is am
        assert attach_to_deepspeed(am) is am  # the bare optimizer later: keeps the attachment
        assert len(am._hf_am_deepspeed["hooks"]) == (3 if stage == 3 else 0)  # attached once, not stacked
    padding = 0
    if stage == 3:
        spans = _zero3_padding_spans(zero_opt)
        padding = sum(e - s for _, sp in spans for s, e in sp)
        if "nozero" in flags:  # negative control: drop the hook that zeroes the padding before each step
            hooks = am._hf_am_deepspeed["hooks"]
            assert len(hooks) == 3
            hooks[1].remove()
        if "poison" in flags:  # after attach: the per-step hook (not the one-off zeroing) must clean them
            with torch.no_grad():
                for flat, sp in spans:
                    for s, e in sp:
                        flat[s:e] = float("nan")

    params_hist, betas_hist = [], []
    for x, y in dc.global_batches(STEPS):
        half = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss = dc.loss_fn(engine, x[half], y[half])
        engine.backward(loss)
        engine.step()
        if stage == 3:
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                params_hist.append([p.detach().clone() for p in model.parameters()])
        else:
            params_hist.append([p.detach().clone() for p in model.parameters()])
        betas_hist.append(am.betas_per_scope().tolist())
        dc.decay_lr(am)
    ref_params, ref_betas = dc.reference_run(name, scope, kind, STEPS)
    diff = max(max_param_diff(a, b) for a, b in zip(params_hist, ref_params))
    return {
        "error": None,
        "max_param_diff": diff if diff == diff else float("inf"),  # NaN -> inf (JSON, comparisons)
        "betas": [[b if b == b else -1.0 for b in step] for step in betas_hist],
        "ref_betas": ref_betas,
        "padding": padding,
        "sub_groups": len(getattr(zero_opt, "fp16_groups", [])) if stage == 3 else None,
    }


def main():
    rank, world = dc.init()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    result = {}
    with dc.exit_on_error():
        for case in sys.argv[1:]:
            result[case] = run_case(rank, world, case)
    dc.finish(result)


if __name__ == "__main__":
    main()
