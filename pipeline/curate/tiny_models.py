"""Tiny random BLIP checkpoints, built locally, so tests exercise the real loading code.

Real BLIP weights (`Salesforce/blip-image-captioning-large`, `Salesforce/blip-itm-large-coco`) are
hundreds of MB and need the hub. The pipeline only ever loads models with `from_pretrained(name_or_path)`,
so a directory written with `save_pretrained` that has the same layout as those repositories (config,
safetensors, BlipProcessor with a BERT tokenizer carrying BLIP's `[DEC]`/`[ENC]` tokens) tests that code
path end to end, offline, in milliseconds. The weights are random: captions are gibberish, ITM scores noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

CAPTIONER_DIR = "captioner"
ITM_DIR = "itm"
IMAGE_SIZE = 64

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Ordinary lowercase words, enough that prompts and typical test captions tokenize without [UNK].
_WORDS = """
a an the of on in at and with to from by for is are it its this that there some two three one
picture photo image view close up shot drawing painting illustration rendering background foreground
red green blue yellow orange purple pink brown black white gray grey dark light bright colorful
circle square triangle rectangle star line dot shape shapes pattern stripe stripes grid border
small large big little tiny huge round flat simple plain solid empty blank center middle left right
top bottom corner side edge front back over under near next above below inside outside between
man woman person people child boy girl dog cat bird horse car bus truck train boat plane bike
tree trees flower flowers grass sky cloud clouds sun water sea beach mountain road street city house
building room table chair bed window door wall floor field park snow rain night day food plate cup
sitting standing walking running riding holding looking playing eating flying parked lying
logo text sign letter number word words font screen computer phone book paper box ball toy
digit zero five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 . , ! ? - ' "
"""
_PIECES = ["##s", "##es", "##ed", "##ing", "##ly", "##er", "##est", "##y", "##a", "##e", "##o", "##n", "##t"]


@dataclass(frozen=True)
class TinyModelPaths:
    """Where `write_tiny_models` put the two checkpoints; each is a `from_pretrained` directory."""

    captioner: Path
    itm: Path


def tiny_vocab() -> dict[str, int]:
    """Specials first (so [PAD] is 0, like BERT), then words and pieces in a fixed order, deduplicated."""
    tokens = list(dict.fromkeys([*_SPECIAL, *_WORDS.split(), *_PIECES]))
    return {token: i for i, token in enumerate(tokens)}


def blip_processor(vocab: dict[str, int], image_size: int = IMAGE_SIZE) -> BlipProcessor:
    """A BlipProcessor shaped like Salesforce's: BERT tokenizer plus bos [DEC] and extra special [ENC]."""
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)
    # Salesforce added these after the BERT vocab, so they get the two highest ids, as here.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    # The PIL backend needs no torchvision, and saves image_processor_type "BlipImageProcessor" like the
    # real checkpoints, so loading picks the torchvision backend wherever that is installed.
    image_processor = BlipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


@dataclass(frozen=True)
class BlipShape:
    """The sizes of a small BLIP: one width and depth for the vision and text towers."""

    hidden: int = 32
    layers: int = 2
    heads: int = 2
    image_size: int = IMAGE_SIZE
    patch_size: int = 16


def blip_config(processor: BlipProcessor, shape: BlipShape = BlipShape()) -> BlipConfig:
    """A small BLIP config whose special-token ids agree with the processor's tokenizer.

    `BlipForConditionalGeneration.generate` overwrites the prompt's first token with `bos_token_id` and
    stops on `sep_token_id`, so those must be the tokenizer's [DEC] and [SEP] or captions never end.
    """
    tok = processor.tokenizer
    tower = {
        "hidden_size": shape.hidden,
        "intermediate_size": 2 * shape.hidden,
        "projection_dim": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
    }
    text = {
        **tower,
        "vocab_size": len(tok),
        "encoder_hidden_size": shape.hidden,
        "max_position_embeddings": 64,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
        "sep_token_id": tok.sep_token_id,
        "eos_token_id": tok.sep_token_id,
    }
    vision = {
        **tower,
        "image_size": shape.image_size,
        "patch_size": shape.patch_size,
        "initializer_range": 0.02,  # the 1e-10 default would make every image look the same
    }
    return BlipConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=shape.hidden,
        image_text_hidden_size=shape.hidden,
    )


def write_tiny_models(out_dir: str | Path, seed: int = 0) -> TinyModelPaths:
    """Write out_dir/captioner/ (BlipForConditionalGeneration + BlipProcessor) and out_dir/itm/
    (BlipForImageTextRetrieval + BlipProcessor), random weights from `seed`, each directory loadable with
    `from_pretrained(dir)` exactly the way `Salesforce/blip-image-captioning-large` and
    `Salesforce/blip-itm-large-coco` load (model class .from_pretrained and AutoProcessor/BlipProcessor
    .from_pretrained). Idempotent: writing twice gives identical files."""
    out = Path(out_dir)
    paths = TinyModelPaths(captioner=out / CAPTIONER_DIR, itm=out / ITM_DIR)
    processor = blip_processor(tiny_vocab())
    config = blip_config(processor)
    for model_cls, path in (
        (BlipForConditionalGeneration, paths.captioner),
        (BlipForImageTextRetrieval, paths.itm),
    ):
        torch.manual_seed(seed)  # per model, so each checkpoint depends only on the seed, not on order
        model = model_cls(config).eval()
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        processor.save_pretrained(path)
    return paths
