import subprocess

import pytest


@pytest.mark.slurm
def test_cluster_runs_a_job(slurm_cluster):
    out = subprocess.run(["srun", "-N1", "-p", slurm_cluster.partition, "hostname"], capture_output=True, text=True,
                         env=slurm_cluster.env(), timeout=60)
    assert out.returncode == 0, out.stderr + slurm_cluster.logs()
    assert out.stdout.strip()
