"""Markdown tables of a step-time result (the JSON written by ``bench/step_time.py``)."""

from __future__ import annotations

MIB = 2**20


def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def table(res: dict) -> str:
    """One shape: the step-time table plus memory and profiler columns where measured."""
    lines = [
        f"### {res['shape']}: {res['description']} ({res['device']}, compile={res['compile']})",
        "",
        f"msign dtype {res['msign_dtype']}; weights {res['weight_bytes'] / MIB:.1f} MiB; load average "
        f"{_x(res['load_before'][0])} before, {_x(res['load_after'][0])} after",
        "",
        "| optimizer | median ms | p10 | p90 | n | vs torch Muon (paired) | vs fastest peer, same alg "
        "| floor % | peak transient MiB (x weights) | RSS peak delta MiB | non-GEMM % | copied MiB/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["rows"].items():
        mem, prof = r.get("memory") or {}, r.get("profile") or {}
        peak = (
            f"{mem['peak_tensor_bytes'] / MIB:.1f} ({mem['peak_tensor_x_weights']:.2f}x)"
            if "peak_tensor_bytes" in mem
            else "-"
        )
        rss = f"{mem['rss_hwm_delta_bytes'] / MIB:.1f}" if "rss_hwm_delta_bytes" in mem else "-"
        vs = f"{_x(r['vs_torch_muon'])} ({_x(r['vs_torch_muon_paired'])})"
        peer = r.get("vs_fastest_peer")
        peer_s = f"{_x(peer['ratio'])} ({peer['peer']})" if peer else "-"
        copied = f"{prof['copied_bytes'] / MIB:.0f}" if prof else "-"
        lines.append(
            f"| {name} | {_ms(r['median_s'])} | {_ms(r['p10_s'])} | {_ms(r['p90_s'])} | {r['n']} | {vs} | {peer_s} "
            f"| {_pct(r['floor_fraction'])} | {peak} | {rss} | {_pct(prof.get('non_gemm_share'))} | {copied} |"
        )
    for s in res.get("skipped", []):
        lines.append(f"\nskipped: {s}")
    return "\n".join(lines)


def profiles(res: dict) -> str:
    """Top ops of every profiled optimizer."""
    out = []
    for name, r in res["rows"].items():
        p = r.get("profile")
        if not p:
            continue
        out += [
            f"\n#### {res['shape']} / {name}: step {_ms(p['step_s'])} ms under the profiler, "
            f"GEMM+linalg {_ms(p['gemm_s'])} ms, non-GEMM {_pct(p['non_gemm_share'])}, "
            f"copied {p['copied_bytes'] / MIB:.0f} MiB in {p['copy_calls']} copy/cat calls per step",
            "",
            "| op | calls/step | self ms/step | share of step |",
            "|---|---:|---:|---:|",
        ]
        out += [f"| {o['op']} | {o['calls']} | {o['self_ms']:.1f} | {_pct(o['share'])} |" for o in p["top_ops"]]
    return "\n".join(out)


def gemm_rates(rates: list) -> str:
    lines = ["measured GEMM rates (Gram y y^T of (batch, s, l)):"]
    for r in rates:
        lines.append(f"  {r['dtype']:<15} batch={r['batch']:<4} {r['s']}x{r['l']:<6} {r['gflops']:8.1f} GFLOP/s")
    return "\n".join(lines)
