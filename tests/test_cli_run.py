"""`autopar run`, for real: a decorated script on 2 processes (and unchanged as one plain process),
and a zoo model trained for 2 steps. Needs the runtime launcher and the solver."""
from __future__ import annotations

import json
import re

import pytest

from test_cli_fixtures import main_in_process, run_cli

pytest.importorskip("autopar.runtime.launch")
pytest.importorskip("autopar.solvers.api")

QUICKSTART = '''
import dataclasses, sys
import torch
import torch.distributed as dist
import autopar.decorator as D
from autopar.models import gpt

@D.parallelize(cluster="local:2")
class GPT(gpt.GPT):
    def example_inputs(self):
        return gpt.example_inputs(self.config, 4)

cfg = dataclasses.replace(gpt.GPTConfig.tiny(), n_layer=int(sys.argv[1]))
torch.manual_seed(0)
model = GPT(cfg)
x = gpt.example_inputs(cfg, 4)
y = gpt.make_targets(model, x)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
losses = [float(model.train_step(x, y, gpt.loss_fn, opt)) for _ in range(2)]
rank = dist.get_rank() if dist.is_initialized() else 0
print(f"RESULT rank={rank} type={type(model).__name__} dp={model.plan.mesh['dp']} "
      f"losses={losses[0]:.6f},{losses[1]:.6f}")
'''


def _results(text):
    # ranks share one stdout pipe, so two ranks' lines can arrive interleaved on one line
    return sorted(re.findall(r"RESULT (rank=\d+ type=\w+ dp=\d+ losses=[-0-9.]+,[-0-9.]+\d)", text))


def test_run_script_on_two_processes_and_as_one(tmp_path):
    """The same script: on 2 ranks through `autopar run` (rank 0 solves, both train the same plan,
    script args passed through), then as one plain process (plan from the cache, unsharded)."""
    (tmp_path / "quickstart.py").write_text(QUICKSTART)
    env = {"AUTOPAR_CACHE_DIR": str(tmp_path / "cache")}
    res = run_cli("run", "quickstart.py", "--nproc", "2", "2", cwd=tmp_path, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    r = _results(res.stdout)
    assert len(r) == 2 and all("type=ParallelModule" in x for x in r), res.stdout
    assert r[0].split("losses=")[1] == r[1].split("losses=")[1]  # the same global loss on both ranks
    assert res.stderr.count("solved plan") == 1 and "plan from cache" not in res.stderr
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1

    import subprocess
    import sys
    import os

    plain = subprocess.run([sys.executable, "quickstart.py", "2"], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, **env}, timeout=240)
    assert plain.returncode == 0, plain.stderr[-3000:]
    (p,) = _results(plain.stdout)
    assert "type=GPT" in p and "plan from cache" in plain.stderr and "running unsharded" in plain.stderr
    first = lambda s: float(s.split("losses=")[1].split(",")[0])  # noqa: E731
    assert first(p) == pytest.approx(first(r[0]), rel=1e-5)  # same weights, same global batch


def test_run_model_reports_measured_and_predicted(tmp_path):
    env = {"AUTOPAR_CACHE_DIR": str(tmp_path / "cache")}
    res = run_cli("run", "autopar.models.mlp:tiny", "--cluster", "local:2", "--steps", "2", "--json",
                  cwd=tmp_path, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads(res.stdout)
    assert d["steps"] == 2 and d["mesh"]["pp"] * d["mesh"]["dp"] * d["mesh"]["tp"] == 2
    assert d["measured_step_s"] > 0 and d["predicted_step_s"] > 0


def test_run_errors(tmp_path, capsys):
    rc, _, err = main_in_process(capsys, "run", "missing.py", "--nproc", "2", cwd=tmp_path)
    assert rc == 1 and "missing.py does not exist" in err
    rc, _, err = main_in_process(capsys, "run", "autopar.models.mlp:tiny", "--cluster", "h100x8")
    assert rc == 1 and "must be 'local:N'" in err
    rc, _, err = main_in_process(capsys, "run", "autopar.models.mlp:tiny", "--cluster", "local:2", "--nproc", "3")
    assert rc == 1 and "--nproc 3 disagrees" in err
