"""bench/gpu_check.py on a machine without CUDA: it says it found no GPU, still prints the precision
figures of the valuation (float32 and bf16 autocast on the CPU against float64) and exits 0."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script runs its GPU checks")
def test_gpu_check_on_a_cpu_only_machine_reports_precision_and_exits_zero():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--quick"], capture_output=True,
                          text=True, timeout=900, cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("no CUDA GPU found")
    figures = dict(re.findall(r"cpu (float32|bf16 autocast)\s+spearman ([0-9.]+)", done.stdout))
    assert set(figures) == {"float32", "bf16 autocast"}
    assert float(figures["float32"]) > 0.9999  # float32 against float64: rounding only
    assert 0.9 < float(figures["bf16 autocast"]) <= 1.0
