"""ITM and ITC scores of many texts per image, each image's tokens projected once for all of its texts.

`BlipForImageTextRetrieval` runs its text encoder on (text, image) pairs: every text re-projects its
image's 577 tokens to keys and values in each of the 12 cross-attention layers, about 70 % of the
encoder's work for a caption. Here texts come grouped by image (`TextGroups`): the image's keys and
values are projected once (`text_tower.project_image`) and its texts' queries attend to them together.
The scores equal the plain forward pass's (tests/test_capfilt_stage.py, within 1e-5 in float32).

The same checkpoint's contrastive (ITC) side comes almost free: the image embedding is the projected,
normalised [CLS] token of the vision tower that ITM already ran (`image_features`), and a text's is its
[CLS] through the text encoder without cross-attention (`text_features`), as BLIP trained the ITC loss;
their dot product is the cosine similarity that `BlipForImageTextRetrieval(use_itm_head=False)` returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.curate.text_tower import project_image, text_layers

ITM_MAX_TOKENS = 35  # BLIP truncates text at 35 tokens for ITM; the stored caption stays whole


class ItmEncoder:
    """A loaded `BlipForImageTextRetrieval`'s text encoder and ITM head, scoring texts grouped by image."""

    def __init__(self, itm_model: Any) -> None:
        self.embeddings = itm_model.text_encoder.embeddings
        self.layers = text_layers(itm_model.text_encoder.encoder)
        self.head = itm_model.itm_head
        self.vision_proj = itm_model.vision_proj
        self.text_proj = itm_model.text_proj

    @property
    def embedding_size(self) -> int:
        """The length of an image or text embedding (the checkpoint's `image_text_hidden_size`)."""
        return self.vision_proj.out_features

    @torch.inference_mode()
    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Each image's ITC embedding: its vision tower's [CLS] token, projected and normalised."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)

    @torch.inference_mode()
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Each text's ITC embedding: the encoder without cross-attention (BLIP's "text" mode), its
        [CLS] token projected and normalised. `input_ids` begin with the tokenizer's [CLS]."""
        hidden = self.embeddings(input_ids=input_ids)
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            query, key, value = layer.query_key_value(hidden)
            hidden = layer.feed_forward(layer.self_attend(hidden, query, key, value, mask))
        return F.normalize(self.text_proj(hidden[:, 0, :]).float(), dim=-1)

    @torch.inference_mode()
    def logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """ITM head logits (column 1 = match) of rows grouped by image: rows [i*g, (i+1)*g) are texts of
        image i, g = rows / images. `input_ids` as the encoder reads them (the first token already set)."""
        image_kv = project_image(self.layers, image_embeds)
        hidden = self.embeddings(input_ids=input_ids)
        mask = attention_mask.bool()[:, None, None, :]  # padding is not attended to
        for layer, keys, values in zip(self.layers, image_kv.keys, image_kv.values, strict=True):
            query, key, value = layer.query_key_value(hidden)
            hidden = layer.feed_forward(
                layer.cross_attend(layer.self_attend(hidden, query, key, value, mask), keys, values)
            )
        return self.head(hidden[:, 0, :])


@dataclass(frozen=True)
class TextBatch:
    """Images and their texts' token ids, `slots` rows per image; `texts[r]` is the index of row r's
    text in the caller's list, None for a filler row (an image with fewer texts than `slots`)."""

    images: list[int]
    token_ids: list[list[int]]
    texts: list[int | None]


@dataclass(frozen=True)
class TextGroups:
    """Texts (already tokenized) grouped by the image they are scored against, in batches of about
    `batch_size` texts. Every image gets as many rows as the image with most texts: in CapFilt that is
    k + 1 for all (the web caption and k captions), or k where a web caption is blank, whose filler row
    is scored and thrown away. Images go shortest text first, so a batch pads to its own longest text."""

    token_ids: list[list[int]]
    owners: list[int]
    filler: list[int]

    def batches(self, batch_size: int) -> Iterator[TextBatch]:
        texts_of: dict[int, list[int]] = {}
        for text, image in enumerate(self.owners):
            texts_of.setdefault(image, []).append(text)
        if not texts_of:
            return
        slots = max(len(texts) for texts in texts_of.values())
        order = sorted(texts_of, key=lambda image: max(len(self.token_ids[t]) for t in texts_of[image]))
        per_batch = max(1, batch_size // slots)
        for start in range(0, len(order), per_batch):
            images = order[start : start + per_batch]
            rows: list[int | None] = []
            for image in images:
                rows += texts_of[image] + [None] * (slots - len(texts_of[image]))
            ids = [self.filler if row is None else self.token_ids[row] for row in rows]
            yield TextBatch(images, ids, rows)
