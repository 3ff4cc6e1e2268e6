"""Worker: a checkpoint written on one world size, resumed on another (issue 13).

Launched by ``tests/reshard/test_reshard.py`` through ``dist_common.launch`` on 1 or 2
ranks.  Every argument is one phase, run in order in this launch:

``fsdp2-save=<dir>``            FSDP2 (``fully_shard`` on a 1-D CPU mesh of this world size):
                                train ``STEPS1`` steps, then ``dcp.save`` the model and
                                optimizer state dicts (``torch.distributed.checkpoint.state_dict``)
                                into ``<dir>/<case>``.
``fsdp2-resume=<dir>``          the same model and optimizer on this world size, ``dcp.load`` +
                                ``set_state_dict`` from ``<dir>/<case>``, ``STEPS2`` more steps.
                                Also the negative control: the same resume with the model state
                                only (the AM state starts afresh), which must differ.
``ds-save=<dir>:<stage>``       DeepSpeed ZeRO-<stage>: train ``STEPS1`` steps,
                                ``engine.save_checkpoint(<dir>/<case>, tag="saved")``; rank 0
                                then converts it with ``hf_am.integrations.deepspeed.to_universal``
                                (tag ``saved_universal``) and with DeepSpeed's own
                                ``ds_to_universal`` alone (tag ``ds_only_universal``).
``ds-resume=<dir>:<stage>``     ``"checkpoint": {"load_universal": true}``, ``engine.load_checkpoint``
                                of ``saved_universal``, ``STEPS2`` more steps; then the clear errors:
                                the plain checkpoint on this (other) world size, and the
                                ``ds_only_universal`` conversion that lost the AM scalars.

Each rank trains on its slice of the same global batches, so a resumed run must equal the
uninterrupted 1-process run (computed here too, with no collective) of ``STEPS1 + STEPS2``
steps: parameters to 1e-6, every step's betas to 1e-5, and the AM state right after the load
must equal that run's state after ``STEPS1`` steps.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import dist_common as dc
from helpers import deepspeed_config, max_param_diff

STEPS1, STEPS2 = 3, 3
OUT = 1  # last layer (1, 5): on 2 ranks FSDP2 gives rank 1 an empty shard of it
FSDP2_CASES = ["adamw:tensor:two", "sgd:group:two", "sgd:model:one:exact"]  # <optimizer>:<scope>:<grouping>[:exact]


# ------------------------------------------------------------------ the uninterrupted 1-process run
def parse(case):
    """``(name, scope, kind, loss_estimate)`` of a case string."""
    name, scope, kind, *rest = case.split(":")
    return name, scope, kind, (rest[0] if rest else "linear")


def batches(loss_estimate, out_features=OUT):
    """The global batches of the whole run (the exact loss difference needs full-batch training)."""
    return dc.global_batches(STEPS1 + STEPS2, out_features=out_features, same=loss_estimate == "exact")


def step(opt, model, x, y, world=1):
    """One step through a closure; on several ranks the closure returns the global batch's loss
    (the mean of the ranks' equal slices), which ``loss_estimate="exact"`` compares across steps."""
    def closure():
        opt.zero_grad()
        loss = dc.loss_fn(model, x, y)
        loss.backward()
        if world > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        return loss

    opt.step(closure)


def reference(name, scope, kind, loss_estimate, out_features):
    """Parameters and betas after every one of ``STEPS1 + STEPS2`` steps, and the whole optimizer state
    (``{param index: {key: tensor}}``) after ``STEPS1`` steps (what a resume must start from)."""
    model = dc.make_model(out_features=out_features)
    opt = dc.make_optimizer(name, dc.grouping(kind, model.named_parameters()), scope, loss_estimate=loss_estimate)
    params_hist, betas_hist, saved_state = [], [], None
    index = {id(p): i for i, p in enumerate(model.parameters())}
    with dc.CollectiveCounter() as counter:
        for i, (x, y) in enumerate(batches(loss_estimate, out_features)):
            step(opt, model, x, y)
            params_hist.append([p.detach().clone() for p in model.parameters()])
            betas_hist.append(opt.betas_per_scope().tolist())
            dc.decay_lr(opt)
            if i + 1 == STEPS1:
                saved_state = {index[id(p)]: {k: v.detach().clone() for k, v in s.items()} for p, s in opt.state.items()}
    assert counter.total == 0, counter.calls
    return params_hist, betas_hist, saved_state


def state_diff(got, want):
    """Largest difference between two ``{param index: {key: tensor}}`` states; keys must agree."""
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    worst = 0.0
    for i in want:
        assert got[i].keys() == want[i].keys(), (i, sorted(got[i]), sorted(want[i]))
        for k in want[i]:
            a, b = got[i][k].double().reshape(-1), want[i][k].double().reshape(-1)
            assert a.shape == b.shape, (i, k, a.shape, b.shape)
            worst = max(worst, (a - b).abs().max().item() if a.numel() else 0.0)
    return worst


def am_scalars_nontrivial(state) -> bool:
    """The AM state is not a fresh one: some am_prod/am_beta differs from its initial value."""
    return any(float(s["am_beta"]) != 0.0 for s in state.values())


def slice_of(x, rank, world):
    return x[rank * len(x) // world: (rank + 1) * len(x) // world]


# ------------------------------------------------------------------------------------- FSDP2
def fsdp2_build(name, scope, kind, loss_estimate, mesh):
    from torch.distributed.fsdp import fully_shard

    model = dc.make_model(out_features=OUT)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = dc.make_optimizer(name, dc.grouping(kind, model.named_parameters()), scope, loss_estimate=loss_estimate)
    return model, opt


def fsdp2_train(model, opt, rank, world, batches):
    params_hist, betas_hist = [], []
    for x, y in batches:
        step(opt, model, slice_of(x, rank, world), slice_of(y, rank, world), world)
        params_hist.append([p.full_tensor().detach().clone() for p in model.parameters()])
        betas_hist.append(opt.betas_per_scope().tolist())
        dc.decay_lr(opt)
    return params_hist, betas_hist


def full_state(model, opt):
    """The optimizer state as whole tensors, ``{param index: {key: tensor}}`` (DTensors gathered)."""
    out = {}
    for i, p in enumerate(model.parameters()):
        if p in opt.state:
            out[i] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in opt.state[p].items()}
    return out


def fsdp2_save(rank, world, root, mesh):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    result = {}
    for case in FSDP2_CASES:
        model, opt = fsdp2_build(*parse(case), mesh)
        fsdp2_train(model, opt, rank, world, batches(parse(case)[3])[:STEPS1])
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=str(Path(root) / case.replace(":", "_")))
        result[case] = {"saved_by": world}
    return result


def fsdp2_resume(rank, world, root, mesh):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    result = {}
    for case in FSDP2_CASES:
        name, scope, kind, loss_estimate = parse(case)
        path = str(Path(root) / case.replace(":", "_"))
        ref_params, ref_betas, ref_state = reference(name, scope, kind, loss_estimate, OUT)
        rest = batches(loss_estimate)[STEPS1:]
        res = {}
        for with_optimizer in (True, False):
            model, opt = fsdp2_build(name, scope, kind, loss_estimate, mesh)
            if with_optimizer:
                state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
                dcp.load(state, checkpoint_id=path)
                set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
                loaded = full_state(model, opt)
                res["state_diff"] = state_diff(loaded, ref_state)
                res["state_keys"] = sorted({k for s in loaded.values() for k in s})
                res["am_state_nontrivial"] = am_scalars_nontrivial(loaded)
                res["group_keys"] = sorted(k for k in opt.param_groups[0] if k.startswith("am_"))
            else:  # the negative control: the model resumes, the optimizer starts afresh
                state = {"model": get_model_state_dict(model)}
                dcp.load(state, checkpoint_id=path)
                set_model_state_dict(model, state["model"])
                for g, lr in zip(opt.param_groups, [g["lr"] for g in opt.param_groups]):
                    g["lr"] = lr * 0.8**STEPS1  # same learning rates as the resumed run: only the AM state differs
            params, betas = fsdp2_train(model, opt, rank, world, rest)
            tag = "" if with_optimizer else "fresh_"
            res[tag + "max_param_diff"] = max(max_param_diff(a, b) for a, b in zip(params, ref_params[STEPS1:]))
            res[tag + "max_beta_diff"] = max(
                max(abs(a - b) for a, b in zip(got, want)) for got, want in zip(betas, ref_betas[STEPS1:])
            )
            if with_optimizer:
                res["betas"] = betas
        res["min_ref_beta"] = min(min(b) for b in ref_betas)
        result[case] = res
    return result


# ------------------------------------------------------------------------------------- DeepSpeed
DS_CASE = "adamw:tensor:per_tensor"  # ZeRO needs one group per tensor for scope="tensor"


def ds_engine(world, stage, model=None, universal=False, case=DS_CASE, lr_steps=0):
    """A ZeRO-<stage> engine with an attached AM optimizer, learning rates as after ``lr_steps`` decays."""
    import deepspeed

    import hf_am

    name, scope, kind, _ = parse(case)
    model = model if model is not None else dc.make_model()
    opt = dc.make_optimizer(name, dc.grouping(kind, model.named_parameters()), scope)
    for g in opt.param_groups:
        g["lr"] *= 0.8**lr_steps
    config = deepspeed_config(stage, micro_batch=16 // world)
    if universal:
        config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    hf_am.attach(engine)
    return engine, opt


def ds_train(engine, am, rank, world, batches):
    import deepspeed

    params_hist, betas_hist = [], []
    for x, y in batches:
        engine.backward(dc.loss_fn(engine, slice_of(x, rank, world), slice_of(y, rank, world)))
        engine.step()
        params_hist.append([p.detach().clone() for p in engine.module.parameters()])
        betas_hist.append(am.betas_per_scope().tolist())
        dc.decay_lr(am)
    return params_hist, betas_hist


def ds_folder(root, stage, case=DS_CASE):
    return str(Path(root) / f"zero{stage}_{case.replace(':', '_')}")


def ds_save(rank, world, root, stage):
    from deepspeed.checkpoint import ds_to_universal

    from hf_am.integrations.deepspeed import to_universal

    engine, am = ds_engine(world, stage)
    ds_train(engine, am, rank, world, batches("linear", 3)[:STEPS1])
    folder = ds_folder(root, stage)
    engine.save_checkpoint(folder, tag="saved")
    out = {"saved_by": world}
    if rank == 0:
        to_universal(f"{folder}/saved", f"{folder}/saved_universal")
        # DeepSpeed's converter alone: it narrows every non-step state tensor of a padded group, so
        # AM's 0-d scalars stop it (loudly); where no group is padded it would drop them.
        args = ["--input_folder", f"{folder}/saved", "--output_folder", f"{folder}/ds_alone",
                "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
        saved_argv, sys.argv = sys.argv, ["ds_to_universal", *args]
        try:
            ds_to_universal.main(ds_to_universal.parse_arguments())
            out["ds_alone_error"] = None
        except Exception as exc:  # noqa: BLE001 - the test asserts the message
            out["ds_alone_error"] = f"{type(exc).__name__}: {exc}"
        finally:
            sys.argv = saved_argv
        # What the drop looks like: the universal checkpoint without AM's files (load must refuse it).
        shutil.copytree(f"{folder}/saved_universal", f"{folder}/am_dropped_universal")
        dropped = [f.unlink() for f in Path(f"{folder}/am_dropped_universal/zero").glob("*/am_*.pt")]
        out["dropped_files"] = len(dropped)
    dist.barrier()
    return out


def ds_refusals(rank, world, root):
    """What to_universal refuses, each with its reason: AM-SGD's momentum buffer, ZeRO-3."""
    from hf_am.integrations.deepspeed import UniversalCheckpointError, to_universal

    out = {}
    for label, stage, case in (("sgd", 2, "sgd:model:one"), ("zero3", 3, DS_CASE)):
        engine, am = ds_engine(world, stage, case=case)
        ds_train(engine, am, rank, world, batches("linear", 3)[:1])
        folder = ds_folder(root, stage, case)
        engine.save_checkpoint(folder, tag="saved")
        dist.barrier()
        try:
            to_universal(f"{folder}/saved", f"{folder}/saved_universal")
            out[label] = None
        except UniversalCheckpointError as exc:
            out[label] = str(exc)
        out[label + "_wrote_nothing"] = not os.path.exists(f"{folder}/saved_universal")
        dist.barrier()
    # ZeRO-3 through DeepSpeed's converter alone: its universal loader restores exp_avg/exp_avg_sq
    # only, so loading must refuse (never restart the AM state silently).
    from deepspeed.checkpoint import ds_to_universal

    folder = ds_folder(root, 3)
    if rank == 0:
        saved_argv, sys.argv = sys.argv, ["ds_to_universal", "--input_folder", f"{folder}/saved", "--output_folder",
                                          f"{folder}/ds_alone", "--num_extract_workers", "1", "--num_merge_workers", "1",
                                          "--inject_missing_state"]
        try:
            ds_to_universal.main(ds_to_universal.parse_arguments())
        finally:
            sys.argv = saved_argv
    dist.barrier()
    engine, am = ds_engine(world, 3, universal=True)
    try:
        engine.load_checkpoint(folder, tag="ds_alone")
        out["zero3_load_error"] = None
    except UniversalCheckpointError as exc:
        out["zero3_load_error"] = str(exc)
    return out


def ds_resume(rank, world, root, stage):
    from hf_am.integrations.deepspeed import UniversalCheckpointError

    folder = ds_folder(root, stage)
    name, scope, kind, _ = parse(DS_CASE)
    ref_params, ref_betas, ref_state = reference(name, scope, kind, "linear", 3)
    rest = batches("linear", 3)[STEPS1:]
    res = {"min_ref_beta": min(min(b) for b in ref_betas)}

    engine, am = ds_engine(world, stage, universal=True)
    engine.load_checkpoint(folder, tag="saved_universal")
    # The AM scalars right after the load, one per param group (= per tensor), against the run's state.
    m = dc.make_model()
    index = {id(p): i for i, p in enumerate(m.parameters())}
    order = [index[id(p)] for g in dc.grouping(kind, m.named_parameters()) for p in g["params"]]  # group -> param
    loaded = {}
    for i, g in enumerate(am.param_groups):
        state = am.state[g["params"][0]]
        loaded[order[i]] = {k: v for k, v in state.items() if v.dim() == 0}
    want = {i: {k: v for k, v in s.items() if v.dim() == 0} for i, s in ref_state.items()}
    res["scalar_state_diff"] = state_diff(loaded, want)
    res["state_keys"] = sorted({k for g in am.param_groups for k in am.state[g["params"][0]]})
    res["am_state_nontrivial"] = am_scalars_nontrivial(loaded)
    params, betas = ds_train(engine, am, rank, world, rest)
    res["max_param_diff"] = max(max_param_diff(a, b) for a, b in zip(params, ref_params[STEPS1:]))
    res["max_beta_diff"] = max(max(abs(a - b) for a, b in zip(g, w)) for g, w in zip(betas, ref_betas[STEPS1:]))
    res["betas"] = betas

    # Negative control: the same model weights (the run's after STEPS1 steps), a fresh AM state.
    model = dc.make_model()
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref_params[STEPS1 - 1]):
            p.copy_(q)
    engine, am = ds_engine(world, stage, model=model, lr_steps=STEPS1)
    params, betas = ds_train(engine, am, rank, world, rest)
    res["fresh_max_param_diff"] = max(max_param_diff(a, b) for a, b in zip(params, ref_params[STEPS1:]))
    res["fresh_max_beta_diff"] = max(max(abs(a - b) for a, b in zip(g, w)) for g, w in zip(betas, ref_betas[STEPS1:]))

    # The clear errors: the plain checkpoint on this other world size; DeepSpeed's converter alone.
    for label, tag, universal in (("plain", "saved", False), ("am_dropped", "am_dropped_universal", True)):
        engine, am = ds_engine(world, stage, universal=universal)
        try:
            engine.load_checkpoint(folder, tag=tag)
            res[label + "_error"] = None
        except Exception as exc:  # noqa: BLE001 - the test asserts type and message
            res[label + "_error"] = f"{type(exc).__name__}: {exc}"
            res[label + "_is_ours"] = isinstance(exc, UniversalCheckpointError)
    return res


def main():
    rank, world = dc.init()
    result = {"world": world}
    with dc.exit_on_error():
        mesh = None
        for token in sys.argv[1:]:
            phase, _, arg = token.partition("=")
            if phase.startswith("fsdp2") and mesh is None:
                from torch.distributed.device_mesh import init_device_mesh

                mesh = init_device_mesh("cpu", (world,))
            if phase == "fsdp2-save":
                result[phase] = fsdp2_save(rank, world, arg, mesh)
            elif phase == "fsdp2-resume":
                result[phase] = fsdp2_resume(rank, world, arg, mesh)
            elif phase.startswith("ds"):
                import deepspeed

                deepspeed.init_distributed(dist_backend="gloo")
                root, _, stages = arg.partition(":")
                if phase == "ds-refusals":
                    result[phase] = ds_refusals(rank, world, root)
                for stage in (int(s) for s in stages.split(",") if s):
                    if phase == "ds-save":
                        result.setdefault(phase, {})[stage] = ds_save(rank, world, root, stage)
                    elif phase == "ds-resume":
                        result.setdefault(phase, {})[stage] = ds_resume(rank, world, root, stage)
            else:
                raise SystemExit(f"unknown phase {phase}")
    dc.finish(result)


if __name__ == "__main__":
    main()
