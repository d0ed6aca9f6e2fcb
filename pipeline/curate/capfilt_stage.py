"""Stage 2: the CapFilt actor. One per GPU, holding the captioner and the ITM filter.

Both models live in one actor so an image crosses the host-device boundary once. Per chunk:
1. pixels (uint8) go to the device in one copy and are normalised there, once if both models'
   processors agree;
2. the captioner writes `num_captions` captions per image by nucleus sampling, prompted with
   `prompt`, through the own decode loop (`caption_decoder`: generate's tokens, each image's
   cross-attention keys/values made once for its k captions); prompt and continuation are decoded
   together and the prompt cut off as a string, as BLIP's code does (`blip_text`);
3. the ITM model's vision tower runs once per image; its tokens are projected to the text encoder's
   keys/values once and shared by the web caption and every synthetic caption (`itm_scorer`). Each
   text is scored as BLIP trained the weights: through `pre_caption`, with `[ENC]` as its first token
   (`filter.text_normalise`, `filter.itm_first_token`); the match probability is softmax(ITM logits)[1];
4. the same checkpoint's contrastive side: each image's ITC embedding (projected, normalised [CLS] of
   the vision tower ITM already ran) and each text's ITC cosine similarity with it (`itm_scorer`).
It scores and does not decide: the threshold is applied by the writer, from the stored scores.
On a machine without CUDA the same code runs on the CPU in float32. Attention runs through
`scaled_dot_product_attention` (`pipeline.curate.attention`); docs/performance.md says what each of these
choices buys.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.resources import Resources
from pipeline.core.timings import stopwatch
from pipeline.curate.blip_text import caption_from_decoded, first_token_id, normalise_caption
from pipeline.curate.chunks import Chunk
from pipeline.curate.itm_scorer import ITM_MAX_TOKENS, ItmEncoder, TextGroups
from pipeline.spec.config import CaptionerSpec, FilterSpec
from pipeline.spec.records import EMBEDDING_DTYPE

if TYPE_CHECKING:  # transformers loads on the worker, not in the driver
    from pipeline.curate.caption_decoder import CaptionDecoder
NOT_SCORED = math.nan  # transport value for "not scored" (Arrow-typed, unlike None)


class CapFiltStage:
    """Caption and score a chunk. Construct anywhere (it is picklable); call `setup()` on the worker."""

    def __init__(self, captioner: CaptionerSpec, filter: FilterSpec, resources: Resources) -> None:
        self.captioner_spec = captioner
        self.filter_spec = filter
        self.resources = resources
        self._models: _Models | None = None
        self._first_token: int | None = None
        self._prompt: list[int] = []  # the prompt's token ids, with its [CLS] and [SEP]

    def setup(self) -> None:
        self._models = _Models.load(self.captioner_spec, self.filter_spec.model)
        self._first_token = first_token_id(self._models.itm_tokenizer, self.filter_spec)
        self._prompt = self._models.captioner_tokenizer(self.captioner_spec.prompt).input_ids

    def with_captions(self, num_captions: int) -> CapFiltStage:
        """This stage, set up, writing `num_captions` captions per image: the models are shared, not
        loaded again (benchmarks compare k on one loaded pair)."""
        captioner = dataclasses.replace(self.captioner_spec, num_captions=num_captions)
        stage = CapFiltStage(captioner, self.filter_spec, self.resources)
        stage._models, stage._first_token, stage._prompt = self._models, self._first_token, self._prompt
        return stage

    @property
    def device(self) -> str:
        return self.models.device

    @property
    def models(self) -> _Models:
        if self._models is None:
            raise RuntimeError("CapFiltStage.setup() must run before the stage is called")
        return self._models

    def __call__(self, chunk: Chunk) -> Chunk:
        import torch

        result = self.unscored(chunk)
        ok = [i for i, err in enumerate(chunk["decode_errors"]) if not err]
        if not ok:
            return result
        k = self.captioner_spec.num_captions
        seed = chunk_seed(self.captioner_spec.seed, chunk["shard"], chunk["chunk"], chunk.get("part", ""))
        torch.manual_seed(seed)
        with torch.inference_mode():
            captioner_input, itm_input = self.models.model_inputs(chunk["pixels"][ok])
            with stopwatch(result, "caption_s"):
                captions = self._caption(captioner_input)
            texts, owners = [], []
            for j, i in enumerate(ok):
                web = chunk["captions"][i]
                if web.strip():
                    texts.append(web)
                    owners.append((i, None))
                for c, text in enumerate(captions[j * k : (j + 1) * k]):
                    result["synthetic_captions"][i][c] = text
                    texts.append(text)
                    owners.append((i, c))
            position = {i: j for j, i in enumerate(ok)}
            with stopwatch(result, "itm_s"):
                scores = self._score(itm_input, texts, [position[i] for i, _ in owners])
        for (i, c), itm, itc in zip(owners, scores.itm, scores.itc, strict=True):
            if c is None:
                result["web_itm"][i], result["web_itc"][i] = itm, itc
            else:
                result["synthetic_itm"][i][c], result["synthetic_itc"][i][c] = itm, itc
        for j, i in enumerate(ok):
            result["image_embedding"][i] = scores.image_embeddings[j].tobytes()
        return result

    def unscored(self, chunk: Chunk) -> Chunk:
        """The result of a chunk before any scoring. Fixed shapes (k per row, NaN for "not scored")
        keep the Arrow types the same in every block, a failed chunk's included."""
        n, k = len(chunk["keys"]), self.captioner_spec.num_captions
        return {
            "shard": chunk["shard"],
            "chunk": chunk["chunk"],
            "keys": chunk["keys"],
            "decode_errors": chunk["decode_errors"],
            # Passed on for the driver's dedup, which decides from the keep rule and these alone.
            "captions": chunk["captions"],
            "pixel_hashes": chunk["pixel_hashes"],
            "synthetic_captions": [[""] * k for _ in range(n)],
            "web_itm": [NOT_SCORED] * n,
            "synthetic_itm": [[NOT_SCORED] * k for _ in range(n)],
            "web_itc": [NOT_SCORED] * n,
            "synthetic_itc": [[NOT_SCORED] * k for _ in range(n)],
            "image_embedding": [b""] * n,  # float16 bytes (`EMBEDDING_DTYPE`); empty: not scored
            # Seconds in caption() and itm(); both end with their results on the host, so a GPU's
            # queued work is counted where it ran.
            "caption_s": 0.0,
            "itm_s": 0.0,
        }

    def caption(self, pixels: Any) -> list[str]:
        """`num_captions` sampled captions per image (uint8 NHWC on the host), image-major, prompt removed."""
        return self._caption(self.models.model_inputs(pixels)[0])

    def itm(self, pixels: Any, texts: list[str], image_index: list[int]) -> list[float]:
        """Match probability of each text (as written) with its image, `pixels[image_index[i]]`."""
        return self.score(pixels, texts, image_index).itm

    def score(self, pixels: Any, texts: list[str], image_index: list[int]) -> TextScores:
        """ITM and ITC scores of each text (as written) with its image, and the images' embeddings."""
        return self._score(self.models.model_inputs(pixels)[1], texts, image_index)

    def _caption(self, pixel_values: Any) -> list[str]:
        import torch

        from pipeline.curate.caption_decoder import SamplingRule

        m, spec, prompt = self.models, self.captioner_spec, self._prompt
        if m.decoder is not None:
            image_embeds = m.captioner.vision_model(pixel_values=pixel_values)[0]
            out = m.decoder(image_embeds, prompt, spec.num_captions)
        else:  # captioner.decoder: generate, transformers' loop, for comparison
            out = m.captioner.generate(
                pixel_values=pixel_values,
                input_ids=torch.tensor([prompt], device=m.device).repeat(pixel_values.shape[0], 1),
                **SamplingRule.for_captioner(spec).generate_kwargs(),
                num_return_sequences=spec.num_captions,
            )
        decode = functools.partial(
            m.captioner_tokenizer.batch_decode, skip_special_tokens=True, clean_up_tokenization_spaces=True
        )
        # BLIP's generate drops the prompt's trailing [SEP] and returns prompt + new tokens.
        [decoded_prompt] = decode([prompt[:-1]])
        return [caption_from_decoded(text, decoded_prompt) for text in decode(out)]

    def _score(self, pixel_values: Any, texts: list[str], image_index: list[int]) -> TextScores:
        """One vision pass per image, and each image's tokens projected to cross-attention keys/values
        once for all of its texts (`itm_scorer`); ITC reads the same tokens with their own [CLS]
        before ITM's first token replaces it."""
        import torch

        m, encoder = self.models, self.models.itm_encoder
        texts = [normalise_caption(text, self.filter_spec) for text in texts]
        tokens = m.itm_tokenizer(texts, truncation=True, max_length=ITM_MAX_TOKENS).input_ids if texts else []
        groups = TextGroups(tokens, image_index, m.itm_filler)
        image_embeds = m.itm_model.vision_model(pixel_values=pixel_values)[0]
        image_features = encoder.image_features(image_embeds)
        itm, itc = [0.0] * len(texts), [0.0] * len(texts)
        for batch in groups.batches(self.filter_spec.batch_size):
            tokens = m.itm_tokenizer.pad({"input_ids": batch.token_ids}, return_tensors="pt").to(m.device)
            text_features = encoder.text_features(tokens.input_ids, tokens.attention_mask)
            if self._first_token is not None:
                tokens.input_ids[:, 0] = self._first_token
            images = torch.tensor(batch.images, device=m.device)
            logits = encoder.logits(image_embeds[images], tokens.input_ids, tokens.attention_mask)
            per_image = len(batch.texts) // len(batch.images)
            similarity = (text_features * image_features[images].repeat_interleave(per_image, dim=0)).sum(-1)
            match = logits.float().softmax(dim=-1)[:, 1]
            for row, p, s in zip(batch.texts, match.tolist(), similarity.tolist(), strict=True):
                if row is not None:
                    itm[row], itc[row] = p, s
        return TextScores(itm, itc, image_features.cpu().numpy().astype(EMBEDDING_DTYPE))


@dataclasses.dataclass(frozen=True)
class TextScores:
    """Per text, its ITM match probability and ITC cosine similarity with its image; per image, its
    ITC embedding (images x the checkpoint's embedding size, float16, as the shard stores it)."""

    itm: list[float]
    itc: list[float]
    image_embeddings: np.ndarray


def chunk_seed(seed: int, shard: str, chunk: int, part: str = "") -> int:
    """A sampling seed that depends only on the job's seed and the chunk's place in the data (and,
    for a chunk split after a failure, on which part of it this is: see `chunk_retry`)."""
    where = f"{seed}:{shard}:{chunk}" + (f":{part}" if part else "")
    digest = hashlib.sha256(where.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def actor_dtype(device: str) -> Any:
    """The models' dtype on a device: bfloat16 on CUDA, float32 on the CPU."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


class _Models:
    """Both BLIP models with their processors, on one device, the decode loop, and the on-device
    normalisation."""

    def __init__(self, captioner: Any, captioner_processor: Any, itm_model: Any, itm_processor: Any,
                 device: str, dtype: Any, decoder: CaptionDecoder | None) -> None:  # fmt: skip
        self.captioner, self.itm_model, self.decoder = captioner, itm_model, decoder
        self.itm_encoder = ItmEncoder(itm_model)
        self.captioner_tokenizer = captioner_processor.tokenizer
        self.itm_tokenizer = itm_processor.tokenizer
        self.itm_filler = self.itm_tokenizer("").input_ids  # the row of an image with fewer texts
        self.device, self.dtype = device, dtype
        self._captioner_norm = Normaliser(captioner_processor.image_processor, device, dtype)
        itm_norm = Normaliser(itm_processor.image_processor, device, dtype)
        self._itm_norm = None if itm_norm.settings == self._captioner_norm.settings else itm_norm

    @classmethod
    def load(cls, captioner_spec: CaptionerSpec, itm_name: str) -> _Models:
        """Both models and processors, by hub name or directory. Weights load from safetensors only:
        a pickle checkpoint (`pytorch_model.bin`) runs code when unpickled, so it is refused here
        even when `model_check` did not see it (a hub model); no model's own code is run either."""
        import torch
        from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

        from pipeline.curate.caption_decoder import CaptionDecoder, SamplingRule

        captioner_name = captioner_spec.model
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = actor_dtype(device)
        captioner = BlipForConditionalGeneration.from_pretrained(
            captioner_name, dtype=dtype, use_safetensors=True
        )
        itm_model = BlipForImageTextRetrieval.from_pretrained(itm_name, dtype=dtype, use_safetensors=True)
        for model in (captioner, itm_model):
            try:
                from pipeline.curate.attention import use_sdpa

                use_sdpa(model)
            except (ImportError, RuntimeError, OSError) as err:  # another transformers: eager, slower
                print(f"capfilt: {type(model).__name__} keeps eager attention: {err}", flush=True)
        captioner = captioner.to(device).eval()
        decoder = None
        if captioner_spec.decoder == "own":
            decoder = CaptionDecoder(captioner, SamplingRule.for_captioner(captioner_spec))
            if captioner_spec.compile:
                decoder.compile_step()
        return cls(
            captioner,
            AutoProcessor.from_pretrained(captioner_name, use_safetensors=True),
            itm_model.to(device).eval(),
            AutoProcessor.from_pretrained(itm_name, use_safetensors=True),
            device,
            dtype,
            decoder,
        )

    def model_inputs(self, pixels: Any) -> tuple[Any, Any]:
        """The captioner's and the ITM model's pixel values of uint8 NHWC host images: one copy to the
        device (from pinned memory on CUDA, so it can overlap), normalised once where both models'
        processors agree (Salesforce's BLIP checkpoints all share 384 px and CLIP's mean/std)."""
        import torch

        images = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
        if self.device == "cuda":
            images = images.pin_memory()
        images = images.to(self.device, non_blocking=True)
        captioner_input = self._captioner_norm(images)
        if self._itm_norm is None:  # both processors agree
            return captioner_input, captioner_input
        return captioner_input, self._itm_norm(images)


class Normaliser:
    """uint8 NHWC -> normalised NCHW on the device, as BlipImageProcessor would do."""

    def __init__(self, image_processor: Any, device: str, dtype: Any) -> None:
        import torch

        self.size = (image_processor.size["height"], image_processor.size["width"])
        self.scale = float(image_processor.rescale_factor)
        # what the normalisation depends on, from the processor's config (no device round trip)
        self.settings = (
            self.size,
            self.scale,
            tuple(image_processor.image_mean),
            tuple(image_processor.image_std),
        )
        self.mean = torch.tensor(image_processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, device=device).view(1, 3, 1, 1)
        self.device, self.dtype = device, dtype

    def __call__(self, pixels: Any) -> Any:
        import torch.nn.functional as F

        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() * self.scale
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True)
        return ((x - self.mean) / self.std).to(self.dtype)
