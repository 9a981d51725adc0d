"""The README quickstart runs as one process and under `autopar run`, with the same losses."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart.py"


def _losses(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+ loss ([-0-9.e]+)$", out, flags=re.M)]


def test_quickstart_same_losses_on_one_and_four_processes(tmp_path):
    env = dict(os.environ, AUTOPAR_CACHE_DIR=str(tmp_path / "cache"))
    single = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "autopar", "run", str(EXAMPLE), "--nproc", "4"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = _losses(single.stdout), _losses(multi.stdout)
    assert len(a) == 3 and len(b) == 3, (single.stdout[-2000:], multi.stdout[-2000:])
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-5)
    assert "mesh" in single.stdout  # the plan is printed, readable
