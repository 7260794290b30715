"""What a run is (model, optimizer, data: fixed for its life) and its settings (lr, steps, batch
size, optimizer options, ...: changeable on resume only when the user says so)."""

from __future__ import annotations

from .errors import UsageError
from .recipes import DEFAULT_ADAMW_LR, DEFAULT_LR

__all__ = ["run_config", "structural_problems", "setting_changes", "check_changes", "format_changes"]

# flags (argparse dest names) that are settings of the run; the optimizer options join them
SETTINGS = (
    "weight_decay",
    "warmup",
    "schedule",
    "min_lr_ratio",
    "grad_clip",
    "batch_size",
    "steps",
    "seed",
    "eval_interval",
    "eval_iters",
)


def settings(args, ocfg: dict) -> dict:
    """Every setting that changes the run's numbers, with defaults resolved (``--lr`` unset and
    ``--lr`` equal to the default are the same setting)."""
    name = ocfg["name"]
    out = dict(
        lr=DEFAULT_LR[name] if ocfg["lr"] is None else ocfg["lr"],
        adamw_lr=DEFAULT_ADAMW_LR if ocfg["adamw_lr"] is None else ocfg["adamw_lr"],
    )
    out.update({k: getattr(args, k) for k in SETTINGS})
    if getattr(args, "qk_clip_tau", 0.0):  # recorded only when on (older checkpoints lack the keys)
        out.update(qk_clip_tau=args.qk_clip_tau, qk_clip_gqa=args.qk_clip_gqa)
    for k, v in ocfg["options"].items():
        out[k if k not in out else "opt." + k] = v
    return out


def run_config(args, mcfg: dict, ocfg: dict, data_name: str) -> dict:
    """The record a checkpoint keeps of its run (JSON-able)."""
    return dict(
        model_name=args.model,
        model=mcfg,
        optimizer=dict(name=ocfg["name"]),
        data=data_name,
        settings=settings(args, ocfg),
    )


def structural_problems(saved: dict, current: dict) -> list:
    """What no flag can change on resume: the model and its config, the optimizer, the data."""
    problems = []
    if saved.get("model_name") != current["model_name"]:
        problems.append(f"model {saved.get('model_name')!r} in the checkpoint vs {current['model_name']!r} now")
    smodel = saved.get("model", {})
    for k in sorted(set(smodel) | set(current["model"])):
        if smodel.get(k) != current["model"].get(k):
            problems.append(f"model {k}={smodel.get(k)!r} in the checkpoint vs {current['model'].get(k)!r} now")
    sname = saved.get("optimizer", {}).get("name")
    if sname != current["optimizer"]["name"]:
        problems.append(f"optimizer {sname!r} in the checkpoint vs {current['optimizer']['name']!r} now")
    if saved.get("data") != current["data"]:
        problems.append(f"data {saved.get('data')!r} in the checkpoint vs {current['data']!r} now")
    return problems


def setting_changes(saved: dict, current: dict) -> dict:
    """``{key: [saved value, new value]}`` for every setting that differs (``None``: not set)."""
    old, new = saved.get("settings"), current["settings"]
    if old is None:  # a checkpoint from before settings were recorded: nothing to compare
        return {}
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def format_changes(changes: dict) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


def check_changes(changes: dict, accept: str | None, valid: set, path: str) -> None:
    """Refuse changed settings that ``--accept-changes`` does not name (one line, naming each)."""
    accepted: set = set()
    if accept:
        accepted = set(valid) if accept.strip() == "all" else {k.strip().replace("-", "_") for k in accept.split(",")}
        unknown = sorted(accepted - set(valid) - {""})
        if unknown:
            raise UsageError(
                f"--accept-changes {', '.join(unknown)}: not a setting of this run; settings: {', '.join(sorted(valid))}"
            )
    refused = {k: v for k, v in changes.items() if k not in accepted}
    if refused:
        raise UsageError(
            f"--resume {path}: these settings differ from the checkpoint: {format_changes(refused)}; pass "
            f"--accept-changes {','.join(refused)} (or all) to continue with the new values, or leave those flags "
            "as they were"
        )
