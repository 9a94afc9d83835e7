"""Pieces the vision-side adapters share: scattering image features into placeholder slots, and loading checks.

Loading a checkpoint folder is checked end to end, because transformers' `from_pretrained` accepts a lot silently:
a config edited from 12 to 6 layers loads the first 6 and drops the rest, a config with more layers than the weights
leaves the extra ones random, a folder without a tokenizer gets some default one. `check_checkpoint_folder` looks at
the files before anything is loaded (weights present and whole, their keys those of the family config.json names,
tokenizer and image-processor configs present); `load_model` loads strictly (every tensor of the weights used, every
parameter of the model loaded, every shape equal) and turns each failure into one `FreeVLMError` line.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from freevlm.backbones.base import LMInputs
from freevlm.backbones.lm import default_exit_layers
from freevlm.errors import FreeVLMError


def scatter_image_features(
    embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor
) -> torch.Tensor:
    """Put image features into the placeholder positions, as the transformers VLMs do (masked_scatter, row-major).

    embeds (B, P, D), features (B, Q, D) or (B*Q, D); the prompt must hold exactly B*Q placeholder tokens.
    """
    mask = input_ids == image_token_id  # (B, P)
    n_slots, n_features = int(mask.sum()), features.numel() // features.shape[-1]
    if n_slots != n_features:
        raise FreeVLMError(
            f"prompt has {n_slots} image placeholder tokens (id {image_token_id}) but the vision side produced "
            f"{n_features} feature vectors; tokenise prompts with the backbone's processor"
        )
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.device, embeds.dtype))


def image_rows(pixel_values: torch.Tensor, extra: dict, rows: list[int]) -> tuple[torch.Tensor, dict]:
    """The inputs of batch rows `rows` (one image each): `pixel_values[rows]` and every extra input's rows, except
    that Qwen2-VL's flat patches (all images' patches in one (sum of t*h*w, C*T*P*P) tensor, `image_grid_thw` giving
    each image's grid) are cut per image first."""
    grid = extra.get("image_grid_thw")
    picked = {k: v[rows] for k, v in extra.items()}
    if grid is None:
        return pixel_values[rows], picked
    per_image = torch.split(pixel_values, grid.prod(-1).tolist())
    return torch.cat([per_image[r] for r in rows]), picked


def per_image(features: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """The vision side's output for a few images -> one (Q_i, D) tensor per image, image i having `counts[i]`
    features (its prompt's placeholders: Qwen2-VL's and LLaVA-OneVision's counts depend on the image's size)."""
    return list(torch.split(features.reshape(-1, features.shape[-1]), counts))


def read_model_type(path: str | Path) -> str:
    """The `model_type` of a checkpoint folder, with one-line errors for the usual mistakes."""
    folder = Path(path)
    if not folder.exists():
        raise FreeVLMError(f"checkpoint folder not found: {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FreeVLMError(f"not a transformers checkpoint folder (no config.json): {folder}")
    try:
        return json.loads(config_file.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise FreeVLMError(f"unreadable config {config_file}: {err!r}") from None


class VLMBackbone:
    """A transformers VLM, its processor, and its LM adapter: what every freevlm component is handed.

    The families differ only in how image features are made (`image_features`, supplied by `blip2.py`,
    `instructblip.py`, `llava.py`) and in where the LM sits inside the model (resolved once, into `lm`).
    """

    def __init__(self, family: str, model, processor, lm, image_features, parameter_groups, name: str = "", *,
                 rope_index=None, generate_inputs=None, vision_inputs: tuple[str, ...] | None = None,
                 image_prompt_template: str | None = None):
        # "blip2" / "instructblip" / "llava" / "qwen2_vl" / "qwen2_5_vl" / "llava_onevision" / "idefics3" / "smolvlm"
        self.family = family
        self.model = model  # the transformers model (Blip2ForConditionalGeneration, ...)
        self.processor = processor  # the transformers processor (images + text -> model inputs), or None
        self.lm = lm  # DecoderOnlyLM / EncoderDecoderLM
        self._image_features = image_features  # (model, pixel_values, **extra) -> (B, Q, D) or (B*Q, D)
        self._parameter_groups = parameter_groups  # model -> {"vision"|"qformer"|"projection"|"lm": [params]}
        self.name = name or f"{family}-{lm.config.model_type}"
        # M-RoPE families (Qwen2-VL): (model, input_ids, attention_mask, **extra) -> (3, B, P) prompt position ids
        self._rope_index = rope_index
        # (model, input_ids, extra) -> the extra inputs the model's own `generate` needs (None: `extra` as it is)
        self._generate_inputs = generate_inputs
        self.vision_inputs = vision_inputs  # the extra inputs the vision side reads (None: all of them)
        self.image_prompt_template = image_prompt_template  # e.g. "<image>{}": where the processor expands the image

    def __repr__(self) -> str:
        lm = self.lm
        return f"VLMBackbone({self.name!r}, family={self.family}, lm={lm.config.model_type}, layers={lm.num_layers})"

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def image_features(self, pixel_values: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self._image_features(self.model, pixel_values, **extra)

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """The model's parameters by part: "vision", "qformer" (absent for LLaVA), "projection", "lm"."""
        return self._parameter_groups(self.model)

    def image_prompt(self, prompt: str) -> str:
        """The text a prompt becomes before the processor: LLaVA's processor expands an `<image>` marker in the
        text, the BLIP-2 family's processors prepend the query-token placeholders themselves."""
        if self.image_prompt_template is not None:  # Idefics3/SmolVLM's: the processor expands a leading <image>
            return self.image_prompt_template.format(prompt)
        if hasattr(self.processor, "image_prompt"):  # Qwen2-VL's: the image between its vision markers
            return self.processor.image_prompt(prompt)
        return f"<image> {prompt}" if self.family == "llava" else prompt

    def prepare(self, pixel_values, input_ids, attention_mask=None, image_features=None, **extra):
        features = self.image_features(pixel_values, **extra) if image_features is None else image_features
        embeds = self.model.get_input_embeddings()(input_ids)
        embeds = scatter_image_features(embeds, input_ids, self.image_token_id, features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep_ids = None if self.lm.is_encoder_decoder else input_ids
        positions = None if self._rope_index is None else self._rope_index(self.model, input_ids, attention_mask,
                                                                              **extra)
        return LMInputs(inputs_embeds=embeds, attention_mask=attention_mask, input_ids=keep_ids,
                        position_ids=positions)

    def default_exit_layers(self) -> list[int]:
        return default_exit_layers(self.lm)

    def hf_generate(self, pixel_values, input_ids, attention_mask=None, **kwargs):
        if self._generate_inputs is not None:
            kwargs = self._generate_inputs(self.model, input_ids, kwargs)
        return self.model.generate(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs
        )


class ImageTextProcessor:
    """Images + prompts -> a model's inputs, for families whose transformers processor cannot be built without
    torchvision (Qwen2-VL's and LLaVA-OneVision's hold a video processor, which needs it). It does the one thing those
    processors add to the image processor and the tokenizer: each image placeholder becomes as many as the image has
    features (`tokens_per_image`, the family's own count). Expanded after tokenisation, on ids, so any tokenizer
    works (a word-level one included)."""

    def __init__(self, image_processor, tokenizer, image_token_id: int, tokens_per_image, image_prompt,
                 token_types: bool = False):
        self.image_processor = image_processor  # the family's PIL image processor
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self._tokens_per_image = tokens_per_image  # (image_processor, its outputs) -> placeholders per image
        self._image_prompt = image_prompt  # (tokenizer, image_token, prompt) -> the text of one image + prompt
        self.token_types = token_types  # also return `mm_token_type_ids` (1 at image placeholders), as Qwen2-VL's

    def image_prompt(self, prompt: str) -> str:
        return self._image_prompt(self.tokenizer, self.image_token, prompt)

    def __call__(self, images=None, text=None, padding: bool = True, return_tensors: str = "pt", **kwargs) -> dict:
        out = {}
        counts: list[int] = []
        if images is not None:
            out.update(self.image_processor(images=images, return_tensors="pt"))
            counts = self._tokens_per_image(self.image_processor, out)
        if text is None:
            return out
        texts = [text] if isinstance(text, str) else list(text)
        rows, images_left = [], iter(counts)
        for ids in self.tokenizer(texts, **kwargs)["input_ids"]:
            row = []
            for t in ids:
                if t != self.image_token_id:
                    row.append(t)
                    continue
                n = next(images_left, None)
                if n is None:
                    raise FreeVLMError("the prompts hold more image placeholders than there are images")
                row.extend([t] * n)
            rows.append(row)
        if next(images_left, None) is not None:
            raise FreeVLMError("more images than image placeholders in the prompts")
        width = max(len(r) for r in rows)
        pad, left = self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left"
        ids = [[pad] * (width - len(r)) + r if left else r + [pad] * (width - len(r)) for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r)) for r in rows]
        out["input_ids"] = torch.tensor(ids, dtype=torch.long)
        out["attention_mask"] = torch.tensor(mask, dtype=torch.long)
        if self.token_types:
            out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).int()
        return out

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


# --- checkpoint folders -------------------------------------------------------------------------------------------

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # legacy; loaded, but not pre-checked
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
FAMILY_NAMES = {"blip-2": "BLIP-2", "instructblip": "InstructBLIP", "llava": "LLaVA", "qwen2_vl": "Qwen2-VL",
                "qwen2_5_vl": "Qwen2.5-VL", "llava_onevision": "LLaVA-OneVision", "idefics3": "Idefics3/SmolVLM"}
SAME_WEIGHTS = {"smolvlm": "idefics3"}  # model types whose weights have the same names (SmolVLM copies Idefics3)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def weight_keys(folder: Path) -> list[str] | None:
    """The tensor names of a folder's safetensors weights (one file or shards), read from the headers only, after
    checking each file is whole; None for legacy PyTorch weights. No weights at all is an error."""
    from safetensors import SafetensorError, safe_open

    if (folder / SAFETENSORS_INDEX).is_file():
        index_file = folder / SAFETENSORS_INDEX
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise FreeVLMError(f"corrupt weights index {index_file}: {_one_line(err)}") from None
    elif (folder / SAFETENSORS).is_file():
        files = [SAFETENSORS]
    elif any((folder / name).is_file() for name in TORCH_WEIGHTS):
        return None
    else:
        raise FreeVLMError(f"no model weights in {folder} (expected {SAFETENSORS} or {SAFETENSORS_INDEX})")
    keys: list[str] = []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FreeVLMError(f"weights file missing: {path} (listed in {SAFETENSORS_INDEX})")
        try:
            # The header must list tensors that cover the file exactly, so a truncated or 0-byte file fails here.
            with safe_open(str(path), "pt") as f:
                keys.extend(f.keys())
        except (SafetensorError, OSError) as err:
            raise FreeVLMError(f"corrupt or truncated weights file {path}: {_one_line(err)}") from None
    return keys


def family_of_keys(keys: Iterable[str]) -> str | None:
    """The model_type whose weights these are, from parts only that family has (None: none of freevlm's)."""
    keys = list(keys)
    if any("visual.merger." in k for k in keys):  # Qwen2.5-VL's vision blocks have a gated (SwiGLU) MLP
        return "qwen2_5_vl" if any(".mlp.gate_proj." in k and "visual." in k for k in keys) else "qwen2_vl"
    if any(k.endswith("image_newline") for k in keys):  # anyres: a learned newline after each row of patches
        return "llava_onevision"
    if any("multi_modal_projector." in k for k in keys):
        return "llava"
    if any(k.endswith("qformer.embeddings.word_embeddings.weight") for k in keys):
        return "instructblip"  # InstructBLIP's Q-Former reads the instruction, so it has word embeddings
    if any(k.endswith("query_tokens") for k in keys):
        return "blip-2"
    if any(".connector.modality_projection." in k for k in keys):
        return "idefics3"  # or SmolVLM: the same weights
    return None


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _has_image_processor(folder: Path) -> bool:
    if (folder / "preprocessor_config.json").is_file():
        return True
    config = folder / "processor_config.json"  # transformers 5 nests the image processor's config in it
    try:
        return config.is_file() and "image_processor" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FreeVLMError(f"corrupt {config}: {_one_line(err)}") from None


def check_checkpoint_folder(folder: str | Path, model_type: str) -> None:
    """Everything a load needs is there and consistent, checked from the files before any weight is read."""
    folder = Path(folder)
    keys = weight_keys(folder)
    if keys is not None:
        found = family_of_keys(keys)
        if found != SAME_WEIGHTS.get(model_type, model_type):
            what = f"a {FAMILY_NAMES[found]} model's" if found else "not those of a model freevlm supports"
            raise FreeVLMError(f"{folder / 'config.json'} says model_type {model_type!r} but the weights in {folder} "
                               f"are {what}")
    if not _has_tokenizer(folder):
        raise FreeVLMError(f"no tokenizer in {folder} (expected tokenizer.json or tokenizer_config.json); save the "
                           "tokenizer (or processor) with the model")
    if not _has_image_processor(folder):
        raise FreeVLMError(f"no image processor config in {folder} (expected preprocessor_config.json or "
                           "processor_config.json); save the processor with the model")
    if model_type == "instructblip" and not _has_tokenizer(folder / "qformer_tokenizer"):
        raise FreeVLMError(f"no Q-Former tokenizer in {folder / 'qformer_tokenizer'}; InstructBLIP needs both "
                           "tokenizers (save the InstructBlipProcessor with the model)")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports from transformers while loading: freevlm checks the load itself and says
    what is wrong in one line (the CLI promises one line per problem)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


_STACK = re.compile(r"^(.*\.(?:layers|layer|block|h))\.(\d+)\.")


def _stacks(keys: Iterable[str]) -> dict[str, set[int]]:
    """Layer stacks (e.g. "language_model.model.decoder.layers") and the layer indices the keys hold in each."""
    out: dict[str, set[int]] = {}
    for k in keys:
        m = _STACK.match(k)
        if m:
            out.setdefault(m.group(1), set()).add(int(m.group(2)))
    return out


def loading_problem(model, info: dict) -> str | None:
    """What is wrong with a load, from transformers' loading info (None: every tensor loaded, none left over)."""
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(info.get("mismatched_keys", ()))
    have = _stacks(model.state_dict())
    for prefix, extra in _stacks(unexpected).items():
        if prefix in have and min(extra) >= len(have[prefix]):
            return (f"config.json gives {prefix} {len(have[prefix])} layers but the weights hold {max(extra) + 1}; "
                    "freevlm does not run a truncated model (was config.json edited?)")
    for prefix, lacking in _stacks(missing).items():
        n = len(have.get(prefix, ()))
        if lacking == set(range(min(lacking), n)):
            return (f"config.json gives {prefix} {n} layers but the weights hold only {min(lacking)}; the rest would "
                    "be left random (was config.json edited?)")
    if mismatched:
        key, ckpt, model_shape = mismatched[0]
        return (f"the weights do not fit config.json: {key} is {list(ckpt)} in the weights but {list(model_shape)} "
                f"by the config ({len(mismatched)} tensors differ; was config.json edited?)")
    if unexpected:
        return (f"{len(unexpected)} tensors of the weights have no place in the model config.json describes (e.g. "
                f"{unexpected[0]}); freevlm does not drop weights silently")
    if missing:
        return (f"the weights lack {len(missing)} tensors of the model config.json describes (e.g. {missing[0]}); "
                "they would be left random")
    return None


def load_model(cls, path: str | Path, dtype: torch.dtype | None = None):
    """`cls.from_pretrained(path)`, strictly: any mismatch between the weights and config.json is refused."""
    from safetensors import SafetensorError

    with quiet_transformers():
        try:
            # ignore_mismatched_sizes only so that transformers reports every mismatch instead of raising with a
            # pointer to a log table; the model is refused below if there is any.
            model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                              ignore_mismatched_sizes=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as err:
            raise FreeVLMError(f"cannot load the model in {path}: {_one_line(err)[:400]}") from None
    problem = loading_problem(model, info)
    if problem:
        raise FreeVLMError(f"{path}: {problem}")
    return model


def load_part(loader, path: str | Path, what: str):
    """A tokenizer or image processor from `path`, with a one-line error."""
    with quiet_transformers():
        try:
            return loader(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FreeVLMError(f"cannot load the {what} in {path}: {_one_line(err)[:400]}") from None


def build_processor(cls, path: str | Path, components: list, **defaults):
    """`cls(*components, **fields)` with every field of the folder's processor_config.json (num_query_tokens,
    patch_size, vision_feature_select_strategy, num_additional_image_tokens, image_token, chat template, ...);
    `defaults` (from the model's config) fill only the fields the file does not have.

    Uses transformers' own reading (`get_processor_dict`) and construction (`from_args_and_dict`), so nothing the
    checkpoint's processor was saved with is dropped: rebuilding a LlavaProcessor from the model config alone loses
    `num_additional_image_tokens`, and a CLS-token checkpoint then gets one image placeholder too few.
    """
    with quiet_transformers():
        try:
            fields, _ = cls.get_processor_dict(path)
        except (OSError, ValueError, json.JSONDecodeError) as err:
            raise FreeVLMError(f"cannot read the processor config in {path}: {_one_line(err)[:400]}") from None
    merged = {**{k: v for k, v in defaults.items() if v is not None}, **fields}
    try:
        return cls.from_args_and_dict(components, merged)
    except (ValueError, TypeError) as err:
        raise FreeVLMError(f"bad processor config in {path}: {_one_line(err)[:400]}") from None
