"""The runtime's exactness matrix: every plan kind on 2 and 4 gloo CPU processes vs one process.

Each world size is ONE spawned job running many cases (see autopar.runtime.exactness): same
loss at each of 3 optimizer steps and the same parameters afterwards as a single process, and
the same after checkpoint save/load across two plans (same world size) and across world sizes
(saved by the 2-rank job, loaded by the 4-rank job under another plan).
"""
from __future__ import annotations

import json
import os

import pytest

import autopar.runtime.exactness as exactness
from autopar.runtime.testing import long_job_timeout_s, run_workers

CASES_2 = [
    "mlp:dp", "mlp:fsdp", "mlp:tp",
    "gpt:dp:probe=1", "gpt:fsdp:resharded=1", "gpt:tp", "gpt_tied:tp", "gpt:dp:mb=2",
    # a vocab-parallel embedding whose output stays a partial sum until its consumer
    "gpt:tp:vocab_partial=1",
    # dp gradients in many small buckets (all-reduces launched from the backward), 2 microbatches
    "gpt:dp:bucket=20000,mb=2",
    "gpt:fsdp:zero=2",
    "gpt:pp:mb=2", "gpt:pp:schedule=1f1b,mb=4", "gpt:pp:v=2,mb=4",
    "gpt:dp:recompute=1", "gpt:tp:offload=1", "gpt:dp:opt=adam",
    # ZeRO-3 regathers in the backward under the activation-offload and checkpoint hooks too
    "gpt:fsdp:offload=1,resharded=1", "gpt:fsdp:recompute=1",
    # ZeRO-Infinity plans (weights and grads on the host: a no-op copy on a CPU, run for real
    # on a GPU by tests/test_gpu_offload.py)
    "gpt:fsdp:opt=adam,offload=params,resharded=1", "gpt:dp:opt=adam,offload=grads,mb=2",
    "gpt:fsdp:ckpt=tp", "gpt:pp:mb=2,ckpt=dp", "gpt:dp:opt=adam,offload=1,ckpt=fsdp",
    "gpt:fsdp:opt=adam,save=ws2",
    "gpt:fsdp:meta=1", "gpt_tied:tp:meta=1",
    # the user's own loop (model(x), loss.backward(), optimizer.step()); a pipeline refuses it
    "gpt:dp:plain=1", "gpt:fsdp:plain=1,opt=adam", "gpt:pp:mb=2,plain=1,expect=train_step",
    # the zoo at tiny size (bert's masked-LM loss ignores positions: it needs loss_over=global
    # under dp, the plan contract's per-shard mean is exact only for plain means)
    "llama:dp", "llama:tp", "llama:pp:mb=2", "bert:dp:loss=global", "bert:tp", "vit:dp", "vit:tp",
    # batch-sharded batch norm all-reduces its statistic sums (running statistics compared too);
    # microbatches would each normalise with their own rows: refused
    "resnet:dp", "resnet:dp:mb=2,expect=microbatches", "dlrm:tp", "moe:dp", "moe:tp",
    # Hugging Face GPT-2 / LLaMA small configs (captured with torch.export)
    "hf_gpt2:dp", "hf_gpt2:tp", "hf_llama:fsdp:resharded=1", "hf_llama:tp",
    # the solver's own plan for local:2
    "gpt:solver", "mlp:solver", "llama:solver",
]
CASES_4 = [
    "gpt:dp", "gpt:fsdp:resharded=1", "gpt:tp", "gpt:dp_tp",
    "gpt:pp:mb=4", "gpt:pp:schedule=1f1b,mb=4",
    "gpt:pp_dp:mb=2", "gpt:pp_dp:schedule=1f1b,mb=2", "gpt:pp_tp:mb=2",
    "gpt:dp_tp:recompute=1,offload=1",
    "gpt:dp_tp:ckpt=pp_dp",
    "gpt:dp_tp:opt=adam,load=ws2",
    "gpt:pp_dp:v=2,mb=2",
    "resnet:dp", "resnet:dp_tp", "llama:dp_tp", "llama:dp_tp:bucket=20000", "llama:pp_dp:mb=2", "hf_gpt2:dp_tp", "hf_llama:dp_tp",
    "gpt:solver", "mlp:solver", "llama:solver",
    # the solver's plan with the mesh pinned (its placements, not make_plan's); its tp=4 plans
    # may shard the batch on tp, leaving grads that are pending sums over tp (bucketed too)
    "llama:solver:dp=2,tp=2", "gpt:solver:pp=2,dp=2,mb=2", "llama:solver:tp=4", "gpt:solver:tp=4",
]


def _run(nproc: int, cases: list[str], ckpt_dir: str) -> dict:
    # the whole matrix in one launch
    outs = run_workers(exactness.__file__, nproc, cases, timeout_s=long_job_timeout_s(),
                       env={"AUTOPAR_TEST_CKPT": ckpt_dir})
    results = {}
    for line in outs[0].splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["case"]] = r
    return results


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def results_2(ckpt_dir):
    return _run(2, CASES_2, ckpt_dir)


@pytest.fixture(scope="module")
def results_4(ckpt_dir, results_2):  # after the 2-rank job: it loads what that one saved
    return _run(4, CASES_4, ckpt_dir)


def _check(results: dict, case: str) -> None:
    r = results.get(case)
    assert r is not None, f"case {case} did not report (see the job output)"
    assert r["ok"], f"{case}: {r.get('error')}\n{r.get('trace', '')}"


@pytest.mark.parametrize("case", CASES_2)
def test_exact_on_2_ranks(results_2, case):
    _check(results_2, case)


@pytest.mark.parametrize("case", CASES_4)
def test_exact_on_4_ranks(results_4, case):
    _check(results_4, case)


def test_incomplete_checkpoint_refused(tmp_path):
    from autopar.runtime.checkpoint import CheckpointError, load_checkpoint

    (tmp_path / "ck.tmp").mkdir()
    (tmp_path / "ck").mkdir()  # a directory a crashed save could leave behind: no marker
    with pytest.raises(CheckpointError, match="AUTOPAR_COMPLETE"):
        load_checkpoint(None, None, str(tmp_path / "ck"))
    assert not os.path.exists(tmp_path / "ck" / "AUTOPAR_COMPLETE")
