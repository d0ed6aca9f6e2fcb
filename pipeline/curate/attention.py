"""Switch transformers' BLIP attention to `torch.nn.functional.scaled_dot_product_attention`.

BLIP's `BlipAttention` (vision tower) and `BlipTextSelfAttention` (text encoder/decoder, self- and
cross-attention) compute attention eagerly (matmul, softmax, matmul) and BLIP declares no SDPA support,
so `attn_implementation="sdpa"` is not an option. SDPA's fused kernels (flash / memory-efficient on a
GPU) never materialise the (batch, heads, q, k) probabilities, which for the ViT's 577 tokens is the
costly part of attention; on a 2-core CPU the ViT-B/16@384 tower alone ran about 1.3x faster.

`use_sdpa` swaps each attention module's class to a subclass whose `forward` is the installed one
(transformers 5.23.0) with only matmul-softmax-matmul replaced by SDPA: projections, head reshapes and the
`EncoderDecoderCache` logic (self-attention cache update; cross-attention K/V computed once, reused once
`is_updated`) are copied verbatim. A class swap rather than a rebound `forward`: weights and `isinstance`
(transformers' output recorders match on it) stay, and unlike a bound method it pickles. So that an
upgrade cannot silently change results, each original `forward`'s source is fingerprinted and the
attributes used are checked; any mismatch raises instead of switching.

The config's `_attn_implementation` stays "eager" on purpose: the text model keeps building additive
float masks (0 / dtype min, shape (batch, 1, q, k)), which SDPA adds to the scores as eager does. SDPA
cannot return attention probabilities, so the second tuple element is None; generate() and the ITM
path never read it (the layers discard it); `output_attentions=True` gets an empty tuple.
"""

from __future__ import annotations

import hashlib
import inspect
import math

import torch
from torch import nn
from torch.nn.functional import scaled_dot_product_attention
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

CHECKED_TRANSFORMERS = "5.23.0"  # the version whose BLIP attention is copied below (the image pins it)
# sha256[:16] of inspect.getsource(cls.forward) in that version, the code copied below.
_FINGERPRINTS = {BlipAttention: "7c204e9f015bbc82", BlipTextSelfAttention: "3c3aade98d4f2632"}
_ATTRIBUTES = {
    BlipAttention: ("qkv", "projection", "num_heads", "embed_dim", "scale"),
    BlipTextSelfAttention: ("query", "key", "value", "attention_head_size", "all_head_size", "layer_idx"),
}


def _dropout_p(module: nn.Module) -> float:
    """Eager applies `module.dropout` to the probabilities; SDPA does the same given its p (0 in eval)."""
    return module.dropout.p if module.training else 0.0


def _as_sdpa_mask(mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """SDPA wants a float mask in the query's dtype (some backends, e.g. bf16 on GPU, refuse others).
    Clamping first keeps an fp32 "dtype min" finite when narrowed to fp16, so it cannot become -inf."""
    mask = None if mask is None else mask.to(query.device)
    if mask is not None and mask.dtype not in (torch.bool, query.dtype):
        mask = mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
    return mask


class SdpaBlipAttention(BlipAttention):
    """BlipAttention (vision tower) with SDPA; no mask: every patch attends to every patch."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, None]:
        bsz, tgt_len, embed_dim = hidden_states.size()
        mixed_qkv = (
            self.qkv(hidden_states)
            .reshape(bsz, tgt_len, 3, self.num_heads, embed_dim // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        q, k, v = mixed_qkv[0], mixed_qkv[1], mixed_qkv[2]
        context = scaled_dot_product_attention(q, k, v, dropout_p=_dropout_p(self), scale=self.scale)
        context = context.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        return self.projection(context), None


class SdpaBlipTextSelfAttention(BlipTextSelfAttention):
    """BlipTextSelfAttention with SDPA; everything up to the attention itself is the 5.23.0 code."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        query_layer = self.query(hidden_states).view(hidden_shape).transpose(1, 2)

        is_cross_attention = encoder_hidden_states is not None
        attention_mask = encoder_attention_mask if is_cross_attention else attention_mask

        is_updated = False
        if past_key_values is not None:
            if isinstance(past_key_values, EncoderDecoderCache):
                is_updated = past_key_values.is_updated.get(self.layer_idx)
                if is_cross_attention:
                    curr_past_key_values = past_key_values.cross_attention_cache
                else:
                    curr_past_key_values = past_key_values.self_attention_cache
            else:
                curr_past_key_values = past_key_values

        current_states = encoder_hidden_states if is_cross_attention else hidden_states
        if is_cross_attention and past_key_values is not None and is_updated:
            key_layer = curr_past_key_values.layers[self.layer_idx].keys
            value_layer = curr_past_key_values.layers[self.layer_idx].values
        else:
            kv_shape = (*current_states.shape[:-1], -1, self.attention_head_size)
            key_layer = self.key(current_states).view(kv_shape).transpose(1, 2)
            value_layer = self.value(current_states).view(kv_shape).transpose(1, 2)
            if past_key_values is not None:
                key_layer, value_layer = curr_past_key_values.update(key_layer, value_layer, self.layer_idx)
                if is_cross_attention and isinstance(past_key_values, EncoderDecoderCache):
                    past_key_values.is_updated[self.layer_idx] = True

        mask, scale = _as_sdpa_mask(attention_mask, query_layer), 1 / math.sqrt(self.attention_head_size)
        context = scaled_dot_product_attention(
            query_layer, key_layer, value_layer, mask, _dropout_p(self), scale=scale
        )
        return context.transpose(1, 2).reshape(*input_shape, self.all_head_size), None


_SDPA = {BlipAttention: SdpaBlipAttention, BlipTextSelfAttention: SdpaBlipTextSelfAttention}


def _check(module: nn.Module) -> None:
    """Raise unless `module` runs exactly the code the SDPA subclass was copied from."""
    cls = type(module)
    if cls not in _SDPA:  # a subclass of BLIP's attention from elsewhere: its overrides would be lost
        raise RuntimeError(f"unknown BLIP attention subclass {cls.__qualname__}; refusing to swap it")
    if "forward" in vars(module):
        raise RuntimeError(f"{cls.__qualname__} instance has a patched forward; refusing to override it")
    digest = hashlib.sha256(inspect.getsource(cls.forward).encode()).hexdigest()[:16]
    if digest != _FINGERPRINTS[cls]:
        raise RuntimeError(
            f"{cls.__qualname__}.forward is not transformers {CHECKED_TRANSFORMERS}'s, which"
            " pipeline.curate.attention copies; re-check the SDPA subclass against the installed code,"
            " then update _FINGERPRINTS and CHECKED_TRANSFORMERS"
        )
    missing = [name for name in _ATTRIBUTES[cls] if not hasattr(module, name)]
    if missing or not isinstance(getattr(module, "dropout", None), nn.Dropout):
        raise RuntimeError(f"{cls.__qualname__} lacks {missing or ['dropout: nn.Dropout']}")


def use_sdpa(model: nn.Module) -> int:
    """Switch every BLIP attention module in `model` (a loaded BlipForConditionalGeneration or
    BlipForImageTextRetrieval, or any module holding BLIP towers) to SDPA in place; return how many were
    switched. Idempotent: modules already switched are not counted again. Raises if `model` holds no
    BLIP attention (a wrong model would otherwise silently stay eager) or if any module is not the code
    the subclasses copy; all are checked before any is swapped, so a failure leaves `model` untouched."""
    found = [m for m in model.modules() if isinstance(m, (BlipAttention, BlipTextSelfAttention))]
    if not found:
        raise ValueError(f"{type(model).__name__} contains no BLIP attention modules")
    todo = [m for m in found if not isinstance(m, tuple(_SDPA.values()))]
    for module in todo:
        _check(module)
    for module in todo:
        module.__class__ = _SDPA[type(module)]
    return len(todo)
