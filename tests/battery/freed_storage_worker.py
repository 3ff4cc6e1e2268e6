"""Worker for ``test_safety.py``'s freed-storage test: damages one tensor a step touches by freeing or
shrinking its storage under it, steps, and prints one JSON line per case.

Run in its own process because a wrong implementation does not raise, it crashes: the kernels (and torch's
own ops) read freed memory.  A case's line says whether the step raised, with what message, and whether
every undamaged parameter and state tensor kept its bits (the damaged tensor itself cannot be read).

    python tests/battery/freed_storage_worker.py        # with tests/ on PYTHONPATH
"""

from __future__ import annotations

import json
import sys

import torch

from helpers import loss_fn, make_batches, make_model, train
from hf_am import AMAdamW, AMSGD

OPTIMIZERS = {"am_adamw": (AMAdamW, 1e-2), "am_sgd": (AMSGD, 5e-2)}
PATHS = {"default": {}, "foreach": dict(foreach=True), "reference": dict(foreach=False)}
DAMAGES = ("state_freed", "scalar_freed", "coefficient_freed", "param_view_freed", "grad_one_element_past")


def cases():
    """Every optimizer x path x damage.  The one-element state freed under the object the gate accepted
    (a step count, the stored coefficient) is read by torch's ops on the portable paths and by the C code
    on the default path, and written by both: the gate checks its extent every step."""
    for opt_name in OPTIMIZERS:
        for path in PATHS:
            for damage in DAMAGES:
                yield opt_name, path, damage


def _view_into_freed(t: torch.Tensor, keep_elements: int) -> torch.Tensor:
    """``t``'s values as a view one element into a new storage, which is then shrunk to ``keep_elements``."""
    base = torch.zeros(t.numel() + 1, dtype=t.dtype)
    view = base[1:].view(t.shape)
    view.copy_(t.detach())
    base.untyped_storage().resize_(keep_elements * t.element_size())
    return view


def run_case(opt_name: str, path: str, damage: str) -> dict:
    cls, lr = OPTIMIZERS[opt_name]
    model = make_model()
    opt = cls(model.parameters(), lr=lr, **PATHS[path])
    train(model, opt, make_batches(2))
    for p in model.parameters():
        p.grad = None
    loss_fn(model, make_batches(1)[0]).backward()
    params = list(model.parameters())
    target = params[1]
    # what must keep its bits: every tensor but the one damaged
    before = {(i, "param"): p.detach().clone() for i, p in enumerate(params) if p is not target or damage == "grad_one_element_past"}
    for i, p in enumerate(params):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                before[(i, key)] = value.clone()
    state = opt.state[target]
    if damage == "state_freed":
        name = opt.state_tensor_names[0]
        state[name].untyped_storage().resize_(0)
        before.pop((1, name))
    elif damage in ("scalar_freed", "coefficient_freed"):
        key = "step" if damage == "scalar_freed" else "am_beta"
        state[key].untyped_storage().resize_(0)  # the tensor object the gate already accepted
        before.pop((1, key))
    elif damage == "param_view_freed":
        target.data = _view_into_freed(target, 0)
    else:
        target.grad = _view_into_freed(target.grad, target.numel())
    try:
        opt.step()
        raised = None
    except Exception as exc:  # noqa: BLE001 -- the test reads the type and message
        raised = f"{type(exc).__name__}: {exc}"
    now = {(i, "param"): p.detach() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        now.update({(i, k): v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)})
    unchanged = all(torch.equal(value, now[key]) for key, value in before.items())
    return dict(opt=opt_name, path=path, damage=damage, raised=raised, unchanged=unchanged)


def main() -> int:
    for case in cases():
        print(json.dumps(run_case(*case)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
