"""Process-group teardown at exit (runtime.mesh): a decorated script ends without
``destroy_process_group``; the group autopar created must be destroyed while the interpreter is
still whole (else gloo can abort the process after a run that succeeded), and a rank that fails
must exit at once, its blocked peer failing right after (not at the group timeout). autopar's own
workers leave through ``exit_worker``: groups destroyed, output flushed, the exit code kept."""
from __future__ import annotations

import time

import pytest

from autopar.runtime.testing import run_workers

WORKER = '''
import atexit, os, sys
import torch
import torch.distributed as dist

# registered before the group exists, so it runs after autopar's teardown (atexit is LIFO)
atexit.register(lambda: print(f"at exit: initialized={dist.is_initialized()}", flush=True))
from autopar.runtime.mesh import init_distributed
init_distributed("cpu")
t = torch.ones(3) * (dist.get_rank() + 1)
dist.all_reduce(t)
print(f"sum={t.tolist()}", flush=True)
if sys.argv[1] == "fail" and dist.get_rank() == 1:
    raise ValueError("rank 1 fails on purpose")
if sys.argv[1] == "exit" and dist.get_rank() == 1:
    sys.exit(3)
dist.all_reduce(t)  # rank 0 blocks here when rank 1 failed
'''


def test_group_destroyed_at_exit_after_a_clean_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    outs = run_workers(str(script), 2, ["ok"], timeout_s=120)
    for out in outs:
        assert "sum=[3.0, 3.0, 3.0]" in out
        assert out.strip().endswith("at exit: initialized=False"), out


@pytest.mark.parametrize("how", ["fail", "exit"])
def test_a_failing_rank_ends_the_job_at_once(tmp_path, how):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 failed") as ei:
        run_workers(str(script), 2, [how], timeout_s=120)  # the group timeout is 120 s here
    assert time.monotonic() - t0 < 30
    msg = str(ei.value)
    assert "at exit: initialized=False" in msg  # rank 1 destroyed its group on the way out
    if how == "fail":
        assert "rank 1 fails on purpose" in msg
    else:
        assert "(exit 3)" in msg


EXIT_WORKER = '''
import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from autopar.runtime.mesh import exit_worker, init_distributed

init_distributed("cpu")
mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))  # holds a group past destroy
t = torch.ones(2)
dist.all_reduce(t, group=mesh.get_group())
sys.stdout.write(f"sum={t.tolist()} unflushed")  # no newline, no flush: exit_worker flushes
exit_worker(int(sys.argv[1]) if dist.get_rank() == 1 else 0)
print("not reached")
'''


def test_exit_worker_flushes_and_keeps_the_exit_code(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(EXIT_WORKER)
    outs = run_workers(str(script), 2, ["0"], timeout_s=120)
    assert outs == ["sum=[2.0, 2.0] unflushed"] * 2
    with pytest.raises(RuntimeError, match=r"rank 1 failed \(exit 5\)"):
        run_workers(str(script), 2, ["5"], timeout_s=120)
