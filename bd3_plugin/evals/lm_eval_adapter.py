"""lm-eval model type `bd3`: likelihoods are diffusion likelihood bounds, generation is the block sampler.

    lm_eval --model bd3 --model_args pretrained=PATH_OR_HUB_ID,estimator=auto,passes=16 --tasks ...

The only module of bd3_plugin that imports lm_eval. Tokenisation is lm-eval's `TemplateLM` (that of the
`hf` model), so scores line up with autoregressive baselines.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass

import lm_eval.models  # lm-eval's own model types in its registry before "bd3" (see BD3EvalLM)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.core.config import BD3Config
from bd3_plugin.likelihood.estimators import Estimator, check_fits, choose_estimator
from bd3_plugin.sampling.config import SamplerConfig
from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.likelihood.scoring import content_seed, eval_interval, greedy_windows, score_windows, windows
from bd3_plugin.likelihood.zeroshot import PROTOCOLS, ScoredLoglikelihood, rolling_windows

log = logging.getLogger(__name__)
# Generation arguments some tasks pass with values that ask for nothing beyond plain sampling.
_NEUTRAL_GEN_KWARGS = {("num_beams", 1), ("repetition_penalty", 1.0), ("min_p", 0.0), ("min_p", 0), ("typical_p", 1.0)}
_CHUNK = 64  # requests scored between two writes to lm-eval's cache


class BD3ArgsError(ValueError):
    pass


@dataclass(frozen=True)
class AdapterArgs:
    """--model_args of `bd3`, checked on construction; unknown keys are errors."""

    pretrained: str
    block_size: int | None = None
    estimator: str | None = None  # auto, exact, stratified or mc (default: estimators.DEFAULT)
    passes: int | None = None  # the most 2L passes per request (default: estimators.DEFAULT)
    mc_samples: int | None = None  # = estimator=mc,passes=K
    seed: int = 1234
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    algorithm: str = "first_hitting"
    temperature: float = 0.0  # generation, when the task does not set it
    top_p: float = 1.0
    top_k: int = 0
    steps: int | None = None
    threshold: float = 0.9
    max_gen_toks: int = 256
    greedy_check: bool = True  # compute is_greedy (one extra pass per request)
    protocol: str = "auto"  # loglikelihood_rolling: rows | documents | auto (see zeroshot.py)

    def __post_init__(self) -> None:
        for name in ("mc_samples", "passes", "batch_size", "max_gen_toks"):
            value = getattr(self, name)
            if value is None and name in ("mc_samples", "passes"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BD3ArgsError(f"bd3 model_args: {name} must be a positive integer, got {value!r}")
        try:
            self.scorer
        except ValueError as err:
            raise BD3ArgsError(f"bd3 model_args: {err}") from None
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise BD3ArgsError(f"bd3 model_args: dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.protocol not in PROTOCOLS:
            raise BD3ArgsError(f"bd3 model_args: protocol must be one of {', '.join(PROTOCOLS)}, "
                               f"got {self.protocol!r}")

    @property
    def scorer(self) -> Estimator:
        return choose_estimator(self.estimator, self.passes, self.mc_samples)

    @classmethod
    def parse(cls, kwargs: dict) -> "AdapterArgs":
        import dataclasses

        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = dict(kwargs)
        kwargs.pop("max_batch_size", None)  # lm-eval passes it; batches here have a fixed size
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise BD3ArgsError(f"bd3 model_args: unknown key(s) {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(fields))}")
        if "pretrained" not in kwargs:
            raise BD3ArgsError("bd3 model_args: pretrained=PATH_OR_HUB_ID is required")
        if str(kwargs.get("batch_size", "")).startswith("auto"):
            kwargs.pop("batch_size")  # a fixed default; the model is small next to its activations
        for key in ("batch_size", "mc_samples", "passes", "max_gen_toks", "block_size", "steps", "seed", "top_k"):
            if isinstance(kwargs.get(key), str) and kwargs[key].isdigit():
                kwargs[key] = int(kwargs[key])
        kwargs["pretrained"] = str(kwargs["pretrained"])
        device = str(kwargs.get("device", "cpu"))
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line passes cuda by default; like its hf model, fall back to the CPU.
            log.warning("bd3: %s requested but CUDA is not available; using the CPU", device)
            kwargs["device"] = "cpu"
        return cls(**kwargs)


def checked_args(kwargs: dict) -> AdapterArgs:
    """The model args as parsed for the model, with the sampler settings checked: every check that needs
    no checkpoint (a sweep runs them before it starts any worker)."""
    args = AdapterArgs.parse(kwargs)
    SamplerConfig(algorithm=args.algorithm, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, steps=args.steps, threshold=args.threshold)  # validates the sampler settings
    return args


def scoring_config(args: AdapterArgs, config: BD3Config) -> BD3Config:
    """The checkpoint's config at the block size scored with (`block_size=`, which must divide the model
    length); refuses an `exact` estimator whose passes do not cover a block. Needs only config.json."""
    if args.block_size is not None and args.block_size != config.block_size:
        config = config.replace(block_size=args.block_size)  # validates divisibility
    check_fits(args.scorer, config.block_size, *eval_interval(config.block_size))
    return config


def _fail(err: Exception):
    """Under the lm_eval command line, a bad argument is one line on stderr, not a traceback."""
    if os.path.basename(sys.argv[0]) in ("lm_eval", "lm-eval"):
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    raise err


# lm-eval fills its registry with its own model types (lm_eval.models) only when `get_model` finds it empty:
# registering "bd3" into an empty registry would hide `hf`, `local-completions`, ... from this process.
@register_model("bd3")
class BD3EvalLM(TemplateLM):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        try:
            args = checked_args(kwargs)
            self.ckpt = load_checkpoint(args.pretrained, device=args.device, dtype=getattr(torch, args.dtype))
            cfg = scoring_config(args, self.ckpt.config)
            if cfg.block_size != self.ckpt.config.block_size:
                warnings.warn(f"scoring with block_size {args.block_size}; the checkpoint was trained with "
                              f"{self.ckpt.config.block_size}", stacklevel=2)
                self.ckpt.model.config = cfg
        except (ValueError, OSError) as err:
            _fail(err)
        self.args = args
        self.model = self.ckpt.model
        self.tokenizer = self.ckpt.tokenizer
        self._truncated = 0

    # ---- TemplateLM plumbing ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.bos_token_id

    @property
    def max_length(self) -> int:
        return self.model.config.model_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.ckpt.path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ---- likelihoods --------------------------------------------------------------------------
    def _score(self, wins, n_requests: int, seeds: list[int] | None = None) -> tuple[list[float], list[bool]]:
        """Per-request log-likelihood lower bounds (−NELBO, the mean over MC samples for `mc`) and greedy
        flags. `seeds`: one per window (default: a hash of the window's tokens)."""
        totals = score_windows(self.model, wins, estimator=self.args.scorer, seed=self.args.seed, seeds=seeds,
                               batch_size=self.args.batch_size)
        greedy = (greedy_windows(self.model, wins, batch_size=self.args.batch_size) if self.args.greedy_check
                  else [False] * len(wins))
        ll = [0.0] * n_requests
        ok = [True] * n_requests
        for w, total, g in zip(wins, totals.mean(dim=1).tolist(), greedy):
            ll[w.doc] -= total
            ok[w.doc] &= g
        return ll, ok

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        for (ctx, cont), _, cont_ids in requests:
            if not cont_ids:
                _fail(ValueError(f"bd3: empty continuation after context {ctx[-40:]!r}: there is nothing to score"))
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="bd3 loglikelihood", disable=disable_tqdm)
        for start in range(0, len(order), _CHUNK):
            chunk = order[start : start + _CHUNK]
            wins = []
            seeds = []
            for j, i in enumerate(chunk):
                _, ctx_ids, cont_ids = requests[i]
                request_wins = windows(ctx_ids + cont_ids, len(ctx_ids), self.max_length, doc=j)
                if request_wins[0].first < len(ctx_ids):  # the first window starts inside the context
                    self._note_truncation()
                wins += request_wins
                # Common random numbers: the continuations of one context share their draws (seeded from
                # the context the first window keeps), so choices differ by the model, not by the noise.
                kept = tuple(request_wins[0].ids[: request_wins[0].first])
                seeds += [content_seed(self.args.seed, "context", kept, k) for k in range(len(request_wins))]
            ll, greedy = self._score(wins, len(chunk), seeds)
            for j, i in enumerate(chunk):
                results[i] = (ll[j], greedy[j])
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(chunk))
        bar.close()
        return results

    def _note_truncation(self) -> None:
        if self._truncated == 0:
            warnings.warn(f"bd3: a context does not fit beside its continuation in model_length "
                          f"{self.max_length}: it is cut from the left", stacklevel=2)
        self._truncated += 1

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each result carries the number of tokens it scored (`ScoredLoglikelihood.tokens`)."""
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id
        results = []
        for start in tqdm(range(0, len(requests), _CHUNK), desc="bd3 rolling", disable=disable_tqdm):
            chunk = requests[start : start + _CHUNK]
            wins = []
            tokens = []
            for j, req in enumerate(chunk):
                try:
                    w, n = rolling_windows(req.args[0], self.args.protocol, self.tok_encode, self.max_length,
                                           bos, self.eot_token_id, j)
                except ValueError as err:
                    _fail(err)
                wins += w
                tokens.append(n)
            ll, _ = self._score(wins, len(chunk))
            for req, value, n in zip(chunk, ll, tokens):
                results.append(ScoredLoglikelihood(value, n))
                self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), results[-1])
        return results

    # ---- generation ---------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        try:  # every group's settings are checked before any generation starts
            settings = [self._sampler_config(requests[m[0]].args[1]) for m in groups.values()]
        except ValueError as err:
            _fail(err)
        bar = tqdm(total=len(requests), desc="bd3 generate", disable=disable_tqdm)
        for members, (config, until) in zip(groups.values(), settings):
            members.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self.args.batch_size):
                batch = members[start : start + self.args.batch_size]
                # Documents start after the end-of-text token in training, so prompts do too.
                prompts = [[self.eot_token_id] + self.tok_encode(requests[i].args[0]) for i in batch]
                seeds = [content_seed(self.args.seed, (requests[i].args[0],)) for i in batch]
                out = generate(self.model, prompts, config, seeded_generators(seeds), eos_id=self.eot_token_id)
                for i, g in zip(batch, out.generations):
                    results[i] = _cut(self.tok_decode(g.tokens), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(batch))
        bar.close()
        return results

    def _sampler_config(self, gen_kwargs: dict) -> tuple[SamplerConfig, list[str]]:
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_toks = int(kw.pop("max_gen_toks", self.args.max_gen_toks))
        do_sample = kw.pop("do_sample", None)
        temperature = float(kw.pop("temperature", self.args.temperature))
        if do_sample is False:
            temperature = 0.0
        top_p = float(kw.pop("top_p", self.args.top_p))
        top_k = kw.pop("top_k", self.args.top_k)
        top_k = 0 if top_k is None else top_k  # Hugging Face's None: no top-k filter
        neutral = {k for k, v in kw.items() if (k, v) in _NEUTRAL_GEN_KWARGS}
        refused = sorted(set(kw) - neutral)
        if refused:
            raise BD3ArgsError(f"bd3: generation argument(s) {', '.join(refused)} are not supported by the block "
                               "sampler (supported: until, max_gen_toks, do_sample, temperature, top_p, top_k)")
        return SamplerConfig(algorithm=self.args.algorithm, max_new_tokens=max_toks, temperature=temperature,
                             top_p=top_p, top_k=top_k, steps=self.args.steps, threshold=self.args.threshold), until


def _cut(text: str, until: list[str]) -> str:
    """Truncate at the first stop string."""
    cuts = [text.find(s) for s in until if s and s in text]
    return text[: min(cuts)] if cuts else text
