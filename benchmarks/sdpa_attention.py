"""Eager vs SDPA attention for BLIP-base-sized models on CPU, random weights, fp32.

    python benchmarks/sdpa_attention.py [kernel|vision|generate|itm ...]
Eager and SDPA runs are interleaved (A B A B ...) so background load hits both alike; reports the
median and min ms per batch, and checks the outputs agree.
"""

import copy
import statistics
import sys
import time

import torch
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipVisionConfig,
    BlipVisionModel,
)

from pipeline.curate.attention import use_sdpa

torch.set_num_threads(2)
torch.manual_seed(0)


def bench(name, eager, sdpa, fn, reps, warmup=1):
    """fn(model) -> output; times reps interleaved calls of each model after warmup."""
    times = {"eager": [], "sdpa": []}
    cpu = {"eager": [], "sdpa": []}
    with torch.inference_mode():
        for _ in range(warmup):
            out_e, out_s = fn(eager), fn(sdpa)
        for _ in range(reps):
            for label, model in (("eager", eager), ("sdpa", sdpa)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn(model)
                times[label].append((time.perf_counter() - t0) * 1000)
                cpu[label].append((time.process_time() - c0) * 1000)
    if out_e.dtype.is_floating_point:
        agree = f"max|diff|={(out_e - out_s).abs().max().item():.2e}"
    else:
        agree = f"identical={torch.equal(out_e, out_s)} shape={tuple(out_e.shape)}"
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    paired = statistics.median(e / d for e, d in zip(times["eager"], times["sdpa"], strict=True))
    print(
        f"{name}: wall ms median/min eager {med['eager']:.0f}/{low['eager']:.0f}"
        f" sdpa {med['sdpa']:.0f}/{low['sdpa']:.0f} | cpu-ms median eager {cpu_med['eager']:.0f}"
        f" sdpa {cpu_med['sdpa']:.0f} | eager/sdpa by min {low['eager'] / low['sdpa']:.2f}x"
        f" | median of paired eager/sdpa {paired:.2f}x"
        f" | {agree} | reps={reps}",
        flush=True,
    )


def pair(model):
    model = model.eval()
    sdpa = copy.deepcopy(model)
    print(f"  {type(model).__name__}: switched {use_sdpa(sdpa)} attention modules", flush=True)
    return model, sdpa


def base():
    """BlipConfig defaults are BLIP-base sizes (ViT-B/16 at 384, BERT-base text); usable vision init."""
    return BlipConfig(vision_config={"initializer_range": 0.02})


def kernel():
    """The attention op alone, (matmul, softmax, matmul) as BLIP does it vs SDPA."""

    class Eager(torch.nn.Module):
        def forward(self, q, k, v, mask=None):
            s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            return (s if mask is None else s + mask).softmax(-1) @ v

    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v, mask=None):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask)

    q = k = v = torch.randn(4, 12, 577, 64)
    bench(
        "  kernel: vision self-attn one layer (4,12,577,64)", Eager(), Sdpa(), lambda m: m(q, k, v), reps=30
    )
    qt, kv = torch.randn(32, 12, 35, 64), torch.randn(32, 12, 577, 64)
    bench("  kernel: ITM cross-attn one layer q (32,12,35,64) kv 577", Eager(), Sdpa(),
          lambda m: m(qt, kv, kv), reps=30)  # fmt: skip
    mask = torch.zeros(32, 1, 35, 35)
    mask[::2, :, :, 20:] = torch.finfo(torch.float32).min
    bench("  kernel: ITM self-attn one layer (32,12,35,64) + padding mask", Eager(), Sdpa(),
          lambda m: m(qt, qt, qt, mask), reps=30)  # fmt: skip


def vision():
    cfg = BlipVisionConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=384,
        patch_size=16,
        initializer_range=0.02,  # the 1e-10 default makes every output (and the diff check) trivial
    )
    eager, sdpa = pair(BlipVisionModel(cfg))
    x = torch.randn(4, 3, 384, 384)
    bench("vision ViT-B/16@384 batch 4", eager, sdpa, lambda m: m(pixel_values=x).last_hidden_state, reps=15)


def generate():
    eager, sdpa = pair(BlipForConditionalGeneration(base()))  # defaults = BLIP-base sizes, 384 px
    x = torch.randn(4, 3, 384, 384)
    kw = {"min_new_tokens": 20, "max_new_tokens": 20, "do_sample": False}
    bench("generate batch 4, 20 new tokens (vision + decode)", eager, sdpa,
          lambda m: m.generate(pixel_values=x, **kw), reps=8)  # fmt: skip
    with torch.inference_mode():
        embeds = eager.vision_model(pixel_values=x).last_hidden_state
    ones = torch.ones(embeds.shape[:-1], dtype=torch.long)
    bos = eager.config.text_config.bos_token_id
    ids = torch.full((4, 1), bos)

    def decode(m):
        return m.text_decoder.generate(
            input_ids=ids, encoder_hidden_states=embeds, encoder_attention_mask=ones,
            eos_token_id=102, pad_token_id=0, **kw,
        )  # fmt: skip

    bench("text decoder only, batch 4, 20 new tokens (KV cache)", eager, sdpa, decode, reps=15)


def itm():
    eager, sdpa = pair(BlipForImageTextRetrieval(base()))
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(32, 577, 768, generator=g)
    lengths = torch.randint(8, 36, (32,), generator=g)  # captions of 8..35 tokens, padded to the longest
    ids = torch.randint(1000, 30000, (32, int(lengths.max())), generator=g)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    ones = torch.ones(embeds.shape[:-1], dtype=torch.long)

    def run(m):
        h = m.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=embeds,
                           encoder_attention_mask=ones).last_hidden_state  # fmt: skip
        return m.itm_head(h[:, 0]).softmax(-1)

    bench(f"ITM text encoder batch 32 (padded to {ids.shape[1]} tokens, 577 image tokens)", eager, sdpa,
          run, reps=15)  # fmt: skip


if __name__ == "__main__":
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    for what in sys.argv[1:] or ["kernel", "vision", "generate", "itm"]:
        {"kernel": kernel, "vision": vision, "generate": generate, "itm": itm}[what]()
