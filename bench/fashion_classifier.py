"""A small Fashion-MNIST CNN whose penultimate layer is the feature space of the diffusion quality measures.

Takes the images of `fashion_diffusion.images` (32 x 32, pixels in [-1, 1]): three conv-BN-ReLU-maxpool stages
(16, 32, 64 channels), then a 128-wide hidden layer (the features) and 10 logits. `features(images)` gives the
[N, 128] features, `predict(images)` the classes, both from the weights that `train` commits.

    .venv/bin/python bench/fashion_classifier.py train [--epochs 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from fashion_diffusion import RESULTS, images

CHECKPOINT = RESULTS / "classifier.pt"
FEATURES = 128


def _stage(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(),
                         nn.MaxPool2d(2))


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_stage(1, 16), _stage(16, 32), _stage(32, 64), nn.Flatten(),
                                  nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


_loaded: dict[str, Classifier] = {}


def load() -> Classifier:
    """The trained classifier (eval mode), read once."""
    if "model" not in _loaded:
        if not CHECKPOINT.is_file():
            raise SystemExit(f"{CHECKPOINT} is missing: run .venv/bin/python bench/fashion_classifier.py train")
        model = Classifier()
        model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
        _loaded["model"] = model.eval()
    return _loaded["model"]


@torch.no_grad()
def features(images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Penultimate-layer features [N, 128] of images [N, 1, 32, 32] in [-1, 1]."""
    body = load().body
    return torch.cat([body(images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def predict(images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Predicted classes [N] of images [N, 1, 32, 32] in [-1, 1]."""
    model = load()
    return torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])


def train(epochs: int, batch: int, lr: float, seed: int) -> Classifier:
    """AdamW with a one-cycle learning rate, random horizontal flips; the model in eval mode."""
    torch.manual_seed(seed)
    model = Classifier()
    x, y = images("train")
    steps = epochs * (len(x) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for step in range(len(x) // batch):
            index = order[step * batch:(step + 1) * batch]
            flip = torch.rand(len(index), generator=generator) < 0.5
            inputs = torch.where(flip[:, None, None, None], x[index].flip(-1), x[index])
            loss = nn.functional.cross_entropy(model(inputs), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 100 == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    model = train(args.epochs, args.batch, args.lr, args.seed)
    seconds = time.time() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), CHECKPOINT)
    _loaded.clear()
    test_x, test_y = images("test")
    accuracy = (predict(test_x) == test_y).float().mean().item()
    record = {"test_accuracy": round(accuracy, 4), "epochs": args.epochs, "seconds": round(seconds),
              "params": sum(p.numel() for p in model.parameters()), "features": FEATURES, "batch": args.batch,
              "lr": args.lr, "threads": args.threads, "seed": args.seed}
    (RESULTS / "classifier.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
