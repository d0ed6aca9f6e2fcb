"""Text the way BLIP's own code handles it: captions into the ITM model, generated tokens out as captions.

The released BLIP weights were finetuned and evaluated by the authors' code (salesforce/BLIP), and a
score means what the paper's 0.5 threshold means only when the text reaches the model as it did there:
- every caption goes through `pre_caption` (`data/utils.py`): lower case, `. ! " ( ) * # : ; ~` to
  spaces, runs of whitespace to one space, stripped, cut to `max_words` words (30 for COCO retrieval);
- the ITM text encoder reads the `[ENC]` token in first position, not `[CLS]`
  (`models/blip_retrieval.py`, `train_retrieval.py`: `input_ids[:, 0] = tokenizer.enc_token_id`);
  transformers' `BlipForImageTextRetrieval` feeds `[CLS]`, as the authors' demo model `blip_itm.py` does;
- a caption is the decoded prompt + continuation with the prompt cut off as a string
  (`models/blip.py`, `BLIP_Decoder.generate`), decoded with BERT's clean-up of spaces ("dog ' s" ->
  "dog's"), as the transformers of BLIP's day did by default.
The stored web caption is never changed: `normalise_caption(caption, filter spec)` is what was scored.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.spec.config import FilterSpec, SpecError

ENC_TOKEN = "[ENC]"
_BLIP_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_WHITESPACE_RUN = re.compile(r"\s{2,}")
_WORD_PIECE = re.compile(r"(?<!\S)##")  # a `##` continuation left at the start of a word


def pre_caption(caption: str, max_words: int) -> str:
    """BLIP's `pre_caption`, step for step (its single line breaks and tabs survive, as there)."""
    caption = _BLIP_PUNCTUATION.sub(" ", caption.lower())
    caption = _WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def normalise_caption(caption: str, spec: FilterSpec) -> str:
    """The text the ITM model scores for `caption` under the job's `filter` settings."""
    if spec.text_normalise == "blip":
        return pre_caption(caption, spec.max_words)
    return caption


def first_token_id(tokenizer: Any, spec: FilterSpec) -> int | None:
    """The id that replaces the text's first token for ITM: `[ENC]` under `itm_first_token: enc`,
    None (the tokenizer's own `[CLS]`) under `cls`. A tokenizer without `[ENC]` is the spec's error."""
    if spec.itm_first_token == "cls":
        return None
    token_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise SpecError(
            f"filter.model: {spec.model}: its tokenizer has no {ENC_TOKEN} token, which BLIP's ITM "
            "reads first; set filter.itm_first_token: cls to score with [CLS] instead"
        )
    return int(token_id)


def caption_from_decoded(decoded: str, decoded_prompt: str) -> str:
    """A generated caption from the decoded prompt + continuation: the prompt cut off as a string, the
    whitespace folded. A `##` piece can only survive decoding at the very start (an empty prompt);
    it is glued to nothing, so its marker goes."""
    text = decoded[len(decoded_prompt) :] if decoded.startswith(decoded_prompt) else decoded
    return " ".join(_WORD_PIECE.sub("", text).split())
