"""Token data for the example models: an embedded default corpus, text files, FineWeb ``.bin``
shards, and :class:`TokenDataset` (train/val tensors, seeded random batches, resumable).

* :func:`default_corpus`: CPython's own reference documentation (``pydoc_data.topics``), about
  0.47 MB of English, no network needed.
* :func:`load_text`: a UTF-8 file or a folder of ``*.txt`` files, byte-level or ``tiktoken:<name>``.
* :func:`load_fineweb_shard` / :func:`load_fineweb`: modded-nanogpt shards (a 256 x int32 header
  ``[20240520, 1, n_tokens, 0...]`` then ``n_tokens`` uint16 GPT-2 tokens); :func:`write_fineweb_shard`.
* :func:`load_dataset`: one entry point for all of them.
"""

from __future__ import annotations

import array
import functools
import glob as _glob
import os
import struct
import sys
from pathlib import Path

import torch

__all__ = [
    "default_corpus",
    "load_text",
    "load_fineweb_shard",
    "load_fineweb",
    "write_fineweb_shard",
    "get_tokenizer",
    "ByteTokenizer",
    "TiktokenTokenizer",
    "TokenDataset",
    "load_dataset",
    "FINEWEB_MAGIC",
    "FINEWEB_VERSION",
]

FINEWEB_MAGIC = 20240520
FINEWEB_VERSION = 1
_HEADER_INTS = 256
_HEADER_BYTES = 4 * _HEADER_INTS
_TOPIC_SEPARATOR = "\n\n"


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256)."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text) -> torch.Tensor:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in _as_list(tokens)).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """A tiktoken encoding (``tiktoken:gpt2``...). Needs the ``tiktoken`` package and its encoding
    files (downloaded once by tiktoken, then cached)."""

    def __init__(self, encoding: str):
        try:
            import tiktoken
        except ImportError:
            raise RuntimeError(
                f"tokenizer 'tiktoken:{encoding}' needs the tiktoken package: pip install tiktoken "
                "(it downloads the encoding on first use and caches it; set TIKTOKEN_CACHE_DIR to "
                "a folder holding the cached files to work offline)"
            ) from None
        try:
            self.enc = tiktoken.get_encoding(encoding)
        except Exception as e:  # unknown name, no network and no cache, ...
            raise RuntimeError(
                f"tiktoken could not load the encoding {encoding!r} ({type(e).__name__}: {e}). "
                "Run once with network access, or point TIKTOKEN_CACHE_DIR at a folder with the "
                "cached encoding files"
            ) from None
        self.name = f"tiktoken:{encoding}"
        self.vocab_size = self.enc.n_vocab

    def encode(self, text) -> torch.Tensor:
        text = text if isinstance(text, str) else bytes(text).decode("utf-8")
        return torch.tensor(self.enc.encode_ordinary(text), dtype=torch.int32)

    def decode(self, tokens) -> str:
        return self.enc.decode(_as_list(tokens))


def get_tokenizer(spec: str = "bytes"):
    """``"bytes"`` (default) or ``"tiktoken:<encoding>"``, e.g. ``"tiktoken:gpt2"``."""
    if not isinstance(spec, str):
        raise TypeError(f"tokenizer must be a string, got {type(spec).__name__}")
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("tiktoken:") and len(spec) > len("tiktoken:"):
        return TiktokenTokenizer(spec[len("tiktoken:") :])
    raise ValueError(f"unknown tokenizer {spec!r}; use 'bytes' or 'tiktoken:<encoding>' (e.g. 'tiktoken:gpt2')")


def _as_list(tokens) -> list:
    if isinstance(tokens, torch.Tensor):
        return tokens.reshape(-1).tolist()
    return [int(t) for t in tokens]


# ------------------------------------------------------------------------------------------------
# Corpora
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def default_corpus() -> bytes:
    """CPython's reference documentation topics (``pydoc_data.topics.topics``) joined in sorted-key
    order with blank lines, as UTF-8 bytes. Fixed for a given Python version."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds drop pydoc_data
        raise RuntimeError(
            "the default corpus needs CPython's pydoc_data module, which this Python lacks; "
            "pass a text file, a folder of .txt files or FineWeb .bin shards instead"
        ) from None
    return _TOPIC_SEPARATOR.join(topics[k] for k in sorted(topics)).encode("utf-8")


def _read_text_bytes(path) -> bytes:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {str(p)!r}")
    if p.is_dir():
        files = sorted(f for f in p.glob("*.txt") if f.is_file())
        if not files:
            raise ValueError(f"folder {str(p)!r} has no .txt files")
        parts = [f.read_bytes() for f in files]
        if not any(parts):
            raise ValueError(f"all .txt files in {str(p)!r} are empty")
        return b"\n\n".join(x for x in parts if x)
    data = p.read_bytes()
    if not data:
        raise ValueError(f"text file {str(p)!r} is empty")
    return data


def load_text(path, tokenizer: str = "bytes") -> torch.Tensor:
    """Tokens of a UTF-8 text file, or of every ``*.txt`` file in a folder (sorted by name, joined
    with a blank line): uint8 bytes by default, int32 ids for ``tokenizer="tiktoken:<encoding>"``."""
    tok = get_tokenizer(tokenizer)
    return _encode(_read_text_bytes(path), tok, path)


def _encode(data: bytes, tok, where) -> torch.Tensor:
    if isinstance(tok, ByteTokenizer):
        return tok.encode(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(where)!r} is not valid UTF-8 ({e})") from None
    return tok.encode(text)


def write_fineweb_shard(path, tokens) -> None:
    """Write ``tokens`` (ints in [0, 65535]) as a modded-nanogpt shard."""
    t = torch.as_tensor(tokens).reshape(-1)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"tokens must be integers, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 65535):
        raise ValueError("tokens must lie in [0, 65535] to fit uint16")
    header = [0] * _HEADER_INTS
    header[0], header[1], header[2] = FINEWEB_MAGIC, FINEWEB_VERSION, t.numel()
    body = array.array("H", t.tolist())
    if sys.byteorder == "big":
        body.byteswap()  # shards are little-endian
    with open(path, "wb") as f:
        f.write(struct.pack(f"<{_HEADER_INTS}i", *header))
        f.write(body.tobytes())


def load_fineweb_shard(path) -> torch.Tensor:
    """Tokens (int32) of one modded-nanogpt ``.bin`` shard; checks magic, version and file size."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such FineWeb shard: {str(p)!r}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES:
            raise ValueError(f"{str(p)!r}: file has {size} bytes, shorter than the {_HEADER_BYTES}-byte header")
        magic, version, n = struct.unpack("<3i", head[:12])
        if magic != FINEWEB_MAGIC:
            raise ValueError(
                f"{str(p)!r}: bad magic number {magic} (expected {FINEWEB_MAGIC}); not a modded-nanogpt token shard"
            )
        if version != FINEWEB_VERSION:
            raise ValueError(f"{str(p)!r}: unsupported version {version} (expected {FINEWEB_VERSION})")
        if n < 0 or size != _HEADER_BYTES + 2 * n:
            raise ValueError(
                f"{str(p)!r}: header says {n} tokens ({_HEADER_BYTES + 2 * max(n, 0)} bytes) but the "
                f"file has {size} bytes (truncated or corrupt)"
            )
        buf = bytearray(f.read(2 * n))
    if n == 0:
        return torch.zeros(0, dtype=torch.int32)
    if sys.byteorder == "big":  # shards are little-endian
        return (
            torch.frombuffer(buf, dtype=torch.uint8)
            .view(-1, 2)
            .flip(-1)
            .contiguous()
            .view(torch.uint16)
            .to(torch.int32)
            .view(-1)
        )
    return torch.frombuffer(buf, dtype=torch.uint16).to(torch.int32)


def _expand(pattern) -> list:
    files = sorted(_glob.glob(str(pattern)))
    if not files:
        raise FileNotFoundError(f"no files match {str(pattern)!r}")
    return files


def load_fineweb(pattern, max_tokens: int | None = None) -> torch.Tensor:
    """Concatenated tokens of the shards matching ``pattern`` (a path or a glob, sorted by name),
    optionally cut to the first ``max_tokens``."""
    out, total = [], 0
    for f in _expand(pattern):
        t = load_fineweb_shard(f)
        out.append(t)
        total += t.numel()
        if max_tokens is not None and total >= max_tokens:
            break
    t = torch.cat(out)
    return t[:max_tokens] if max_tokens is not None else t


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------


class TokenDataset:
    """Train/val token tensors (val = the last ``val_fraction`` of the tokens) with random
    ``(x, y)`` batches. Each split draws from its own ``torch.Generator`` seeded from ``seed``, so
    evaluating never shifts the training batches; ``state_dict()``/``load_state_dict()`` save and
    restore both generators, and a resumed run draws exactly the same batches."""

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        seed: int = 0,
        val_fraction: float = 0.1,
        tokenizer=None,
        vocab_size: int | None = None,
        name: str = "",
    ):
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1:
            raise TypeError("tokens must be a 1-D tensor of token ids")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if tokens.numel() == 0:
            raise ValueError("no tokens")
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.vocab_size = int(vocab_size if vocab_size is not None else self.tokenizer.vocab_size)
        self.name, self.seed, self.val_fraction = name, seed, float(val_fraction)
        n_val = int(tokens.numel() * val_fraction)
        self.train, self.val = tokens[: tokens.numel() - n_val], tokens[tokens.numel() - n_val :]
        self._gens = {"train": torch.Generator().manual_seed(seed), "val": torch.Generator().manual_seed(seed + 1)}

    def __repr__(self):
        return (
            f"TokenDataset({self.name!r}, train={self.train.numel()} tokens, val={self.val.numel()} tokens, "
            f"vocab_size={self.vocab_size}, tokenizer={self.tokenizer.name!r})"
        )

    def split(self, split: str) -> torch.Tensor:
        if split not in self._gens:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def check_block_size(self, block_size: int, split: str | None = None) -> None:
        """ValueError when a split has fewer than ``block_size + 1`` tokens."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        for s in [split] if split else ["train"] + (["val"] if self.val.numel() else []):
            n = self.split(s).numel()
            if n < block_size + 1:
                raise ValueError(
                    f"the {s} split of {self.name or 'the corpus'} has {n} tokens, too few for "
                    f"block_size={block_size} (needs at least {block_size + 1}); use a smaller "
                    "block_size, a larger corpus or a smaller val_fraction"
                )

    def get_batch(self, split: str, batch_size: int, block_size: int, device=None):
        """``(x, y)``, both ``(batch_size, block_size)`` int64: random windows of the split, ``y`` the
        next tokens of ``x``."""
        data = self.split(split)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.check_block_size(block_size, split)
        starts = torch.randint(data.numel() - block_size, (batch_size,), generator=self._gens[split])
        win = data[starts[:, None] + torch.arange(block_size + 1)].long()
        x, y = win[:, :-1], win[:, 1:]
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y

    def decode(self, tokens) -> str:
        """Text of ``tokens`` (byte tokens decode with ``errors="replace"``)."""
        return self.tokenizer.decode(tokens)

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "num_train_tokens": self.train.numel(),
            "num_val_tokens": self.val.numel(),
            "train_generator": self._gens["train"].get_state(),
            "val_generator": self._gens["val"].get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the generators; ValueError when the state comes from a dataset of different size."""
        if not isinstance(state, dict) or not {"train_generator", "val_generator"} <= set(state):
            raise ValueError("not a TokenDataset state dict (needs 'train_generator' and 'val_generator')")
        for key, t in (("num_train_tokens", self.train), ("num_val_tokens", self.val)):
            if key in state and state[key] != t.numel():
                raise ValueError(
                    f"state dict has {key}={state[key]} but this dataset has {t.numel()}; "
                    "it was saved for different data"
                )
        self._gens["train"].set_state(state["train_generator"])
        self._gens["val"].set_state(state["val_generator"])


def load_dataset(
    spec=None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    tokenizer: str = "bytes",
    block_size: int | None = None,
    max_tokens: int | None = None,
) -> TokenDataset:
    """The dataset named by ``spec``:

    * ``None`` or ``"default"``: :func:`default_corpus`;
    * a ``.txt`` file, any other text file, or a folder (its ``*.txt`` files): :func:`load_text`;
    * a ``.bin`` file or a glob (``"data/fineweb_train_*.bin"``): FineWeb shards (GPT-2 tokens,
      vocab 50257; decoding needs tiktoken; ``tokenizer`` must stay ``"bytes"``). A glob of
      ``.txt`` files is read as text.

    ``block_size``, when given, is checked against both splits at once; ``max_tokens`` truncates
    the token stream before the split.
    """
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be None, a path or a glob string, got {type(spec).__name__}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be None or an int >= 1, got {max_tokens!r}")
    spec_s = None if spec is None else os.fspath(spec)
    if spec_s is None or spec_s == "default":
        kind = "default"
    elif any(ch in spec_s for ch in "*?[") and not os.path.exists(spec_s):
        files = _expand(spec_s)
        if all(f.endswith(".bin") for f in files):
            kind = "bin"
        elif all(f.endswith(".txt") for f in files):
            kind = "txt-glob"
        else:
            raise ValueError(
                f"{spec_s!r} matches a mix of files; a glob must match only .bin shards or only .txt files"
            )
    else:
        kind = "bin" if spec_s.endswith(".bin") else "text"
    if kind == "bin":
        if tokenizer != "bytes":
            raise ValueError(f"{spec_s!r} holds FineWeb shards, already GPT-2 tokens; tokenizer= applies to text only")
        tokens, tok, name = load_fineweb(spec_s, max_tokens), _FinewebTokenizer(), spec_s
    else:
        tok = get_tokenizer(tokenizer)
        if kind == "default":
            name, data = "default corpus (pydoc_data.topics)", default_corpus()
        elif kind == "txt-glob":
            name, data = spec_s, b"\n\n".join(_read_text_bytes(f) for f in files)
        else:
            name, data = spec_s, _read_text_bytes(spec_s)
        tokens = _encode(data, tok, name)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    ds = TokenDataset(tokens, seed=seed, val_fraction=val_fraction, tokenizer=tok, name=name)
    if block_size is not None:
        ds.check_block_size(block_size)
    return ds


class _FinewebTokenizer:
    """GPT-2 ids of FineWeb shards; decodes with tiktoken when available, else shows the ids."""

    name = "fineweb:gpt2"
    vocab_size = 50257

    def decode(self, tokens) -> str:
        ids = _as_list(tokens)
        try:
            return TiktokenTokenizer("gpt2").enc.decode(ids)
        except RuntimeError:
            return "<gpt2 ids: " + " ".join(map(str, ids)) + ">"

    def encode(self, text):
        return TiktokenTokenizer("gpt2").encode(text)
