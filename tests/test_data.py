"""Data: the embedded corpus, text and FineWeb loading, TokenDataset batches and resumption."""

import struct
import sys

import pytest
import torch

from compositional_muon.training.data import (
    FINEWEB_MAGIC,
    TokenDataset,
    default_corpus,
    get_tokenizer,
    load_dataset,
    load_fineweb,
    load_fineweb_shard,
    load_text,
    write_fineweb_shard,
)


def test_default_corpus_is_deterministic_english_bytes():
    a = default_corpus()
    assert isinstance(a, bytes) and len(a) > 100_000
    assert a == default_corpus()
    text = a.decode("utf-8")
    assert 'The "assert" statement' in text and "Assert statements are" in text
    ds = load_dataset(None, seed=0)
    assert ds.vocab_size == 256
    assert ds.train.dtype == torch.uint8
    assert ds.train.numel() + ds.val.numel() == len(a)
    assert ds.val.numel() == int(len(a) * 0.1)
    assert bytes(ds.val[:50].tolist()) == a[len(a) - ds.val.numel() :][:50]
    assert load_dataset("default", seed=0).train.numel() == ds.train.numel()


def test_batches_shapes_dtypes_and_shift():
    ds = load_dataset(None, seed=0)
    x, y = ds.get_batch("train", 4, 32)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 256 and int(x.min()) >= 0
    xv, yv = ds.get_batch("val", 3, 16)
    assert xv.shape == (3, 16)
    # every window is a slice of the val split
    val = ds.val.long()
    row = torch.cat((xv[0], yv[0, -1:]))
    assert any(torch.equal(val[i : i + 17], row) for i in range(val.numel() - 16))


def test_determinism_for_a_seed():
    a, b, c = (load_dataset(None, seed=s) for s in (3, 3, 4))
    xa, xb, xc = (d.get_batch("train", 2, 8)[0] for d in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_state_dict_resume_draws_the_same_batches():
    ds = load_dataset(None, seed=7)
    for _ in range(3):
        ds.get_batch("train", 2, 8)
        ds.get_batch("val", 2, 8)
    state = ds.state_dict()
    expected = [ds.get_batch("train", 2, 8) for _ in range(3)] + [ds.get_batch("val", 2, 8)]
    resumed = load_dataset(None, seed=123)
    resumed.load_state_dict(state)
    got = [resumed.get_batch("train", 2, 8) for _ in range(3)] + [resumed.get_batch("val", 2, 8)]
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # validation draws do not move the training stream
    d1, d2 = load_dataset(None, seed=1), load_dataset(None, seed=1)
    d1.get_batch("val", 2, 8)
    assert torch.equal(d1.get_batch("train", 2, 8)[0], d2.get_batch("train", 2, 8)[0])
    small = TokenDataset(torch.arange(100, dtype=torch.uint8))
    with pytest.raises(ValueError, match="different data"):
        small.load_state_dict(state)
    with pytest.raises(ValueError):
        small.load_state_dict({"seed": 0})


def test_decode():
    ds = TokenDataset(torch.tensor(list("héllo wörld".encode()), dtype=torch.uint8), val_fraction=0.0)
    assert ds.decode(ds.train) == "héllo wörld"
    assert ds.decode([0xC3]) == "\ufffd"  # a cut multi-byte character decodes with a replacement
    assert ds.decode(torch.tensor([[104, 105]])) == "hi"


def test_fineweb_shard_round_trip(tmp_path):
    toks = torch.randint(0, 50257, (1000,), generator=torch.Generator().manual_seed(0))
    p = tmp_path / "fineweb_train_000001.bin"
    write_fineweb_shard(p, toks)
    raw = p.read_bytes()
    assert struct.unpack("<3i", raw[:12]) == (FINEWEB_MAGIC, 1, 1000) and len(raw) == 1024 + 2000
    back = load_fineweb_shard(p)
    assert back.dtype == torch.int32 and torch.equal(back.long(), toks)
    write_fineweb_shard(tmp_path / "fineweb_train_000002.bin", torch.arange(10))
    both = load_fineweb(tmp_path / "fineweb_train_*.bin")
    assert both.numel() == 1010 and torch.equal(both[1000:].long(), torch.arange(10))
    assert load_fineweb(tmp_path / "fineweb_train_*.bin", max_tokens=5).numel() == 5
    ds = load_dataset(str(tmp_path / "*.bin"), seed=0)
    assert ds.vocab_size == 50257 and ds.train.numel() == 909 and ds.val.numel() == 101
    x, y = ds.get_batch("train", 2, 16)
    assert x.dtype == torch.int64 and int(x.max()) < 50257
    assert load_dataset(str(p), seed=0).train.numel() == 900
    assert isinstance(ds.decode([1, 2, 3]), str)
    with pytest.raises(ValueError, match="tokenizer"):
        load_dataset(str(p), seed=0, tokenizer="tiktoken:gpt2")
    with pytest.raises(ValueError, match="65535"):
        write_fineweb_shard(tmp_path / "bad.bin", [70000])


def _corrupt(tmp_path, name, header=None, cut=0):
    p = tmp_path / name
    write_fineweb_shard(p, torch.arange(100))
    raw = bytearray(p.read_bytes())
    if header:
        for i, v in header.items():
            raw[4 * i : 4 * i + 4] = struct.pack("<i", v)
    p.write_bytes(bytes(raw[: len(raw) - cut]))
    return p


def test_bad_shards_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"bad_magic\.bin.*magic"):
        load_fineweb_shard(_corrupt(tmp_path, "bad_magic.bin", {0: 12345}))
    with pytest.raises(ValueError, match=r"bad_version\.bin.*version 7"):
        load_fineweb_shard(_corrupt(tmp_path, "bad_version.bin", {1: 7}))
    with pytest.raises(ValueError, match=r"truncated\.bin.*100 tokens.*1222 bytes"):
        load_fineweb_shard(_corrupt(tmp_path, "truncated.bin", cut=2))
    with pytest.raises(ValueError, match=r"count\.bin.*header says 101"):
        load_fineweb_shard(_corrupt(tmp_path, "count.bin", {2: 101}))
    (tmp_path / "tiny.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="header"):
        load_fineweb_shard(tmp_path / "tiny.bin")
    with pytest.raises(FileNotFoundError):
        load_fineweb_shard(tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_fineweb(tmp_path / "nothing_*.bin")


def test_text_file_and_folder(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello ünïcode\n", encoding="utf-8")
    t = load_text(f)
    assert t.dtype == torch.uint8 and bytes(t.tolist()) == "hello ünïcode\n".encode()
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("second")
    (d / "a.txt").write_text("first")
    (d / "ignored.md").write_text("not text")
    assert bytes(load_text(d).tolist()) == b"first\n\nsecond"
    ds = load_dataset(d, seed=0, val_fraction=0.0)
    assert ds.decode(ds.train) == "first\n\nsecond"
    assert load_dataset(str(d / "*.txt"), seed=0, val_fraction=0.0).decode(ds.train) == "first\n\nsecond"
    big = tmp_path / "big.txt"
    big.write_bytes(default_corpus()[:5000])
    ds = load_dataset(str(big), seed=0, block_size=64)
    assert ds.get_batch("train", 2, 64)[0].shape == (2, 64)


def test_bad_paths_and_specs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "missing.txt"), seed=0)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "nodocs" / "x.md").write_text("x")
    with pytest.raises(ValueError, match="no .txt files"):
        load_text(tmp_path / "nodocs")
    with pytest.raises(TypeError):
        load_dataset(3, seed=0)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_text(tmp_path / "empty.txt", tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset(None, seed=0, val_fraction=1.0)
    ds = load_dataset(None, seed=0)
    with pytest.raises(ValueError, match="split"):
        ds.get_batch("test", 2, 8)
    with pytest.raises(ValueError, match="batch_size"):
        ds.get_batch("train", 0, 8)


def test_tiny_corpus_vs_block_size(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("x" * 50)
    with pytest.raises(ValueError, match="block_size=64"):
        load_dataset(f, seed=0, block_size=64)
    ds = load_dataset(f, seed=0)  # 45 train / 5 val tokens
    assert ds.get_batch("train", 2, 40)[0].shape == (2, 40)
    with pytest.raises(ValueError, match="val split.*5 tokens"):
        ds.get_batch("val", 2, 40)
    with pytest.raises(ValueError, match="train split"):
        ds.get_batch("train", 2, 45)
    no_val = load_dataset(f, seed=0, val_fraction=0.0)
    with pytest.raises(ValueError, match="val split.*0 tokens"):
        no_val.get_batch("val", 1, 4)


def test_tiktoken_missing_is_a_clear_runtime_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken -> ImportError
    f = tmp_path / "a.txt"
    f.write_text("hello")
    with pytest.raises(RuntimeError, match="pip install tiktoken"):
        load_text(f, tokenizer="tiktoken:gpt2")
    with pytest.raises(RuntimeError, match="tiktoken"):
        get_tokenizer("tiktoken:gpt2")
    # FineWeb samples still decode to something readable without it
    p = tmp_path / "s.bin"
    write_fineweb_shard(p, torch.arange(40))
    assert "gpt2 ids: 1 2 3" in load_dataset(str(p), seed=0).decode([1, 2, 3])
