"""The 2-rank gloo step check: natively (fast) and on aarch64 under qemu-user (slow).

tools/arm_check.py compares a 2-process gloo data-parallel SGD step with one process;
tools/arm_emulation.sh runs it on an emulated aarch64 Python. The native tests prove the
check passes on a correct step and fails on a wrong one (gradients summed, not averaged),
so a PASS under emulation means something.
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


def test_native_two_rank_step_matches_one_process():
    result = _run([sys.executable, str(CHECK), "--skip-ortools"], timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"machine: {platform.machine()} ")
    assert "model: autopar.models mlp 'tiny'" in result.stdout  # the zoo model, not the fallback
    assert lines[-1] == f"PASS ({platform.machine()}, torch {torch.__version__})"


def test_native_check_fails_when_gradients_are_summed_not_averaged():
    cmd = [sys.executable, str(CHECK), "--grad-reduce", "sum", "--skip-ortools", "--skip-autopar"]
    result = _run(cmd, timeout_s=300)
    assert result.returncode == 1, result.stdout + result.stderr
    # Step 0's loss is computed before any update, so the first difference is step 1's loss.
    assert "FAIL: AssertionError: rank 0 loss at step 1" in result.stdout
    assert "PASS" not in result.stdout


def _emulated_root_ready() -> bool:
    arm = Path(os.environ.get("AUTOPAR_ARM_ROOT", REPO / ".arm"))
    return (arm / "rootfs" / ".autopar-rootfs-ok").exists() and (
        arm / "rootfs" / "opt" / "site-packages" / ".autopar-site-ok"
    ).exists()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_aarch64_two_rank_step_under_qemu():
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("qemu-aarch64-static not installed (apt-get install qemu-user-static)")
    if os.geteuid() != 0 and not _emulated_root_ready():
        pytest.skip("building the arm64 root needs root; run tools/arm_emulation.sh once as root")
    result = _run(["bash", str(EMULATION)], timeout_s=3500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "machine: aarch64 " in result.stdout
    pass_lines = [line for line in result.stdout.splitlines() if line.startswith("PASS")]
    assert len(pass_lines) == 1 and pass_lines[0].startswith("PASS (aarch64, torch "), pass_lines
