"""`pipeline.curate.attention.use_sdpa` must be a pure speed change: same outputs as BLIP's eager attention for
the vision tower, the ITM text encoder with padded texts, and cached generate(), on real checkpoints
(tiny, random, loaded with `from_pretrained` like the pipeline does)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

from pipeline.curate import attention
from pipeline.curate.attention import SdpaBlipAttention, SdpaBlipTextSelfAttention, use_sdpa
from pipeline.curate.tiny_models import IMAGE_SIZE, TinyModelPaths, write_tiny_models

ATOL = 1e-5
TEXTS = ["a dog", "a red car parked on the street next to a tall building", "two cats sitting on a bed"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> TinyModelPaths:
    return write_tiny_models(tmp_path_factory.mktemp("tiny"))


def load(cls: type, path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The checkpoint with sharper attention: at the tiny models' init (std 0.02) every score is ~0 and
    attention is uniform, so a wrong scale would go unnoticed; query/key x8 gives O(1) scores."""
    model = cls.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        for module in attention_modules(model):
            if isinstance(module, BlipAttention):
                module.qkv.weight[: 2 * module.embed_dim] *= 8
            else:
                module.query.weight *= 8
                module.key.weight *= 8
    return model


def pair(
    cls: type, path: Path, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(eager, SDPA) copies of one model, identical weights."""
    eager = load(cls, path, dtype)
    sdpa = copy.deepcopy(eager)
    use_sdpa(sdpa)
    return eager, sdpa


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BlipAttention, BlipTextSelfAttention))]


@pytest.mark.parametrize("cls", [BlipForConditionalGeneration, BlipForImageTextRetrieval])
def test_switches_every_attention_module_once(paths: TinyModelPaths, cls: type) -> None:
    model = load(cls, paths.captioner if cls is BlipForConditionalGeneration else paths.itm)
    layers = model.config.vision_config.num_hidden_layers + 2 * model.config.text_config.num_hidden_layers
    assert len(attention_modules(model)) == layers  # vision self-attn + text self- and cross-attn
    assert use_sdpa(model) == layers
    assert all(type(m) in (SdpaBlipAttention, SdpaBlipTextSelfAttention) for m in attention_modules(model))
    assert use_sdpa(model) == 0  # idempotent
    clone = pickle.loads(pickle.dumps(model))  # a class swap keeps the model picklable
    assert type(clone.vision_model.encoder.layers[0].self_attn) is SdpaBlipAttention


def test_refuses_a_model_without_blip_attention() -> None:
    with pytest.raises(ValueError, match="no BLIP attention"):
        use_sdpa(torch.nn.Linear(2, 2))


def test_refuses_changed_transformers_code_and_leaves_model_eager(
    paths: TinyModelPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load(BlipForImageTextRetrieval, paths.itm)
    monkeypatch.setitem(attention._FINGERPRINTS, BlipTextSelfAttention, "0" * 16)
    with pytest.raises(RuntimeError, match=r"5\.23\.0"):
        use_sdpa(model)
    assert {type(m) for m in attention_modules(model)} == {BlipAttention, BlipTextSelfAttention}


def test_vision_tower_matches_eager(paths: TinyModelPaths) -> None:
    eager, sdpa = (m.vision_model for m in pair(BlipForImageTextRetrieval, paths.itm))
    x = pixels()
    with torch.no_grad():
        a, b = eager(pixel_values=x), sdpa(pixel_values=x)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=ATOL, rtol=0)


def itm(model: torch.nn.Module, tokens: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(match probabilities, text encoder's hidden states): the ITM head alone is too small at random
    init to show a wrong cross-attention, the hidden states are not."""
    with torch.no_grad():
        out = model(pixel_values=x, **tokens)
    return out.itm_score.float().softmax(-1), out.question_embeds.float()


def test_itm_with_padding_matches_eager(paths: TinyModelPaths) -> None:
    tokenizer = BlipProcessor.from_pretrained(paths.itm).tokenizer
    tokens = dict(tokenizer(TEXTS, padding="longest", return_tensors="pt"))
    assert (tokens["attention_mask"] == 0).any()  # the mask path is exercised
    eager, sdpa = pair(BlipForImageTextRetrieval, paths.itm)
    x = pixels()
    expected = itm(eager, tokens, x)
    torch.testing.assert_close(itm(sdpa, tokens, x), expected, atol=ATOL, rtol=0)
    # Padding must be masked, not attended: the short text alone scores as it does in the padded batch.
    alone = dict(tokenizer(TEXTS[:1], return_tensors="pt"))
    probs, hidden = itm(sdpa, alone, x[:1])
    torch.testing.assert_close(probs, expected[0][:1], atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden, expected[1][:1, : hidden.shape[1]], atol=ATOL, rtol=0)


def test_itm_bf16_runs_close_to_eager(paths: TinyModelPaths) -> None:
    """The pipeline runs bf16 on GPU; masks come in the embeddings' dtype and must reach SDPA as such."""
    tokenizer = BlipProcessor.from_pretrained(paths.itm).tokenizer
    tokens = dict(tokenizer(TEXTS, padding="longest", return_tensors="pt"))
    eager, sdpa = pair(BlipForImageTextRetrieval, paths.itm, torch.bfloat16)
    x = pixels().bfloat16()
    (probs, hidden), (expected_probs, expected_hidden) = itm(sdpa, tokens, x), itm(eager, tokens, x)
    torch.testing.assert_close(probs, expected_probs, atol=2e-2, rtol=0)
    torch.testing.assert_close(hidden, expected_hidden, atol=0.05, rtol=0)


@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float16])
def test_fp32_mask_is_cast_to_query_dtype_and_stays_finite(query_dtype: torch.dtype) -> None:
    mask = torch.tensor([0.0, torch.finfo(torch.float32).min]).view(1, 1, 1, 2)
    cast = attention._as_sdpa_mask(mask, torch.zeros(1, 1, 1, 4, dtype=query_dtype))
    assert cast is not None and cast.dtype == query_dtype and torch.isfinite(cast).all()


def generate(model: torch.nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(pixel_values=x, min_length=20, max_length=20, use_cache=True, **kwargs)


def test_generate_with_kv_cache_gives_identical_tokens(paths: TinyModelPaths) -> None:
    eager, sdpa = pair(BlipForConditionalGeneration, paths.captioner)
    x = pixels()
    greedy = generate(eager, x)
    assert greedy.shape[1] == 20
    assert torch.equal(generate(sdpa, x), greedy)
    # Sampling as the captioner stage does it: a prompt, top-p, several captions per image.
    prompt = BlipProcessor.from_pretrained(paths.captioner).tokenizer("a picture of", return_tensors="pt")
    sampled = []
    for model in (eager, sdpa):
        torch.manual_seed(7)
        sampled.append(
            generate(
                model,
                x,
                input_ids=prompt.input_ids.repeat(len(x), 1),
                do_sample=True,
                top_p=0.9,
                num_return_sequences=2,
                repetition_penalty=1.1,
            )
        )
    assert sampled[0].shape == (2 * len(x), 20)
    assert torch.equal(sampled[1], sampled[0])
