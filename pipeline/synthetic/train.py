"""Train the tiny BLIP captioner and ITM filter on the synthetic world's `clean` split.

    python -m pipeline.synthetic.train --out pipeline/synthetic/checkpoints   # the shipped checkpoints

This is BLIP's fine-tuning step in miniature: the captioner learns language modelling of clean captions
after the prompt "a picture of ", and the filter learns the image-text-matching head on matched pairs
against three kinds of negatives: another image's caption, the caption with one attribute swapped (the
hard negative) and random word sequences from the tokenizer's vocabulary. No web-split text is used.
Both models see images exactly as the pipeline feeds them (`stored_pixels`, normalised by `Normaliser`),
and text goes through the same calls as in
`CapFiltStage` (prompt with [DEC] first; ITM text through BLIP's `pre_caption`, [ENC] first, the text
encoder cross-attending to one vision pass).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
    PreTrainedTokenizerBase,
)

from pipeline.curate.blip_text import first_token_id, normalise_caption
from pipeline.curate.capfilt_stage import Normaliser
from pipeline.curate.itm_scorer import ITM_MAX_TOKENS
from pipeline.curate.tiny_models import (
    CAPTIONER_DIR,
    ITM_DIR,
    BlipShape,
    TinyModelPaths,
    blip_config,
    blip_processor,
)
from pipeline.spec.config import FilterSpec
from pipeline.synthetic.pixels import IMAGE_SIZE, stored_pixels
from pipeline.synthetic.splits import SEO_WORDS, clean_split, swap_one_attribute
from pipeline.synthetic.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Scene,
    describe,
    random_scene,
)

PROMPT = "a picture of "
ITM_TEXT = FilterSpec(model="(training)")  # the ITM sees text as a job's default filter feeds it: BLIP's way
SHAPE = BlipShape(hidden=128, layers=3, heads=4, image_size=IMAGE_SIZE, patch_size=8)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    clean_rows: int = 8000
    captioner_steps: int = 2000
    itm_steps: int = 2500
    batch_size: int = 48
    learning_rate: float = 1e-3


# Words of the web split's junk and rambling alt-text (a real BERT vocabulary would have them too).
_ALT_TEXT_WORDS = """
check out our amazing collection of designs the best for desktop and phone updated
every day so come back soon more pictures picture photo image click here to enlarge
untitled thumbnail no description available img dsc png jpg
"""


def vocabulary() -> dict[str, int]:
    """Every word the world's captions use, plus characters and ## pieces, so any ASCII word tokenizes
    without [UNK] (as BERT's 30k vocabulary would) and junk alt-text reaches the model as text."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words: list[str] = []
    rng = np.random.default_rng(0)
    for _ in range(3000):  # every template and synonym appears many times over
        words += describe(random_scene(rng), rng).replace(",", " , ").replace(":", " : ").split()
    words += [*SHAPES, *(s + "s" for s in SHAPES), *COLOURS, *BACKGROUNDS, "grey", "centre", "an"]
    words += _ALT_TEXT_WORDS.split()
    words += list(SEO_WORDS)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    punctuation = list(".,:;!?-_'\"()/&")
    tokens = [*specials, *words, *chars, *punctuation, *(f"##{c}" for c in chars)]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def train(
    out: Path, config: TrainConfig = TrainConfig(), log: Callable[[str], None] = print
) -> TinyModelPaths:
    """Train both models and write them (with their processor) as `from_pretrained` directories."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 7])
    processor = blip_processor(vocabulary(), image_size=SHAPE.image_size)
    blip = blip_config(processor, SHAPE)
    scenes = [pair.scene for pair in clean_split(config.clean_rows, config.seed)]
    started = time.monotonic()
    pixels = torch.from_numpy(stored_pixels(scenes))
    log(f"rendered {len(scenes)} clean images in {time.monotonic() - started:.0f} s")
    normalise = Normaliser(processor.image_processor, "cpu", torch.float32)
    paths = TinyModelPaths(captioner=out / CAPTIONER_DIR, itm=out / ITM_DIR)

    def batch(idx: np.ndarray) -> tuple[torch.Tensor, list[Scene]]:
        return normalise(pixels[idx]), [scenes[i] for i in idx]

    captioner = BlipForConditionalGeneration(blip)
    _sinusoidal_positions(captioner.vision_model.embeddings.position_embedding)
    _fit(captioner, config.captioner_steps, config, log, "captioner", len(scenes), rng,
         lambda idx: _caption_loss(captioner, processor, *batch(idx), rng))  # fmt: skip
    itm = _itm_from_captioner(captioner, blip)
    _fit(itm, config.itm_steps, config, log, "itm", len(scenes), rng,
         lambda idx: _itm_loss(itm, processor, *batch(idx), rng))  # fmt: skip
    for model, path in ((captioner, paths.captioner), (itm, paths.itm)):
        path.mkdir(parents=True, exist_ok=True)
        model.eval().half().save_pretrained(path)  # half precision: the package ships a few MB, not 20
        processor.save_pretrained(path)
        training = {**asdict(config), "shape": asdict(SHAPE)}
        (path / "training.json").write_text(json.dumps(training, indent=2, sort_keys=True) + "\n")
    log(f"wrote {paths.captioner} and {paths.itm} in {time.monotonic() - started:.0f} s")
    return paths


def _sinusoidal_positions(table: torch.nn.Parameter) -> None:
    """2-D sine-cosine patch positions (as in MAE), the [CLS] row zero. BLIP's default init is 0.02-scale
    noise, dwarfed by the patch projections: a from-scratch tower then takes far longer to learn *where*
    things are, and "on the left" is a sixth of every caption here."""
    tokens, dim = table.shape[-2], table.shape[-1]
    side = math.isqrt(tokens - 1)
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angles = coord[:, None].float() * freq[None, :]
        parts += [angles.sin(), angles.cos()]
    grid = torch.cat(parts, dim=1)
    with torch.no_grad():
        table.zero_()
        table[..., 1:, : grid.shape[1]] = grid


def _itm_from_captioner(
    captioner: BlipForConditionalGeneration, blip: BlipConfig
) -> BlipForImageTextRetrieval:
    """Start the filter from the captioner's vision tower and text layers, as BLIP starts both from one
    pre-trained model: the filter then learns to *compare* image and text, not to see from scratch."""
    itm = BlipForImageTextRetrieval(blip)
    itm.vision_model.load_state_dict(captioner.vision_model.state_dict())
    itm.text_encoder.load_state_dict(captioner.text_decoder.bert.state_dict())
    return itm


Log = Callable[[str], None]
LossOf = Callable[[np.ndarray], torch.Tensor]


def _fit(model: torch.nn.Module, steps: int, config: TrainConfig, log: Log, name: str, n: int,
         rng: np.random.Generator, loss_of: LossOf) -> None:  # fmt: skip
    """AdamW with linear warm-up and cosine decay; batches drawn without replacement, epoch by epoch."""
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.05)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    order = rng.permutation(n)
    cursor, running, started = 0, 0.0, time.monotonic()
    for step in range(steps):
        if cursor + config.batch_size > n:
            order, cursor = rng.permutation(n), 0
        idx = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        loss = loss_of(idx)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"{name} step {step + 1}/{steps} loss {running:.3f} ({time.monotonic() - started:.0f} s)")


def _caption_loss(model: BlipForConditionalGeneration, processor: BlipProcessor, pixel_values: torch.Tensor,
                  scenes: list[Scene], rng: np.random.Generator) -> torch.Tensor:  # fmt: skip
    tok = processor.tokenizer
    texts = [PROMPT + describe(scene, rng) for scene in scenes]
    batch = tok(texts, padding="longest", return_tensors="pt")
    input_ids = batch.input_ids.clone()
    input_ids[:, 0] = tok.bos_token_id  # as BLIP's generate does with the prompt
    labels = input_ids.masked_fill(batch.attention_mask == 0, -100)
    prompt_len = len(tok(PROMPT).input_ids) - 1  # [CLS] + prompt words, without the [SEP]
    labels[:, :prompt_len] = -100  # the loss is on the caption, not the prompt
    return model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=batch.attention_mask,
                 labels=labels).loss  # fmt: skip


def _itm_logits(
    itm_model: BlipForImageTextRetrieval,
    tokenizer: PreTrainedTokenizerBase,
    image_embeds: torch.Tensor,
    texts: list[str],
    first_token: int | None,
) -> torch.Tensor:
    """ITM head logits (column 1 = match) of texts[i] against image_embeds[i], the vision tower's
    output: BlipForImageTextRetrieval's ITM path without its vision pass, so one pass serves many texts.
    `first_token` replaces the [CLS] in first position (BLIP's [ENC]); None keeps [CLS]. Texts come
    normalised. Through transformers' modules, so gradients reach every weight; the actor scores
    through `itm_scorer.ItmEncoder`, the same arithmetic (equal within 1e-5, tests/test_capfilt_stage.py)."""
    device = image_embeds.device
    tokens = tokenizer(
        texts, padding="longest", truncation=True, max_length=ITM_MAX_TOKENS, return_tensors="pt"
    ).to(device)
    input_ids = tokens.input_ids
    if first_token is not None:
        input_ids[:, 0] = first_token
    encoded = itm_model.text_encoder(
        input_ids=input_ids,
        attention_mask=tokens.attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device),
    ).last_hidden_state
    return itm_model.itm_head(encoded[:, 0, :])


def _itm_loss(model: BlipForImageTextRetrieval, processor: BlipProcessor, pixel_values: torch.Tensor,
              scenes: list[Scene], rng: np.random.Generator) -> torch.Tensor:  # fmt: skip
    """One matched and one mismatched caption per image; the vision tower runs once per image."""
    image_embeds = model.vision_model(pixel_values=pixel_values)[0]
    return itm_loss_of(model, processor, image_embeds, scenes, rng)


def itm_loss_of(model: BlipForImageTextRetrieval, processor: BlipProcessor, image_embeds: torch.Tensor,
                scenes: list[Scene], rng: np.random.Generator) -> torch.Tensor:  # fmt: skip
    """`_itm_loss` on the vision tower's output, for a loss that shares the vision pass with it."""
    texts = [describe(scene, rng) for scene in scenes]
    texts += [_negative(scene, rng) for scene in scenes]
    texts = [normalise_caption(text, ITM_TEXT) for text in texts]
    labels = torch.tensor([1] * len(scenes) + [0] * len(scenes))
    first_token = first_token_id(processor.tokenizer, ITM_TEXT)
    logits = _itm_logits(
        model, processor.tokenizer, torch.cat([image_embeds, image_embeds]), texts, first_token
    )
    return torch.nn.functional.cross_entropy(logits, labels)


_NEGATIVE_KINDS = ("other", "swap", "swap", "words")  # hard negatives twice as often: they are the hard part


def _negative(scene: Scene, rng: np.random.Generator) -> str:
    kind = _NEGATIVE_KINDS[int(rng.integers(len(_NEGATIVE_KINDS)))]
    if kind == "swap":
        return describe(swap_one_attribute(scene, rng), rng)
    if kind == "other":
        other = random_scene(rng)
        while other.attributes == scene.attributes:
            other = random_scene(rng)
        return describe(other, rng)
    return " ".join(rng.choice(_whole_words(), size=int(rng.integers(1, 30))))


@functools.cache
def _whole_words() -> tuple[str, ...]:
    """The vocabulary's words (no specials, pieces or punctuation), built once, not per negative."""
    return tuple(token for token in vocabulary() if token.isalpha())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/captioner and OUT/itm")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--captioner-steps", type=int, default=TrainConfig.captioner_steps)
    parser.add_argument("--itm-steps", type=int, default=TrainConfig.itm_steps)
    parser.add_argument("--clean-rows", type=int, default=TrainConfig.clean_rows)
    args = parser.parse_args(argv)
    config = TrainConfig(seed=args.seed, captioner_steps=args.captioner_steps, itm_steps=args.itm_steps,
                         clean_rows=args.clean_rows)  # fmt: skip
    train(args.out, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
