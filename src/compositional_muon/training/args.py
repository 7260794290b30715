"""The command line of ``python -m compositional_muon.train``: the parser (the one source of every
default) and the model/optimizer settings it describes."""

from __future__ import annotations

import argparse

from ..muon import ADJUST_LR_FNS
from ..qk_clip import GQA_POLICIES
from . import run_logs
from .errors import UsageError
from .models import MODELS
from .recipes import DEFAULT_ADAMW_LR, DEFAULT_LR, OPTIMIZERS

__all__ = ["build_parser", "parse_args", "model_config", "optimizer_config", "parse_kv", "CM_SWITCHES", "CM_NAMES"]

DESCRIPTION = "Train a small language model with any optimizer of the library."
CM_NAMES = ("cm", "cm-isotropic")
CM_SWITCHES = (
    "method",
    "isotropic",
    "hybrid",
    "whitening",
    "connection",
    "momentum_reproject",
    "per_mat_renorm",
    "lam",
    "nesterov",
    "transform",
)


def _model_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="gpt", choices=sorted(MODELS))
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-embd", type=int, default=128)
    g.add_argument("--n-head", type=int, default=4)
    g.add_argument("--n-kv-head", type=int, default=None, help="key/value heads (GQA); default n_head")
    g.add_argument("--block-size", type=int, default=128)
    g.add_argument("--no-rope", action="store_true", help="learned positions instead of RoPE")
    g.add_argument("--zero-init-o", action="store_true", help="zero-initialize o_proj and the MLP output")
    g.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other config field, e.g. n_loops=2 (LoopFormer) or n_recursions=3 (MoR)",
    )


def _optimizer_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="cm", choices=OPTIMIZERS)
    lrs = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
    g.add_argument("--lr", type=float, default=None, help=f"matrix learning rate (CM: the composed step eta); {lrs}")
    g.add_argument(
        "--adamw-lr", type=float, default=None, help=f"lr of the AdamW groups (embeddings, head); {DEFAULT_ADAMW_LR:g}"
    )
    g.add_argument(
        "--muon-lr",
        type=float,
        default=None,
        help="cm / muon-per-head: lr of the non-attention matrices (default --lr)",
    )
    g.add_argument(
        "--adjust-lr-fn",
        choices=ADJUST_LR_FNS,
        default=None,
        help="muon / muon-per-head / cm: match_rms_adamw scales updates to RMS 0.2*lr (AdamW lrs carry over)",
    )
    g.add_argument(
        "--qk-clip-tau",
        type=float,
        default=0.0,
        help="per-head QK-clip (MuonClip) after every step at this max attention logit (0: off)",
    )
    g.add_argument("--qk-clip-gqa", choices=GQA_POLICIES, default="query", help="QK-clip policy for GQA/MQA")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    g.add_argument(
        "--schedule",
        default="cosine",
        choices=("constant", "cosine", "linear"),
        help="lr decay after warmup (to --min-lr-ratio of the peak)",
    )
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the global grad norm (0: off)")
    g.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra optimizer option, e.g. method=joint, connection=frobenius, beta2=0.99",
    )
    g = p.add_argument_group("CM variant switches (optimizer cm / cm-isotropic)")
    g.add_argument("--method", choices=("half_split", "joint"))
    g.add_argument("--whitening", choices=("both", "pre", "post", "none"))
    g.add_argument(
        "--connection", choices=("none", "frobenius", "scale_aware", "frobenius_scalar", "scale_aware_scalar")
    )
    g.add_argument("--lam", type=float)
    g.add_argument(
        "--transform",
        choices=("none", "normuon", "newton"),
        help="compose a Muon-variant transform with CM (normuon; newton is refused, see docs/variants.md)",
    )
    g.add_argument("--no-hybrid", dest="hybrid", action="store_false", default=None)
    g.add_argument("--momentum-reproject", action="store_true", default=None)
    g.add_argument("--per-mat-renorm", action="store_true", default=None)
    g.add_argument("--nesterov", action="store_true", default=None)


def _run_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--data", default=None, help="text file/folder, FineWeb .bin shard(s) or glob; default: embedded corpus"
    )
    g.add_argument("--steps", type=int, default=600)
    g.add_argument("--time-limit", type=float, default=0.0, help="stop after this many seconds (0: no limit)")
    g.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="stop (with a checkpoint) after N steps of this invocation, to split a run into jobs; "
        "continue with --resume",
    )
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=8)
    g.add_argument("--ckpt-interval", type=int, default=200, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--out", default="runs/train")
    g.add_argument(
        "--resume",
        default=None,
        metavar="PATH|auto",
        help="checkpoint to continue from ('auto': <out>'s checkpoint if present, else a new run)",
    )
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one (deletes it)")
    g.add_argument(
        "--accept-changes",
        default=None,
        metavar="KEYS|all",
        help="with --resume: take these changed settings (comma-separated, e.g. lr,steps) instead of refusing",
    )
    g.add_argument("--sample-tokens", type=int, default=200)
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--dist", default="none", choices=("none", "ddp", "fsdp2"), help="under torchrun")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per data-parallel group (--dist fsdp2)")
    g.add_argument("--hsdp", type=int, default=0, help="ranks per FSDP shard group, replicated across groups (fsdp2)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    run_logs.add_arguments(g)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compositional_muon.train",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_group(p)
    _optimizer_group(p)
    _run_group(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def parse_kv(items, what: str) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (ints, floats, true/false, none parsed)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{what} {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _parse_value(v.strip())
    return out


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def model_config(args) -> dict:
    cfg = dict(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_kv_head=args.n_kv_head,
        block_size=args.block_size,
        rope=not args.no_rope,
        zero_init_o=args.zero_init_o,
    )
    cfg.update(parse_kv(args.model_arg, "--model-arg"))
    return cfg


def optimizer_config(args) -> dict:
    options = {k: getattr(args, k) for k in CM_SWITCHES if getattr(args, k, None) is not None}
    if options and args.optimizer not in CM_NAMES:
        raise UsageError(f"CM switches {sorted(options)} only apply to --optimizer cm / cm-isotropic")
    if args.muon_lr is not None:
        if args.optimizer not in (*CM_NAMES, "muon-per-head"):
            raise UsageError("--muon-lr only applies to --optimizer cm / cm-isotropic / muon-per-head")
        options["muon_lr"] = args.muon_lr
    if args.adjust_lr_fn is not None:
        if args.optimizer not in ("muon", "muon-per-head", *CM_NAMES):
            raise UsageError("--adjust-lr-fn only applies to --optimizer muon / muon-per-head / cm / cm-isotropic")
        options["adjust_lr_fn"] = args.adjust_lr_fn
    options.update(parse_kv(args.opt, "--opt"))
    return dict(
        name=args.optimizer, lr=args.lr, adamw_lr=args.adamw_lr, weight_decay=args.weight_decay, options=options
    )
