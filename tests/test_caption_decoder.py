"""The own decode loop gives `BlipForConditionalGeneration.generate`'s tokens (CPU, float32).

Two captioners: the random tiny one (it rarely ends a caption, so every step runs to max_length) and
the shipped trained one (it ends captions at [SEP], at different steps per row, so the early exit and
the padding of ended rows are exercised). Both loaded as the actor loads them (SDPA attention).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, BlipForConditionalGeneration
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pipeline.curate.attention import use_sdpa
from pipeline.curate.caption_decoder import CaptionDecoder, SamplingRule, TokenChooser
from pipeline.synthetic.trained import shipped_models

PROMPT = "a picture of "


def _load(path) -> tuple[BlipForConditionalGeneration, list[int]]:
    model = BlipForConditionalGeneration.from_pretrained(path, use_safetensors=True).eval()
    use_sdpa(model)
    return model, AutoProcessor.from_pretrained(path).tokenizer(PROMPT).input_ids


@pytest.fixture(scope="module", params=["random", "trained"])
def captioner(request, tiny_models):
    return _load(tiny_models.captioner if request.param == "random" else shipped_models().captioner)


def _embeds_and_pixels(model, images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.config.vision_config.image_size
    pixels = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model.vision_model(pixel_values=pixels)[0], pixels


def _generate(model, prompt: list[int], pixels: torch.Tensor, k: int, rule: SamplingRule) -> torch.Tensor:
    ids = torch.tensor([prompt]).repeat(pixels.shape[0], 1)
    with torch.inference_mode():
        return model.generate(
            pixel_values=pixels, input_ids=ids, num_return_sequences=k, **rule.generate_kwargs()
        )


@pytest.mark.parametrize("images", [1, 3, 8])
@pytest.mark.parametrize(("min_length", "max_length"), [(5, 12), (0, 20), (9, 9)])
def test_greedy_tokens_are_generates(captioner, images, min_length, max_length):
    model, prompt = captioner
    rule = SamplingRule(False, 1.0, 1.1, min_length, max_length)
    embeds, pixels = _embeds_and_pixels(model, images, seed=images)
    expected = _generate(model, prompt, pixels, 1, rule)
    assert torch.equal(CaptionDecoder(model, rule)(embeds, prompt, 1), expected)
    # k greedy rows of an image are the same caption (generate refuses k > 1 without sampling)
    assert torch.equal(CaptionDecoder(model, rule)(embeds, prompt, 3), expected.repeat_interleave(3, dim=0))


@pytest.mark.parametrize(("images", "k"), [(1, 1), (2, 5), (5, 3), (16, 1)])
@pytest.mark.parametrize(("min_length", "max_length"), [(5, 20), (0, 12)])
def test_sampled_tokens_are_generates_with_the_same_seed(captioner, images, k, min_length, max_length):
    model, prompt = captioner
    rule = SamplingRule(True, 0.9, 1.1, min_length, max_length)
    embeds, pixels = _embeds_and_pixels(model, images, seed=10 + images)
    torch.manual_seed(1234)
    expected = _generate(model, prompt, pixels, k, rule)
    torch.manual_seed(1234)
    ours = CaptionDecoder(model, rule)(embeds, prompt, k)
    assert torch.equal(ours, expected)
    assert ours.shape[0] == images * k


def test_trained_captions_end_early_and_ended_rows_are_padded():
    """The case the early exit is for: every row ends before max_length, at different steps."""
    model, prompt = _load(shipped_models().captioner)
    rule = SamplingRule(True, 0.9, 1.1, 5, 40)
    embeds, pixels = _embeds_and_pixels(model, 6, seed=3)
    torch.manual_seed(7)
    ours = CaptionDecoder(model, rule)(embeds, prompt, 2)
    torch.manual_seed(7)
    assert torch.equal(ours, _generate(model, prompt, pixels, 2, rule))
    eos, pad = model.config.text_config.sep_token_id, model.config.text_config.pad_token_id
    ends = [(row == eos).nonzero()[0].item() for row in ours]  # every row ended
    assert ours.shape[1] < 40 and max(ends) == ours.shape[1] - 1 and len(set(ends)) > 1
    for row, end in zip(ours, ends, strict=True):
        assert (row[end + 1 :] == pad).all()


def _hf_processors(rule: SamplingRule, eos: int) -> LogitsProcessorList:
    """transformers' processors for the rule, as `generate` lists them for this call."""
    return LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(rule.repetition_penalty),
            MinLengthLogitsProcessor(rule.min_length, torch.tensor([eos])),
            TopKLogitsWarper(rule.top_k),
            TopPLogitsWarper(rule.top_p),
        ]
    )


def test_sampling_rule_resolves_generates_defaults(captioner):
    model, _ = captioner
    rule = SamplingRule(True, 0.9, 1.1, 5, 20).with_model_defaults(model.text_decoder.generation_config)
    assert (rule.top_k, rule.temperature) == (50, 1.0)  # transformers' defaults: the model names neither


@pytest.mark.parametrize("length", [3, 4, 5, 11])
@pytest.mark.parametrize("top_p", [0.9, 0.5])
def test_token_chooser_scores_are_generates_processors(length, top_p):
    rows, vocab, eos = 12, 300, 3
    generator = torch.Generator().manual_seed(length)
    logits = torch.randn(rows, vocab, generator=generator) * 4
    tokens = torch.randint(0, vocab, (rows, length), generator=generator)
    rule = SamplingRule(True, top_p, 1.3, 5, 20, top_k=50, temperature=1.0)
    chooser = TokenChooser(rule, tokens[:, :2], vocab, eos)
    for column in tokens[:, 2:].T:
        chooser.saw(column)
    expected = _hf_processors(rule, eos)(tokens, logits.clone())
    ours = chooser.scores(logits, length)
    assert torch.equal(ours, expected)
    assert ((ours == -torch.inf).sum(dim=1) >= vocab - 50).all()  # not a no-op: top-k and top-p cut


@pytest.mark.slow
def test_compiled_step_gives_the_same_tokens():
    """`captioner.compile`: the step through torch.compile (inductor, a C++ compiler on the CPU)."""
    model, prompt = _load(shipped_models().captioner)
    rule = SamplingRule(False, 1.0, 1.1, 5, 20)
    embeds, _ = _embeds_and_pixels(model, 3, seed=4)
    decoder = CaptionDecoder(model, rule)
    eager = decoder(embeds, prompt, 2)
    decoder.compile_step()
    assert torch.equal(decoder(embeds, prompt, 2), eager)
    assert decoder._compiled is not None  # it did compile, it did not fall back


def test_a_step_that_cannot_compile_runs_eagerly_and_says_why(monkeypatch, capsys):
    def no_compiler(function, **options):
        def compiled(*args):
            raise RuntimeError("InductorError: no working C++ compiler\n(details)")

        return compiled

    model, prompt = _load(shipped_models().captioner)
    rule = SamplingRule(False, 1.0, 1.1, 5, 12)
    embeds, _ = _embeds_and_pixels(model, 2, seed=5)
    decoder = CaptionDecoder(model, rule)
    eager = decoder(embeds, prompt, 1)
    monkeypatch.setattr(torch, "compile", no_compiler)
    decoder.compile_step()
    assert torch.equal(decoder(embeds, prompt, 1), eager)
    out = capsys.readouterr().out
    assert out.count("captioner.compile is off") == 1 and "no working C++ compiler (details)" in out
