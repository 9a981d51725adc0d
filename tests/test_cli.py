"""The ``autopar`` console script, run for real (subprocess): show, validate, explain, profile,
usage and the errors a user can meet. Plan/run (solver, runtime) are in test_cli_plan.py."""
from __future__ import annotations

import json
import os
import sys

import pytest

from test_cli_fixtures import AUTOPAR, main_in_process, make_plan, run_cli


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    p = d / "plan.json"
    make_plan().save(p)
    return p


def one_paragraph_error(res, *needles):
    """Exit 1, no traceback, one paragraph naming the problem."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    err = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(err) == 1, res.stderr
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def test_console_script_and_module_entry_point_exist(tmp_path):
    assert os.path.exists(AUTOPAR)
    import subprocess

    res = subprocess.run([sys.executable, "-m", "autopar", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for cmd in ("plan", "run", "show", "explain", "profile", "validate"):
        assert cmd in res.stdout


def test_usage_errors_exit_2(tmp_path, capsys):
    res = run_cli("show", "x.json", "--bogus", cwd=tmp_path)
    assert res.returncode == 2 and "usage" in res.stderr and "Traceback" not in res.stderr
    for args in ([], ["frobnicate"], ["show"], ["plan", "m:f"], ["explain", "p.json"]):
        rc, _, err = main_in_process(capsys, *args, cwd=tmp_path)
        assert rc == 2 and "usage" in err, (args, rc, err)


def test_show_text_json_and_png(plan_file, tmp_path):
    res = run_cli("show", plan_file, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "pp=2 x dp=2 x tp=2" in res.stdout and "h.0..h.3:" in res.stdout
    assert "Predicted step time" in res.stdout
    res = run_cli("show", plan_file, "--json", cwd=tmp_path)
    assert res.returncode == 0
    d = json.loads(res.stdout)
    assert not res.stderr
    assert d["world_size"] == 8 and d["pipeline"]["schedule"] == "1f1b"
    png = tmp_path / "p.png"
    res = run_cli("show", plan_file, "--png", png, "--quiet", cwd=tmp_path)
    assert res.returncode == 0 and res.stderr == ""
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_show_png_without_matplotlib_is_a_clean_error(plan_file, tmp_path):
    # A sitecustomize that hides matplotlib, as on an install without the 'plot' extra.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'matplotlib' or name.startswith('matplotlib.'):\n"
        "            raise ImportError('no matplotlib')\n"
        "sys.meta_path.insert(0, _Block())\n")
    res = run_cli("show", plan_file, "--png", tmp_path / "x.png", cwd=tmp_path,
                  env={"PYTHONPATH": str(tmp_path)})
    one_paragraph_error(res, "matplotlib", "autopar[plot]")


def test_bad_plan_file_is_one_paragraph(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_paragraph_error(run_cli("show", bad, cwd=tmp_path), "not a valid autopar plan", "line 1")
    data = make_plan().to_dict()
    data["schema_version"] = 7
    bad.write_text(json.dumps(data))
    rc, _, err = main_in_process(capsys, "show", bad)
    assert rc == 1 and "schema_version is 7" in err and "Traceback" not in err
    rc, _, err = main_in_process(capsys, "explain", tmp_path / "missing.json", "x")
    assert rc == 1 and "does not exist" in err


def test_validate_ok_and_json(plan_file, tmp_path, capsys):
    res = run_cli("validate", plan_file, "--cluster", "h100x8", cwd=tmp_path)
    assert res.returncode == 0 and "valid" in res.stdout and "fits cluster 'h100x8'" in res.stdout
    rc, out, _ = main_in_process(capsys, "validate", plan_file, "--json")
    assert rc == 0 and json.loads(out)["ok"] is True


def test_validate_schema_error_names_the_field(plan_file, tmp_path, capsys):
    data = json.loads(plan_file.read_text())
    data["mesh"]["tp"] = 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    rc, stdout, _ = main_in_process(capsys, "validate", bad, "--json")
    assert rc == 1
    out = json.loads(stdout)
    assert out["ok"] is False and any("plan.mesh.tp" in e for e in out["errors"])


def test_plan_made_for_another_cluster(plan_file, tmp_path, capsys):
    one_paragraph_error(run_cli("validate", plan_file, "--cluster", "a100x8", cwd=tmp_path),
                        "made for cluster 'h100x8'", "a100x8")
    rc, _, err = main_in_process(capsys, "validate", plan_file, "--cluster", "h100x16")
    assert rc == 1 and "8 devices" in err and "16" in err


def test_unknown_cluster_name(plan_file, tmp_path, capsys):
    one_paragraph_error(run_cli("plan", "autopar.models.mlp:tiny", "--cluster", "h100x7000x", cwd=tmp_path),
                        "unknown cluster 'h100x7000x'")
    rc, _, err = main_in_process(capsys, "validate", plan_file, "--cluster", "tpu9x4")
    assert rc == 1 and "unknown cluster 'tpu9x4'" in err


def test_unknown_model_path(tmp_path, capsys):
    one_paragraph_error(run_cli("plan", "nosuchpkg.models:tiny", "--cluster", "h100x8", cwd=tmp_path),
                        "cannot import module 'nosuchpkg.models'")
    for args, needle in ((["autopar.models.gpt:nosuch"], "has no function 'nosuch'"),
                         (["missing_file.py:build"], "missing_file.py does not exist"),
                         (["no_colon"], "pkg.module:function")):
        rc, _, err = main_in_process(capsys, "plan", *args, "--cluster", "h100x8", cwd=tmp_path)
        assert rc == 1 and needle in err and "Traceback" not in err, err
    (tmp_path / "m.py").write_text("def build():\n    return 42\n")
    rc, _, err = main_in_process(capsys, "plan", "m.py:build", "--cluster", "h100x8", cwd=tmp_path)
    assert rc == 1 and "must return (model, example_inputs)" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    rc, _, err = main_in_process(capsys, "plan", "nosuchpkg.models:tiny", "--cluster", "h100x8", "--debug")
    assert rc == 1 and "Traceback" in err


def test_explain_from_plan_alone_and_unknown_node(plan_file, tmp_path, capsys):
    res = run_cli("explain", plan_file, "h.1.mlp.c_fc", "--no-recapture", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("h_1_mlp_c_fc (stage 0): colwise")
    rc, out, _ = main_in_process(capsys, "explain", plan_file, "h_1_mlp_c_fc", "--no-recapture", "--json")
    d = json.loads(out)
    assert d["chosen"]["strategy"] == "colwise" and d["source"] == "plan only"
    rc, _, err = main_in_process(capsys, "explain", plan_file, "h.1.mlp.c_fcc")
    assert rc == 1 and "not in the plan" in err and "h_1_mlp_c_fc" in err
    # the plan names autopar.models.gpt:tiny (2 layers) but was made for a 4-layer graph:
    # the alternatives are not comparable, and explain says so instead of guessing
    rc, out, _ = main_in_process(capsys, "explain", plan_file, "h_1_mlp_c_fc", "--json")
    d = json.loads(out)
    assert rc == 0 and d["source"] == "plan only" and any("captures as graph" in n for n in d["notes"])


def test_profile_writes_a_cluster(tmp_path):
    out = tmp_path / "profile.json"
    res = run_cli("profile", "--nproc", "1", "--out", out, "--json", "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["world_size"] == 1 and d["peak_flops"]["fp32"] > 0
    from autopar.cost_model.cluster import local_cluster

    assert local_cluster(1, out).world_size == 1
    # a repeat count below 1 is refused before anything is measured, and nothing is written
    bad = tmp_path / "bad.json"
    res = run_cli("profile", "--nproc", "1", "--repeat", "0", "--out", bad, cwd=tmp_path)
    assert res.returncode == 1 and "--repeat must be at least 1, got 0" in res.stderr and not bad.exists()
