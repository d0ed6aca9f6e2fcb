"""FLOPs: what the CapFilt actor computes per image, against the least CapFilt needs.

`counted_flops` runs a call under `torch.utils.flop_counter.FlopCounterMode`, which counts matrix
products, convolutions and attention (2 FLOPs per multiply-add; element-wise work is not counted).
torch counts the GPU's attention kernels but not the CPU's, so the CPU's fused attention is registered
here with the same formula.

`minimum_flops` is the method's least work, from the model configs alone, in the same convention:
- one vision pass per model (each model has its own vision tower);
- the captioner's text decoder: the image's tokens projected to cross-attention keys/values once, the
  prompt run once per image (it is the same text over the same image for all k captions), then for
  each of the k captions one step per new token after the first, each token attending to the tokens
  before it, and the vocabulary head wherever a next token is drawn;
- the ITM text encoder: the image's keys/values once, then each of the k + 1 texts at its own length
  (no padding), and the ITM head on its first token;
- ITC: the image's [CLS] projected once, and each of the k + 1 texts through the encoder without
  cross-attention at its own length, its [CLS] projected.
The ratio of the two is the bench's `flops_ratio_k1` / `_k5`: 1.0 is no work beyond the method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

_cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
try:

    @register_flop_formula(_cpu_attention)
    def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

except RuntimeError:  # a later torch that counts it itself
    pass


def counted_flops(call: Callable[[], object]) -> int:
    """FLOPs of `call()` as FlopCounterMode counts them (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


@dataclass(frozen=True)
class Sizes:
    """What the FLOPs of one BLIP model depend on, read from its config."""

    vision_hidden: int
    vision_mlp: int
    vision_layers: int
    image_size: int
    patch_size: int
    text_hidden: int
    text_mlp: int
    text_layers: int
    vocab: int
    embedding: int  # image_text_hidden_size: ITC's projections

    @classmethod
    def of(cls, config: Any) -> Sizes:
        v, t = config.vision_config, config.text_config
        vision = (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.image_size, v.patch_size)
        text = (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size)
        return cls(*vision, *text, config.image_text_hidden_size)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # the patches and the class token

    def vision(self) -> int:
        d, s, p = self.vision_hidden, self.image_tokens, self.patch_size
        patches = 2 * 3 * p * p * d * (s - 1)
        per_token = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * self.vision_mlp
        return patches + self.vision_layers * (s * per_token + 4 * s * s * d)

    def image_keys_values(self) -> int:
        return self.text_layers * 2 * 2 * self.image_tokens * self.vision_hidden * self.text_hidden

    def text_token(self, attended: int) -> int:
        """One text token through every layer: self-attention over `attended` tokens, cross-attention
        over the image's (its keys/values already made), the feed-forward."""
        d = self.text_hidden
        linear = 2 * d * 3 * d + 2 * d * d + 2 * d * d + 2 * d * d + 2 * 2 * d * self.text_mlp
        return self.text_layers * (linear + 4 * attended * d + 4 * self.image_tokens * d)

    def unimodal_text_token(self, attended: int) -> int:
        """One text token through every layer without cross-attention (ITC's text side)."""
        d = self.text_hidden
        linear = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * self.text_mlp
        return self.text_layers * (linear + 4 * attended * d)

    def vocabulary_head(self) -> int:
        return 2 * self.text_hidden * self.text_hidden + 2 * self.text_hidden * self.vocab


def minimum_flops(
    captioner: Any,
    itm: Any,
    images: int,
    captions: int,
    prompt_tokens: int,
    new_tokens: int,
    itm_text_tokens: list[int],
) -> int:
    """The least FLOPs for `images` images: `captions` captions each of `new_tokens` tokens after a
    prompt of `prompt_tokens` (with [DEC]), and ITM and ITC scores of all their texts, of
    `itm_text_tokens` tokens each (the web captions and the synthetic ones)."""
    cap, match = Sizes.of(captioner), Sizes.of(itm)
    per_image = cap.vision() + cap.image_keys_values() + match.vision() + match.image_keys_values()
    per_image += sum(cap.text_token(i + 1) for i in range(prompt_tokens)) + cap.vocabulary_head()
    steps = range(prompt_tokens, prompt_tokens + new_tokens - 1)  # the last token is drawn, never run
    per_image += captions * sum(cap.text_token(position + 1) + cap.vocabulary_head() for position in steps)
    per_image += 2 * match.vision_hidden * match.embedding  # ITC: the image's [CLS] projected
    texts = sum(tokens * match.text_token(tokens) + 2 * match.text_hidden * 2 for tokens in itm_text_tokens)
    texts += sum(
        tokens * match.unimodal_text_token(tokens) + 2 * match.text_hidden * match.embedding
        for tokens in itm_text_tokens
    )
    return images * per_image + texts
