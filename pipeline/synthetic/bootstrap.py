"""BLIP's central claim in miniature: pretraining on CapFilt output beats pretraining on raw web pairs.

The same small image-text model (a CNN image encoder and a bag-of-words-and-bigrams text encoder, trained
contrastively like CLIP/BLIP's ITC) is trained with the same budget (steps, batch size, learning rate,
seed) on two datasets of the same images: the raw web captions, and what CapFilt kept (web captions that
passed the filter plus the synthetic captions that did). It is then scored by retrieval on the held-out
`eval` split: image->text and text->image recall@1 and @5.
"""

from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

_BUCKETS = 8192  # hashed words and bigrams: no vocabulary to build, and junk text still maps somewhere
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Budget:
    steps: int = 400
    batch_size: int = 128
    learning_rate: float = 2e-3
    dim: int = 64


@dataclass(frozen=True)
class Recall:
    i2t_r1: float
    i2t_r5: float
    t2i_r1: float
    t2i_r5: float

    @property
    def r1(self) -> float:
        """Mean of the two recall@1 directions, the headline figure."""
        return (self.i2t_r1 + self.t2i_r1) / 2


class _ImageEncoder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for out in (32, 64, 96, 128):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * 4 * 4, dim)  # keeps the 4x4 layout: position is part of the caption

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 4)
        return self.head(x.flatten(1))


class _TextEncoder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(_BUCKETS, 128, mode="mean")
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(128, dim))

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(tokens, offsets))


def _tokens(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hashed words and word bigrams, with an always-present bucket 0 so empty text is a valid bag."""
    ids: list[int] = []
    offsets: list[int] = []
    for text in texts:
        offsets.append(len(ids))
        words = _WORD.findall(text.lower())
        grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
        ids.append(0)
        ids += [1 + zlib.crc32(g.encode()) % (_BUCKETS - 1) for g in grams]
    return torch.tensor(ids), torch.tensor(offsets)


class DualEncoder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.image = _ImageEncoder(dim)
        self.text = _TextEncoder(dim)
        self.log_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image(pixels), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return nn.functional.normalize(self.text(*_tokens(texts)), dim=-1)


def pretrain(pixels: np.ndarray, captions: list[list[str]], budget: Budget, seed: int) -> DualEncoder:
    """Contrastive training; `captions[i]` are the texts of image i, one drawn per image per step.
    Images with no text are not trained on (CapFilt may leave an image without a caption)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    usable = np.array([i for i, texts in enumerate(captions) if texts])
    model = DualEncoder(budget.dim)
    optimiser = torch.optim.AdamW(model.parameters(), lr=budget.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, budget.steps)
    images = torch.from_numpy(pixels)
    model.train()
    for _ in range(budget.steps):
        batch = rng.choice(usable, size=min(budget.batch_size, len(usable)), replace=False)
        texts = [captions[i][int(rng.integers(len(captions[i])))] for i in batch]
        logits = model.log_scale.exp() * model.embed_images(images[batch]) @ model.embed_texts(texts).T
        target = torch.arange(len(batch))
        loss = (
            nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)
        ) / 2
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            model.log_scale.clamp_(0, np.log(100))
    return model.eval()


@torch.no_grad()
def retrieval(model: DualEncoder, pixels: np.ndarray, captions: list[str]) -> Recall:
    """Recall@k over the eval split, where caption i belongs to image i and to no other."""
    similarity = model.embed_images(torch.from_numpy(pixels)) @ model.embed_texts(captions).T
    truth = torch.arange(len(captions))

    def recall(scores: torch.Tensor, k: int) -> float:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        return float((top == truth[:, None]).any(dim=1).float().mean())

    return Recall(
        recall(similarity, 1), recall(similarity, 5), recall(similarity.T, 1), recall(similarity.T, 5)
    )
