"""The optimizers a benchmark steps: this library's, torch's, and the optional peers.

Every entry builds a fresh optimizer over the same parameters. Peers (HeavyBall, pytorch-optimizer)
are optional: a missing package removes its rows (reported as ``skipped``). Some peers consume or
overwrite ``p.grad`` during a step (HeavyBall sets it to None, pytorch-optimizer's Muon/NorMuon
modify it in place), so the timing loop restores every gradient before every step.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compositional_muon import CompositionalMuon, Muon
from compositional_muon.attention import DEFAULT_ADAMW_PATTERNS, route_parameters

from .shapes import Bench

LR = 1e-3  # small: the weights are reset before every step anyway

CM_VARIANTS: dict[str, dict] = {
    "CM full": {},
    "CM isotropic": dict(isotropic=True),
    "CM joint": dict(method="joint"),
    "CM whitening=none": dict(whitening="none"),
    "CM connection=frobenius": dict(connection="frobenius"),
    "CM hybrid=False": dict(hybrid=False),
    "CM transform=normuon": dict(transform="normuon"),
}
CORE = ("AdamW", "torch.optim.Muon", "Muon", "CM full", "CM isotropic", "NorMuon", "AdaMuon")


@dataclass
class Entry:
    """One benchmark row: ``algorithm`` groups rows that compute the same update rule (muon,
    normuon, adamuon, cm, ...) so a library's row can be compared with the peers' same algorithm."""

    name: str
    make: Callable[[], object]
    algorithm: str
    source: str  # "torch", "ours" or a peer package
    note: str = ""


def _import_pytorch_optimizer():
    """pytorch_optimizer imports transformers when it is installed; a broken transformers install
    (version conflict) must not hide the optimizers, so retry with transformers reported absent."""
    try:
        return importlib.import_module("pytorch_optimizer")
    except ImportError as e:
        if "pytorch_optimizer" not in str(e) and importlib.util.find_spec("pytorch_optimizer") is not None:
            for k in [k for k in sys.modules if k.startswith(("pytorch_optimizer", "transformers"))]:
                del sys.modules[k]
            real = importlib.util.find_spec
            importlib.util.find_spec = lambda n, *a, **k: None if n == "transformers" else real(n, *a, **k)
            try:
                return importlib.import_module("pytorch_optimizer")
            finally:
                importlib.util.find_spec = real
        raise


def _accepts(cls, key: str) -> bool:
    try:
        return key in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


class Pair:
    """Several optimizers stepped as one (torch.optim.Muon takes 2-D parameters only)."""

    def __init__(self, *opts):
        self.opts = [o for o in opts if o is not None]

    def step(self):
        for o in self.opts:
            o.step()


class FunctionalCM:
    """CM through the functional API: ``cm_qk`` and ``cm_ov`` once per layer, own momenta."""

    def __init__(self, specs):
        from compositional_muon.cm import cm_ov, cm_qk

        self.qk, self.ov = cm_qk, cm_ov
        self.layers = []
        for s in specs:
            ws = [h.param for h in (s.q, s.k, s.v, s.o)]
            self.layers.append((s, ws, [torch.zeros_like(w) for w in ws]))

    @torch.no_grad()
    def step(self):
        for s, (wq, wk, wv, wo), (mq, mk, mv, mo) in self.layers:
            kw = dict(head_dim=s.head_dim, eta=LR, num_kv_heads=s.num_kv_heads)
            self.qk(wq, wk, wq.grad, wk.grad, mq, mk, **kw)
            self.ov(wv, wo, wv.grad, wo.grad, mv, mo, **kw)


def _split(bench: Bench) -> tuple[list, list]:
    params = list(bench.model.parameters())
    if not bench.whole_model:
        return params, []
    cm, muon, adamw = route_parameters(bench.model, bench.specs, DEFAULT_ADAMW_PATTERNS)
    return [p for _, p in cm + muon], [p for _, p in adamw]


def library_entries(bench: Bench, device: str, lib_options: dict) -> list[Entry]:
    """torch's AdamW and Muon, and this library's optimizers. ``lib_options`` (e.g.
    ``bucket_bytes``) go to every library optimizer whose constructor takes them."""
    from compositional_muon.variants import AdaMuon, Mano, NewtonMuon, NorMuon

    hidden, rest = _split(bench)
    params = hidden + rest
    fused = dict(fused=True) if device.startswith("cuda") else dict(foreach=True)

    def opts_for(cls) -> dict:
        return {k: v for k, v in lib_options.items() if _accepts(cls, k)}

    def groups(**kw):
        gs = [dict(params=hidden, use_muon=True, lr=LR, **kw)]
        return gs + ([dict(params=rest, use_muon=False, lr=LR)] if rest else [])

    def cm(**kw):
        o = opts_for(CompositionalMuon)
        if bench.whole_model:
            return CompositionalMuon.from_model(
                bench.model, attention=bench.specs, lr=LR, muon_lr=LR, adamw_lr=LR, **kw, **o
            )
        return CompositionalMuon([dict(kind="cm", attention=bench.specs, lr=LR, **kw)], **o)

    def variant(cls):
        def make():
            opt = cls(groups(), **opts_for(cls))
            if cls is NewtonMuon:
                opt.register(bench.model, warn=False)
            return opt

        return make

    def torch_muon():
        aux = torch.optim.AdamW(rest, lr=LR, **fused) if rest else None
        return Pair(torch.optim.Muon(hidden, lr=LR), aux)

    out = [
        Entry("AdamW", lambda: torch.optim.AdamW(params, lr=LR, **fused), "adamw", "torch", "all parameters"),
        Entry("torch.optim.Muon", torch_muon, "muon", "torch", "one matrix at a time, bf16 NS"),
        Entry("Muon", variant(Muon), "muon", "ours", "batched msign"),
    ]
    for name, kw in CM_VARIANTS.items():
        note = ", ".join(f"{k}={v}" for k, v in kw.items()) or "defaults"
        out.append(Entry(name, lambda kw=kw: cm(**kw), "cm", "ours", note))
    if not bench.whole_model:
        out.append(Entry("CM functional", lambda: FunctionalCM(bench.specs), "cm", "ours", "cm_qk + cm_ov per layer"))
    out += [
        Entry("NorMuon", variant(NorMuon), "normuon", "ours"),
        Entry("AdaMuon", variant(AdaMuon), "adamuon", "ours"),
        Entry("Mano", variant(Mano), "mano", "ours", "no msign"),
        Entry("Newton-Muon", variant(NewtonMuon), "newton-muon", "ours", "K^-1 every step"),
    ]
    return out


def peer_entries(bench: Bench, compile_step: bool) -> tuple[list[Entry], list[str]]:
    """HeavyBall's and pytorch-optimizer's Muon-family optimizers on the hidden matrices (their
    own AdamW on the rest of a whole model). Returns (entries, skipped-with-reason)."""
    hidden, rest = _split(bench)
    out, skipped = [], []
    try:
        import heavyball

        def hb():
            aux = torch.optim.AdamW(rest, lr=LR, foreach=True) if rest else None
            return Pair(heavyball.Muon(hidden, lr=LR, compile_step=compile_step), aux)

        out.append(Entry("HeavyBall Muon", hb, "muon", "heavyball", f"compile_step={compile_step}"))
    except ImportError as e:
        skipped.append(f"HeavyBall: {e}")
    try:
        po = _import_pytorch_optimizer()

        def pto(cls, **kw):
            def make():
                gs = [dict(params=hidden, use_muon=True)]
                if rest:
                    gs.append(dict(params=rest, use_muon=False))
                return cls(gs, lr=LR, **kw)

            return make

        out += [
            Entry("pt-opt Muon", pto(po.Muon), "muon", "pytorch_optimizer", "ns_method=newton_schulz"),
            Entry(
                "pt-opt Muon gram",
                pto(po.Muon, ns_method="gram_newton_schulz"),
                "muon",
                "pytorch_optimizer",
                "ns_method=gram_newton_schulz",
            ),
            Entry("pt-opt NorMuon", pto(po.NorMuon), "normuon", "pytorch_optimizer"),
            Entry("pt-opt AdaMuon", pto(po.AdaMuon), "adamuon", "pytorch_optimizer"),
        ]
    except ImportError as e:
        skipped.append(f"pytorch_optimizer: {e}")
    return out, skipped
