"""Before/after table of two ``bench/step_time.py`` JSON files (same shape, same rows).

    python bench/compare.py BEFORE.json AFTER.json [--shape gpt2]

Per optimizer: median step (and its ratio to torch.optim.Muon's median in the same run),
the share of the step outside GEMM/factorization kernels, bytes written by copies per step, and
the peak transient memory as a multiple of the weights. Wall-clock columns are only comparable
when both runs saw the same machine load; the other columns do not depend on it.
"""

from __future__ import annotations

import argparse
import json

MIB = 2**20


def _rows(path: str, shape: str) -> tuple[dict, dict]:
    with open(path) as f:
        data = json.load(f)
    res = next(r for r in data["results"] if r["shape"] == shape)
    return data, res["rows"]


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(before: str, after: str, shape: str) -> str:
    (db, rb), (da, ra) = _rows(before, shape), _rows(after, shape)
    lines = [
        f"before: {db.get('label') or before} ({db['time']}); after: {da.get('label') or after} ({da['time']})",
        "",
        "| optimizer | median ms before / after | vs torch Muon (ratio of medians) before / after | non-GEMM before / after "
        "| copied MiB/step before / after | peak transient x weights before / after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in [n for n in rb if n in ra]:
        b, a = rb[name], ra[name]

        def pair(key, sub=None, fmt=".2f", scale=1.0, b=b, a=a):
            def get(r):
                v = (r.get(sub) or {}).get(key) if sub else r.get(key)
                return None if v is None else v * scale

            return f"{_f(get(b), fmt)} / {_f(get(a), fmt)}"

        lines.append(
            f"| {name} | {pair('median_s', fmt='.0f', scale=1e3)} | {pair('vs_torch_muon')} "
            f"| {pair('non_gemm_share', 'profile', '.0%')} | {pair('copied_bytes', 'profile', '.0f', 1 / MIB)} "
            f"| {pair('peak_tensor_x_weights', 'memory')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--shape", default="gpt2")
    a = p.parse_args()
    print(table(a.before, a.after, a.shape))


if __name__ == "__main__":
    main()
