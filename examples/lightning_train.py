"""Train this library's small GPT with Lightning and CompositionalMuon, on CPU, then resume.

    pip install "compositional-muon[lightning]"
    python examples/lightning_train.py --epochs 3 --out /tmp/lightning_cm

Writes a Lightning checkpoint (model, CompositionalMuon state, lr scheduler) and continues from it
for one more epoch with Trainer.fit(ckpt_path=...)."""

import argparse
import os

import lightning
import torch

from compositional_muon.integrations.lightning import CausalLMModule, LRSchedule
from compositional_muon.training.models import GPT, GPTConfig

TEXT = b"the quick brown fox jumps over the lazy dog. " * 200


def loader(block: int = 32, batch: int = 16) -> torch.utils.data.DataLoader:
    data = torch.tensor(list(TEXT), dtype=torch.long)
    n = (len(data) - 1) // block
    x = data[: n * block].view(n, block)
    y = data[1 : n * block + 1].view(n, block)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def module(steps: int) -> CausalLMModule:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_embd=64, n_head=4, n_kv_head=2))
    return CausalLMModule(model, lr=0.02, adamw_lr=3e-3, schedule=LRSchedule(warmup_steps=5, total_steps=steps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="runs/lightning")
    a = p.parse_args()
    dl = loader()
    total = (a.epochs + 1) * len(dl)
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer = lightning.Trainer(max_epochs=a.epochs, **kw)
    trainer.fit(module(total), dl)
    os.makedirs(a.out, exist_ok=True)
    ckpt = os.path.join(a.out, "last.ckpt")
    trainer.save_checkpoint(ckpt)
    print(f"after {a.epochs} epochs: train loss {float(trainer.callback_metrics['train_loss']):.4f}; saved {ckpt}")
    more = lightning.Trainer(max_epochs=a.epochs + 1, **kw)
    more.fit(module(total), dl, ckpt_path=ckpt)
    print(f"resumed for one more epoch: train loss {float(more.callback_metrics['train_loss']):.4f}")


if __name__ == "__main__":
    main()
