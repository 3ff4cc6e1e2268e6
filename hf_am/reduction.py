"""From per-tensor partial sums to whole-scope sums, and the checks that ranks agree (docs/algorithm.md §3, §8).

:func:`scope_sums` weights each tensor's ``[<d,d>, <g,d>, <g-d,g-d>]`` by the
learning rates, adds them per scope and runs the one collective sharded
parameters need; the collective also carries a fingerprint of which parameters
have gradients on each rank.  :class:`LayoutGuard` checks, when the layout is
new, that every rank agrees on the scopes, and reports disagreements the
fingerprint finds.
"""

from __future__ import annotations

import zlib
from array import array
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from .device_constants import DeviceConstants
from .planning import GroupPlan, Layout
from .sharding import all_reduce_sum, gather_objects, optional_numel
from .state import INIT_NUMEL, PREV_LR


def scope_sums(
    plans: List[GroupPlan], partials: List[torch.Tensor], layout: Layout, exact: bool, constants: DeviceConstants
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(sums, mismatch)``: the ``(n_scopes, 3)`` sums ``[A, B, C]`` and, when a collective ran,
    a boolean tensor that is True where ranks disagreed on which parameters have gradients.

    Learning-rate weighting (§3): ``A`` and ``C`` weigh by this step's ``eta``,
    ``B`` by ``eta + eta'`` (``eta'`` the previous step's) for the linear loss
    estimate, by ``eta`` alone when the exact loss difference is known.
    """
    n_scopes, acc, device = layout.n_scopes, layout.acc, layout.device
    by_key: Dict[Hashable, List[torch.Tensor]] = {}
    index_by_key: Dict[Hashable, List[int]] = {}
    whole_blocks: List[torch.Tensor] = []  # rows of whole tensors (key None), in plan order
    whole_index: List[int] = []
    for plan, sums in zip(plans, partials):
        eta = plan.group["lr"]
        eta_prev = plan.group.get(PREV_LR, eta)
        weight_b = eta if exact else eta + eta_prev
        sums = sums.to(acc)
        if type(eta) in (float, int) and type(weight_b) in (float, int):
            # One multiply by a cached row [eta, w_B, eta] (the same products as column by column)
            weights = constants.get(("lr weights", float(eta).hex(), float(weight_b).hex(), acc, device),  # hex: -0.0 != 0.0
                                    lambda: torch.tensor([eta, weight_b, eta], dtype=acc, device=device))
            weighted = sums * weights
        else:  # a tensor lr (schedulers change it in place): column by column
            weighted = torch.stack((sums[:, 0] * eta, sums[:, 1] * weight_b, sums[:, 2] * eta), dim=1)
        if all(key is None for key in plan.keys):  # the usual case: the group's rows as one block
            whole_blocks.append(weighted)
            whole_index.extend(plan.scope_ids)
            continue
        for i, key in enumerate(plan.keys):
            if key is None:
                whole_blocks.append(weighted[i : i + 1])
                whole_index.append(plan.scope_ids[i])
            else:
                by_key.setdefault(key, []).append(weighted[i])
                index_by_key.setdefault(key, []).append(plan.scope_ids[i])
    total = torch.zeros(n_scopes, 3, dtype=acc, device=device)
    if whole_blocks:  # whole tensors: nothing to reduce
        rows = whole_blocks[0] if len(whole_blocks) == 1 else torch.cat(whole_blocks)
        total.index_add_(0, constants.index(whole_index, device), rows)
    mismatch = None
    for key, pgroups in layout.groups_for_key.items():  # param order: the same keys, in the same order, on every rank
        # Two extra rows carry [1, h1, h2], [h3, 0, 0]: a fingerprint of which of the key's
        # parameters have a gradient here; after the sum, sum(h) == count * h on every rank
        # that agrees with all others.
        header, hashes = _fingerprint(constants, key, positions_with_gradients(plans, key), acc, device)
        part = torch.cat((torch.zeros(n_scopes, 3, dtype=acc, device=device), header))
        if key in by_key:
            part.index_add_(0, constants.index(index_by_key[key], device), torch.stack(by_key[key]))
        all_reduce_sum(part, pgroups)
        count = part[n_scopes, 0]
        bad = (part[n_scopes, 1] != count * hashes[0]) | (part[n_scopes, 2] != count * hashes[1])
        bad = bad | (part[n_scopes + 1, 0] != count * hashes[2])
        mismatch = bad if mismatch is None else mismatch | bad
        total += part[:n_scopes]
    return total, mismatch


def positions_with_gradients(plans: List[GroupPlan], key) -> tuple:
    """Positions (among the call's params) of this rank's tensors that a key's collective sums."""
    return tuple(pos for plan in plans for pos, k in zip(plan.positions, plan.keys) if k == key)


def _fingerprint(constants: DeviceConstants, key, present: tuple, acc, device):
    """Header rows ``[[1, h1, h2], [h3, 0, 0]]`` (cached on the device) and ``(h1, h2, h3)``.

    ``h`` are three bytes of a CRC of the positions of this rank's parameters
    with a gradient.  Bytes keep ``count * h`` exact in float32 for up to
    65,000 ranks; the cache keeps steady-state steps free of host-to-device copies.
    """

    def build():
        crc = zlib.crc32(array("q", present).tobytes())
        hashes = (float(crc & 0xFF), float((crc >> 8) & 0xFF), float((crc >> 16) & 0xFF))
        header = torch.tensor([[1.0, hashes[0], hashes[1]], [hashes[2], 0.0, 0.0]], dtype=acc, device=device)
        return header, hashes

    return constants.get(("fingerprint", key, present, acc, device), build)


def mismatch_message(detail: str, consequence: str) -> str:
    return (
        "Ranks disagree on which parameters have gradients in this step() call "
        f"({detail}): the sharded sums of the beta formula would mix different parameters. Every rank "
        f"must give gradients to the same parameters (an empty shard's missing gradient is fine); {consequence}"
    )


class LayoutGuard:
    """Rank agreement on the layout of a step (docs/algorithm.md §8).

    * :meth:`check_new_layout`: before the first collective of a layout never
      seen (first step, after ``load_state_dict`` or a new param group, events
      every rank meets at the same step), gather and compare the scopes (a host
      sync, only then).
    * :meth:`on_mismatch`: the per-step fingerprint found a disagreement.  CPU
      sums (gloo, ZeRO-Offload) are read at no cost: raise before any parameter
      moves.  Device sums are not read inside ``step()``: remember the flag;
      :meth:`check` (called by the statistics readers and the Trainer callback) raises.
    """

    def __init__(self, scope: str):
        self.scope = scope
        self.verified: set = set()
        self.device_mismatch: Optional[torch.Tensor] = None

    def forget(self) -> None:
        self.verified.clear()

    def check_new_layout(self, plans: List[GroupPlan], layout: Layout) -> None:
        if not layout.groups_for_key or layout.signature in self.verified:
            return
        for key, pgroups in layout.groups_for_key.items():
            present = positions_with_gradients(plans, key)
            for pg in pgroups:
                gathered = gather_objects((layout.n_scopes, present), pg)
                counts = [g[0] for g in gathered]
                if len(set(counts)) != 1 or len({tuple(g[1]) for g in gathered}) != 1:
                    raise ValueError(
                        f"Ranks disagree on the scopes of this step: numbers of scopes per rank {counts}, "
                        f"parameters with gradients per rank {[len(g[1]) for g in gathered]} (scope={self.scope!r}). "
                        "Every rank must hold the same param groups in the same order, with the same tensors "
                        "(an empty shard is fine), and the same of them must have gradients"
                    )
            if key[0] == "process_group":
                self._check_not_split(plans, key, pgroups)
        self.verified.add(layout.signature)

    def _check_not_split(self, plans: List[GroupPlan], key, pgroups: Sequence) -> None:
        """Under a flat partition a group/model scope must be whole in this call."""
        if self.scope == "tensor":
            return
        local: Dict[int, int] = {}
        expected: Dict[int, int] = {}
        for plan in plans:
            sid = plan.scope_ids[0]
            local[sid] = local.get(sid, 0) + sum(lp.numel() for lp, k in zip(plan.local_params, plan.keys) if k == key)
            # Tensors reduced over another group (or none) are whole here: not part of this count.
            others = sum(optional_numel(p) for p, k in zip(plan.params, plan.keys) if k != key)
            expected[sid] = expected.get(sid, 0) + plan.group[INIT_NUMEL] - others
        total = dict(local)
        for pg in pgroups:
            gathered = gather_objects(total, pg)
            total = {sid: sum(g[sid] for g in gathered) for sid in total}
        for sid, n in total.items():
            if n < expected[sid]:
                raise ValueError(
                    f"scope={self.scope!r}: this step() call holds {n} of the {expected[sid]} elements of a scope "
                    "across all ranks, so the caller (DeepSpeed ZeRO-3 sub-groups?) splits the scope across "
                    "step() calls. Use scope='tensor' with one group per tensor, or a sub_group_size that "
                    "keeps each group whole"
                )

    def on_mismatch(self, mismatch: torch.Tensor, plans: List[GroupPlan]) -> None:
        if mismatch.device.type != "cpu":
            self.device_mismatch = mismatch if self.device_mismatch is None else self.device_mismatch | mismatch
            return
        if bool(mismatch):
            n_present = sum(len(plan.params) for plan in plans)
            raise RuntimeError(
                mismatch_message(
                    f"this rank has gradients for {n_present} parameter tensors",
                    "parameters and momenta are unchanged by this step; its step counts (and, off the compiled "
                    "kernels, AM-AdamW's second moments) already include it",
                )
            )

    def check(self) -> None:
        """Raise if an earlier device step found ranks disagreeing on which parameters have gradients (syncs)."""
        flag = self.device_mismatch
        if flag is not None and bool(flag):
            raise RuntimeError(
                mismatch_message(
                    "detected on the device, at an earlier step",
                    "the steps that found it kept every momentum unchanged instead of using the mixed sums",
                )
            )
