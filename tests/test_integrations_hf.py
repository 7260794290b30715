"""The Hugging Face adapter with the real transformers classes and Trainer (CPU, tiny random models)."""

import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from compositional_muon import CompositionalMuon, MuonWithAuxAdam  # noqa: E402
from compositional_muon.integrations.hf import (  # noqa: E402
    CompositionalMuonFactory,
    build_optimizer,
    hf_heads,
    trainer_optimizer_kwargs,
)

F32 = dict(msign_dtype=torch.float32)


def _llama(tie=False, kv=2, layers=2):
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _models():
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    yield "llama-gqa-tied", _llama(tie=True), 2
    yield "qwen2-mqa", transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=1, **common)), 1
    yield "mistral", transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, **common)), 2
    gemma = transformers.GemmaConfig(num_key_value_heads=1, head_dim=16, **common)  # head_dim != 32 / 4
    yield "gemma", transformers.GemmaForCausalLM(gemma), 1
    gpt2 = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    yield "gpt2", transformers.GPT2LMHeadModel(gpt2), 4


@pytest.mark.parametrize("which", ["llama-gqa-tied", "qwen2-mqa", "mistral", "gemma", "gpt2"])
def test_every_parameter_once_attention_as_cm_and_one_step_moves_all(which):
    name, model, kv = next(m for m in _models() if m[0] == which)
    h = hf_heads(model)
    opt = build_optimizer(model, lr=0.02, **F32)
    assert isinstance(opt, CompositionalMuon)
    cm = opt.param_groups[0]
    assert {(p["num_heads"], p["num_kv_heads"], p["head_dim"]) for p in cm["cm_pairs"]} == {(4, kv, h.head_dim)}
    assert len(cm["cm_pairs"]) == 2 * h.num_layers
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    emb = model.get_input_embeddings().weight
    adamw = next(g for g in opt.param_groups if g["kind"] == "adamw")
    assert any(p is emb for p in adamw["params"]) and any(
        p is model.get_output_embeddings().weight for p in adamw["params"]
    )
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(before[n], p), f"{name}: {n} did not move"
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_tied_embedding_takes_exactly_one_adamw_step():
    model = _llama(tie=True)
    opt = build_optimizer(model, lr=0.02, adamw_lr=1e-2, **F32)
    w = model.model.embed_tokens.weight
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    ref = w.detach().double().clone()
    g = w.grad.double()
    # AdamW's first step with bias correction: lr * g / (|g| + eps), eps = 1e-10, beta/weight decay as built
    expect = ref - 1e-2 * g / (g.abs() + 1e-10)
    opt.step()
    assert torch.allclose(w.detach().double(), expect, atol=1e-6), "tied embedding not stepped exactly once"


def test_muon_choice_and_bad_input():
    model = _llama()
    opt = build_optimizer(model, "muon", lr=0.01)
    assert isinstance(opt, MuonWithAuxAdam)
    muon = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    assert any(p is model.model.layers[0].self_attn.q_proj.weight for p in muon)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "sgd")
    with pytest.raises(ValueError, match="do not apply"):
        build_optimizer(model, "muon", lam=0.1)
    with pytest.raises(TypeError, match="unknown CM option"):
        build_optimizer(model, lammm=0.1)
    with pytest.raises(TypeError, match="optimizers="):
        CompositionalMuonFactory([torch.zeros(2, requires_grad=True)], lr=0.1)


class _Losses(transformers.TrainerCallback):
    def __init__(self, stop_at=None):
        self.losses, self.stop_at = {}, stop_at

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]

    def on_step_end(self, args, state, control, **kw):
        if self.stop_at is not None and state.global_step == self.stop_at:
            control.should_save = True
            control.should_training_stop = True


def _dataset(n=32, seq=16):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": (ids := torch.randint(0, 64, (seq,), generator=g)), "labels": ids.clone()} for _ in range(n)]


def _trainer(out, stop_at=None, how="factory"):
    model = _llama(tie=True)
    args = transformers.TrainingArguments(
        output_dir=out,
        max_steps=24,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=12,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        seed=7,
        data_seed=7,
        lr_scheduler_type="linear",
        warmup_steps=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kw = dict(lr=0.02, adamw_lr=3e-3, **F32)
    cb = _Losses(stop_at)
    if how == "factory":
        extra = trainer_optimizer_kwargs(**kw)
    else:
        extra = dict(optimizers=(build_optimizer(model, **kw), None))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[cb], **extra)
    return trainer, cb


@pytest.mark.slow
def test_trainer_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, one_thread):
    pytest.importorskip("accelerate")  # the Trainer needs it (transformers[torch])
    full, cb_full = _trainer(str(tmp_path / "full"))
    full.train()
    assert isinstance(getattr(full.optimizer, "optimizer", full.optimizer), CompositionalMuon)  # accelerate wraps it
    assert sorted(cb_full.losses) == list(range(1, 25))
    assert cb_full.losses[24] < cb_full.losses[1]

    part, cb_part = _trainer(str(tmp_path / "part"), stop_at=12, how="optimizers")
    part.train()
    ckpt = str(tmp_path / "part" / "checkpoint-12")
    assert os.path.isfile(os.path.join(ckpt, "optimizer.pt"))
    assert {k: cb_part.losses[k] for k in range(1, 13)} == {k: cb_full.losses[k] for k in range(1, 13)}

    resumed, cb_res = _trainer(str(tmp_path / "part"))
    resumed.train(resume_from_checkpoint=ckpt)
    assert {k: cb_res.losses[k] for k in range(13, 25)} == {k: cb_full.losses[k] for k in range(13, 25)}
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n

    # the same resume without the optimizer state (momenta, AdamW moments) is not the same run
    bare = str(tmp_path / "bare")
    shutil.copytree(ckpt, bare)
    os.unlink(os.path.join(bare, "optimizer.pt"))
    blind, _ = _trainer(str(tmp_path / "blind"))
    blind.train(resume_from_checkpoint=bare)
    assert any(not torch.equal(a, b) for a, b in zip(full.model.parameters(), blind.model.parameters()))
