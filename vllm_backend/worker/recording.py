"""Trajectories and reveal-time logprobs inside the BD3 runner (worker side).

A request that asks for its trajectory (`vllm_xargs.bd3_trajectory`, set by `traces.py`) or for `logprobs`
has its block steps recorded: the runner passes a recorder to `bd3_plugin.sampling.denoise.denoise_block` (one per
group of rows that share sampler settings, when any of them asks), and `RunnerTraces` keeps one
`bd3_plugin.sampling.trajectory.TrajectoryBuilder` per traced request, beside the request's generator. Nothing is
recorded for a request that asks for neither; recording draws nothing, so the tokens are the same.

Logprobs are the reveal-time values of the record: under `--logprobs-mode processed_logprobs` the
distribution the sampler drew from (temperature, top-k, nucleus, SUBS; a point mass at temperature 0), under
`raw_logprobs` (vLLM's default) the raw model at temperature 1 with SUBS. The top alternatives come from the
same distribution at the slot's reveal pass, and the rank is vLLM's (tokens at least as probable, itself
included).

This module is imported by the runner only (worker processes).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from vllm.v1.outputs import LogprobsTensors

from bd3_plugin.sampling.trajectory import BlockRecorder, TrajectoryBuilder, raw_log_probs

from vllm_backend.worker.params import TRACE_KEY

KEEP_FINISHED = 1024  # finished, unfetched trajectories kept per worker (oldest dropped first)


class TopLogprobsRecorder(BlockRecorder):
    """A `BlockRecorder` that also keeps, per revealed slot, the k most probable tokens of the distribution
    it was revealed from and the revealed token's rank in it."""

    def __init__(self, config, mask_id: int, k: int, raw: bool) -> None:
        super().__init__(config, mask_id)
        self.k = k
        self.raw = raw

    def begin(self, block: torch.Tensor) -> None:
        super().begin(block)
        b, size = block.shape
        self.top_ids = torch.zeros(b, size, self.k, dtype=torch.long, device=block.device)
        self.top_logprobs = torch.full((b, size, self.k), -float("inf"), dtype=torch.float64, device=block.device)
        self.rank = torch.ones(b, size, dtype=torch.long, device=block.device)

    def step(self, logits, masked, result, passes, grid, t, s) -> None:
        super().step(logits, masked, result, passes, grid, t, s)
        reveal = result.reveal
        tok = result.tokens[reveal][:, None]  # (n, 1)
        if self.raw:
            dist = raw_log_probs(logits[reveal], self.mask_id)  # (n, V)
        elif self.config.temperature == 0:  # greedy: a point mass on the revealed (argmax) token
            dist = torch.full((len(tok), logits.shape[-1]), -float("inf"), dtype=torch.float64, device=logits.device)
            dist.scatter_(-1, tok, 0.0)
        else:
            dist = result.probs[reveal[result.scored]].log()  # the sampler's own distributions: no second softmax
        self.rank[reveal] = (dist >= dist.gather(-1, tok)).sum(dim=-1)
        if self.k:
            values, ids = dist.topk(min(self.k, dist.shape[-1]), dim=-1)
            self.top_logprobs[reveal, : values.shape[-1]] = values
            self.top_ids[reveal, : ids.shape[-1]] = ids


@dataclass
class _Entry:
    """One traced request: its builder and the passes it took part in."""

    key: str
    builder: TrajectoryBuilder | None = None  # made at the request's first block step
    steps: int = 0  # denoising passes before the next block
    commits: int = 0  # passes that only stored clean K/V of this request (prefill chunks); a block's clean
    # K/V is stored by the next block step's first pass, which is one of its denoising passes


@dataclass
class _StepLogprobs:
    """A request's logprob rows for the tokens its block step returns."""

    logprob: torch.Tensor  # (m,) float64, the returned tokens' own
    top_ids: torch.Tensor  # (m, k)
    top_logprobs: torch.Tensor  # (m, k)
    rank: torch.Tensor  # (m,)


@dataclass
class RunnerTraces:
    """Per-runner trace state. `mode` is the engine's logprobs_mode (checked at start-up)."""

    block_size: int
    mask_id: int
    vocab_size: int
    mode: str
    live: dict[str, _Entry] = field(default_factory=dict)
    finished: OrderedDict = field(default_factory=OrderedDict)
    step_logprobs: dict[str, _StepLogprobs] = field(default_factory=dict)
    step_k: int | None = None  # the step's widest logprobs request (None: no request asks)

    # ---- which requests ask ------------------------------------------------------------------------
    @staticmethod
    def trace_key(params) -> str | None:
        key = (params.extra_args or {}).get(TRACE_KEY)
        return key if isinstance(key, str) else None

    def num_logprobs(self, params) -> int | None:
        k = params.logprobs
        return None if k is None else (self.vocab_size if k == -1 else int(k))

    # ---- the runner's calls --------------------------------------------------------------------------
    def begin_step(self, requests, step, block_rids: list[str]) -> None:
        """Before the step's denoising: count prefill passes of traced requests, find the widest k."""
        self.step_logprobs = {}
        blocks = set(block_rids)
        for rid in step.num_scheduled_tokens:
            if rid not in blocks and rid in requests:
                key = self.trace_key(requests[rid].sampling_params)
                if key is not None:
                    self.live.setdefault(rid, _Entry(key)).commits += 1
        ks = [k for k in (self.num_logprobs(requests[rid].sampling_params) for rid in block_rids) if k is not None]
        self.step_k = max(ks) if ks else None

    def recorder(self, config, requests, rids: list[str]) -> BlockRecorder | None:
        """The recorder for one group of rows denoised together, or None when none of them asks."""
        params = [requests[rid].sampling_params for rid in rids]
        if any(self.num_logprobs(p) is not None for p in params):
            return TopLogprobsRecorder(config, self.mask_id, self.step_k, self.mode == "raw_logprobs")
        if any(self.trace_key(p) is not None for p in params):
            return BlockRecorder(config, self.mask_id)
        return None

    def block_done(self, requests, rows, recorder, outcome, block: torch.Tensor, config, generators) -> None:
        """After a group's `denoise_block`: rows (req_id, first token, n_masks), the group's final
        blocks (b, L') and generators. Traced rows get the block; logprob rows keep this step's values."""
        if recorder is None:
            return
        record = recorder.finish()
        length = self.block_size  # a block row is one whole block; its placeholders are its last n_masks slots
        for j, (rid, _, n_masks) in enumerate(rows):
            params = requests[rid].sampling_params
            key = self.trace_key(params)
            if key is not None:
                entry = self.live.setdefault(rid, _Entry(key))
                if entry.builder is None:
                    entry.builder = TrajectoryBuilder(requests[rid].prompt_token_ids, self.block_size, self.mask_id,
                                                      config, generators[j].initial_seed(), params.seed is None, True)
                entry.builder.add_block(record, j, block[j], entry.steps)
                entry.steps += int(outcome.row_steps[j])
            if self.num_logprobs(params) is not None:
                first = length - n_masks  # the returned tokens: the block's placeholder slots
                values = record.logprob_raw if self.mode == "raw_logprobs" else record.logprob
                self.step_logprobs[rid] = _StepLogprobs(values[j, first:length].cpu(),
                                                        recorder.top_ids[j, first:length].cpu(),
                                                        recorder.top_logprobs[j, first:length].cpu(),
                                                        recorder.rank[j, first:length].cpu())

    def logprobs_tensors(self, req_ids: list[str], width: int, blocks: dict[str, list[int]]
                         ) -> LogprobsTensors | None:
        """The step's logprobs in the layout vLLM's spec-decode path parses: row i·width + j is request i's
        j-th returned token; column 0 the token itself, then the top k (vLLM keeps each request's own k)."""
        if self.step_k is None or not self.step_logprobs:
            return None
        k = self.step_k
        n = len(req_ids)
        ids = torch.zeros(n, width, k + 1, dtype=torch.int32)
        values = torch.full((n, width, k + 1), -float("inf"), dtype=torch.float32)
        ranks = torch.ones(n, width, dtype=torch.int64)
        for i, rid in enumerate(req_ids):
            got = self.step_logprobs.get(rid)
            if got is None or rid not in blocks:
                continue
            m = len(blocks[rid])
            ids[i, :m, 0] = torch.tensor(blocks[rid], dtype=torch.int32)
            values[i, :m, 0] = got.logprob.float()
            ids[i, :m, 1:] = got.top_ids.int()
            values[i, :m, 1:] = got.top_logprobs.float()
            ranks[i, :m] = got.rank
        return LogprobsTensors(ids.view(n * width, k + 1), values.view(n * width, k + 1), ranks.view(n * width))

    def finish(self, finished_req_ids) -> None:
        """Requests the scheduler has finished: their traces wait to be fetched, the oldest dropped first."""
        for rid in finished_req_ids:
            entry = self.live.pop(rid, None)
            if entry is not None:
                self.finished[rid] = entry
        while len(self.finished) > KEEP_FINISHED:
            self.finished.popitem(last=False)

    # ---- fetching --------------------------------------------------------------------------------------
    def take(self, wanted: list[tuple[str, list[tuple[int, str]]]]) -> list[list[dict]]:
        """For each (key, [(n_output, finish_reason) per choice]), the choices' trajectories as JSON, in
        choice order, removed from the store. vLLM names the n children of a request `f"{index}_{parent}"`
        (`v1/engine/parallel_sampling.py`); a request with one choice has one entry."""
        out = []
        for key, choices in wanted:
            found = {rid: e for store in (self.live, self.finished) for rid, e in store.items() if e.key == key}
            if len(found) != len(choices):
                raise LookupError(f"trace {key}: {len(found)} recorded choice(s) for {len(choices)} requested")
            order = sorted(found, key=lambda rid: int(rid.split("_", 1)[0])) if len(found) > 1 else list(found)
            row = []
            for rid, (n_output, finish_reason) in zip(order, choices):
                entry = self.live.pop(rid, None) or self.finished.pop(rid)
                if entry.builder is None:
                    raise LookupError(f"trace {key}: request {rid} has no decoded block")
                row.append(entry.builder.build(n_output, finish_reason, entry.steps, entry.commits).to_json())
            out.append(row)
        return out
