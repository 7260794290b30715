"""Every bad input to the training CLI: exit status 2, one line starting with ``error:``, no
traceback, and the run folder (or the --out that was asked for) exactly as it was. A run that
cannot go on (diverged) ends with one line and status 1; a library bug keeps its traceback."""

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from compositional_muon.train import main
from compositional_muon.training import cli_checks
from compositional_muon.training import loop as loop_mod

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "4"]
TINY += ["--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "4", "--no-plot", "--quiet", "--warmup", "1"]
RUN = TINY + ["--steps", "2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run (last.pt, metrics.jsonl, summary.json)."""
    out = str(tmp_path_factory.mktemp("cli") / "run")
    assert main(RUN + ["--out", out]) == 0
    return out


def _snapshot(path):
    """{relative path: sha256} of every file under ``path`` (None when it does not exist)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    out = {}
    for root, dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path) + "/"] = "dir"
    return out


def _one_line_error(capsys, argv, out, status=2):
    before = _snapshot(out)
    capsys.readouterr()
    assert main(argv) == status
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert _snapshot(out) == before, "the run folder changed"
    return lines[0]


# (extra argv, a phrase the one-line message must contain); run against a finished run with
# --resume auto (so only the bad value can be the reason), and against a new --out
BAD_VALUES = [
    (["--eval-interval", "0"], "--eval-interval must be >= 1, got 0"),
    (["--eval-iters", "0"], "--eval-iters must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--block-size", "-4"], "--block-size must be >= 1"),
    (["--n-head", "0"], "--n-head must be >= 1"),
    (["--n-kv-head", "0"], "--n-kv-head must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--ckpt-interval", "-1"], "--ckpt-interval must be >= 0, got -1"),
    (["--stop-after", "-1"], "--stop-after must be >= 0"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--sample-tokens", "-1"], "--sample-tokens must be >= 0, got -1"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0"),
    (["--adamw-lr", "inf"], "--adamw-lr must be a finite number > 0"),
    (["--muon-lr", "nan"], "--muon-lr must be a finite number > 0"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0, got nan"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0"),
    (["--lam", "-1"], "--lam must be a finite number >= 0"),
    (["--time-limit", "nan"], "--time-limit must be a finite number >= 0"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio must be in [0, 1]"),
    (["--min-lr-ratio", "nan"], "--min-lr-ratio must be in [0, 1]"),
    (["--opt", "unknown_key=1"], "--opt unknown_key: not an option of --optimizer cm; valid keys: "),
    (["--optimizer", "muon", "--opt", "beta2=0.9"], "valid keys: adjust_lr_fn, backend,"),
    (["--optimizer", "adamw", "--opt", "beta2=0.9"], "--optimizer adamw takes no --opt options"),
    (["--opt", "oops"], "--opt 'oops' is not KEY=VALUE"),
    (["--opt", "lam=-1"], "lam"),  # a value the optimizer itself refuses
    (["--optimizer", "muon", "--method", "joint"], "only apply to --optimizer cm"),
    (["--optimizer", "muon", "--muon-lr", "0.01"], "--muon-lr only applies to --optimizer cm"),
    (["--model-arg", "n_layerz=3"], "unknown GPTConfig field(s) ['n_layerz']"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device name"),
    (["--device", "meta"], "--device meta holds no data"),
    (["--dist", "ddp"], "--dist ddp needs at least 2 processes"),
    (["--overwrite", "--resume", "auto"], "pass only one of them"),
    (["--head-stats-every", "-1"], "--head-stats-every must be >= 0, got -1"),
]
if not torch.cuda.is_available():
    BAD_VALUES += [
        (["--device", "cuda"], "--device cuda: no cuda device is available on this machine"),
        (["--device", "cuda:5"], "--device cuda:5: no cuda device is available"),
    ]


@pytest.mark.parametrize("extra, phrase", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_value_one_line_and_the_run_is_unchanged(finished, capsys, extra, phrase):
    resume = [] if "--resume" in extra or "--dist" in extra else ["--resume", "auto"]
    line = _one_line_error(capsys, RUN + ["--out", finished] + resume + extra, finished)
    assert phrase in line, line


@pytest.mark.parametrize("extra, phrase", BAD_VALUES[:3] + BAD_VALUES[12:14] + BAD_VALUES[27:28])
def test_bad_value_creates_no_out_folder(tmp_path, capsys, extra, phrase):
    out = str(tmp_path / "new" / "run")
    assert phrase in _one_line_error(capsys, RUN + ["--out", out] + extra, out)
    assert not os.path.exists(tmp_path / "new")


def test_accept_changes_needs_resume_and_known_keys(finished, capsys):
    line = _one_line_error(capsys, RUN + ["--out", finished + "-x", "--accept-changes", "lr"], finished)
    assert "--accept-changes only applies with --resume" in line
    line = _one_line_error(capsys, RUN + ["--out", finished, "--resume", "auto", "--accept-changes", "lrr"], finished)
    assert "--accept-changes lrr: not a setting of this run; settings: " in line and "batch_size" in line


def test_changed_settings_on_resume_name_every_difference(finished, capsys):
    argv = RUN + ["--out", finished, "--resume", "auto", "--lr", "0.5", "--batch-size", "2", "--seed", "3"]
    line = _one_line_error(capsys, argv, finished)
    for part in ("lr 0.02 -> 0.5", "batch_size 4 -> 2", "seed 0 -> 3", "--accept-changes batch_size,lr,seed"):
        assert part in line, line


def test_new_run_over_an_existing_run(finished, capsys):
    line = _one_line_error(capsys, RUN + ["--out", finished], finished)
    assert "already holds a run" in line and "--resume auto" in line and "--overwrite" in line


def test_resume_problems(finished, tmp_path, capsys):
    ck = os.path.join(finished, "last.pt")
    base = RUN + ["--out", finished]
    assert "does not exist" in _one_line_error(capsys, base + ["--resume", str(tmp_path / "nope.pt")], finished)
    assert "is a folder" in _one_line_error(capsys, base + ["--resume", finished], finished)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert "corrupt" in _one_line_error(capsys, base + ["--resume", str(bad)], finished)
    line = _one_line_error(capsys, base + ["--resume", ck, "--optimizer", "muon"], finished)
    assert "optimizer/model mismatch" in line and "optimizer 'cm' in the checkpoint vs 'muon' now" in line
    line = _one_line_error(capsys, ["--n-layer", "2"] + base[2:] + ["--resume", ck], finished)
    assert "model n_layer=1 in the checkpoint vs 2 now" in line


def test_resume_auto_over_a_distributed_run(tmp_path, capsys):
    out = tmp_path / "d"
    (out / "last_dcp").mkdir(parents=True)
    line = _one_line_error(capsys, RUN + ["--out", str(out), "--resume", "auto"], str(out))
    assert "holds last_dcp" in line and "torchrun" in line


def test_bad_data(tmp_path, capsys):
    out = str(tmp_path / "r")
    line = _one_line_error(capsys, RUN + ["--out", out, "--data", str(tmp_path / "missing.txt")], out)
    assert "missing.txt" in line
    small = tmp_path / "small.txt"
    small.write_text("just a few bytes")
    line = _one_line_error(capsys, RUN + ["--out", out, "--data", str(small)], out)
    assert "block" in line and "small.txt" in line


def test_out_is_an_existing_file_or_under_one(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert "is an existing file" in _one_line_error(capsys, RUN + ["--out", str(f)], str(f))
    assert "is a file, not a folder" in _one_line_error(capsys, RUN + ["--out", str(f / "sub")], str(f))


def test_out_on_a_read_only_file_system(tmp_path, capsys, monkeypatch):
    def read_only(*a, dir=None, **k):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(cli_checks.tempfile, "mkstemp", read_only)  # no real read-only mount without privileges
    out = str(tmp_path / "ro" / "run")
    line = _one_line_error(capsys, RUN + ["--out", out], str(tmp_path))
    assert "cannot be written: read-only file system" in line


def test_out_without_permission(capsys):
    """Real: a folder this user may not write (as root: a forked child that drops to nobody)."""
    top = tempfile.mkdtemp(prefix="cm-perm-")
    try:
        os.chmod(top, 0o755)
        locked = os.path.join(top, "locked")
        os.mkdir(locked, 0o555)
        out = os.path.join(locked, "run")
        if os.geteuid() != 0:
            capsys.readouterr()
            line = _one_line_error(capsys, RUN + ["--out", out], locked)
        else:
            line = _in_child_as_nobody(RUN + ["--out", out])
        assert "cannot be written: no permission to write" in line, line
        assert os.listdir(locked) == []
    finally:
        os.chmod(os.path.join(top, "locked"), 0o755)
        shutil.rmtree(top)


def _in_child_as_nobody(argv) -> str:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to uid/gid 65534, run the CLI, report its stderr through the pipe
        status = 99
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            sys.stderr = os.fdopen(w, "w")
            status = main(argv)
            sys.stderr.flush()
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_diverged_run_ends_with_one_line_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "r")
    assert main(TINY + ["--steps", "4", "--stop-after", "2", "--out", out]) == 0
    real = loop_mod.train_step
    monkeypatch.setattr(loop_mod, "train_step", lambda *a: dict(real(*a), train_loss=float("nan")))
    ck = _snapshot(os.path.join(out, "last.pt"))
    capsys.readouterr()
    assert main(TINY + ["--steps", "4", "--out", out, "--resume", "auto"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: the training loss is nan at step 3"), lines
    assert _snapshot(os.path.join(out, "last.pt")) == ck


def test_a_library_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def bug(*a, **k):
        raise ValueError("a bug inside the optimizer step")

    monkeypatch.setattr(loop_mod, "train_step", bug)
    with pytest.raises(ValueError, match="a bug inside"):  # not turned into a one-line user error
        main(RUN + ["--out", str(tmp_path / "r")])
    code = (
        "import sys; from compositional_muon.training import loop\n"
        "def bug(*a, **k): raise ZeroDivisionError('library bug')\n"
        "loop.train_step = bug\n"
        "from compositional_muon.train import main; sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *RUN, "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 1 and "Traceback" in r.stderr and "ZeroDivisionError: library bug" in r.stderr


def test_one_line_error_from_the_command_line(tmp_path):
    """The real entry point (`python -m compositional_muon.train`): status 2, one line, no traceback."""
    out = str(tmp_path / "r")
    r = subprocess.run(
        [sys.executable, "-m", "compositional_muon.train", *RUN, "--out", out, "--lr", "inf"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2 and r.stderr.strip() == "error: --lr must be a finite number > 0, got inf", r.stderr
    assert not os.path.exists(out)
