"""Side-by-side optimizer step times on the same weights and gradients, in one process.

    python bench/step_time.py [--shape gpt2] [--device cpu|cuda] [--compile] [--profile] [--set core|all]

Every optimizer steps the *same* parameters with the *same* fixed gradients (each keeps its own
state); the weights and gradients are restored (untimed) before every step. Steps are timed with
``time.perf_counter`` around ``step()`` (synchronized on CUDA), after ``--warmup`` untimed steps,
interleaved round-robin with a rotating order so load changes hit every optimizer alike; slow
optimizers get fewer samples (``--budget`` seconds each, at least ``--min-repeat``).

Rows: torch's AdamW and ``torch.optim.Muon``, this library's Muon, CM (full, isotropic, with
``--set all`` the other switches), the functional ``cm_qk``/``cm_ov`` per layer, the variants, and
the peers when installed (HeavyBall Muon; pytorch-optimizer Muon in ``newton_schulz`` and
``gram_newton_schulz`` modes, NorMuon, AdaMuon). ``vs fastest peer`` compares a row with the
fastest peer row of the same algorithm.

Also measured per optimizer (unless ``--no-memory``): peak transient memory of a step
(``benchkit.measure.transient_memory``); with ``--profile``: torch.profiler top ops, the share of
the step outside GEMM/factorization kernels and the bytes written by copies per step. The output
records the CPU model and flags, the msign dtype, and GEMM rates (fp32/bf16). Shapes:
``tiny``/``small``/``gpt2``/``1b`` (q/k/v/o stacks; ``1b`` is D=2048, H=16, 24 layers) and
``seed003`` (a whole LoopFormer). Writes markdown to stdout (and ``--md``) and JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gpt2", help="comma-separated: tiny, small, gpt2, 1b, seed003")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="time torch.compile(optimizer.step)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a quick dry run)")
    p.add_argument("--profile", action="store_true", help="torch.profiler summary per optimizer")
    p.add_argument("--profile-steps", type=int, default=2, help="steps under the profiler")
    p.add_argument("--no-memory", action="store_true", help="skip the transient-memory measurement")
    p.add_argument("--no-peers", action="store_true", help="leave out HeavyBall / pytorch-optimizer")
    p.add_argument("--set", default="core", choices=("core", "all"), help="core rows or every variant")
    p.add_argument("--only", default="", help="comma-separated optimizer names (default: the --set)")
    p.add_argument("--skip", default="", help="comma-separated optimizer names to leave out")
    p.add_argument("--bucket-bytes", type=int, default=None, help="bucket_bytes for library optimizers")
    p.add_argument("--msign-dtype", default=None, help="sets COMPOSITIONAL_MUON_MSIGN_DTYPE (e.g. bfloat16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=9, help="timed steps per optimizer (at most)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first builds state / compiles)")
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timed steps per optimizer")
    p.add_argument("--min-repeat", type=int, default=3)
    p.add_argument("--slow-step", type=float, default=30.0, help="one sample when a warm-up step is slower")
    p.add_argument("--json", default=os.path.join(HERE, "results.json"))
    p.add_argument("--md", default=None, help="also write the markdown here")
    p.add_argument("--src", default=None, help="import compositional_muon from this source tree")
    p.add_argument("--label", default="")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    if ARGS.src:
        sys.path.insert(0, os.path.abspath(ARGS.src))
    if ARGS.msign_dtype:
        os.environ["COMPOSITIONAL_MUON_MSIGN_DTYPE"] = ARGS.msign_dtype
sys.path.insert(0, HERE)

import torch  # noqa: E402
from benchkit import flops, machine, measure, report  # noqa: E402
from benchkit.optimizers import CORE, library_entries, peer_entries  # noqa: E402
from benchkit.shapes import build  # noqa: E402


def select(entries: list, args) -> list:
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if only:
        return [e for e in entries if e.name in only]
    keep = [e for e in entries if e.name not in skip]
    if args.set == "core":
        keep = [e for e in keep if e.name in CORE or e.name == "CM functional" or e.source not in ("ours", "torch")]
    return keep


def warm_up(entries: list, work, args) -> tuple[dict, dict, dict, list]:
    """Build each optimizer and run its untimed steps; a failure removes the row with its reason."""
    steps, need, warm, skipped = {}, {}, {}, []
    for e in entries:
        try:
            opt = e.make()
            step = torch.compile(opt.step, backend=args.compile_backend) if args.compile else opt.step
            ts = []
            for _ in range(max(1, args.warmup)):
                ts.append(measure.timed(step, work, args.device))
                if ts[-1] > args.slow_step:
                    break
        except Exception as exc:  # a peer or a variant that cannot run here: report, keep going
            skipped.append(f"{e.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        t = ts[-1]
        n = 1 if t > args.slow_step else max(min(args.repeat, int(args.budget // max(t, 1e-9))), args.min_repeat)
        steps[e.name], need[e.name], warm[e.name] = step, n, ts
        print(f"  warm-up {e.name:<28} {t * 1e3:10.1f} ms -> {n} timed steps", flush=True)
    return steps, need, warm, skipped


def run_shape(shape: str, args, rates: flops.Rates) -> dict:
    bench = build(shape, args.device)
    params = list(bench.model.parameters())
    work = measure.Workload(params)
    lib_opts = {"bucket_bytes": args.bucket_bytes} if args.bucket_bytes else {}
    entries = library_entries(bench, args.device, lib_opts)
    skipped: list = []
    if not args.no_peers:
        peers, skipped = peer_entries(bench, compile_step=args.compile)
        entries += peers
    entries = select(entries, args)
    print(f"\n## {shape}: {bench.description}", flush=True)
    load0 = os.getloadavg()
    steps, need, warm, failed = warm_up(entries, work, args)
    samples, rounds = measure.interleave(steps, work, args.device, need)
    load1 = os.getloadavg()
    hidden = [p for p in params if p.ndim >= 2] if not bench.whole_model else None
    if hidden is None:
        from benchkit.optimizers import _split

        hidden = _split(bench)[0]
    dtype = getattr(torch, machine.msign_dtype_name(args.device), torch.float32)
    rows = {}
    for e in entries:
        if e.name not in steps:
            continue
        xs = samples[e.name]
        terms = flops.flop_terms(e, bench, hidden, dtype)
        med = statistics.median(xs)
        floor = rates.floor(terms) if terms else None
        rows[e.name] = dict(
            algorithm=e.algorithm,
            source=e.source,
            note=e.note,
            median_s=med,
            p10_s=min(xs) if len(xs) < 3 else statistics.quantiles(xs, n=10, method="inclusive")[0],
            p90_s=max(xs) if len(xs) < 3 else statistics.quantiles(xs, n=10, method="inclusive")[-1],
            n=len(xs),
            samples_s=xs,
            warmup_s=warm[e.name],
            gemm_flops=sum(f for f, _, _ in terms),
            floor_s=floor,
            floor_fraction=floor / med if floor else None,
            vs_torch_muon=med / statistics.median(samples["torch.optim.Muon"])
            if "torch.optim.Muon" in samples
            else None,
            vs_torch_muon_paired=measure.paired_ratio(rounds, samples, e.name, "torch.optim.Muon"),
        )
        if not args.no_memory:
            rows[e.name]["memory"] = measure.transient_memory(steps[e.name], work, args.device)
        if args.profile:
            rows[e.name]["profile"] = measure.profile_steps(steps[e.name], work, args.device, args.profile_steps)
    for r in rows.values():
        peers = [
            (n, q) for n, q in rows.items() if q["source"] not in ("ours", "torch") and q["algorithm"] == r["algorithm"]
        ]
        if peers and r["source"] == "ours":
            pn, pq = min(peers, key=lambda nq: nq[1]["median_s"])
            r["vs_fastest_peer"] = dict(peer=pn, ratio=r["median_s"] / pq["median_s"])
    return dict(
        shape=shape,
        description=bench.description,
        device=args.device,
        compile=args.compile,
        msign_dtype=machine.msign_dtype_name(args.device),
        weight_bytes=work.weight_bytes,
        load_before=load0,
        load_after=load1,
        skipped=skipped + failed,
        rows=rows,
    )


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine.describe(args.device)
    print(f"# optimizer step times\n{info.line()}", flush=True)
    rates = flops.Rates(args.device)
    results, md = [], [f"machine: {info.line()}", ""]
    for shape in [s.strip() for s in args.shape.split(",") if s.strip()]:
        res = run_shape(shape, args, rates)
        results.append(res)
        md += [report.table(res), report.profiles(res), ""]
        print(report.table(res) + "\n" + report.profiles(res), flush=True)
    gemm = [
        dict(batch=b, s=s, l=l, dtype=str(dt).replace("torch.", ""), gflops=r / 1e9)
        for (b, s, l, dt), r in sorted(rates.cache.items(), key=lambda kv: (str(kv[0][3]), kv[0][:3]))
    ]
    md.append(report.gemm_rates(gemm))
    print(report.gemm_rates(gemm))
    out = dict(
        machine=info.as_dict(),
        argv=sys.argv,
        label=args.label,
        time=time.strftime("%Y-%m-%d %H:%M:%S"),
        gemm_rates=gemm,
        results=results,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(md) + "\n")
    print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main(ARGS)
