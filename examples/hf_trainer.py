"""Train a tiny randomly initialised Llama with the Hugging Face Trainer and CompositionalMuon.

    pip install "compositional-muon[hf]"
    python examples/hf_trainer.py --steps 40 --out /tmp/hf_cm

Runs on CPU in about half a minute. The Trainer saves the optimizer state with every checkpoint
(checkpoint-N/optimizer.pt); continue a run with trainer.train(resume_from_checkpoint=True)."""

import argparse

import torch
import transformers

from compositional_muon.integrations.hf import trainer_optimizer_kwargs


def dataset(n: int = 64, seq: int = 32, vocab: int = 128) -> list:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, vocab, (seq,), generator=g)
    # learnable: shifted copies of one pattern
    return [{"input_ids": (x := torch.roll(base, i)), "labels": x.clone()} for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="runs/hf_trainer")
    a = p.parse_args()
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    args = transformers.TrainingArguments(
        output_dir=a.out,
        max_steps=a.steps,
        per_device_train_batch_size=8,
        logging_steps=10,
        save_steps=a.steps // 2,
        report_to=[],
        use_cpu=True,
        lr_scheduler_type="cosine",
        warmup_steps=5,
    )
    # CM on q/k/v/o, Muon on the MLP matrices, AdamW on the (tied) embedding and the norms
    opt = trainer_optimizer_kwargs(lr=0.02, adamw_lr=3e-3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), **opt)
    result = trainer.train()
    print(f"final train loss {result.training_loss:.4f}; optimizer: {type(trainer.optimizer.optimizer).__name__}")


if __name__ == "__main__":
    main()
