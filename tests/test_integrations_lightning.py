"""The Lightning adapter with the real lightning Trainer on CPU: fit, checkpoint, resume."""

import pytest
import torch

pytest.importorskip("lightning")
import lightning  # noqa: E402

from compositional_muon import CompositionalMuon  # noqa: E402
from compositional_muon.integrations.lightning import CausalLMModule, LRSchedule, optimizer_config  # noqa: E402
from compositional_muon.training.models import GPT, GPTConfig  # noqa: E402


def _module():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_embd=32, n_head=4, n_kv_head=2))
    return CausalLMModule(
        model, lr=0.02, adamw_lr=3e-3, schedule=LRSchedule(warmup_steps=2, total_steps=16), msign_dtype=torch.float32
    )


def _loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 32, (16, 17), generator=g)
    ds = torch.utils.data.TensorDataset(x[:, :-1], x[:, 1:])
    return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)


def _trainer(epochs):
    return lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_optimizer_config_routes_and_schedules():
    m = _module()
    cfg = optimizer_config(m.model, schedule=LRSchedule(warmup_steps=4, total_steps=10, min_lr_ratio=0.1))
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, CompositionalMuon) and cfg["lr_scheduler"]["interval"] == "step"
    assert [g["kind"] for g in opt.param_groups] == ["cm", "muon", "adamw"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 / 4)  # warmup step 0
    assert LRSchedule(warmup_steps=4, total_steps=10, min_lr_ratio=0.1).factor(10) == pytest.approx(0.1)
    assert "lr_scheduler" not in optimizer_config(m.model)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        LRSchedule(min_lr_ratio=2.0)
    del sched


@pytest.mark.slow
def test_fit_checkpoint_resume_equals_uninterrupted(tmp_path, one_thread):
    full = _module()
    _trainer(4).fit(full, _loader())
    assert isinstance(full.trainer.optimizers[0], CompositionalMuon)

    half = _module()
    t = _trainer(2)
    t.fit(half, _loader())
    ckpt = str(tmp_path / "half.ckpt")
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["optimizer_states"][0]["state"], "the optimizer state is in the checkpoint"
    assert any(g.get("kind") == "cm" for g in saved["optimizer_states"][0]["param_groups"])

    resumed = _module()
    _trainer(4).fit(resumed, _loader(), ckpt_path=ckpt)
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 16

    # the same resume with the optimizer's state (momenta, AdamW moments) dropped differs
    saved["optimizer_states"][0]["state"] = {}
    torch.save(saved, str(tmp_path / "no_state.ckpt"))
    blind = _module()
    _trainer(4).fit(blind, _loader(), ckpt_path=str(tmp_path / "no_state.ckpt"))
    assert any(not torch.equal(a, b) for a, b in zip(full.model.parameters(), blind.model.parameters()))
