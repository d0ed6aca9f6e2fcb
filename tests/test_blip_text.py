"""BLIP's text conventions, case by case: `pre_caption`, the `[ENC]` id, caption strings from decoding.

The expected strings are written out by hand from the authors' `data/utils.py` and `models/blip.py`,
not computed by the code under test.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pipeline.curate.blip_text import caption_from_decoded, first_token_id, normalise_caption, pre_caption
from pipeline.spec.config import FilterSpec, SpecError


@pytest.mark.parametrize(
    ("raw", "max_words", "expected"),
    [
        ("A Dog on the Beach.", 30, "a dog on the beach"),
        ('"Sunset" (HDR) #travel: best; ever~ *wow*!', 30, "sunset hdr travel best ever wow"),
        ("  two   spaces\tand a tab  ", 30, "two spaces\tand a tab"),  # a lone tab survives, as in BLIP
        ("commas, hyphens-and 'quotes' stay", 30, "commas, hyphens-and 'quotes' stay"),
        ("one two three four five", 3, "one two three"),
        ("...", 30, ""),
        ("line one\n", 30, "line one"),
        ("ÉCOLE Über", 30, "école über"),
    ],
)
def test_pre_caption_as_blip_writes_it(raw, max_words, expected):
    assert pre_caption(raw, max_words) == expected


def test_normalise_follows_the_filter_settings():
    text = "A Red CIRCLE: on the Left!"
    assert normalise_caption(text, FilterSpec()) == "a red circle on the left"
    assert normalise_caption(text, FilterSpec(max_words=2)) == "a red"
    assert normalise_caption(text, FilterSpec(text_normalise="none")) == text


def test_enc_id_comes_from_the_tokenizer(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.itm)
    enc = first_token_id(tokenizer, FilterSpec(model=str(tiny_models.itm)))
    assert tokenizer.convert_ids_to_tokens(enc) == "[ENC]"
    assert first_token_id(tokenizer, FilterSpec(itm_first_token="cls")) is None


def test_a_tokenizer_without_enc_is_a_one_line_error_naming_the_model(tmp_path, tiny_models):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog"]))
    tokenizer = BertTokenizer(vocab_file=str(vocab))
    with pytest.raises(
        SpecError, match=r"^filter.model: some/model: its tokenizer has no \[ENC\] token.*cls"
    ):
        first_token_id(tokenizer, FilterSpec(model="some/model"))


@pytest.mark.parametrize(
    ("decoded", "prompt", "expected"),
    [
        ("a picture of a dog on a beach", "a picture of", "a dog on a beach"),
        ("a picture ofs dog", "a picture of", "s dog"),  # a first piece glued to the prompt's last word
        ("##s dog", "", "s dog"),  # with no prompt, a leading piece has nothing to join
        ("a picture of the dog's ball", "a picture of", "the dog's ball"),
        ("a picture of   two  cats ", "a picture of", "two cats"),
        ("something else entirely", "a picture of", "something else entirely"),
    ],
)
def test_caption_from_decoded_cuts_the_prompt_as_a_string(decoded, prompt, expected):
    assert caption_from_decoded(decoded, prompt) == expected


def test_the_text_settings_are_part_of_the_fingerprint_not_of_the_downloads(tmp_path):
    from dataclasses import replace

    from pipeline.spec.config import typed_spec

    spec = typed_spec({"input": {"url_list": str(tmp_path / "urls.parquet")}, "output": {"path": "out"}})
    changed = [
        replace(spec, filter=replace(spec.filter, itm_first_token="cls")),
        replace(spec, filter=replace(spec.filter, text_normalise="none")),
        replace(spec, filter=replace(spec.filter, max_words=50)),
    ]
    assert len({spec.fingerprint(), *(s.fingerprint() for s in changed)}) == 4
    assert {s.download_fingerprint() for s in changed} == {spec.download_fingerprint()}


def test_a_job_whose_filter_tokenizer_lacks_enc_stops_before_any_work(tmp_path, tiny_models):
    import shutil

    from transformers import BertTokenizer

    from pipeline.curate.model_check import check_itm_tokenizer
    from pipeline.curate.tiny_models import tiny_vocab
    from pipeline.spec.config import typed_spec

    itm = tmp_path / "itm-without-enc"
    shutil.copytree(tiny_models.itm, itm)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (itm / name).unlink()
    BertTokenizer(vocab=tiny_vocab(), do_lower_case=True).save_pretrained(itm)  # BERT's specials only
    raw = {"input": {"url_list": "urls.parquet"}, "output": {"path": "out"}, "filter": {"model": str(itm)}}
    with pytest.raises(SpecError, match=r"^filter.model: .*itm-without-enc: its tokenizer has no \[ENC\]"):
        check_itm_tokenizer(typed_spec(raw))
    check_itm_tokenizer(typed_spec({**raw, "filter": {"model": str(itm), "itm_first_token": "cls"}}))
