"""The captioner's decode loop, owned by the project: `BlipForConditionalGeneration.generate`'s tokens
with the work the method needs and no more.

What transformers' `generate` does per image and k captions, and what this loop does instead:
- the image's cross-attention keys/values: projected for each of the k rows; here once per image
  (`text_tower.project_image`), the k rows' queries attending to them together;
- the prompt: run for each of the k rows; here once per image (its k rows are the same text over the
  same image), its self-attention keys/values then copied into the k rows' cache;
- the self-attention cache: grown by concatenation every step; here a static buffer of `max_length`
  positions, written in place, attended through a mask, so a step has the same shapes every time
  (what a CUDA graph or `torch.compile` needs);
- stopping: a host sync every step to ask whether all rows ended; here the loop asks every
  `SYNC_EVERY` steps and the output is cut where the last row ended, so it is the same.

The logits processors are `generate`'s for the same settings (`SamplingRule`), the same arithmetic in
the same order, a few tensor operations each on the device (`TokenChooser`); sampling is the same
`softmax` + `multinomial` over all rows every step, finished ones included, so with the same seed the
same random numbers are drawn for the same rows. On CPU in float32 the tokens are `generate`'s
(tests/test_caption_decoder.py checks greedy and sampled decoding against it). A layer runs through
`text_tower`, from its weights, so a step is the arithmetic and little else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from pipeline.core.messages import one_line
from pipeline.curate.text_tower import Affine, ImageKeysValues, Norm, project_image, text_layers
from pipeline.spec.config import CaptionerSpec

SYNC_EVERY = 4  # steps between asking the device whether every row has ended


@dataclass(frozen=True)
class SamplingRule:
    """What `generate(do_sample=..., top_p=..., repetition_penalty=..., min_length=..., max_length=...)`
    samples with. `top_k` and `temperature` are what generate takes when the call does not name them:
    the model's generation config, else transformers' defaults (top_k 50)."""

    do_sample: bool
    top_p: float
    repetition_penalty: float
    min_length: int
    max_length: int
    top_k: int | None = None
    temperature: float | None = None

    @classmethod
    def for_captioner(cls, spec: CaptionerSpec) -> SamplingRule:
        """The job's sampling: nucleus sampling as in the BLIP paper."""
        return cls(True, spec.top_p, spec.repetition_penalty, spec.min_length, spec.max_length)

    def generate_kwargs(self) -> dict[str, object]:
        """These settings as `generate` takes them (top_k and temperature left to it)."""
        named = ("do_sample", "top_p", "repetition_penalty", "min_length", "max_length")
        return {name: getattr(self, name) for name in named}

    def with_model_defaults(self, generation_config: GenerationConfig) -> SamplingRule:
        """top_k and temperature as `generate` resolves them for a model with this generation config."""
        defaults = GenerationConfig._get_default_generation_params()

        def resolved(name: str) -> object:
            value = getattr(generation_config, name, None)
            return defaults.get(name) if value is None else value

        return dataclasses.replace(self, top_k=resolved("top_k"), temperature=resolved("temperature"))


class TokenChooser:
    """The next token of every row from its logits: `generate`'s logits processors for the rule (the
    same arithmetic, in the same order: repetition penalty, min length, temperature, top-k, top-p),
    then `softmax` + `multinomial` (or argmax). Each is a few tensor operations on the device; the
    tokens seen so far are a (rows, vocabulary) mask updated in place, not the growing sequence."""

    def __init__(self, rule: SamplingRule, tokens: torch.Tensor, vocab: int, eos: int) -> None:
        self.rule = rule
        self.eos = torch.tensor([eos], device=tokens.device)
        self.seen = torch.zeros(tokens.shape[0], vocab, dtype=torch.bool, device=tokens.device)
        self.seen.scatter_(1, tokens, True)

    def scores(self, logits: torch.Tensor, length: int) -> torch.Tensor:
        """The processed scores for rows of `length` tokens so far (float32 logits in)."""
        rule, scores = self.rule, logits
        if rule.repetition_penalty != 1.0:
            penalised = torch.where(
                scores < 0, scores * rule.repetition_penalty, scores / rule.repetition_penalty
            )
            scores = torch.where(self.seen, penalised, scores)
        if length < rule.min_length:
            scores = scores.index_fill(1, self.eos, -math.inf)
        if not rule.do_sample:
            return scores
        if rule.temperature is not None and rule.temperature != 1.0:
            scores = scores / rule.temperature
        if rule.top_k:
            kth = torch.topk(scores, min(rule.top_k, scores.shape[-1]))[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if rule.top_p < 1.0:  # TopPLogitsWarper, step for step
            ascending, order = torch.sort(scores, descending=False)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - rule.top_p)
            remove[..., -1:] = 0
            scores = scores.masked_fill(remove.scatter(1, order, remove), -math.inf)
        return scores

    def __call__(self, logits: torch.Tensor, length: int) -> torch.Tensor:
        scores = self.scores(logits, length)
        if self.rule.do_sample:
            return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(dim=-1)

    def saw(self, chosen: torch.Tensor) -> None:
        self.seen.scatter_(1, chosen[:, None], True)


class CaptionDecoder:
    """Captions of a batch of images from a loaded `BlipForConditionalGeneration`: token ids laid out
    as `generate` returns them (the prompt, [DEC] first, then the new tokens, padded after [SEP])."""

    def __init__(self, captioner: torch.nn.Module, rule: SamplingRule) -> None:
        text = captioner.config.text_config
        decoder = captioner.text_decoder
        self.word_embeddings = decoder.bert.embeddings.word_embeddings.weight
        self.position_embeddings = decoder.bert.embeddings.position_embeddings.weight
        self.embedding_norm = Norm.of(decoder.bert.embeddings.LayerNorm)
        self.layers = text_layers(decoder.bert.encoder)
        head = decoder.cls.predictions
        self.head_transform = (Affine.of(head.transform.dense), head.transform.transform_act_fn)
        self.head_norm, self.head_out = Norm.of(head.transform.LayerNorm), Affine.of(head.decoder)
        self.vocab = head.decoder.out_features
        self.rule = rule.with_model_defaults(decoder.generation_config)
        self.bos, self.eos, self.pad = text.bos_token_id, text.sep_token_id, text.pad_token_id
        self._compiled: Callable[..., torch.Tensor] | None = None

    def compile_step(self) -> None:
        """Run the decode step through `torch.compile` (`captioner.compile`). The step has the same
        shapes every call, so it compiles once per batch size; fused kernels cut a GPU's launches per
        token. CUDA graphs are not asked for: the step writes its cache in place, which they refuse."""
        self._compiled = torch.compile(self._step, fullgraph=True, dynamic=False)

    def step(self, *args: object) -> torch.Tensor:
        """The decode step, compiled when asked and possible. A step that fails to compile says why,
        once, and the decoder goes on eagerly: the tokens are the same, only slower."""
        if self._compiled is not None:
            try:
                return self._compiled(*args)
            except Exception as err:  # a missing compiler, an unsupported op: speed, not results
                print(
                    f"capfilt: captioner.compile is off, the decode step runs eagerly: {one_line(err)}",
                    flush=True,
                )
                self._compiled = None
        return self._step(*args)

    @torch.inference_mode()
    def __call__(self, image_embeds: torch.Tensor, prompt_ids: list[int], k: int) -> torch.Tensor:
        """`k` captions per image, image-major (rows i*k .. i*k+k-1 are image i's), as
        `generate(pixel_values, input_ids=prompt_ids (with its [SEP]), num_return_sequences=k)`."""
        device = image_embeds.device
        rule, images = self.rule, image_embeds.shape[0]
        rows, length = images * k, rule.max_length
        prompt = torch.tensor([self.bos, *prompt_ids[1:-1]], device=device)  # generate: [DEC] first, no [SEP]
        start = prompt.shape[0]
        tokens = torch.full((rows, max(length, start)), self.pad, dtype=torch.long, device=device)
        tokens[:, :start] = prompt
        if start >= length:
            return tokens[:, :start]
        image_kv = project_image(self.layers, image_embeds)
        cache = self._new_cache(rows, length, image_embeds.dtype, device)
        positions = torch.arange(length, device=device)
        logits = self._prefill(prompt, positions[:start], image_kv, cache, k)
        choose = TokenChooser(rule, tokens[:, :start], self.vocab, self.eos)
        unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        alive_until = torch.full((), start, dtype=torch.long, device=device)
        visible = (positions[None, :] <= positions[:, None]).view(length, 1, 1, 1, length)  # [p]: keys 0..p
        for cur in range(start, length):
            chosen = torch.where(unfinished, choose(logits.float(), cur), self.pad)
            tokens[:, cur] = chosen
            choose.saw(chosen)
            alive_until += unfinished.any()
            unfinished &= chosen != self.eos
            if cur + 1 == length or ((cur - start) % SYNC_EVERY == SYNC_EVERY - 1 and not unfinished.any()):
                break
            logits = self.step(chosen, positions[cur : cur + 1], visible[cur], image_kv, cache)
        return tokens[:, : int(alive_until)]

    def _new_cache(
        self, rows: int, length: int, dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        """Per layer, one (2, rows, heads, max_length, head size) buffer of self-attention keys/values."""
        size = self.layers[0].head_size
        shape = (2, rows, self.word_embeddings.shape[1] // size, length, size)
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]

    def _prefill(
        self,
        prompt: torch.Tensor,
        positions: torch.Tensor,
        image_kv: ImageKeysValues,
        cache: list[torch.Tensor],
        k: int,
    ) -> torch.Tensor:
        """The prompt through the decoder once per image; its keys/values copied to the image's k rows.
        Returns the next-token logits of every row."""
        images, start = image_kv.images, prompt.shape[0]
        hidden = self._embed(prompt.expand(images, start), positions)
        causal = torch.ones(start, start, dtype=torch.bool, device=prompt.device).tril()
        for layer, kv, keys, values in zip(self.layers, cache, image_kv.keys, image_kv.values, strict=True):
            query, key, value = layer.query_key_value(hidden)
            kv[0, :, :, :start] = key.repeat_interleave(k, dim=0)
            kv[1, :, :, :start] = value.repeat_interleave(k, dim=0)
            hidden = layer.self_attend(hidden, query, key, value, causal)
            hidden = layer.feed_forward(layer.cross_attend(hidden, keys, values))
        return self._vocabulary(hidden[:, -1:, :])[:, 0].repeat_interleave(k, dim=0)

    def _step(
        self,
        chosen: torch.Tensor,
        position: torch.Tensor,
        visible: torch.Tensor,
        image_kv: ImageKeysValues,
        cache: list[torch.Tensor],
    ) -> torch.Tensor:
        """One token per row at `position` (a one-element device tensor): its keys/values written into
        the cache, attending to the cache positions `visible` marks (0..position); returns the next-token
        logits. The shapes are the same every call."""
        hidden = self._embed(chosen[:, None], position)
        for layer, kv, keys, values in zip(self.layers, cache, image_kv.keys, image_kv.values, strict=True):
            query, key, value = layer.query_key_value(hidden)
            kv[0].index_copy_(2, position, key)
            kv[1].index_copy_(2, position, value)
            hidden = layer.self_attend(hidden, query, kv[0], kv[1], visible)
            hidden = layer.feed_forward(layer.cross_attend(hidden, keys, values))
        return self._vocabulary(hidden)[:, 0]

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`BlipTextEmbeddings`: word + position embedding, then LayerNorm ((rows, tokens) ids, a
        position per token)."""
        words = F.embedding(ids, self.word_embeddings)
        return self.embedding_norm(words + F.embedding(positions, self.position_embeddings))

    def _vocabulary(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (`cls.predictions`): transform, activation, LayerNorm, then the vocabulary."""
        dense, activation = self.head_transform
        return self.head_out(self.head_norm(activation(dense(hidden))))
