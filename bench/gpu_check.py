"""The prepared GPU check: one command, one CUDA GPU, under 8 minutes, one JSON + one markdown.

    bash bench/gpu_check.sh            # = python bench/gpu_check.py --out runs/gpu_check
    python bench/gpu_check.py --tiny   # CPU dry run of every phase in about a minute (tested)

Phases, each with a share of the time budget (a phase that would overrun is cut and says so):

1. ``tests``: the device-sensitive tests (``tests/test_cuda.py``) on the device.
2. ``step_time``: ``bench/step_time.py`` at the gpt2 shape and the 1B attention shape (D=2048,
   H=16, 24 layers) with bf16 msign, compile off and on (``torch.compile(optimizer.step)``, core
   rows), peak GPU memory per optimizer.
3. ``training``: equal-time training (``--train-seconds`` each) of Muon, CM and per-head Muon (if
   this library has it) on a ~25M-parameter GPT, bytes of text gathered from files already on the
   machine (this repository's sources and docs, then Python's standard library); validation loss
   at the last evaluation every run reached, steps done and median step time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"))
    p.add_argument("--tiny", action="store_true", help="CPU dry run with tiny shapes and seconds-long runs")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--budget-s", type=float, default=420.0, help="total seconds for all phases")
    p.add_argument("--train-seconds", type=float, default=55.0, help="seconds of training per optimizer")
    p.add_argument("--phases", default="tests,step_time,training")
    return p.parse_args(argv)


def env(device: str, tiny: bool) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + e.get("PYTHONPATH", "")
    e["COMPOSITIONAL_MUON_TEST_DEVICE"] = device
    if not tiny:
        e["COMPOSITIONAL_MUON_MSIGN_DTYPE"] = "bfloat16"
    return e


def run(cmd: list, timeout: float, e: dict) -> dict:
    """Run a command; returns rc, seconds and the output's tail (rc 124 when cut by the timeout)."""
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=max(1.0, timeout))
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as x:
        rc, out = 124, (x.stdout or b"").decode(errors="replace") if isinstance(x.stdout, bytes) else (x.stdout or "")
    print(f"$ {' '.join(cmd)}\n  -> rc {rc} in {time.time() - t0:.0f}s", flush=True)
    return dict(cmd=cmd, rc=rc, seconds=time.time() - t0, tail=out[-3000:])


def corpus(path: str, max_bytes: int) -> str:
    """A text file built from files already on the machine: this repository's sources and docs,
    then the Python standard library, up to ``max_bytes``."""
    files = sorted(glob.glob(os.path.join(ROOT, "src", "**", "*.py"), recursive=True))
    files += sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    files += sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    n = 0
    with open(path, "wb") as out:
        for f in files:
            try:
                with open(f, "rb") as fh:
                    b = fh.read()
            except OSError:
                continue
            out.write(b)
            n += len(b)
            if n >= max_bytes:
                break
    return path


def phase_tests(args, e, budget) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    if args.tiny:  # the dry run checks the plumbing; the suite runs these tests on CPU when asked
        cmd += ["-k", "default_msign_dtype or muon_on_device"]
    return run(cmd, budget, e)


def phase_step_time(args, e, budget) -> dict:
    shapes = ["tiny"] if args.tiny else ["gpt2", "1b"]
    core = "AdamW,torch.optim.Muon,Muon,CM full,CM isotropic"
    plans = []
    for shape in shapes:
        # every row at gpt2; at 1B (1.5 GiB of weights, every optimizer's state alive at once) the
        # core rows and the peers but the slow Gram-Newton-Schulz mode
        rows = ["--set", "all"] if shape != "1b" else ["--set", "core", "--skip", "pt-opt Muon gram"]
        plans.append((shape, False, [] if args.tiny else rows))
        plans.append((shape, True, ["--only", core] + (["--compile-backend", "eager"] if args.tiny else [])))
    results, t_end = [], time.time() + budget
    for shape, comp, extra in plans:
        left = t_end - time.time()
        if left < 20:
            results.append(dict(shape=shape, compile=comp, rc=None, note="cut: out of time"))
            continue
        js = os.path.join(args.out, f"step_time_{shape}_{'compile' if comp else 'eager'}.json")
        cmd = [sys.executable, os.path.join(HERE, "step_time.py"), "--shape", shape, "--device", args.device]
        cmd += [
            "--json",
            js,
            "--warmup",
            "2",
            "--repeat",
            "5",
            "--min-repeat",
            "2",
            "--budget",
            "1" if args.tiny else "3",
        ]
        cmd += (["--compile"] if comp else []) + extra
        cmd += ["--threads", "1", "--no-peers"] if args.tiny else ["--slow-step", "20"]
        r = run(cmd, min(left, budget / 2), e)
        r.update(shape=shape, compile=comp, json=js if os.path.exists(js) else None)
        results.append(r)
    return dict(runs=results)


def phase_training(args, e, budget) -> dict:
    data = corpus(os.path.join(args.out, "corpus.txt"), 200_000 if args.tiny else 20_000_000)
    sys.path.insert(0, os.path.join(ROOT, "src"))
    try:
        from compositional_muon.training.recipes import OPTIMIZERS
    except ImportError:
        OPTIMIZERS = ("muon", "cm")
    opts = [o for o in ("muon", "cm", "muon-per-head") if o in OPTIMIZERS]
    model = (
        ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "4"]
        if args.tiny
        else ["--n-layer", "8", "--n-embd", "512", "--n-head", "8", "--block-size", "256", "--batch-size", "32"]
    )
    secs = min(args.train_seconds, max(1.0, budget / max(1, len(opts)) - 15))
    runs = {}
    for o in opts:
        out = os.path.join(args.out, "train", o)
        cmd = [sys.executable, "-m", "compositional_muon.train", "--optimizer", o, "--data", data, "--out", out]
        cmd += model + [
            "--steps",
            "1000000",
            "--time-limit",
            f"{secs:g}",
            "--eval-interval",
            "1" if args.tiny else "100",
        ]
        cmd += ["--eval-iters", "2" if args.tiny else "8", "--device", args.device, "--quiet", "--no-plot"]
        cmd += ["--ckpt-interval", "0"]
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
        r = run(cmd, secs + 120, e)
        r["metrics"] = _metrics(os.path.join(out, "metrics.jsonl"))
        runs[o] = r
    common = min((r["metrics"].get("last_eval_step") or 0 for r in runs.values()), default=0)
    for r in runs.values():
        r["val_at_common_step"] = r["metrics"].get("val_by_step", {}).get(str(common))
    return dict(seconds_each=secs, common_eval_step=common, runs=runs)


def _metrics(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        recs = [json.loads(x) for x in f if x.strip()]
    evals = {str(r["step"]): r["val_loss"] for r in recs if "val_loss" in r}
    times = sorted(r["step_time"] for r in recs[5:]) or sorted(r["step_time"] for r in recs) or [float("nan")]
    last = max((int(s) for s in evals), default=None)
    return dict(
        steps=recs[-1]["step"] if recs else 0,
        median_step_s=times[len(times) // 2],
        last_eval_step=last,
        last_val=evals.get(str(last)),
        val_by_step=evals,
    )


def markdown(res: dict) -> str:
    lines = [f"# GPU check ({res['device']}, {res['wall_s']:.0f} s)", "", f"machine: {res.get('machine', '?')}", ""]
    t = res["phases"].get("tests")
    if t:
        lines += [f"## tests/test_cuda.py: rc {t['rc']}", "", "```", t["tail"][-600:].strip(), "```", ""]
    st = res["phases"].get("step_time")
    if st:
        sys.path.insert(0, HERE)
        from benchkit import report

        for r in st["runs"]:
            if not r.get("json"):
                lines += [
                    f"## step time {r['shape']} compile={r['compile']}: {r.get('note') or 'rc ' + str(r['rc'])}",
                    "",
                ]
                continue
            with open(r["json"]) as f:
                for shape_res in json.load(f)["results"]:
                    lines += [report.table(shape_res), ""]
    tr = res["phases"].get("training")
    if tr:
        lines += [
            f"## training: {tr['seconds_each']:.0f} s each, validation loss at step {tr['common_eval_step']} "
            "(the last evaluation every run reached) and at each run's last evaluation",
            "",
            "| optimizer | steps | median step ms | val @ common step | last eval step | val @ last |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for o, r in tr["runs"].items():
            m = r["metrics"]
            lines.append(
                f"| {o} | {m.get('steps', '-')} | {1e3 * m.get('median_step_s', float('nan')):.1f} "
                f"| {r['val_at_common_step'] or '-'} | {m.get('last_eval_step', '-')} | {m.get('last_val', '-')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.tiny:  # plumbing only: no time cuts (a loaded CI machine may be slow), seconds-long runs
        args.budget_s, args.train_seconds = 3600.0, min(args.train_seconds, 3.0)
    os.makedirs(args.out, exist_ok=True)
    e = env(args.device, args.tiny)
    sys.path.insert(0, HERE)
    from benchkit import machine

    t0 = time.time()
    res: dict = dict(device=args.device, tiny=args.tiny, argv=sys.argv, phases={})
    res["machine"] = machine.describe(args.device, measure_gemm=not args.tiny).line()
    shares = {"tests": 0.12, "step_time": 0.45, "training": 0.43}
    fns = {"tests": phase_tests, "step_time": phase_step_time, "training": phase_training}
    for name in [p for p in args.phases.split(",") if p]:
        left = args.budget_s - (time.time() - t0)
        res["phases"][name] = fns[name](args, e, min(left, shares[name] * args.budget_s + 30))
    res["wall_s"] = time.time() - t0
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(res))
    print(f"wrote {args.out}/gpu_check.json and gpu_check.md in {res['wall_s']:.0f} s")
    bad = [n for n, p in res["phases"].items() if n == "tests" and p["rc"] not in (0, 5)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
