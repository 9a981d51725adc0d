"""autopar's runtime on 2 gloo ranks vs one process: natively (fast) and on aarch64 under qemu-user (slow).

tools/arm_check.py runs a tiny zoo model under a data-parallel, a tensor-parallel and the
solver's plan with ``apply_plan(...).train_step`` on 2 gloo ranks and compares losses and
parameters with one process; tools/arm_emulation.sh runs it on an emulated aarch64 Python. The
native tests prove the check passes on the real runtime and fails when the runtime is broken
(data-parallel gradients never summed), so a PASS under emulation means something.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "tools" / "arm_check.py"
EMULATION = REPO / "tools" / "arm_emulation.sh"


def _load_arm_check():
    spec = importlib.util.spec_from_file_location("arm_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["arm_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


def test_config_rejects_uneven_batch_split():
    arm_check = _load_arm_check()
    with pytest.raises(ValueError, match="global_batch 7 does not split evenly over world_size 2"):
        arm_check.CheckConfig(world_size=2, global_batch=7)


def test_checkout_mapping_follows_setup_cfg():
    arm_check = _load_arm_check()
    packages = arm_check._checkout_packages(REPO)
    assert packages["autopar"] == REPO / "autopar"
    assert packages["autopar.runtime"] == REPO / "runtime"
    assert packages["autopar.cost_model"] == REPO / "cost_model"


def test_config_rejects_unknown_plan():
    arm_check = _load_arm_check()
    with pytest.raises(ValueError, match="plans must be a non-empty subset of"):
        arm_check.CheckConfig(plans=("dp", "zero9"))


def test_native_runtime_matches_one_process_under_dp_tp_and_solver_plans():
    result = _run([sys.executable, str(CHECK), "--skip-ortools"], timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"machine: {platform.machine()} ")
    assert "model: autopar.models gpt 'tiny'" in result.stdout
    plan_lines = {line.split(":", 1)[0]: line for line in lines if line.startswith("plan ")}
    assert sorted(plan_lines) == ["plan dp", "plan solver", "plan tp"], lines
    assert "mesh pp=1 dp=2 tp=1" in plan_lines["plan dp"]
    assert "mesh pp=1 dp=1 tp=2" in plan_lines["plan tp"]
    assert "tp-sharded 0/" not in plan_lines["plan tp"]  # tensor parallel really shards weights
    for line in plan_lines.values():  # each plan either ran and matched or equals one that did
        assert "max |diff| loss" in line or "not run, same as the" in line, line
    assert lines[-1] == f"PASS ({platform.machine()}, torch {torch.__version__})"


def test_native_check_fails_when_runtime_skips_the_dp_gradient_sum():
    cmd = [sys.executable, str(CHECK), "--fault", "drop-dp-grad-sync", "--skip-ortools", "--plans", "dp",
           "--steps", "2"]
    result = _run(cmd, timeout_s=300)
    assert result.returncode == 1, result.stdout + result.stderr
    # Step 0's loss is computed before any update, so the first difference is step 1's loss.
    assert "FAIL: plan dp: AssertionError: rank 0 loss at step 1" in result.stdout
    assert "PASS" not in result.stdout


def test_compare_names_the_parameter_that_differs():
    arm_check = _load_arm_check()
    want = arm_check.StepTrace((1.0, 0.5), {"fc.weight": torch.zeros(2, 2)})
    got = arm_check.StepTrace((1.0, 0.5), {"fc.weight": torch.tensor([[0.0, 0.0], [0.0, 1e-3]])})
    with pytest.raises(AssertionError, match="parameter 'fc.weight' after 2 steps"):
        arm_check.compare(got, want)
    assert arm_check.compare(want, want) == (0.0, 0.0)


def _emulated_root_ready() -> bool:
    arm = Path(os.environ.get("AUTOPAR_ARM_ROOT", REPO / ".arm"))
    return (arm / "rootfs" / ".autopar-rootfs-ok").exists() and (
        arm / "rootfs" / "opt" / "site-packages" / ".autopar-site-ok"
    ).exists()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_aarch64_runtime_plans_under_qemu():
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("qemu-aarch64-static not installed (apt-get install qemu-user-static)")
    if os.geteuid() != 0 and not _emulated_root_ready():
        pytest.skip("building the arm64 root needs root; run tools/arm_emulation.sh once as root")
    result = _run(["bash", str(EMULATION)], timeout_s=3500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "machine: aarch64 " in result.stdout
    pass_lines = [line for line in result.stdout.splitlines() if line.startswith("PASS")]
    assert len(pass_lines) == 1 and pass_lines[0].startswith("PASS (aarch64, torch "), pass_lines
    assert "plan dp: mesh pp=1 dp=2 tp=1" in result.stdout
    assert "plan tp: mesh pp=1 dp=1 tp=2" in result.stdout
