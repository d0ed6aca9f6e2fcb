"""Train a few steps of a small image-text contrastive model on a capfilt job's shards.

    python docs/examples/pretrain_from_shards.py OUT_DIR [--steps N] [--policy random_kept]

The model is the tiny dual encoder that `capfilt bench quality` pretrains (pipeline/synthetic/bootstrap.py);
put yours in its place. The part to copy is the data path: shards -> CapFiltDataset -> DataLoader.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from pipeline.inspect.loader import CapFiltDataset, CaptionPolicy
from pipeline.synthetic.bootstrap import DualEncoder


def to_pixels(image: Image.Image) -> torch.Tensor:
    """HxWx3 uint8, one size for the batch. A module-level function, so spawned workers can unpickle it."""
    return torch.from_numpy(np.array(image.resize((64, 64))))


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description="Train a few steps on capfilt shards.")
    parser.add_argument("out", help="a capfilt job's output dir (or its shards/ dir)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--policy", default="random_kept", choices=[p.value for p in CaptionPolicy])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dataset = CapFiltDataset(args.out, policy=args.policy, transform=to_pixels, shuffle=500, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, drop_last=True)
    model = DualEncoder(dim=64)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    print(f"{len(dataset.shards)} shards, caption policy {args.policy}")
    losses: list[float] = []
    for epoch in itertools.count():
        dataset.set_epoch(epoch)  # a new shard order, sample order and random_kept pick
        batches = 0
        for images, captions in loader:
            batches += 1
            logits = model.log_scale.exp() * model.embed_images(images) @ model.embed_texts(captions).T
            target = torch.arange(len(captions))
            loss = (
                nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)
            ) / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            print(f"epoch {epoch} step {len(losses)}: loss {losses[-1]:.3f}  e.g. {captions[0]!r}")
            if len(losses) == args.steps:
                return losses
        if batches == 0:
            raise SystemExit(f"no full batch of {args.batch_size} in {args.out} with policy {args.policy}")
    return losses


if __name__ == "__main__":
    main()
