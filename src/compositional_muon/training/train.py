"""Train a small language model with any optimizer of the library.

    python -m compositional_muon.train                      # the demo: GPT + CM on the embedded corpus
    python -m compositional_muon.train --model loopformer --optimizer normuon --steps 500
    python -m compositional_muon.train --out runs/x --resume auto     # continue runs/x/last.pt

Writes ``<out>/metrics.jsonl`` (one JSON object per step, plus evaluation lines), checkpoints
``<out>/last.pt`` atomically every ``--ckpt-interval`` steps, at the end, and on Ctrl-C, and at the
end a generated sample and ``<out>/loss.png``. ``--resume`` continues a run exactly: on CPU the
resumed run reproduces the uninterrupted one bit for bit (model, optimizer, scheduler, data
sampler and RNG states are all in the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

import torch

from . import run_logs
from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .data import load_dataset
from .models import MODELS, build_model
from .recipes import DEFAULT_LR, OPTIMIZERS, build_optimizer

__all__ = ["main", "run", "parse_args", "build_parser"]

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compositional_muon.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="cm", choices=OPTIMIZERS)
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="matrix learning rate (CM: the composed step eta); default per optimizer: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()),
    )
    g.add_argument("--adamw-lr", type=float, default=None, help="lr of the AdamW groups (embeddings, head)")
    g.add_argument("--muon-lr", type=float, default=None, help="CM: lr of the non-attention matrices (default --lr)")
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
        help="checkpoint to continue from ('auto': <out>/last.pt if present)",
    )
    g.add_argument("--sample-tokens", type=int, default=200)
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--dist", default="none", choices=("none", "ddp", "fsdp2"), help="under torchrun")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    run_logs.add_arguments(g)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _kv(items, what) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what} {item!r} is not KEY=VALUE")
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
    cfg.update(_kv(args.model_arg, "--model-arg"))
    return cfg


def optimizer_config(args) -> dict:
    options = {k: getattr(args, k) for k in CM_SWITCHES if getattr(args, k, None) is not None}
    if options and args.optimizer not in ("cm", "cm-isotropic"):
        raise ValueError(f"CM switches {sorted(options)} only apply to --optimizer cm / cm-isotropic")
    if args.muon_lr is not None:
        if args.optimizer not in ("cm", "cm-isotropic"):
            raise ValueError("--muon-lr only applies to --optimizer cm / cm-isotropic")
        options["muon_lr"] = args.muon_lr
    options.update(_kv(args.opt, "--opt"))
    return dict(
        name=args.optimizer, lr=args.lr, adamw_lr=args.adamw_lr, weight_decay=args.weight_decay, options=options
    )


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of every group's peak lr at ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, data, args, device, dist=None) -> float:
    was = model.training
    model.eval()
    losses = []
    shard = dist.shard if dist is not None else (lambda t: t)
    for _ in range(args.eval_iters):
        x, y = data.get_batch("val", args.batch_size, args.block_size, device)
        losses.append(model(shard(x), shard(y))[1].item())
    model.train(was)
    return sum(losses) / len(losses)


def _resolve_resume(args, ckpt_path: str):
    if args.resume is None:
        return None
    if args.resume == "auto":
        return ckpt_path if os.path.exists(ckpt_path) else None
    return args.resume


def _check_compatible(saved: dict, current: dict, path: str) -> None:
    """CheckpointError listing every difference between the saved run's setup and this one's."""
    problems = []
    if saved.get("model_name") != current["model_name"]:
        problems.append(f"model {saved.get('model_name')!r} in the checkpoint vs {current['model_name']!r} now")
    for k in sorted(set(saved.get("model", {})) | set(current["model"])):
        if saved.get("model", {}).get(k) != current["model"].get(k):
            problems.append(
                f"model {k}={saved.get('model', {}).get(k)!r} in the checkpoint vs {current['model'].get(k)!r} now"
            )
    for k in ("name", "options"):
        if saved.get("optimizer", {}).get(k) != current["optimizer"][k]:
            problems.append(
                f"optimizer {k}={saved.get('optimizer', {}).get(k)!r} in the checkpoint vs "
                f"{current['optimizer'][k]!r} now"
            )
    if saved.get("data") != current["data"]:
        problems.append(f"data {saved.get('data')!r} in the checkpoint vs {current['data']!r} now")
    if problems:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit this run (optimizer/model mismatch): " + "; ".join(problems)
        )


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])


def run(args: argparse.Namespace) -> dict:
    """Train as described by ``args`` (see :func:`build_parser`); returns a summary dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    for name in ("steps", "batch_size", "eval_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    run_logs.check_arguments(args)
    dist = _Dist(args, device)
    try:
        return _run(args, dist)
    finally:
        dist.cleanup()


class _Dist:
    """Single process, or DDP / FSDP2 under torchrun (see docs/distributed.md)."""

    def __init__(self, args, device):
        self.mode, self.rank, self.world, self.device = args.dist, 0, 1, device
        if self.mode == "none":
            return
        from . import dist as D

        self.D = D
        info = D.setup_distributed("gloo" if device.type == "cpu" else None)
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        if self.world < 2:
            raise ValueError(
                f"--dist {self.mode} needs at least 2 processes (torchrun --nproc_per_node=N, N >= 2); "
                "for a single process leave out --dist"
            )
        if args.batch_size % self.world:
            raise ValueError(f"--batch-size {args.batch_size} (global) is not divisible by the world size {self.world}")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        return model if self.mode == "none" else self.D.wrap_model(model, self.mode)

    def core(self, model):
        return model if self.mode == "none" else self.D.unwrap_model(model)

    def shard(self, x):
        """This rank's rows of a global batch."""
        if self.world == 1:
            return x
        b = x.size(0) // self.world
        return x[self.rank * b : (self.rank + 1) * b]

    def mean(self, v: float) -> float:
        return v if self.mode == "none" else float(self.D.all_reduce_mean(v))

    def cleanup(self) -> None:
        if self.mode != "none":
            self.D.cleanup_distributed()


def _run(args, dist: _Dist) -> dict:
    device = dist.device
    mcfg, ocfg = model_config(args), optimizer_config(args)
    data = load_dataset(args.data, seed=args.seed, block_size=args.block_size)
    mcfg["vocab_size"] = data.vocab_size
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = dist.wrap(build_model(args.model, **mcfg).to(device))
    opt = build_optimizer(
        ocfg["name"],
        dist.core(model),
        lr=ocfg["lr"],
        adamw_lr=ocfg["adamw_lr"],
        weight_decay=ocfg["weight_decay"],
        options=ocfg["options"],
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.steps, args.warmup, args.schedule, args.min_lr_ratio)
    )
    os.makedirs(args.out, exist_ok=True)
    # single process: one atomic .pt file; distributed: a torch.distributed.checkpoint folder
    ckpt_path = os.path.join(args.out, "last.pt" if dist.mode == "none" else "last_dcp")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    config = dict(
        model_name=args.model,
        model=mcfg,
        optimizer=ocfg,
        data=data.name,
        seed=args.seed,
        batch_size=args.batch_size,
        steps=args.steps,
    )
    step, elapsed = 0, 0.0
    resume = _resolve_resume(args, ckpt_path)
    if resume:
        if dist.mode == "none":
            ck = load_checkpoint(resume)
            _check_compatible(ck.get("config", {}), config, resume)
            try:
                model.load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"checkpoint {resume!r} does not fit this model/optimizer: {e}") from e
        else:
            ts_path = os.path.join(resume, "train_state.pt")
            if not os.path.isfile(ts_path):
                raise CheckpointError(f"{resume!r} is not a distributed training checkpoint (no train_state.pt)")
            ck = torch.load(ts_path, map_location="cpu", weights_only=False)
            _check_compatible(ck.get("config", {}), config, resume)
            layout = dict(mode=dist.mode, world_size=dist.world)
            if ck.get("layout", layout) != layout:
                saved = ck["layout"]
                raise CheckpointError(
                    f"{resume!r} was written by --dist {saved['mode']} with {saved['world_size']} processes; this "
                    f"run is --dist {dist.mode} with {dist.world}: resume with the same --dist and "
                    f"--nproc_per_node"
                )
            dist.D.load_checkpoint(resume, model, opt)
        sched.load_state_dict(ck["scheduler"])
        data.load_state_dict(ck["data"])
        _set_rng_state(ck["rng"])
        step, elapsed = ck["step"], ck.get("elapsed", 0.0)
        _truncate_metrics(metrics_path, step)
        print(f"resumed from {resume} at step {step}", file=sys.stderr)
    elif os.path.exists(metrics_path) and dist.main:
        os.unlink(metrics_path)

    def checkpoint():
        state = dict(
            scheduler=sched.state_dict(),
            data=data.state_dict(),
            rng=_rng_state(),
            step=step,
            elapsed=elapsed,
            config=config,
        )
        if dist.mode == "none":
            save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), **state), ckpt_path)
            return
        dist.D.save_checkpoint(ckpt_path, model, opt, extra=dict(step=step))  # every rank
        if dist.main:  # ranks share these (same seeds): rank 0 writes them
            state["layout"] = dict(mode=dist.mode, world_size=dist.world)
            save_atomic(state, os.path.join(ckpt_path, "train_state.pt"))

    n_params = sum(p.numel() for p in dist.core(model).parameters())
    if dist.world > 1:
        n_params = sum(getattr(p, "full_tensor", lambda p=p: p)().numel() for p in dist.core(model).parameters())
    if dist.main:
        print(
            f"model {args.model} ({n_params / 1e6:.2f}M params) | optimizer {ocfg['name']} | data {data.name} | "
            f"{args.steps} steps x {args.batch_size} x {args.block_size} tokens | device {device}"
            + (f" | {dist.mode} x {dist.world}" if dist.world > 1 else ""),
            file=sys.stderr,
        )
    if hasattr(opt, "summary") and not args.quiet and dist.main:
        kinds = {}
        for g in opt.param_groups:
            kinds[g.get("kind", "muon" if g.get("use_muon") else "adamw")] = len(g["params"])
        print("param groups: " + ", ".join(f"{k}: {v} tensors" for k, v in kinds.items()), file=sys.stderr)
    logs = run_logs.RunLogs(args, opt, main=dist.main, single_process=dist.mode == "none", resumed_step=step)
    progress = logs.progress
    tokens_per_step = args.batch_size * args.block_size
    interrupted = paused = False
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    model.train()
    try:
        with open(metrics_path if dist.main else os.devnull, "a") as mf:
            start = time.time() - elapsed
            first = step
            while step < args.steps:
                if args.stop_after and step - first >= args.stop_after:
                    paused = True
                    break
                if args.time_limit and time.time() - start > args.time_limit:
                    print(f"\ntime limit of {args.time_limit:g}s reached at step {step}", file=sys.stderr)
                    break
                t0 = time.time()
                x, y = data.get_batch("train", args.batch_size, args.block_size, device)
                _, loss = model(dist.shard(x), dist.shard(y))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                lr_now = opt.param_groups[0]["lr"]
                logs.before_step(step + 1)
                opt.step()
                sched.step()
                step += 1
                dt = time.time() - t0
                elapsed = time.time() - start
                rec = dict(
                    step=step,
                    train_loss=dist.mean(loss.item()),
                    lr=float(lr_now),
                    step_time=dt,
                    tokens_per_s=tokens_per_step / max(dt, 1e-9),
                    elapsed=elapsed,
                )
                if getattr(model, "last_losses", None):
                    rec["parts"] = {k: float(v) for k, v in model.last_losses.items()}
                if step % args.eval_interval == 0 or step == args.steps:
                    rec["val_loss"] = dist.mean(evaluate(model, data, args, device, dist))
                logs.after_step(rec)
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                extra = f"val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
                progress.update(step, rec["train_loss"], rec["tokens_per_s"], extra)
                if "val_loss" in rec and dist.main and (progress.quiet or not progress.tty):
                    print(f"step {step}: train {rec['train_loss']:.4f} val {rec['val_loss']:.4f}", file=sys.stderr)
                elif "val_loss" in rec:
                    progress.newline()
                if not math.isfinite(rec["train_loss"]):
                    raise FloatingPointError(f"the training loss is {rec['train_loss']} at step {step}")
                if args.ckpt_interval and step % args.ckpt_interval == 0:
                    checkpoint()
    except KeyboardInterrupt:
        interrupted = True
        progress.newline()
        print(f"interrupted at step {step}; saving {ckpt_path}", file=sys.stderr)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    checkpoint()
    summary = dict(
        out=args.out,
        steps=step,
        interrupted=interrupted,
        checkpoint=ckpt_path,
        metrics=metrics_path,
        **_summarize(metrics_path),
    )
    summary.update(logs.finish(f"{args.model} / {ocfg['name']}", plot=not args.no_plot))
    if interrupted or paused:
        summary["paused"] = paused
        return summary
    if args.sample_tokens:  # every rank generates (FSDP2 needs all of them in each forward)
        source = data.split("val") if data.split("val").numel() >= 16 else data.split("train")
        prompt = torch.tensor([source[:16].tolist()], device=device)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        out = dist.core(model).generate(prompt, args.sample_tokens, temperature=0.8, top_k=40, generator=gen)
        summary["sample"] = data.decode(out[0].tolist())
        if dist.main:
            print("\n--- sample ---\n" + summary["sample"] + "\n--------------", file=sys.stderr)
    if not dist.main:
        return summary
    if not args.no_plot:
        summary["plot"] = plot_losses(
            metrics_path, os.path.join(args.out, "loss.png"), title=f"{args.model} / {ocfg['name']}"
        )
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(
        f"final train loss {summary.get('final_train_loss', float('nan')):.4f}, val loss "
        f"{summary.get('final_val_loss', float('nan')):.4f}; outputs in {args.out}",
        file=sys.stderr,
    )
    return summary


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines beyond the checkpoint's step (written after it, before an interruption)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _summarize(path: str) -> dict:
    recs = read_metrics(path) if os.path.exists(path) else []
    if not recs:
        return {}
    tail = [r["train_loss"] for r in recs[-20:]]
    vals = [r for r in recs if "val_loss" in r]
    times = sorted(r["step_time"] for r in recs[5:]) or sorted(r["step_time"] for r in recs)
    return dict(
        final_train_loss=sum(tail) / len(tail),
        final_val_loss=vals[-1]["val_loss"] if vals else float("nan"),
        median_step_time=times[len(times) // 2],
        total_time=recs[-1]["elapsed"],
    )


def plot_losses(metrics_path: str, png_path: str, title: str = "") -> str | None:
    """Train (smoothed) and validation loss against step, as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the loss plot (pip install matplotlib)", file=sys.stderr)
        return None
    recs = read_metrics(metrics_path)
    steps = [r["step"] for r in recs]
    train = [r["train_loss"] for r in recs]
    smooth, acc = [], None
    for v in train:
        acc = v if acc is None else 0.9 * acc + 0.1 * v
        smooth.append(acc)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, train, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(steps, smooth, color="tab:blue", label="train (EMA 0.9)")
    vals = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if vals:
        ax.plot(*zip(*vals), "o-", color="tab:orange", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except (CheckpointError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
