#!/usr/bin/env bash
# The GPU checks of issues 3 and 5, in one go, on a machine with one CUDA GPU and autopar installed:
#   bash bench/gpu_checks.sh OUTDIR
# 1. the offload plans' exactness and memory on the GPU (tests/test_gpu_offload.py)
# 2. a profile of this machine (autopar profile --nproc 1)
# 3. per-op predicted vs measured times: matmul, attention, layernorm (bench/op_accuracy.py)
# 4. a model whose fp32 weights + Adam state are 2x the GPU memory allowed, on the solver's
#    offload plan (bench/gpu_offload.py)
# Each step's log goes to OUTDIR; a failing step does not stop the later ones.
set -u
out=${1:?usage: bash bench/gpu_checks.sh OUTDIR}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd /tmp  # not the checkout: its autopar/ folder is not the installed package
python3 -c "import torch, autopar; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu --rootdir "$here" "$here/tests/test_gpu_offload.py" 2>&1 | tee "$out/gpu_tests.txt"
timeout 150 python3 -c "
import sys
from autopar.cost_model.profiler import profile
profile(1, sys.argv[1], lambda s: print('  ' + s, flush=True))" "$out/gpu_profile.json" 2>&1 | tee "$out/profile.txt"
timeout 170 python3 "$here/bench/op_accuracy.py" --profile "$out/gpu_profile.json" --json "$out/op_accuracy.json" 2>&1 | tee "$out/op_accuracy.txt"
timeout 180 python3 "$here/bench/gpu_offload.py" --profile "$out/gpu_profile.json" --json "$out/gpu_offload.json" 2>&1 | tee "$out/gpu_offload.txt"
