"""Everything DeepSpeed: connecting an AM optimizer to its engine, param groups for ZeRO, config checks.

Why attaching is needed (docs/algorithm.md §8): the adaptive ``beta`` is a ratio of
three sums over a whole *scope* (tensor, group or model).  Under ZeRO every rank
holds only a flat partition of each parameter group, so

* the sums must be all-reduced over the ZeRO data-parallel group, and only over
  it (summing over replicas would count every element several times): this
  module sets ``am.process_group = zero_optimizer.dp_process_group``;
* DeepSpeed calls ``step()`` once per parameter group (stage 1/2) or once per
  sub-group (stage 3), so a scope that spans several such calls cannot be summed
  in one call: this module refuses those configurations up front, from
  DeepSpeed's own group/sub-group layout, instead of letting them train with a
  per-call ``beta``;
* ZeRO-3 pads every parameter inside the flat fp32 partition and the padding
  slots of the *parameter* are uninitialised memory (``torch.empty``).  AM-SGD's
  coupled weight decay ``g + wd * x`` would carry them into the sums (NaN or
  garbage in every ``beta``): this module zeroes those slots before every
  ``step()`` call.

Only DeepSpeed's public-looking attributes of version 0.19 are read
(``dp_process_group``, ``real_dp_process_group``, ``bit16_groups``,
``fp16_groups``, ``sub_group_to_group_id``, ``fp32_partitioned_groups_flat``,
``ds_tensor``/``ds_numel`` of ZeRO-3 parameters).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..optimizer import AMOptimizer, param_groups_per_tensor
from ..hyperparameters import SCOPES
from .optim_args import optim_value
from .wrappers import wrapper_chain

logger = logging.getLogger(__name__)

__all__ = ["arrange_param_groups_for_deepspeed", "attach_to_deepspeed", "prepare_deepspeed_config", "uses_deepspeed"]

_ATTACHED = "_hf_am_deepspeed"  # attribute on the AM optimizer: what attach_to_deepspeed set up


def _find_am(obj) -> Tuple[AMOptimizer, list]:
    """``(am, chain)``: the AM optimizer inside ``obj`` and the objects passed on the way."""
    chain = wrapper_chain(obj)
    for i, current in enumerate(chain):
        if isinstance(current, AMOptimizer):
            return current, chain[: i + 1]
    described = " -> ".join(type(o).__name__ for o in chain) or type(obj).__name__
    raise TypeError(
        f"attach_to_deepspeed: no hf_am.AMOptimizer found by following .optimizer from {described}. "
        "Pass the DeepSpeed engine, its optimizer, or accelerate's wrapper of either, with an "
        "hf_am.AMAdamW/AMSGD as the client optimizer"
    )


def _deepspeed_kind(wrapper) -> str:
    """Which DeepSpeed optimizer wraps the AM optimizer directly (``"none"`` if none does)."""
    if wrapper is None:
        return "none"
    name = type(wrapper).__name__
    module = type(wrapper).__module__
    if not module.startswith("deepspeed."):
        return "none"
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:  # pragma: no cover - deepspeed is installed whenever module starts with "deepspeed."
        DeepSpeedZeroOptimizer = DeepSpeedZeroOptimizer_Stage3 = ()
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        return "zero12"
    if name == "BF16_Optimizer":
        return "bf16"  # ZeRO-1-style partitions, one step() for all groups
    if name == "FP16_Optimizer":
        return "fp16_fused"  # replicas, each group flattened into one fp32 tensor
    if name == "FP16_UnfusedOptimizer":
        return "fp16_unfused"  # replicas, one fp32 copy per tensor
    raise TypeError(
        f"attach_to_deepspeed: unknown DeepSpeed optimizer wrapper {module}.{name}; it is not known how it "
        "partitions and steps the parameter groups, so AM's sums cannot be made exact"
    )


def _same_group(a, b) -> bool:
    import torch.distributed as dist

    if a is b:
        return True
    if a is None or b is None:
        return False
    return dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


def _single_group(groups: Sequence, what: str):
    """The one process group all partitions use; AM has a single ``process_group``."""
    first = groups[0]
    for g in groups[1:]:
        if not _same_group(g, first):
            raise ValueError(
                f"attach_to_deepspeed: the {what} are partitioned over different process groups (MoE expert "
                "data parallelism, MiCS or a per-parameter ds_process_group), but an AM optimizer sums its "
                "scopes over one process group. Use a separate AM optimizer per partition group, or no ZeRO "
                "for the expert parameters"
            )
    return first


def _check_no_model_parallelism(zero_opt) -> None:
    """Tensor/pipeline model parallelism mixes TP-sharded and TP-replicated tensors in one partition."""
    import torch.distributed as dist

    group = getattr(zero_opt, "model_parallel_group", None)
    size = dist.get_world_size(group) if group is not None else 1
    mpu = getattr(zero_opt, "mpu", None)
    if mpu is not None and hasattr(mpu, "get_model_parallel_world_size"):
        size = max(size, int(mpu.get_model_parallel_world_size()))
    if size > 1:
        raise ValueError(
            "attach_to_deepspeed: model parallelism (mpu, model-parallel world size "
            f"{size}) is active. A ZeRO partition then holds pieces of tensor-parallel shards and of replicated "
            "tensors alike, and no single process group sums both correctly; this is not supported"
        )


def _scope_error(scope: str, detail: str, fix: str) -> ValueError:
    return ValueError(
        f"attach_to_deepspeed: scope={scope!r} cannot be exact here: {detail}. DeepSpeed calls the client "
        f"optimizer's step() separately for each of them, so one scope's sums would be split across calls "
        f"(a different beta per call). {fix}"
    )


_TENSOR_FIX = "Build the optimizer with hf_am.param_groups_per_tensor(...) (one parameter group per tensor)."


def _validate_per_call_groups(am: AMOptimizer, tensors_per_group: List[int], calls_per_group: List[int]) -> None:
    """Validate a layout where every ``step()`` call sees one (sub-)group.

    ``tensors_per_group[k]``: tensors of param group ``k``; ``calls_per_group[k]``:
    how many ``step()`` calls DeepSpeed makes for it (ZeRO-3 sub-groups).
    """
    n_groups = len(tensors_per_group)
    total_calls = sum(calls_per_group)
    if am.scope == "model" and total_calls > 1:
        raise _scope_error(
            "model",
            f"the parameters form {n_groups} parameter group(s) stepped in {total_calls} step() calls",
            "Put every parameter in one group (and, under ZeRO-3, a sub_group_size at least as large as its "
            "partition), or use scope='group'/'tensor'.",
        )
    if am.scope == "group":
        split = [k for k, c in enumerate(calls_per_group) if c > 1]
        if split:
            raise _scope_error(
                "group",
                f"ZeRO-3 splits parameter group(s) {split} into {[calls_per_group[k] for k in split]} sub-groups "
                "(sub_group_size is smaller than the group's partition)",
                "Raise zero_optimization.sub_group_size, or use scope='tensor'.",
            )
    _validate_tensor_scope_flat(am, tensors_per_group)


def _validate_tensor_scope_flat(am: AMOptimizer, tensors_per_group: List[int]) -> None:
    """DeepSpeed flattens each group: per-tensor sums exist only where a group holds one tensor."""
    if am.scope == "tensor":
        multi = [k for k, n in enumerate(tensors_per_group) if n > 1]
        if multi:
            raise ValueError(
                f"attach_to_deepspeed: scope='tensor' cannot be exact here: DeepSpeed flattens parameter "
                f"group(s) {multi} ({[tensors_per_group[k] for k in multi]} tensors) into one tensor, so their "
                f"per-tensor sums cannot be told apart. {_TENSOR_FIX}"
            )


def _validate_one_call_flat(am: AMOptimizer, tensors_per_group: List[int]) -> None:
    """One ``step()`` for all groups, each group flattened (BF16_Optimizer, fused FP16_Optimizer)."""
    _validate_tensor_scope_flat(am, tensors_per_group)


# --------------------------------------------------------------- ZeRO-3 padding
class _ZeroPaddingBeforeStep:
    """``step()`` pre-hook zeroing the padding slots of ZeRO-3 flat fp32 partitions.

    Why every step and not once: DeepSpeed rewrites the fp32 partitions when it
    loads a checkpoint, and the slots are cheap (at most ``world_size - 1``
    elements per tensor).  Also zeroes the gradient and any optimizer state of
    the same size there, so nothing that reads the slots (coupled weight decay,
    ``D``-weighted sums) sees anything but zeros.
    """

    def __init__(self, slots: List[Tuple[torch.Tensor, List[Tuple[int, int]]]]):
        self.slots = {id(t): (t, spans) for t, spans in slots if spans}

    def zero(self, am: AMOptimizer) -> None:
        if not self.slots:
            return
        with torch.no_grad():
            for group in am.param_groups:
                for p in group["params"]:
                    entry = self.slots.get(id(p))
                    if entry is None or entry[0] is not p:
                        continue
                    targets = [p]
                    if p.grad is not None:
                        targets.append(p.grad)
                    targets.extend(
                        v for v in am.state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.shape == p.shape
                    )
                    for t in targets:
                        flat = t.view(-1)
                        for start, end in entry[1]:
                            if end <= flat.numel():
                                flat[start:end].zero_()

    def __call__(self, optimizer, args, kwargs):
        self.zero(optimizer)
        return None


class _OnlySteppedGroups:
    """ZeRO-3 ``step()`` pre/post hooks: show the AM optimizer only the group being stepped.

    ZeRO-3 keeps every param group in ``param_groups`` and empties all but the
    current sub-group's (``params = []``) around each ``step()`` call, while
    ZeRO-1/2 pass a one-element ``param_groups`` list.  The AM core's layout
    checks are written for the latter (an empty group there means "flattened
    away", e.g. ``scope='tensor'`` raises "param group k had 1 tensors and now
    holds 0"), so during the call this hides the empty groups, and restores
    the full list afterwards, before DeepSpeed indexes it again.  (Were the
    step to raise, the list stays filtered; the run is over then anyway.)
    """

    def __init__(self):
        self._saved = None

    def before(self, optimizer, args, kwargs):
        groups = optimizer.param_groups
        stepped = [g for g in groups if g["params"]]
        if len(stepped) != len(groups):
            self._saved = groups
            optimizer.param_groups = stepped
        return None

    def after(self, optimizer, args, kwargs):
        if self._saved is not None:
            optimizer.param_groups = self._saved
            self._saved = None


def padding_span(numel: int, partition_size: int, rank: int) -> Optional[Tuple[int, int]]:
    """``(start, end)`` of the padding inside rank ``rank``'s ZeRO-3 slice of one parameter, or ``None``.

    DeepSpeed (``partition_parameters._partition_param``) gives rank ``r`` the
    elements ``[r*s, (r+1)*s)`` of the flattened parameter padded to ``s * W``;
    the positions at or beyond ``numel`` are padding.
    """
    valid = max(0, min(partition_size, numel - rank * partition_size))
    return None if valid == partition_size else (valid, partition_size)


def _zero3_padding_spans(zero_opt) -> List[Tuple[torch.Tensor, List[Tuple[int, int]]]]:
    """Per sub-group: the fp32 flat partition and the ``(start, end)`` padding slots this rank holds.

    A parameter of ``n`` elements is partitioned as ``aligned = ceil(n / W) * W``
    elements in ``W`` slices of ``s = aligned / W``; rank ``r`` holds elements
    ``[r*s, (r+1)*s)``, of which those at or beyond ``n`` are padding.  This is
    computed here rather than read from ``groups_padding``, which assumes the
    padding lies on the last rank only (not true when it exceeds one slice,
    e.g. ``n = 5`` on 4 ranks).
    """
    import torch.distributed as dist

    out = []
    for j, sub_group in enumerate(zero_opt.fp16_groups):
        flat = zero_opt.fp32_partitioned_groups_flat[j]
        spans = []
        offset = 0
        for p in sub_group:
            s = int(p.partition_numel())
            pg = getattr(p, "ds_process_group", zero_opt.dp_process_group)
            r = dist.get_rank(group=pg)
            span = padding_span(int(p.ds_numel), s, r)
            if span is not None:
                spans.append((offset + span[0], offset + span[1]))
            offset += s
        out.append((flat, spans))
    return out


def _partition_group(am: AMOptimizer, wrapper, kind: str):
    """The process group DeepSpeed partitions the AM state over (``None``: no partitioning), after
    checking that every scope of ``am`` can be exact under this wrapper's layout."""
    if kind in ("zero12", "zero3", "bf16") and getattr(wrapper, "zenflow", False):
        raise ValueError(
            "attach_to_deepspeed: ZenFlow steps parts of the parameters asynchronously on the CPU, "
            "so AM's per-step sums cannot be exact; disable zenflow"
        )
    group = None
    if kind == "zero12":
        _check_no_model_parallelism(wrapper)
        group = _single_group(list(wrapper.real_dp_process_group), "parameter groups")
        _validate_per_call_groups(am, [len(g) for g in wrapper.bit16_groups], [1] * len(wrapper.bit16_groups))
    elif kind == "zero3":
        _check_no_model_parallelism(wrapper)
        group = _single_group(list(wrapper.sub_group_process_groups), "ZeRO-3 sub-groups")
        n_groups = len(am.param_groups)
        tensors = [0] * n_groups
        calls = [0] * n_groups
        for j, sub_group in enumerate(wrapper.fp16_groups):
            k = wrapper.sub_group_to_group_id[j]
            tensors[k] += len(sub_group)
            calls[k] += 1
        _validate_per_call_groups(am, tensors, calls)
    elif kind == "bf16":
        _check_no_model_parallelism(wrapper)
        group = _single_group(list(wrapper.real_dp_process_group), "parameter groups")
        _validate_one_call_flat(am, [len(g) for g in wrapper.bf16_groups])
    elif kind == "fp16_fused":
        _validate_one_call_flat(am, [len(g) for g in wrapper.fp16_groups])

    if group is not None:
        dp_group = getattr(wrapper, "dp_process_group", None)
        if dp_group is not None and group is not dp_group and _same_group(group, dp_group):
            group = dp_group  # ZeRO-3 keeps its own handle of the same ranks per parameter
        if am.process_group is not None and not _same_group(am.process_group, group):
            raise ValueError(
                "attach_to_deepspeed: the AM optimizer was built with a process_group whose ranks differ "
                "from DeepSpeed's ZeRO data-parallel group, over which its state is partitioned; build it "
                "without process_group"
            )
    return group


# ------------------------------------------------------------------------ entry
def attach_to_deepspeed(obj) -> AMOptimizer:
    """Make the AM optimizer inside a DeepSpeed setup compute exact ``beta`` s; return it.

    ``obj``: a ``DeepSpeedEngine``, its (ZeRO) optimizer, or accelerate's
    ``AcceleratedOptimizer`` / ``DeepSpeedOptimizerWrapper`` / ``DeepSpeedEngineWrapper``.
    Call it after ``deepspeed.initialize`` and before the first step; calling it
    again is harmless.

    * ZeRO stage 1/2/3 (and DeepSpeed's bf16 ZeRO-1 optimizer): sets
      ``process_group`` to the ZeRO data-parallel group, so every rank's partial
      sums become whole-scope sums.
    * No partitioning (stage 0, fp32 or fp16): leaves ``process_group`` alone;
      replicas must not be reduced.
    * Raises ``ValueError`` for what cannot be exact: a ``"model"`` scope
      stepped in several calls (several groups under ZeRO 1/2/3, or ZeRO-3
      sub-groups), a ``"group"`` scope that ZeRO-3 splits into sub-groups, a
      ``"tensor"`` scope over groups that DeepSpeed flattens with several
      tensors, partitions over different process groups (MoE), model
      parallelism, ZenFlow, or a ``process_group`` the user set to a different group.
    * ZeRO-3: installs ``step()`` hooks that zero the padding slots of the flat
      partitions (uninitialised memory) and show the core only the group
      being stepped (see :class:`_OnlySteppedGroups`).

    DeepSpeed clips gradients by default (``gradient_clipping`` defaults to 1.0
    in DeepSpeed 0.19; the Trainer fills in ``max_grad_norm``); the clipped
    gradient is the same on every rank, so the sums stay exact, but the run
    equals an unclipped one only with ``gradient_clipping: 0``.
    """
    am, chain = _find_am(obj)
    wrapper = chain[-2] if len(chain) >= 2 and getattr(chain[-2], "optimizer", None) is am else None
    kind = _deepspeed_kind(wrapper)
    # A checkpoint loaded before attaching (the Trainer loads, then attaches): check its AM state now;
    # one loaded later through the engine is checked by the engine's load_checkpoint.
    check_loaded_state(am, wrapper)
    engine = next((o for o in chain if hasattr(o, "load_checkpoint") and hasattr(o, "save_checkpoint")), None)
    if engine is not None:
        _wrap_load_checkpoint(engine, am, wrapper)
    attached: Optional[Dict[str, Any]] = getattr(am, _ATTACHED, None)
    if attached is not None and (attached["wrapper"] is wrapper or wrapper is None):
        # Idempotent: the layout cannot change after deepspeed.initialize, and being handed
        # the bare AM optimizer later (no wrapper in sight) must not undo the attachment.
        return am

    group = _partition_group(am, wrapper, kind)
    if group is not None:
        am.process_group = group

    handles = []
    if attached is not None:
        for handle in attached["hooks"]:  # attached to an earlier engine: replace its hooks
            handle.remove()
    if kind == "zero3":
        padding = _ZeroPaddingBeforeStep(_zero3_padding_spans(wrapper))
        padding.zero(_AllPartitions(wrapper, am))  # before anything reads them, even outside step()
        only_stepped = _OnlySteppedGroups()
        handles = [
            am.register_step_pre_hook(only_stepped.before),
            am.register_step_pre_hook(padding),
            am.register_step_post_hook(only_stepped.after),
        ]
    setattr(am, _ATTACHED, {"wrapper": wrapper, "kind": kind, "hooks": handles})
    return am


class _AllPartitions:
    """Looks like the AM optimizer to the padding hook, but lists every ZeRO-3 partition.

    Between steps ZeRO-3 leaves the AM optimizer's ``param_groups`` empty; the
    partitions only appear there during their ``step()`` call.
    """

    def __init__(self, zero_opt, am):
        self.param_groups = [{"params": list(zero_opt.fp32_partitioned_groups_flat)}]
        self.state = am.state


# ------------------------------------------------------------------ param groups for ZeRO
def _normalise_groups(params) -> List[Dict[str, Any]]:
    items = list(params)
    if not items:
        return []
    if not isinstance(items[0], dict):
        return [{"params": items}]
    groups = []
    for group in items:
        ps = group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        groups.append({**group, "params": ps})
    return groups


def arrange_param_groups_for_deepspeed(params, scope: str) -> List[Dict[str, Any]]:
    """Param groups with which DeepSpeed ZeRO's one-``step()``-per-group computes ``scope`` exactly.

    * ``"tensor"``: one group per tensor (each keeps its group's options, e.g. its weight decay);
    * ``"group"``: the groups as they are (ZeRO steps each group whole);
    * ``"model"``: one group; several groups are merged when all their options agree,
      otherwise ``ValueError`` (DeepSpeed cannot sum one scope over several ``step()`` calls).

    Empty groups are dropped (DeepSpeed drops them too).
    """
    if scope not in SCOPES:
        raise ValueError(f"Invalid scope: {scope!r} (allowed: {', '.join(SCOPES)})")
    groups = [g for g in _normalise_groups(params) if g["params"]]
    if scope == "tensor":
        return param_groups_per_tensor(groups)
    if scope == "group" or len(groups) <= 1:
        return groups
    options = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    if all(o == options[0] for o in options[1:]):
        return [{**options[0], "params": [p for g in groups for p in g["params"]]}]
    described = "; ".join(
        f"group {i}: {len(g['params'])} tensors with "
        + ", ".join(f"{k}={v!r}" for k, v in sorted(o.items()))
        for i, (g, o) in enumerate(zip(groups, options))
    )
    raise ValueError(
        "scope='model' computes one beta over all parameters, but DeepSpeed ZeRO calls optimizer.step() once "
        f"per parameter group and these {len(groups)} groups cannot be merged because their options differ "
        f"({described}). With the Trainer this is the decay/no-decay split: use --optim_args scope=tensor or "
        "scope=group, or --weight_decay 0 so that the groups agree and are merged."
    )


# ------------------------------------------------------------------ Trainer/accelerate configs
def _deepspeed_config_dicts(args) -> List[dict]:
    """Every DeepSpeed config dict the Trainer/accelerate may hand to ``deepspeed.initialize``."""
    plugins = [getattr(args, "deepspeed_plugin", None)]
    try:
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state:
            plugins.append(getattr(AcceleratorState(), "deepspeed_plugin", None))
    except Exception:  # pragma: no cover - accelerate missing or state half-initialised
        pass
    dicts: Dict[int, dict] = {}
    for plugin in plugins:
        if plugin is None:
            continue
        hf_ds_config = getattr(plugin, "hf_ds_config", None)
        for cfg in (getattr(plugin, "deepspeed_config", None), getattr(hf_ds_config, "config", None)):
            if isinstance(cfg, dict):
                dicts[id(cfg)] = cfg
    hf_cfg = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    if isinstance(hf_cfg, dict) and dicts:
        dicts[id(hf_cfg)] = hf_cfg
    return list(dicts.values())


def uses_deepspeed(args) -> bool:
    return getattr(args, "deepspeed_plugin", None) is not None


def prepare_deepspeed_config(args) -> None:
    """Check / adapt the DeepSpeed config of a Trainer run that asked for an AM optimizer.

    * A config with its own ``"optimizer"`` section would make DeepSpeed build
      that optimizer instead: ``ValueError``.
    * ZeRO-Offload of the optimizer (``offload_optimizer.device`` cpu/nvme) refuses client
      optimizers unless ``"zero_force_ds_cpu_optimizer": false``; it is set to false when
      absent (the AM optimizer then runs on the offloaded fp32 partitions), and an explicit
      ``true`` is a ``ValueError``.
    """
    name = optim_value(args.optim)
    for cfg in _deepspeed_config_dicts(args):
        if "optimizer" in cfg:
            raise ValueError(
                f"--optim {name} was requested, but the DeepSpeed config has its own \"optimizer\" section "
                f"({cfg['optimizer'].get('type', '?') if isinstance(cfg['optimizer'], dict) else cfg['optimizer']!r}), "
                f"with which DeepSpeed would train with that optimizer instead of {name}. Remove the \"optimizer\" "
                "section from the DeepSpeed config (a \"scheduler\" section may stay)."
            )
        zero = cfg.get("zero_optimization") or {}
        device = (zero.get("offload_optimizer") or {}).get("device")
        if str(device).lower() in ("cpu", "nvme"):
            force = cfg.get("zero_force_ds_cpu_optimizer")
            if force is True or str(force).lower() == "true":
                raise ValueError(
                    f"--optim {name} with ZeRO-Offload (offload_optimizer.device={device!r}) needs "
                    "\"zero_force_ds_cpu_optimizer\": false in the DeepSpeed config, which has it set to true "
                    "(DeepSpeed would refuse any optimizer other than DeepSpeedCPUAdam)."
                )
            if force is None:
                logger.info("hf_am: setting zero_force_ds_cpu_optimizer=false so that ZeRO-Offload accepts %s", name)
            cfg["zero_force_ds_cpu_optimizer"] = False


# ------------------------------------------------------------------ resuming on another world size
# DeepSpeed changes a ZeRO checkpoint's world size only through its universal checkpoint:
# ``deepspeed.checkpoint.ds_to_universal`` merges every rank's flat partitions into one file per
# parameter and state key (``zero/<param>/<key>.pt``), and ``"checkpoint": {"load_universal": true}``
# slices them onto the new partitions.  The converter knows Adam's ``exp_avg``/``exp_avg_sq`` (and
# ``fp32``, ``step``) and nothing else: AM's per-scope scalars (``am_prod``, ``am_beta``, ... : 0-d
# tensors, one per flat partition = per param group) stop it where a group is padded (it narrows
# every non-step tensor) and are dropped elsewhere.  :func:`to_universal` runs it on a copy of the
# optimizer files without them and then adds each scalar as a per-element file holding the value at
# every element of every parameter of the group ("replicated over the parameters of its scope",
# docs/algorithm.md §11, down to the element), which DeepSpeed's own loader reshards like any
# state; after the load :func:`check_loaded_state` turns those elements back into the 0-d scalar
# (all elements of a partition must agree), and refuses, at load time, AM state that a
# conversion lost.

_UNIVERSAL_DS_KEYS = ("fp32", "exp_avg", "exp_avg_sq", "step")  # what ds_to_universal carries


class UniversalCheckpointError(ValueError):
    """An AM optimizer's DeepSpeed checkpoint cannot be carried to another world size (says why, and what to do)."""


_SAME_WORLD = "resume on the world size the checkpoint was written with (plain engine.load_checkpoint)"
_SAME_WORLD_CAP = "R" + _SAME_WORLD[1:]


def _zero_optim_files(folder: str) -> List[str]:
    import glob
    import os

    files = sorted(glob.glob(os.path.join(folder, "*_optim_states.pt")))
    if not files:
        raise UniversalCheckpointError(f"to_universal: {folder} holds no DeepSpeed ZeRO optimizer files (*_optim_states.pt)")
    return files


def _check_convertible(files: List[str]) -> Dict[str, Any]:
    """Read rank 0's optimizer file and refuse what the universal format cannot carry for AM."""
    import torch as _torch

    sd = _torch.load(files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
    stage = int(sd.get("zero_stage", 1))
    if stage >= 3:
        raise UniversalCheckpointError(
            "to_universal: this is a ZeRO-3 checkpoint. DeepSpeed's ZeRO-3 universal loader restores only fp32, "
            "exp_avg and exp_avg_sq and gives every param group the settings of group 0, so AM's per-scope scalars "
            f"(am_prod, am_beta, ...) and per-group settings cannot be carried. {_SAME_WORLD_CAP}, "
            "or train with ZeRO-1/2 (whose universal checkpoints carry the AM state) or FSDP2 (torch.distributed.checkpoint)"
        )
    base = sd.get("base_optimizer_state")
    if not isinstance(base, dict) or "param_groups" not in base:
        raise UniversalCheckpointError(
            "to_universal: the ZeRO optimizer state is not a rigid (non-elastic) checkpoint, the only kind "
            f"ds_to_universal converts; {_SAME_WORLD}"
        )
    if not all("lam" in g for g in base["param_groups"]):
        raise UniversalCheckpointError(
            "to_universal: the checkpoint was not written by an hf_am optimizer (param groups without 'lam'); "
            "convert it with DeepSpeed's own python -m deepspeed.checkpoint.ds_to_universal"
        )
    for gid, state in base["state"].items():
        for key, value in state.items():
            if key in _UNIVERSAL_DS_KEYS or (isinstance(value, _torch.Tensor) and value.dim() == 0):
                continue
            raise UniversalCheckpointError(
                f"to_universal: param group {gid} has the per-element state {key!r}, which DeepSpeed's "
                "ds_to_universal cannot convert (it knows Adam's exp_avg and exp_avg_sq only; AM-SGD's "
                f"momentum_buffer is such a key). {_SAME_WORLD_CAP}, or use FSDP2 with "
                "torch.distributed.checkpoint, which reshards any optimizer state"
            )
    return sd


def _split_am_scalars(files: List[str], model_files: List[str], stripped_folder: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """Read every rank's optimizer file once: return ``{param name: {key: tensor of the parameter's
    shape filled with its scope's scalar}}`` and write a copy of the file without AM's 0-d scalars
    into ``stripped_folder`` (DeepSpeed's converter cannot read them: it ``narrow``-s every non-step
    tensor of a padded group to strip the padding, and a 0-d tensor cannot be narrowed)."""
    import os

    import torch as _torch

    shapes: Dict[str, Any] = {}
    for mf in model_files:
        for group_shapes in _torch.load(mf, map_location="cpu", weights_only=False)["param_shapes"]:
            shapes.update(group_shapes)
    scalars: Dict[int, Dict[str, torch.Tensor]] = {}
    names: Dict[int, List[str]] = {}
    for rank, f in enumerate(files):
        sd = _torch.load(f, map_location="cpu", weights_only=False)
        optim = sd["optimizer_state_dict"]
        for gid, state in optim["base_optimizer_state"]["state"].items():
            for key in [k for k, v in state.items() if k not in _UNIVERSAL_DS_KEYS and isinstance(v, _torch.Tensor) and v.dim() == 0]:
                value = state.pop(key)
                seen = scalars.setdefault(gid, {}).get(key)
                if seen is None:
                    scalars[gid][key] = value.detach().clone()
                elif not _torch.equal(seen, value):
                    raise UniversalCheckpointError(
                        f"to_universal: param group {gid}'s {key} is {float(seen)} on rank 0 and {float(value)} on "
                        f"rank {rank}; every rank holds the same AM scalars, so the checkpoint is inconsistent"
                    )
        for gid, mapping in enumerate(optim["param_slice_mappings"]):
            names.setdefault(gid, [])
            names[gid].extend(n for n in mapping if n not in names[gid])
        _torch.save(sd, os.path.join(stripped_folder, os.path.basename(f)))
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for gid, keys in scalars.items():
        for name in names.get(gid, []):
            out[name] = {k: _torch.full(tuple(shapes[name]), float(v), dtype=_torch.float32) for k, v in keys.items()}
    return out


def to_universal(input_folder: str, output_folder: str, *, write_latest: bool = True) -> str:
    """Convert a ZeRO-1/2 checkpoint of an AM optimizer into a DeepSpeed universal checkpoint that
    carries the AM state; return ``output_folder``.

    ``input_folder`` is the tag folder ``engine.save_checkpoint`` wrote (``<dir>/global_step<N>``).
    Runs DeepSpeed's ``ds_to_universal`` (model, fp32 weights, ``exp_avg``, ``exp_avg_sq``, ``step``,
    param groups; ``--inject_missing_state``) on a temporary copy of the optimizer files without
    AM's scalars (inside ``output_folder``, removed afterwards: one more copy of the optimizer
    state on disk while it runs), and adds those scalars as ``zero/<param>/am_*.pt``.  With
    ``write_latest`` and the output next to the input, writes ``<dir>/latest_universal`` naming it,
    which ``engine.load_checkpoint(<dir>)`` (and the Trainer's ``--resume_from_checkpoint <dir>``)
    read when the DeepSpeed config has ``"checkpoint": {"load_universal": true}``.

    Refused with :class:`UniversalCheckpointError` (nothing written): ZeRO-3 checkpoints, AM-SGD
    (``momentum_buffer``, which the converter cannot carry), elastic checkpoints, checkpoints of
    other optimizers.  Command line: ``python -m hf_am.integrations.deepspeed --input_folder ... --output_folder ...``.
    """
    import argparse
    import glob
    import os
    import shutil

    import torch as _torch

    files = _zero_optim_files(input_folder)
    _check_convertible(files)
    model_files = sorted(glob.glob(os.path.join(input_folder, "mp_rank_*_model_states.pt")))
    if len(model_files) != 1:
        raise UniversalCheckpointError(
            f"to_universal: expected one mp_rank_*_model_states.pt in {input_folder}, found {len(model_files)}; "
            "AM optimizers do not support tensor/pipeline model parallelism"
        )
    from deepspeed.checkpoint import ds_to_universal

    stripped = os.path.join(output_folder, "hf_am_input_without_am_scalars")
    os.makedirs(stripped)
    try:
        extra = _split_am_scalars(files, model_files, stripped)
        for entry in os.listdir(input_folder):  # everything else (model states) as it is
            if not os.path.exists(os.path.join(stripped, entry)):
                os.symlink(os.path.abspath(os.path.join(input_folder, entry)), os.path.join(stripped, entry))
        args = argparse.Namespace(
            input_folder=stripped, output_folder=output_folder, num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True,  # plain models have no universal_checkpoint_info
        )
        ds_to_universal.main(args)
    finally:
        shutil.rmtree(stripped, ignore_errors=True)
    zero = os.path.join(output_folder, "zero")
    for name, keys in extra.items():
        folder = os.path.join(zero, name)
        if not os.path.isdir(folder):
            raise UniversalCheckpointError(f"to_universal: ds_to_universal wrote no {folder}; cannot add the AM state")
        for key, value in keys.items():
            _torch.save({"param": value}, os.path.join(folder, f"{key}.pt"))
    parent_in = os.path.dirname(os.path.abspath(input_folder))
    if write_latest and os.path.dirname(os.path.abspath(output_folder)) == parent_in:
        with open(os.path.join(parent_in, "latest_universal"), "w") as fd:
            fd.write(os.path.basename(os.path.abspath(output_folder)))
    logger.info("hf_am: wrote the universal checkpoint %s with AM state for %d parameters", output_folder, len(extra))
    return output_folder


def _hp_spans(wrapper) -> Dict[int, List[Tuple[int, int]]]:
    """ZeRO-1/2: ``{id(flat fp32 partition): [(start, numel) of each parameter's fragment in it]}``."""
    out: Dict[int, List[Tuple[int, int]]] = {}
    for i, flat in enumerate(getattr(wrapper, "single_partition_of_fp32_groups", []) or []):
        spans = []
        for lp in wrapper.bit16_groups[i]:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is not None:
                address = mapping.get_hp_fragment_address()
                spans.append((int(address.start), int(address.numel)))
        out[id(flat)] = spans
    return out


def check_loaded_state(am: AMOptimizer, wrapper=None) -> None:
    """After a DeepSpeed checkpoint load: make universal-checkpoint AM scalars 0-d again, refuse lost ones.

    * A scalar that :func:`to_universal` spread over the elements arrives as a tensor of the flat
      partition's shape: it becomes the 0-d scalar again, if every element of every parameter
      fragment in the partition holds the same value (else ``UniversalCheckpointError``).
    * State with moments but without AM's scalars (a checkpoint converted by ``ds_to_universal``
      alone, or a ZeRO-3 universal load) is refused with a ``UniversalCheckpointError`` saying how to
      convert, instead of letting the next step restart the AM state from nothing.

    Called by :func:`attach_to_deepspeed` and after ``engine.load_checkpoint`` of an attached engine.
    """
    from ..state import PREV_LOSS, accumulation_dtype

    name = type(am).__name__
    group_of = {id(q): f"param group {gi}" for gi, g in enumerate(am.param_groups) for q in g["params"]}
    scalar_keys = [k for k in am.required_scalar_state if k != "step"]
    if am.loss_estimate == "exact":
        scalar_keys.append(PREV_LOSS)
    spans = None
    for p, state in list(am.state.items()):
        if not state or not isinstance(p, torch.Tensor):
            continue
        expanded = [k for k in scalar_keys if isinstance(state.get(k), torch.Tensor) and state[k].dim() == 1]
        if expanded:
            if spans is None:
                spans = _hp_spans(wrapper) if wrapper is not None else {}
            fragments = spans.get(id(p))
            if not fragments:
                raise UniversalCheckpointError(
                    f"{name}: the loaded state holds AM scalars {expanded} spread over a partition of "
                    f"{p.numel()} elements, which only a DeepSpeed ZeRO-1/2 engine's universal load produces; "
                    "load the universal checkpoint into a ZeRO-1/2 engine whose AM optimizer is attached "
                    "(hf_am.attach(engine))"
                )
            for key in expanded:
                v = state[key]
                values = torch.cat([v.reshape(-1).narrow(0, s, n) for s, n in fragments])
                if values.numel() == 0 or not bool((values == values[0]).all()):
                    raise UniversalCheckpointError(
                        f"{name}: the universal checkpoint's {key} differs between the parameters of "
                        f"{group_of.get(id(p), 'one param group')}: it was written with another scope or grouping (scope and param groups must be the "
                        "same when resuming)"
                    )
                state[key] = values[0].detach().clone().to(accumulation_dtype(p.dtype))
        has_moments = any(k in state for k in am.state_tensor_names)
        missing = [k for k in scalar_keys if k not in state]
        if has_moments and missing:
            raise UniversalCheckpointError(
                f"{name}: after loading the checkpoint, {group_of.get(id(p), 'a ZeRO-3 partition')} has "
                f"{sorted(k for k in am.state_tensor_names if k in state)} "
                f"but not AM's {missing}: the checkpoint lost the AM state (DeepSpeed's ds_to_universal alone "
                "drops it; a ZeRO-3 universal load cannot restore it), and training on would restart it. Convert "
                "the ZeRO-1/2 checkpoint with python -m hf_am.integrations.deepspeed --input_folder <dir>/<tag> "
                f"--output_folder <dir>/<tag>_universal (hf_am.integrations.deepspeed.to_universal), or {_SAME_WORLD}"
            )


def _wrap_load_checkpoint(engine, am: AMOptimizer, wrapper) -> None:
    """``engine.load_checkpoint`` checks the AM state it loaded (:func:`check_loaded_state`), and says
    what to do when DeepSpeed refuses a plain checkpoint of another world size."""
    original = getattr(engine, "load_checkpoint", None)
    if original is None or getattr(original, "_hf_am_checked", False):
        return
    import functools

    @functools.wraps(original)
    def load_checkpoint(*args, **kwargs):
        try:
            out = original(*args, **kwargs)
        except Exception as exc:
            if "world size" not in str(exc) or "universal" in str(exc):
                raise
            try:  # DeepSpeed's exception, with what to do appended
                hinted = type(exc)(
                    f"{exc} [hf_am: to resume an AM optimizer's ZeRO-1/2 checkpoint on another world size, convert it "
                    "with python -m hf_am.integrations.deepspeed --input_folder <dir>/<tag> --output_folder "
                    "<dir>/<tag>_universal and load it with \"checkpoint\": {\"load_universal\": true} in the "
                    "DeepSpeed config]"
                )
            except Exception:  # an exception type that takes other arguments: as it is
                raise exc from None
            raise hinted from exc
        check_loaded_state(am, wrapper)
        return out

    load_checkpoint._hf_am_checked = True
    engine.load_checkpoint = load_checkpoint


def main(argv=None) -> None:
    """``python -m hf_am.integrations.deepspeed --input_folder <dir>/<tag> --output_folder <dir>/<tag>_universal``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hf_am.integrations.deepspeed",
        description="Convert an AM optimizer's DeepSpeed ZeRO-1/2 checkpoint into a universal checkpoint that "
        "carries the AM state (resume on another world size with \"checkpoint\": {\"load_universal\": true}).",
    )
    parser.add_argument("--input_folder", required=True, help="the tag folder engine.save_checkpoint wrote (<dir>/global_stepN)")
    parser.add_argument("--output_folder", required=True, help="where to write the universal checkpoint (<dir>/global_stepN_universal)")
    parser.add_argument("--no_latest", action="store_true", help="do not write <dir>/latest_universal")
    args = parser.parse_args(argv)
    try:
        to_universal(args.input_folder, args.output_folder, write_latest=not args.no_latest)
    except UniversalCheckpointError as exc:
        raise SystemExit(f"error: {exc}")


if __name__ == "__main__":
    main()
