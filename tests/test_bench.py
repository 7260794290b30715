"""The benchmark tooling measures what it says (no timing assertions): profiler byte counts,
transient memory, machine flags, gradient restoring for peers, the step-time JSON, and the GPU
check's CPU dry run."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from benchkit import machine, measure  # noqa: E402

MIB = 2**20
CPUINFO = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_tile\n"


def test_cpu_model_and_flags_from_cpuinfo():
    assert machine.cpu_model(CPUINFO) == "Test CPU 9000"
    f = machine.cpu_flags(CPUINFO)
    assert f["avx2"] and f["avx512_bf16"] and f["amx_tile"]
    assert not f["amx_bf16"] and not f["avx512_fp16"]


def test_profile_counts_bytes_copied_and_gemm_ops(one_thread):
    p = torch.nn.Parameter(torch.zeros(256, 256))
    work = measure.Workload([p])
    a, b = torch.randn(512, 256), torch.randn(256, 256)

    def step():
        with torch.no_grad():
            p.copy_(b)  # 256 KiB written
            c = torch.cat([a, b])  # 768 KiB written
            p.add_(c[:256] @ b)  # one GEMM, no copy

    prof = measure.profile_steps(step, work, "cpu", steps=2)
    assert prof["copied_bytes"] == 256 * 256 * 4 + 768 * 256 * 4
    assert prof["copy_calls"] == 2
    ops = {o["op"]: o for o in prof["top_ops"]}
    assert ops["aten::mm"]["calls"] == 1
    assert 0 <= prof["non_gemm_share"] <= 1 and prof["gemm_s"] > 0


def test_transient_memory_counts_the_step_temporaries(one_thread):
    p = torch.nn.Parameter(torch.zeros(512, 512))  # 1 MiB
    work = measure.Workload([p])

    def step():
        with torch.no_grad():
            tmp = torch.ones(4, 512, 512)  # 4 MiB alive at once
            p.add_(tmp.sum(0))  # + 1 MiB for the sum
            del tmp

    mem = measure.transient_memory(step, work, "cpu")
    assert mem["weight_bytes"] == MIB
    assert 5 * MIB <= mem["peak_tensor_bytes"] <= 5 * MIB + 64 * 1024
    assert mem["peak_tensor_x_weights"] == pytest.approx(mem["peak_tensor_bytes"] / MIB)


def test_workload_restores_weights_and_gradients_a_peer_consumed():
    p = torch.nn.Parameter(torch.randn(4, 3))
    work = measure.Workload([p])
    w0, g0 = p.detach().clone(), work.grads[0].clone()
    work.restore()
    with torch.no_grad():
        p.grad.mul_(3)  # a peer modifying the gradient in place
        p.add_(1.0)
    p.grad = None  # and one that consumes it
    work.restore()
    assert torch.equal(p.detach(), w0) and torch.equal(p.grad, g0)


def _run(args, timeout=900):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def test_step_time_tiny_writes_machine_rows_memory_and_profile(tmp_path):
    js = tmp_path / "r.json"
    _run(
        ["bench/step_time.py", "--shape", "tiny", "--only", "torch.optim.Muon,Muon,CM full,pt-opt Muon", "--profile"]
        + ["--threads", "1", "--repeat", "2", "--min-repeat", "2", "--budget", "0.1", "--json", str(js)]
    )
    out = json.loads(js.read_text())
    m = out["machine"]
    assert set(m["cpu_flags"]) >= {"avx2", "avx512_bf16", "amx_bf16"}
    assert set(m["gemm_gflops"]) == {"float32", "bfloat16"} and all(v > 0 for v in m["gemm_gflops"].values())
    res = out["results"][0]
    assert res["msign_dtype"] in ("float32", "bfloat16") and res["weight_bytes"] == 2 * 4 * 64 * 64 * 4
    have_peer = "pt-opt Muon" in res["rows"]
    assert set(res["rows"]) == {"torch.optim.Muon", "Muon", "CM full"} | ({"pt-opt Muon"} if have_peer else set())
    if have_peer:  # the peer is timed on the same weights and compared with our row of its algorithm
        assert res["rows"]["Muon"]["vs_fastest_peer"]["peer"] == "pt-opt Muon"
    for r in res["rows"].values():
        assert r["n"] == 2 and r["memory"]["peak_tensor_bytes"] > 0
        assert r["profile"]["copied_bytes"] > 0 and r["profile"]["top_ops"]
    assert res["rows"]["torch.optim.Muon"]["vs_torch_muon"] == 1.0


@pytest.mark.slow
def test_gpu_check_tiny_dry_run(tmp_path):
    _run(["bench/gpu_check.py", "--tiny", "--out", str(tmp_path)], timeout=1200)
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["tiny"] and res["device"] == "cpu"
    assert res["phases"]["tests"]["rc"] == 0
    runs = res["phases"]["step_time"]["runs"]
    assert [(r["shape"], r["compile"]) for r in runs] == [("tiny", False), ("tiny", True)]
    assert all(r["rc"] == 0 and r["json"] for r in runs)
    train = res["phases"]["training"]["runs"]
    assert {"muon", "cm"} <= set(train) and all(r["rc"] == 0 and r["metrics"]["steps"] > 0 for r in train.values())
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| Muon |" in md and "## training" in md
