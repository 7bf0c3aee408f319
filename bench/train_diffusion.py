"""Train a denoiser of `fashion_diffusion.py` on Fashion-MNIST on the CPU (one command, seeded, resumable).

Epsilon-prediction MSE at uniformly drawn timesteps of the DDPM schedule, class-conditional; AdamW with a linear
warm-up, then a constant learning rate, and an exponential moving average (EMA) of the weights, which is what
gets saved (decay min(--ema, (1 + step) / (10 + step)): a short run averages over its last ~100 steps).
The DiT swaps 10 % of the labels for its null class in train mode (diffusers' built-in label dropout, drawn from
torch's global generator); the UNet has no null class and always sees the label. Training stops after
`--steps` steps or `--minutes` minutes of training (summed over resumed runs), whichever comes first. Every
`--every` steps, a checkpoint (weights, EMA, optimizer, generators) goes to bench/runs/diffusion/{kind}_state.pt,
which the next run resumes from unless `--restart`. At the end: bench/results/diffusion/{kind}.pt (EMA state
dict of the `Denoiser`) and {kind}_train.json.

    .venv/bin/python bench/train_diffusion.py {unet,dit} [--minutes 30] [--threads 1] [--batch 64]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fashion_diffusion import KINDS, RESULTS, TRAIN_STEPS, build, checkpoint, images, scheduler

STATE_DIR = Path(__file__).parent / "runs" / "diffusion"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--every", type=int, default=200, help="checkpoint every this many steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart", action="store_true", help="ignore a saved checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = Training(args)
    state.run()
    state.finish()


class Training:
    """Model, EMA, optimizer and generators of one run; `run` trains, `save` / `resume` checkpoint."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = build(args.kind, args.seed).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.alphas = scheduler().alphas_cumprod.float()
        self.x, self.y = images("train")
        self.step, self.seconds, self.losses = 0, 0.0, []
        self.path = STATE_DIR / f"{args.kind}_state.pt"
        if self.path.is_file() and not args.restart:
            self.resume()

    def run(self) -> None:
        start = time.time() - self.seconds
        while self.step < self.args.steps and time.time() - start < 60 * self.args.minutes:
            self.train_step()
            self.seconds = time.time() - start
            if self.step % 50 == 0:
                print(f"{self.args.kind} step {self.step} loss {self.recent_loss():.4f} {self.seconds:.0f}s",
                      flush=True)
            if self.step % self.args.every == 0:
                self.save()
        self.save()

    def train_step(self) -> None:
        index = torch.randint(0, len(self.x), (self.args.batch,), generator=self.generator)
        clean, labels = self.x[index], self.y[index]
        t = torch.randint(0, TRAIN_STEPS, (self.args.batch,), generator=self.generator)
        noise = torch.randn(clean.shape, generator=self.generator)
        alpha = self.alphas[t].reshape(-1, 1, 1, 1)
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        loss = F.mse_loss(self.model(noisy, t, labels), noise)
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * min(1.0, (self.step + 1) / self.args.warmup)
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        self.update_ema()
        self.losses.append(loss.item())

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.args.ema, (1 + self.step) / (10 + self.step))
        for average, weight in zip(self.ema.state_dict().values(), self.model.state_dict().values()):
            if average.dtype.is_floating_point:
                average.lerp_(weight, 1 - decay)
            else:
                average.copy_(weight)

    def recent_loss(self) -> float:
        recent = self.losses[-200:]
        return sum(recent) / max(len(recent), 1)

    def save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "step": self.step, "seconds": self.seconds,
                 "losses": self.losses, "settings": self.settings()}
        torch.save(state, self.path.with_suffix(".tmp"))
        self.path.with_suffix(".tmp").replace(self.path)

    def resume(self) -> None:
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["settings"] != self.settings():
            raise SystemExit(f"{self.path} was trained with {state['settings']}; pass --restart to start over")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.seconds, self.losses = state["step"], state["seconds"], state["losses"]
        print(f"resumed {self.path} at step {self.step} ({self.seconds:.0f}s)", flush=True)

    def settings(self) -> dict:
        """What a resumed run must share with the saved one (not the stopping budget or thread count)."""
        return {key: getattr(self.args, key) for key in ("kind", "batch", "lr", "warmup", "ema", "seed")}

    def finish(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        torch.save(self.ema.state_dict(), checkpoint(self.args.kind))
        record = {"steps": self.step, "seconds": round(self.seconds), "final_loss": round(self.recent_loss(), 5),
                  "loss_window": min(200, len(self.losses)), "params": sum(p.numel() for p in self.model.parameters()),
                  "threads": self.args.threads, "minutes": self.args.minutes, "max_steps": self.args.steps,
                  "weights": "EMA", **self.settings()}
        (RESULTS / f"{self.args.kind}_train.json").write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
