"""Side-by-side optimizer step times on the same weights and gradients, in one process.

    python bench/step_time.py [--shape gpt2|small|seed003|all] [--repeat N] [--json out.json]

For each shape every optimizer steps the *same* parameter tensors with the *same* fixed gradients
(each optimizer keeps its own state). Steps are timed with ``time.perf_counter`` around
``optimizer.step()`` only, after ``--warmup`` untimed steps, interleaved round-robin (one step of
each optimizer per round) so a change in machine load hits every optimizer alike; the weights are
reset (untimed) before every step so all steps see the same values. An optimizer whose steps are
slow gets fewer samples (``--budget`` seconds of timed steps, at least ``--min-repeat``; one
sample when a single step exceeds ``--slow-step`` seconds); the sample count is reported.

Shapes: ``gpt2``: the q/k/v/o weights of 12 attention layers, D=768, H=12, d=64; ``small``: 4
layers, D=256, H=4; ``seed003``: the looped model of the seed-003 experiments (LoopFormer, 1
shared layer looped twice, GPT-2 vocabulary, 6.8M parameters) as a whole model: AdamW on
everything, or the optimizer's matrix rule on the hidden matrices plus AdamW on the rest.

The FLOP floor of an optimizer is its msign iterations' GEMM FLOPs (plus, for CM, the Gram and
whitening GEMMs, and Newton-Muon's preconditioner product), each divided by this machine's GEMM
rate for that shape and dtype, measured in the same run. ``floor %`` = floor / median.

Writes a markdown table to stdout and everything (samples included) to ``--json``
(default ``bench/results.json``). Public tools only: torch, time.perf_counter, statistics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="all", choices=("gpt2", "small", "seed003", "all"))
    p.add_argument("--repeat", type=int, default=9, help="timed steps per optimizer (at most)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per optimizer first")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed steps per optimizer and shape")
    p.add_argument("--min-repeat", type=int, default=3, help="timed steps at least (unless --slow-step)")
    p.add_argument(
        "--slow-step",
        type=float,
        default=30.0,
        help="one timed step only when a warm-up step took longer than this (seconds)",
    )
    p.add_argument("--only", default="", help="comma-separated optimizer names to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated optimizer names to leave out")
    p.add_argument("--json", default=os.path.join(HERE, "results.json"))
    p.add_argument(
        "--src",
        default=None,
        help="import compositional_muon from this source tree instead "
        "(e.g. an export of an older commit, for before/after runs)",
    )
    p.add_argument("--label", default="", help="free-form label stored in the JSON")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.src:
    sys.path.insert(0, os.path.abspath(ARGS.src))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import compositional_muon as cmu  # noqa: E402
from compositional_muon import AttentionSpec, CompositionalMuon, Muon  # noqa: E402
from compositional_muon.attention import DEFAULT_ADAMW_PATTERNS, find_attention, route_parameters  # noqa: E402
from compositional_muon.variants import AdaMuon, Mano, NewtonMuon, NorMuon  # noqa: E402

try:
    from compositional_muon.msign import default_msign_dtype  # noqa: E402
except ImportError:  # an older tree: msign ran in bfloat16 unless told otherwise

    def default_msign_dtype(device=None):
        return torch.bfloat16

# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------

SHAPES = {
    "gpt2": dict(kind="attention", L=12, D=768, H=12),
    "small": dict(kind="attention", L=4, D=256, H=4),
    "seed003": dict(
        kind="model", vocab_size=50257, n_embd=128, n_head=4, n_layer=1, n_loops=2, tie_embeddings=True, block_size=256
    ),
}


class AttnLayer(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))


class AttentionStack(nn.Module):
    """The q/k/v/o weights of ``L`` layers (no forward: only the optimizer step is timed)."""

    def __init__(self, L, D, H):
        super().__init__()
        self.layers = nn.ModuleList(AttnLayer(D) for _ in range(L))
        self.head_dim = D // H

    def specs(self):
        return [
            AttentionSpec.separate(f"layers.{i}", l.q_proj, l.k_proj, l.v_proj, l.o_proj, head_dim=self.head_dim)
            for i, l in enumerate(self.layers)
        ]


def _hand_built_loopformer(cfg):
    """The seed-003 LoopFormer's parameter shapes by hand (used when compositional_muon.training.models is absent)."""
    D, V = cfg["n_embd"], cfg["vocab_size"]

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.head_dim, self.num_heads, self.num_kv_heads = D // cfg["n_head"], cfg["n_head"], cfg["n_head"]
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()
            self.mlp = nn.Module()
            self.mlp.up_proj, self.mlp.down_proj = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)
            self.ada = nn.Linear(D, 6 * D)

    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(256, D), nn.Linear(D, D)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, D)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["n_layer"]))
            self.time_embed, self.dt_embed = Emb(), Emb()
            self.lm_head = nn.Linear(D, V, bias=False)
            self.lm_head.weight = self.embed.weight

    return Model()


def build(shape: str, seed: int = 0):
    """(module, attention specs, description) for a shape; weights ~ N(0, 0.02)."""
    cfg = SHAPES[shape]
    torch.manual_seed(seed)
    if cfg["kind"] == "attention":
        m = AttentionStack(cfg["L"], cfg["D"], cfg["H"])
        for p in m.parameters():
            nn.init.normal_(p, std=0.02)
        desc = f"q/k/v/o of {cfg['L']} layers, D={cfg['D']}, H={cfg['H']}, d={cfg['D'] // cfg['H']}"
        return m, m.specs(), desc
    kw = {k: v for k, v in cfg.items() if k != "kind"}
    try:
        from compositional_muon.training.models import build_model

        m = build_model("loopformer", **kw)
        how = "compositional_muon.training.models.build_model('loopformer', ...)"
    except ImportError:
        m = _hand_built_loopformer(kw)
        for p in m.parameters():
            nn.init.normal_(p, std=0.02)
        how = "hand-built LoopFormer shapes"
    n = sum(p.numel() for p in m.parameters())
    desc = (
        f"LoopFormer {kw['n_layer']} layer x {kw['n_loops']} loops, D={kw['n_embd']}, H={kw['n_head']}, "
        f"vocab {kw['vocab_size']}, tied embeddings, {n / 1e6:.2f}M params ({how})"
    )
    return m, find_attention(m), desc


# ------------------------------------------------------------------------------------------------
# Optimizers
# ------------------------------------------------------------------------------------------------

CM_VARIANTS = {
    "CM full": {},
    "CM isotropic": dict(isotropic=True),
    "CM joint": dict(method="joint"),
    "CM whitening=pre": dict(whitening="pre"),
    "CM whitening=post": dict(whitening="post"),
    "CM whitening=none": dict(whitening="none"),
    "CM connection=frobenius": dict(connection="frobenius"),
    "CM connection=scale_aware": dict(connection="scale_aware"),
    "CM connection=frobenius_scalar": dict(connection="frobenius_scalar"),
    "CM connection=scale_aware_scalar": dict(connection="scale_aware_scalar"),
    "CM per_mat_renorm": dict(per_mat_renorm=True),
    "CM hybrid=False": dict(hybrid=False),
    "CM transform=normuon": dict(transform="normuon"),
}
LR = 1e-3  # small: the weights are reset before every step anyway


class Pair:
    """Two torch optimizers stepped as one (torch.optim.Muon takes 2-D parameters only)."""

    def __init__(self, *opts):
        self.opts = opts

    def step(self):
        for o in self.opts:
            o.step()


def make_optimizers(model, specs, whole_model: bool):
    """name -> (factory, description). Attention shapes: every optimizer on the q/k/v/o weights.
    Whole model: AdamW on everything; the others' matrix rule on the hidden matrices (CM on the
    attention pairs, Muon on the other matrices) and AdamW on embeddings / gains / biases."""
    params = [p for p in model.parameters()]
    if whole_model:
        cm, muon, adamw = route_parameters(model, specs, DEFAULT_ADAMW_PATTERNS)
        hidden = [p for _, p in cm + muon]
        rest = [p for _, p in adamw]
    else:
        hidden, rest = params, []

    def groups(**kw):
        gs = [dict(params=hidden, use_muon=True, **kw)]
        if rest:
            gs.append(dict(params=rest, use_muon=False, lr=LR))
        return gs

    def cm_opt(**kw):
        if whole_model:
            return CompositionalMuon.from_model(model, attention=specs, lr=LR, muon_lr=LR, adamw_lr=LR, **kw)
        return CompositionalMuon([dict(kind="cm", attention=specs, lr=LR, **kw)])

    def newton():
        opt = NewtonMuon(groups(lr=LR))
        opt.register(model, warn=False)
        return opt

    def torch_muon():
        tm = torch.optim.Muon(hidden, lr=LR)
        return Pair(tm, torch.optim.AdamW(rest, lr=LR, foreach=True)) if rest else tm

    out = {
        "AdamW": (lambda: torch.optim.AdamW(params, lr=LR, foreach=True), "all parameters"),
        "torch.optim.Muon": (torch_muon, "hidden matrices" + (" + torch AdamW on the rest" if rest else "")),
        "Muon": (lambda: Muon(groups(lr=LR)), "this library, batched msign"),
    }
    for name, kw in CM_VARIANTS.items():
        out[name] = (lambda kw=kw: cm_opt(**kw), ", ".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
    out.update(
        {
            "NorMuon": (lambda: NorMuon(groups(lr=LR)), ""),
            "AdaMuon": (lambda: AdaMuon(groups(lr=LR)), ""),
            "Mano": (lambda: Mano(groups(lr=LR)), "no msign"),
            "Newton-Muon": (newton, "hooks registered; K^-1 applied every step"),
        }
    )
    return out


# ------------------------------------------------------------------------------------------------
# FLOP model
# ------------------------------------------------------------------------------------------------


def msign_flops(m: int, n: int, steps: int) -> int:
    """GEMM FLOPs of one polynomial msign of an m x n matrix: per step the Gram (2 s^2 l), its
    square (2 s^3) and the update (2 s^2 l), s = min(m, n), l = max(m, n)."""
    s, l = min(m, n), max(m, n)
    return steps * (4 * s * s * l + 2 * s**3)


def muon_terms(mats, steps=5, dtype=None, extra=None, batched=True):
    """[(flops, (batch, s, l), dtype)] for one msign per matrix; same-shape matrices form one
    batched term when the optimizer batches them (this library), else one term each (torch)."""
    shapes: dict = {}
    for p in mats:
        m, n = p.shape[0], p[0].numel()
        shapes[(m, n)] = shapes.get((m, n), 0) + 1
    out = []
    for (m, n), count in shapes.items():
        s, l = min(m, n), max(m, n)
        b = count if batched else 1
        out.append((count * msign_flops(m, n, steps), (b, s, l), dtype))
        if extra:
            out.append((count * extra(m, n), (b, s, l), torch.float32))
    return out


def cm_terms(specs, kw, dtype):
    """GEMM FLOPs of a CM step over the attention specs. CompositionalMuon stacks same-shape
    pairs across layers, so each msign shape class is one batched call of ``layers x heads``."""
    method, hybrid = kw.get("method", "half_split"), kw.get("hybrid", True)
    whitening, iso = kw.get("whitening", "both"), kw.get("isotropic", False)
    steps = 8
    acc: dict = {}  # (s, l, dtype) -> [flops, batch]

    def add(count, s, l, dt, flops_each):
        e = acc.setdefault((min(s, l), max(s, l), dt), [0, 0])
        e[0] += count * flops_each
        e[1] += count

    for sp in specs:
        H, hkv, d = sp.num_heads, sp.num_kv_heads, sp.head_dim
        D = sp.q.param.shape[1] if sp.q is not None else sp.v.param.shape[1]
        G = H // hkv
        for kind in ("qk", "ov"):
            hyb = hybrid and kind == "ov"
            if method == "joint":
                if hyb:
                    add(1, H * d, 2 * D, dtype, msign_flops(H * d, 2 * D, steps))
                else:
                    add(hkv, d, (G + 1) * D, dtype, msign_flops(d, (G + 1) * D, steps))
            else:
                if hyb:
                    add(1, H * d, D, dtype, msign_flops(H * d, D, steps))
                    add(hkv, d, D, dtype, msign_flops(d, D, steps))
                else:
                    add(H + hkv, d, D, dtype, msign_flops(d, D, steps))
            # Grams of both factors (not for isotropic without a connection: squared norms only),
            # and the d x d whitenings before / after msign (matrix roots only)
            n_gemm = 1 if (not iso or kw.get("connection", "none") != "none") else 0
            if not iso:
                n_gemm += {"both": 2, "pre": 1, "post": 1, "none": 0}[whitening]
            if n_gemm:
                add(H + hkv, d, D, torch.float32, n_gemm * 2 * d * d * D)
    return [(f, (batch, s, l), dt) for (s, l, dt), (f, batch) in acc.items()]


def flop_terms(name, model, specs, hidden, whole_model, dtype):
    if name.startswith("CM"):
        kw = CM_VARIANTS[name]
        terms = cm_terms(specs, kw, dtype)
        if whole_model:  # CompositionalMuon runs Muon on the other hidden matrices
            cm_ids = {id(hs.param) for s in specs for hs in (s.q, s.k, s.v, s.o) if hs is not None}
            terms += muon_terms([p for p in hidden if id(p) not in cm_ids], 5, dtype)
        return terms
    if name == "torch.optim.Muon":
        return muon_terms(hidden, 5, torch.bfloat16, batched=False)  # bf16 and one matrix at a time
    if name in ("Muon", "NorMuon", "AdaMuon"):
        return muon_terms(hidden, 5, dtype)
    if name == "Newton-Muon":
        return muon_terms(hidden, 5, dtype, extra=lambda m, n: 2 * m * n * n)
    return []


_RATES: dict = {}


def gemm_rate(batch: int, s: int, l: int, dtype) -> float:
    """Best measured FLOP/s of the msign's dominant GEMM, the Gram ``y y^T`` of ``(batch, s, l)``
    (fastest of several runs, so a busy machine lowers it less than a median would)."""
    key = (batch, s, l, dtype)
    if key not in _RATES:
        y = torch.randn(batch, s, l).to(dtype)
        torch.bmm(y, y.mT)
        best, spent, reps = float("inf"), 0.0, 0
        while reps < 3 or (spent < 0.5 and reps < 50):
            t0 = time.perf_counter()
            torch.bmm(y, y.mT)
            dt = time.perf_counter() - t0
            best, spent, reps = min(best, dt), spent + dt, reps + 1
        _RATES[key] = 2 * batch * s * s * l / best
    return _RATES[key]


def floor_seconds(terms):
    return sum(f / gemm_rate(*shape, dt) for f, shape, dt in terms)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_shape(shape: str, args) -> dict:
    model, specs, desc = build(shape)
    whole_model = SHAPES[shape]["kind"] == "model"
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    grads = [1e-2 * torch.randn(p.shape, generator=g) for p in params]
    init = [p.detach().clone() for p in params]
    for p, gr in zip(params, grads):
        p.grad = gr

    def reset():
        with torch.no_grad():
            for p, w in zip(params, init):
                p.copy_(w)

    factories = make_optimizers(model, specs, whole_model)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    names = [n for n in factories if (not only or n in only) and n not in skip]
    if whole_model:
        cm, muon, _ = route_parameters(model, specs, DEFAULT_ADAMW_PATTERNS)
        hidden = [p for _, p in cm + muon]
    else:
        hidden = params
    dtype = default_msign_dtype("cpu")
    print(f"\n## {shape}: {desc}", flush=True)
    load0 = os.getloadavg()

    opts, need, samples, cpu_samples, warm, rounds = {}, {}, {}, {}, {}, {}
    for n in names:
        opts[n] = factories[n][0]()
        ts = []
        for _ in range(max(1, args.warmup)):
            reset()
            t0 = time.perf_counter()
            opts[n].step()
            ts.append(time.perf_counter() - t0)
            if ts[-1] > args.slow_step:
                break
        warm[n] = ts
        t = min(ts)
        if t > args.slow_step:
            need[n] = 1
        else:
            need[n] = max(min(args.repeat, int(args.budget // max(t, 1e-9))), min(args.min_repeat, args.repeat))
        samples[n], cpu_samples[n], rounds[n] = [], [], []
        print(f"  warm-up {n:<34} {t * 1e3:10.1f} ms -> {need[n]} timed steps", flush=True)

    rnd = 0
    while any(len(samples[n]) < need[n] for n in names):
        order = [n for n in names if len(samples[n]) < need[n]]
        k = rnd % len(order)
        for n in order[k:] + order[:k]:  # rotate the order each round
            reset()
            c0, t0 = time.process_time(), time.perf_counter()
            opts[n].step()
            t1, c1 = time.perf_counter(), time.process_time()
            samples[n].append(t1 - t0)
            cpu_samples[n].append(c1 - c0)
            rounds[n].append(rnd)
        rnd += 1
    load1 = os.getloadavg()

    rows = {}
    for n in names:
        xs = samples[n]
        terms = flop_terms(n, model, specs, hidden, whole_model, dtype)
        flops = sum(f for f, _, _ in terms)
        floor = floor_seconds(terms) if terms else None
        med = statistics.median(xs)
        rows[n] = dict(
            median_s=med,
            p10_s=quantile(xs, 0.1),
            p90_s=quantile(xs, 0.9),
            n=len(xs),
            cpu_median_s=statistics.median(cpu_samples[n]),
            samples_s=xs,
            warmup_s=warm[n],
            gemm_flops=flops,
            floor_s=floor,
            floor_fraction=(floor / med) if floor else None,
            note=factories[n][1],
        )
    refs = dict(vs_torch_muon="torch.optim.Muon", vs_adamw="AdamW", vs_muon_fp32="Muon")

    def paired(n, ref):
        """Median over the rounds both ran in of the per-round ratio (robust to load drifting
        between rounds); None with fewer than 3 shared rounds."""
        by_round = dict(zip(rounds[ref], samples[ref]))
        rs = [x / by_round[k] for k, x in zip(rounds[n], samples[n]) if k in by_round]
        return statistics.median(rs) if len(rs) >= 3 else None

    for n, r in rows.items():
        for key, ref in refs.items():
            r[key] = r["median_s"] / rows[ref]["median_s"] if ref in rows else None
            r[key + "_paired"] = paired(n, ref) if ref in rows else None
        r["rounds"] = rounds[n]
    return dict(shape=shape, description=desc, msign_dtype=str(dtype), load_before=load0, load_after=load1, rows=rows)


def fmt_ms(s):
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def markdown(res) -> str:
    lines = [
        f"### {res['shape']}: {res['description']}",
        f"msign working dtype (library default on this device): {res['msign_dtype']}; load average "
        f"{res['load_before'][0]:.2f} before, {res['load_after'][0]:.2f} after",
        "",
        "| optimizer | median ms | p10 | p90 | n | vs torch Muon | vs AdamW | vs Muon (lib) | GEMM GFLOP "
        "| floor ms | floor % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in res["rows"].items():

        def rt(x):
            return f"{x:.3f}" if x is not None else "-"

        fl = r["floor_s"]
        pct = f"{100 * r['floor_fraction']:.0f}%" if fl else "-"
        lines.append(
            f"| {n} | {fmt_ms(r['median_s'])} | {fmt_ms(r['p10_s'])} | {fmt_ms(r['p90_s'])} | {r['n']} "
            f"| {rt(r['vs_torch_muon'])} | {rt(r['vs_adamw'])} | {rt(r['vs_muon_fp32'])} "
            f"| {r['gemm_flops'] / 1e9:.2f} | {fmt_ms(fl) if fl else '-'} "
            f"| {pct} |"
        )
    return "\n".join(lines)


def machine() -> dict:
    from compositional_muon.experiments import cpu_name

    cpu = cpu_name()
    return dict(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        python=platform.python_version(),
        platform=platform.platform(),
        cuda=torch.cuda.is_available(),
        package=cmu.__file__,
    )


def main(args):
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    info = machine()
    print(f"# optimizer step times\n{info}\ntorch.get_num_threads() = {info['threads']} (machine default)", flush=True)
    results = []
    for s in shapes:
        res = run_shape(s, args)
        results.append(res)
        print(markdown(res), flush=True)
    rates = [
        dict(batch=b, s=s, l=l, dtype=str(dt), gflops=r / 1e9)
        for (b, s, l, dt), r in sorted(_RATES.items(), key=lambda kv: (str(kv[0][3]), kv[0][:3]))
    ]
    print("\nmeasured GEMM rates (Gram y y^T of (batch, s, l)):")
    for r in rates:
        print(f"  {r['dtype']:<15} batch={r['batch']:<4} {r['s']}x{r['l']:<6} {r['gflops']:7.1f} GFLOP/s")
    out = dict(
        machine=info,
        argv=sys.argv,
        label=args.label,
        time=time.strftime("%Y-%m-%d %H:%M:%S"),
        gemm_rates=rates,
        results=results,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main(ARGS)
