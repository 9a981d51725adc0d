"""Test-wide settings.

``local:N`` clusters read the profile that `autopar profile` writes to
~/.cache/autopar/profile.json; pointing AUTOPAR_PROFILE at a path that does not exist keeps
every test on the documented catalog fallback, whatever a developer profiled earlier. Tests
that need a profile pass one explicitly. The plan cache is kept per test session for the
same reason.
"""
import os
import tempfile

_session_dir = tempfile.mkdtemp(prefix="autopar-tests-")
os.environ["AUTOPAR_PROFILE"] = os.path.join(_session_dir, "no-profile.json")
os.environ.setdefault("AUTOPAR_CACHE_DIR", os.path.join(_session_dir, "plan-cache"))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_rank_mesh():
    """A ("dp", "tp") DeviceMesh of one rank in this process (a HashStore gloo group, made
    here unless one exists): the runtime's local kernels on DTensors, without launching ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    if made:
        dist.destroy_process_group()
