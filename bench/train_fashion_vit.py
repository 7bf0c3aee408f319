"""Train the small ViT of `fashion_vit.py` on Fashion-MNIST on the CPU (one command, seeded).

AdamW, batch 128, learning rate 2e-3 with linear warm-up and cosine decay, random horizontal flips.
Writes bench/results/fashion_vit.pt (state dict, ~0.8 MB) and fashion_vit_train.json (test accuracy,
time, parameters) after every epoch; `--arch timm` trains timm's ViT of the same size into fashion_vit_timm.pt and
fashion_vit_timm_train.json.

    .venv/bin/python bench/train_fashion_vit.py [--arch torchvision] [--epochs 1] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from fashion_vit import ARCHS, accuracy, build, checkpoint, images, train_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, default="torchvision")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.seed, args.arch)
    x, y = images("train")
    test_x, test_y = images("test")
    steps = args.epochs * math.ceil(len(x) / args.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps))))
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for step, begin in enumerate(range(0, len(x), args.batch)):
            index = order[begin:begin + args.batch]
            batch = x[index]
            flip = torch.rand(len(index), generator=generator) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            loss = torch.nn.functional.cross_entropy(model(batch), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 50 == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
        model.eval()
        save(model, test_x, test_y, args, epoch + 1, time.time() - start)


def save(model: torch.nn.Module, test_x, test_y, args, epochs: int, elapsed: float) -> None:
    """Write the checkpoint and its record (after every epoch, so an interrupted run leaves the last one)."""
    checkpoint(args.arch).parent.mkdir(exist_ok=True)
    torch.save(model.state_dict(), checkpoint(args.arch))
    result = {"test_accuracy": accuracy(model, test_x, test_y), "epochs": epochs, "seconds": round(elapsed),
              "params": sum(p.numel() for p in model.parameters()), "threads": args.threads, "seed": args.seed,
              "batch": args.batch, "lr": args.lr}
    if args.arch != "torchvision":
        result["arch"] = args.arch
    train_record(args.arch).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
