"""`autopar plan`, `explain` with the solver's cost tables, and `run`, through the real entry point.

These need the solver (autopar.solvers.api) and, for `run`, the runtime launcher; they skip
cleanly when those modules are missing."""
from __future__ import annotations

import json
import textwrap

import pytest

from test_cli_fixtures import main_in_process, run_cli

pytest.importorskip("autopar.solvers.api")


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    out = d / "tiny.plan.json"
    res = run_cli("plan", "autopar.models.gpt:tiny", "--cluster", "h100x8", "--fix", "tp=2,dp=4",
                  "--json", out, "--time-limit", "20", cwd=d)
    assert res.returncode == 0, res.stderr
    return out, res


def test_plan_prints_summary_and_writes_a_valid_plan(tiny_plan, tmp_path):
    out, res = tiny_plan
    assert "pp=1 x dp=4 x tp=2" in res.stdout and "Predicted step time" in res.stdout
    assert "capturing the graph" in res.stderr and "solving for h100x8" in res.stderr
    v = run_cli("validate", out, "--cluster", "h100x8", "--json", cwd=tmp_path)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout + v.stderr
    plan = json.loads(out.read_text())
    assert plan["mesh"] == {"pp": 1, "dp": 4, "tp": 2}
    assert plan["model"]["name"] == "autopar.models.gpt:tiny"


def test_plan_to_stdout_and_default_file(tmp_path, capsys):
    rc, out, err = main_in_process(capsys, "plan", "autopar.models.mlp:tiny", "--cluster", "local:2", "--json", "-",
                                   "--quiet", cwd=tmp_path)
    assert rc == 0 and err == "", err
    assert json.loads(out)["cluster"]["name"] == "local:2"
    rc, out, err = main_in_process(capsys, "plan", "autopar.models.mlp:tiny", "--cluster", "local:2", "-q",
                                   cwd=tmp_path)
    assert rc == 0 and "Predicted step time" in out
    assert (tmp_path / "tiny-local_2.plan.json").is_file()


def test_plan_from_a_model_file(tmp_path):
    (tmp_path / "mymodel.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
            return model, (torch.randn(4, 8),)
    """))
    res = run_cli("plan", "mymodel.py:build", "--cluster", "local:2", "--json", "p.json", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "p.json").read_text())["model"]["name"] == "mymodel.py:build"


def test_infeasible_memory_is_one_paragraph(tmp_path):
    res = run_cli("plan", "autopar.models.gpt:gpt3_6_7b", "--cluster", "local:1", "--time-limit", "10", cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    err = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and "GiB" in err[0] and "memory" in err[0]


def test_bad_constraint_is_one_paragraph(tmp_path, capsys):
    rc, _, err = main_in_process(capsys, "plan", "autopar.models.mlp:tiny", "--cluster", "local:2", "--fix", "tq=2")
    assert rc == 1 and "Traceback" not in err and "tq" in err


def test_explain_lists_costed_alternatives(tiny_plan, tmp_path):
    out, _ = tiny_plan
    res = run_cli("explain", out, "h.0.mlp.c_fc", "--json", "--top", "3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["source"] == "solver cost tables"
    alts = d["alternatives"]
    assert 2 <= len(alts) <= 3 and sum(a["chosen"] for a in alts) == 1
    assert [a["total_s"] for a in alts] == sorted(a["total_s"] for a in alts)
    plan = json.loads(out.read_text())
    chosen = next(a for a in alts if a["chosen"])
    mine = next(n for n in plan["nodes"] if n["node"] == "h_0_mlp_c_fc")
    assert chosen["strategy"] == mine["strategy"]
    assert chosen["compute_s"] == pytest.approx(mine["compute_s"], rel=1e-6)  # the solver's own figure

def test_explain_text(tiny_plan, capsys):
    out, _ = tiny_plan
    rc, text, _ = main_in_process(capsys, "explain", out, "h_0_mlp_c_fc")
    assert rc == 0 and text.startswith("h_0_mlp_c_fc") and "solver cost tables" in text
    assert sum(line.startswith("  *") for line in text.splitlines()) == 1
