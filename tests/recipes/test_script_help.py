"""Every command-line script of recipes/, benchmarks/ and experiments/ (found by glob, so
scripts added later are covered too) answers ``--help`` with exit status 0.

A script counts when its source builds an ``argparse``/``HfArgumentParser`` parser and runs
as ``__main__``. A ``%`` in a help string, for instance, makes argparse raise while it
formats ``--help``, which only this test notices."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_DIRS = ("recipes", "benchmarks", "experiments")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
_PARSER = re.compile(r"\b(argparse\.ArgumentParser|ArgumentParser\(|HfArgumentParser)\b")
_MAIN = re.compile(r"""^if __name__ == ["']__main__["']""", re.M)


def cli_scripts() -> list[Path]:
    found = []
    for folder in SCRIPT_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(ROOT).parts):
                continue
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if _PARSER.search(text) and _MAIN.search(text):
                found.append(path)
    return found


SCRIPTS = cli_scripts()


def test_the_known_scripts_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"recipes/pretrain_llama_c4.py", "recipes/scale_study.py", "benchmarks/optimizer_overhead.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.relative_to(ROOT).as_posix() for p in SCRIPTS])
def test_script_answers_help(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, f"{script} --help exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert "usage:" in proc.stdout.lower(), proc.stdout[-2000:]
