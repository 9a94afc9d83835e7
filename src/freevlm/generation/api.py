"""The Python API: a backbone plus its exits, and `generate(images, prompts)`.

    >>> vlm = EarlyExitVLM.from_pretrained("path/to/blip2-opt-2.7b", exits="runs/free/exits")
    >>> out = vlm.generate(images, ["a photo of"] * len(images), threshold=0.8, num_beams=5)
    >>> out.texts, out.sequences, out.exit_layers   # per-token exit layers (N = the final layer)
    >>> out = vlm.generate(images, prompts, mode="speculative", draft_layer=3)   # lossless: full depth's tokens
    >>> out.speculative.acceptance_rate, out.speculative.tokens_per_verification

Three modes: `early_exit` (FREE: tokens leave at the first confident exit; lossy), `full` (every layer; the
reference) and `speculative` (the exit at `draft_layer` drafts up to `draft_length` tokens, the remaining layers
verify them in one pass; the output is full depth's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from freevlm.backbones import load_backbone
from freevlm.data.images import load_image
from freevlm.errors import FreeVLMError
from freevlm.exits import ExitStack, load_exits
from freevlm.generation.criteria import Gated, make_criterion
from freevlm.generation.decode import DecodeSettings, GenerationResult, generate_from_inputs
from freevlm.generation.kv import SkipPolicy
from freevlm.generation.session import DecodeSession, RowBatch
from freevlm.generation.speculative import DraftSettings
from freevlm.generation.vocab import head_subset, load_token_ranking
from freevlm.train.batches import encode_prompts

MODES = ("early_exit", "full", "speculative")


@dataclass
class DecodeOptions:
    mode: str = "early_exit"  # early_exit | full | speculative (see the module docstring)
    criterion: str = "confidence"  # early exit: confidence | entropy | patience | similarity
    threshold: float = 0.8  # early exit: alpha for confidence (the paper's default), or the criterion's one setting
    kv_policy: str = "propagate"  # early exit: what skipped layers get: propagate | copy | catch_up (generation/kv.py)
    propagate_from: str = "hidden"  # propagate only: the exited backbone state ("hidden") or the exit's output
    draft_layer: int | None = None  # speculative: the drafting exit's layer (None: the first exit)
    draft_length: int = 8  # speculative: drafts per round at most
    draft_threshold: float | None = None  # speculative: stop drafting once the exit's confidence falls below this
    draft_adapt: bool = False  # speculative: each row's draft length follows its acceptance so far (<= draft_length)
    head_subset: int | None = None  # early exit checks and speculative drafts score the K most frequent tokens only
    token_ranking: str | None = None  # folder (or file) of the ranking head_subset takes from (default: the VLM's)
    exit_layers: list[int] | None = None  # early exit: the exits checked (a plan's subset; None: every exit)
    gates: str | None = None  # early exit: a folder of exit gates (from `freevlm plan`); checks run where they open
    gate_threshold: float = 0.5  # early exit: a gate opens where its probability exceeds this
    max_new_tokens: int = 30
    num_beams: int = 1  # Table 10 uses 5
    max_cache_gb: float | None = None  # the static KV cache's memory budget (None: what the device has free)

    def __post_init__(self):
        if self.mode not in MODES:
            raise FreeVLMError(f"unknown decoding mode {self.mode!r}; expected one of {', '.join(MODES)}")

    @property
    def uses_exits(self) -> bool:
        return self.mode != "full"


class EarlyExitVLM:
    def __init__(self, backbone, exits: ExitStack | None = None, token_ranking: torch.Tensor | None = None,
                 draft_exits: ExitStack | None = None):
        self.backbone = backbone
        self.exits = exits  # FREE's exits: early exit checks them (and speculative mode drafts with them, by default)
        self.token_ranking = token_ranking  # (V,) token ids, most frequent first: what `head_subset` takes from
        # speculative mode drafts with these when given: an exit trained for drafting (e.g. distilled on the
        # backbone's own outputs, `train-exits --variant kd`), whose argmax agrees with the final layer more often
        self.draft_exits = draft_exits

    @classmethod
    def from_pretrained(cls, backbone: str | Path, exits: str | Path | None = None, *, device: str | None = None,
                        dtype: torch.dtype | None = None, draft_exits: str | Path | None = None) -> EarlyExitVLM:
        bb = load_backbone(backbone, dtype=dtype, device=device)
        stack = None if exits is None else load_exits(exits, bb.lm)
        drafting = None if draft_exits is None else load_exits(draft_exits, bb.lm)
        ranking = None
        for folder in (exits, draft_exits):  # the ranking saved beside the exits, else beside the drafting exits
            if ranking is None and folder is not None:
                ranking = load_token_ranking(folder, bb.lm.vocab_size)
        return cls(bb, stack, ranking, drafting)

    @property
    def drafting_exits(self) -> ExitStack | None:
        """The exits speculative mode drafts with: `draft_exits` when given, else `exits`."""
        return self.draft_exits if self.draft_exits is not None else self.exits

    def load_gates(self, folder: str | Path):
        """Exit gates from a folder (cached per folder): refused if they were trained for other exits."""
        from freevlm.planning.gates import exits_fingerprint, load_gates

        key = str(Path(folder).resolve())
        cache = self.__dict__.setdefault("_gates", {})
        if key not in cache:
            fingerprint = exits_fingerprint(self.exits) if self.exits is not None else None
            gates, _ = load_gates(folder, self.backbone.lm.hidden_size, fingerprint)
            unknown = [x for x in gates.layers if self.exits is None or x not in self.exits.layers]
            if unknown:
                raise FreeVLMError(f"gates in {folder} are for exits {gates.layers}, not all loaded "
                                   f"({self.exits.layers if self.exits is not None else 'no exits'})")
            cache[key] = gates.to(self.device)
        return cache[key]

    def _ranking(self, where: str | None) -> torch.Tensor | None:
        """The token ranking of `where` (a plan's; cached per path), else the VLM's own."""
        if where is None:
            return self.token_ranking
        path = Path(where)
        folder = path if path.is_dir() else path.parent
        cache = self.__dict__.setdefault("_rankings", {})
        key = str(folder.resolve())
        if key not in cache:
            ranking = load_token_ranking(folder, self.backbone.lm.vocab_size)
            if ranking is None:
                raise FreeVLMError(f"no token ranking in {folder}")
            cache[key] = ranking
        return cache[key]

    def _subset(self, ranking, size: int, eos: list[int], vocab_size: int):
        """The head subset of a setting, one object per (ranking, size, EOS ids): the decode session keys its graphs
        on the subset they score, so an equal setting must find the same one."""
        cache = self.__dict__.setdefault("_subsets", {})
        key = (id(ranking), size, tuple(eos), vocab_size)
        held = cache.get(key)
        if held is None or held[0] is not ranking:
            held = cache[key] = (ranking, head_subset(ranking, size, eos, vocab_size))
        return held[1]

    @property
    def session(self) -> DecodeSession:
        """The decode session `generate` decodes in (created on first use): KV caches and static steps (CUDA graphs
        on a GPU) kept per shape and signature across calls (`session.py`); `vlm.session.clear()` frees them."""
        session = self.__dict__.get("_session")
        if session is None:
            session = self.__dict__["_session"] = DecodeSession()
        return session

    @property
    def device(self) -> torch.device:
        return next(self.backbone.model.parameters()).device

    @torch.no_grad()
    def generate(self, images, prompts: list[str], options: DecodeOptions | None = None, *, pixel_noise: float = 0.0,
                 noise_seed: int = 0, tokenizer_decode: bool = True, lm_inputs=None, **overrides) -> GenerationResult:
        """Generate for a batch of images (PIL images or paths) and prompts; `overrides` set DecodeOptions fields
        (`use_exits=False` is short for `mode="full"`) or are transformers-named generation settings
        (length_penalty, do_sample, top_p, num_return_sequences, ...). `lm_inputs`: what `prepare` made of the images
        and prompts already (they are then not read)."""
        opts = options or DecodeOptions()
        fields = set(DecodeOptions.__dataclass_fields__)
        if overrides.pop("use_exits", True) is False:
            overrides["mode"] = "full"
        opts = DecodeOptions(**{**opts.__dict__, **{k: v for k, v in overrides.items() if k in fields}})
        hf_kwargs = {k: v for k, v in overrides.items() if k not in fields}
        if lm_inputs is None:
            lm_inputs = self.prepare(images, prompts, pixel_noise=pixel_noise, noise_seed=noise_seed)
        criterion, draft, exits, subset = self._decoding(opts, hf_kwargs)
        tokenizer = self.backbone.processor.tokenizer if tokenizer_decode else None
        return generate_from_inputs(
            self.backbone.lm, exits, lm_inputs, criterion=criterion, draft=draft, check_layers=opts.exit_layers,
            head_subset=subset,
            policy=SkipPolicy(opts.kv_policy, opts.propagate_from), tokenizer=tokenizer,
            generation_config=self.backbone.model.generation_config, max_new_tokens=opts.max_new_tokens,
            num_beams=opts.num_beams, max_cache_gb=opts.max_cache_gb, session=self.session, **hf_kwargs,
        )

    @torch.no_grad()
    def prepare(self, images, prompts: list[str], *, pixel_noise: float = 0.0, noise_seed: int = 0):
        """The LM inputs of images (PIL images or paths) and prompts, as `generate` decodes them: processor, vision
        encoder, projection (`VLMBackbone.prepare`)."""
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        enc = encode_prompts(self.backbone, pil, prompts, padding_side="left")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        pixels = enc.pop("pixel_values").to(self.backbone.model.dtype)
        if pixel_noise:
            g = torch.Generator(device="cpu").manual_seed(noise_seed)
            noise = pixel_noise * torch.randn(pixels.shape, generator=g).to(pixels)
            if pixels.dim() == 5:  # Idefics3/SmolVLM tiles: the all-zero padding tiles stay padding
                noise = noise * pixels.flatten(2).ne(0).any(-1)[..., None, None, None]
            pixels = pixels + noise
        ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
        return self.backbone.prepare(pixels, ids, mask, **enc)

    def rows(self, options: DecodeOptions, *, rows: int, columns: int, session: DecodeSession | None = None,
             static: bool | None = None) -> RowBatch:
        """A `RowBatch` (continuous batching: prompts from `prepare` admitted and rows released between steps) that
        decodes greedily as `generate` does with `options`: full depth, or early exit under the propagate / copy
        policies; decoder-only LMs (`DecodeSession.rows` refuses the rest). In `session` (default: this VLM's)."""
        if options.mode == "speculative":
            raise FreeVLMError("speculative rounds are not decoded in a row batch: use generate")
        criterion, _, exits, subset = self._decoding(options, {})
        return (session if session is not None else self.session).rows(  # an empty session is falsy (len 0)
            self.backbone.lm, exits, rows=rows, columns=columns, criterion=criterion,
            policy=SkipPolicy(options.kv_policy, options.propagate_from), check_layers=options.exit_layers,
            head_subset=subset, static=static, generation_config=self.backbone.model.generation_config)

    def _decoding(self, opts: DecodeOptions, hf_kwargs: dict):
        """(criterion, draft settings, exits, head subset) of a mode: what `generate` and `rows` decode with."""
        criterion = draft = None
        exits = self.exits if opts.uses_exits else None
        if opts.mode == "speculative":
            exits = self.drafting_exits
            if exits is None:
                raise FreeVLMError("speculative mode drafts with an exit: load exits (--exits or --draft-exits) first")
            layer = opts.draft_layer if opts.draft_layer is not None else exits.layers[0]
            draft = DraftSettings(layer, opts.draft_length, opts.draft_threshold, opts.draft_adapt)
        elif exits is not None:
            criterion = make_criterion(opts.criterion, opts.threshold)
            if opts.gates is not None:
                criterion = Gated(criterion, self.load_gates(opts.gates), opts.gate_threshold)
        subset = None
        if opts.head_subset is not None and opts.uses_exits:
            lm, config = self.backbone.lm, self.backbone.model.generation_config
            eos = DecodeSettings.from_kwargs(config, lm.config, **hf_kwargs).eos_token_id
            subset = self._subset(self._ranking(opts.token_ranking), opts.head_subset, eos, lm.vocab_size)
        return criterion, draft, exits, subset
