"""BLIP's BERT text tower, layer by layer, with each image's cross-attention keys/values made once.

Both BLIP text towers (the captioner's decoder, the ITM model's encoder) cross-attend every text token
to the 577 tokens of its image. transformers projects those image tokens to keys and values once per
*text*: for k captions of an image, k times in the decoder, and k + 1 times in the ITM encoder, where
that projection is about 70 % of the text side's work. Here they are projected once per *image*
(`project_image`), and the texts of one image attend to them together: their queries are laid side by
side along the query axis (`cross_attend`), one attention call per image, no copy of the image's
keys/values. Cross-attention has no mask (every text token sees every image token), so this is the
same arithmetic.

A layer runs from its weights (`TextLayer`, taken from the loaded modules, the self-attention's query,
key and value fused into one product), through `torch.nn.functional`: a decode step is dozens of small
operations, and at small sizes (or on a GPU, where each is a kernel launch) the cost of calling them
through nn.Module is the cost of the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Affine:
    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, *linears: nn.Linear) -> Affine:
        """One linear map, or several side by side (their outputs concatenated)."""
        if len(linears) == 1:
            return cls(linears[0].weight, linears[0].bias)
        return cls(torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    @classmethod
    def of(cls, module: nn.LayerNorm) -> Norm:
        return cls(module.weight, module.bias, module.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class TextLayer:
    """One BLIP text layer (`BlipTextLayer`): self-attention, cross-attention to the image, feed-forward,
    each followed by a residual LayerNorm, as transformers computes it (dropout is off in eval)."""

    head_size: int
    self_qkv: Affine
    self_out: Affine
    self_norm: Norm
    cross_query: Affine
    cross_keys: Affine
    cross_values: Affine
    cross_out: Affine
    cross_norm: Norm
    ffn_in: Affine
    activation: Callable[[torch.Tensor], torch.Tensor]
    ffn_out: Affine
    ffn_norm: Norm

    @classmethod
    def of(cls, layer: nn.Module) -> TextLayer:
        own, cross = layer.attention, layer.crossattention
        return cls(
            head_size=own.self.attention_head_size,
            self_qkv=Affine.of(own.self.query, own.self.key, own.self.value),
            self_out=Affine.of(own.output.dense),
            self_norm=Norm.of(own.output.LayerNorm),
            cross_query=Affine.of(cross.self.query),
            cross_keys=Affine.of(cross.self.key),
            cross_values=Affine.of(cross.self.value),
            cross_out=Affine.of(cross.output.dense),
            cross_norm=Norm.of(cross.output.LayerNorm),
            ffn_in=Affine.of(layer.intermediate.dense),
            activation=layer.intermediate.intermediate_act_fn,
            ffn_out=Affine.of(layer.output.dense),
            ffn_norm=Norm.of(layer.output.LayerNorm),
        )

    def query_key_value(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The self-attention's projections of `hidden`, each (rows, heads, tokens, head size)."""
        rows, tokens, _ = hidden.shape
        qkv = self.self_qkv(hidden).view(rows, tokens, 3, -1, self.head_size).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def self_attend(
        self,
        hidden: torch.Tensor,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The self-attention block of `hidden` given its query and the keys/values it may see
        (`mask`: SDPA's, True where a query may attend)."""
        context = F.scaled_dot_product_attention(
            query, keys, values, mask, scale=1 / math.sqrt(self.head_size)
        )
        return self.self_norm(self.self_out(merge_heads(context)) + hidden)

    def cross_attend(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The cross-attention block for rows grouped by image: rows [i*g, (i+1)*g) all belong to image
        i, g = rows / images. The g texts' queries of an image go side by side into one attention call
        against that image's keys/values, which are neither recomputed nor copied per text."""
        rows, tokens, hidden_size = hidden.shape
        images = keys.shape[0]
        query = (
            self.cross_query(hidden).view(images, rows // images * tokens, -1, self.head_size).transpose(1, 2)
        )
        context = F.scaled_dot_product_attention(query, keys, values, scale=1 / math.sqrt(self.head_size))
        context = context.transpose(1, 2).reshape(rows, tokens, hidden_size)
        return self.cross_norm(self.cross_out(context) + hidden)

    def feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ffn_norm(self.ffn_out(self.activation(self.ffn_in(hidden))) + hidden)


@dataclass(frozen=True)
class ImageKeysValues:
    """Per text layer, the image tokens projected to cross-attention keys and values:
    each (images, heads, image tokens, head size)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def images(self) -> int:
        return self.keys[0].shape[0]


def text_layers(encoder: nn.Module) -> list[TextLayer]:
    """The layers of a `BlipTextEncoder` (`text_decoder.bert.encoder`, `text_encoder.encoder`)."""
    return [TextLayer.of(layer) for layer in encoder.layer]


def heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """(rows, tokens, hidden) -> (rows, heads, tokens, head size)."""
    rows, tokens, _ = x.shape
    return x.view(rows, tokens, -1, head_size).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(rows, heads, tokens, head size) -> (rows, tokens, hidden)."""
    rows, _, tokens, _ = x.shape
    return x.transpose(1, 2).reshape(rows, tokens, -1)


def project_image(layers: list[TextLayer], image_embeds: torch.Tensor) -> ImageKeysValues:
    """Each layer's cross-attention keys and values of the vision tower's output, once per image."""
    keys = [heads(layer.cross_keys(image_embeds), layer.head_size) for layer in layers]
    values = [heads(layer.cross_values(image_embeds), layer.head_size) for layer in layers]
    return ImageKeysValues(keys, values)
