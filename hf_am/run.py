"""Run an unmodified training script with ``--optim am_adamw`` / ``am_sgd`` available.

    python -m hf_am.run script.py ARGS...
    python -m hf_am.run -m package.module ARGS...
    accelerate launch [accelerate options] -m hf_am.run script.py ARGS...
    torchrun --nproc_per_node N -m hf_am.run script.py ARGS...
    hf-am-run script.py ARGS...                     (console script)

``import hf_am`` registers the optimizer names with ``transformers`` before the
script builds its ``HfArgumentParser``; then the script runs as ``__main__``
with ``sys.argv`` = ``[script.py, ARGS...]``, exactly as ``python script.py ARGS``
would run it.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import List, Optional

USAGE = __doc__.split("\n\n")[1].rstrip()


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage:\n" + USAGE + "\n\nRuns the script with hf_am's Trainer optimizers registered.")
        return 0 if args else 2

    import hf_am  # noqa: F401  (registers am_adamw / am_sgd when transformers is installed)
    from hf_am.integrations.trainer import register

    if not register():
        print("hf_am.run: transformers is not installed, so --optim am_adamw cannot be registered", file=sys.stderr)
        return 1

    if args[0] == "-m":
        if len(args) < 2:
            print("hf_am.run: -m needs a module name", file=sys.stderr)
            return 2
        module, rest = args[1], args[2:]
        sys.argv = [module, *rest]
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0

    script, rest = args[0], args[1:]
    if not os.path.isfile(script):
        print(f"hf_am.run: no such script: {script!r}", file=sys.stderr)
        return 2
    sys.argv = [script, *rest]
    # What ``python script.py`` puts first on sys.path: the script's directory.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
