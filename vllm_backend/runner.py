"""BD3RunnerMixin: vLLM's V1 model runner, taught to denoise blocks. It is composed with the CPU runner
(`cpu_worker.py`) and with the GPU runner (`gpu_worker.py`); this module imports neither.

In one engine step, every request that has MASK placeholders scheduled (a block step) gets its whole block
decoded: `bd3_plugin.denoise.denoise_block` runs the request's sampler, and each of its forward passes is
one pass of vLLM's model over the step's tokens (writing the block's K/V into the paged cache); a last pass
over the clean blocks leaves their clean K/V there (the commit). Attention metadata is split at absolute
multiples of L' and made non-causal, so prefill is block-causal and a block sees the cached prefix and
itself, exactly the core's masks.
"""
from __future__ import annotations

import dataclasses
import functools
import random

import torch
from vllm.v1.outputs import SamplerOutput

from bd3_plugin.denoise import denoise_block

from .params import sampler_config
from .recording import RunnerTraces
from .resume import Resumes


def _query_positions(cm, q_lens: torch.Tensor) -> torch.Tensor:
    """Absolute position of every query token (CPU). A request's query is contiguous and ends at its
    sequence length, so the host copy of the sequence lengths gives them without reading the device."""
    n = int(q_lens.sum())
    if cm.seq_lens_cpu_upper_bound is None:
        return cm.positions[:n].cpu().long()
    ends = cm.seq_lens_cpu_upper_bound[: cm.num_reqs].long()
    first = torch.repeat_interleave(ends - q_lens, q_lens)  # (n,) position of each request's first query token
    offset = torch.arange(n) - torch.repeat_interleave(torch.cumsum(q_lens, 0) - q_lens, q_lens)
    return first + offset


def split_into_blocks(cm, block_size: int):
    """Attention metadata with each request's query cut at absolute multiples of `block_size`, every
    piece non-causal with the KV length up to its own last token: block-causal attention."""
    qsl = cm.query_start_loc_cpu.long()
    n = int(qsl[-1])
    q_lens = qsl[1:] - qsl[:-1]
    pos = _query_positions(cm, q_lens)
    req_of_token = torch.repeat_interleave(torch.arange(cm.num_reqs), q_lens)
    first = torch.zeros(n, dtype=torch.bool)
    first[qsl[:-1][q_lens > 0]] = True
    starts = (first | (pos % block_size == 0)).nonzero().flatten()
    ends = torch.cat((starts[1:], torch.tensor([n])))
    new_qsl = torch.cat((starts, torch.tensor([n]))).to(cm.query_start_loc_cpu.dtype)
    seq_lens = (pos[ends - 1] + 1).to(cm.seq_lens.dtype)  # (pieces,) on the host
    owner = req_of_token[starts]
    changes = dict(query_start_loc=new_qsl.to(cm.query_start_loc.device), query_start_loc_cpu=new_qsl,
                   seq_lens=seq_lens.to(cm.seq_lens.device), seq_lens_cpu_upper_bound=seq_lens,
                   num_reqs=len(starts), max_query_len=int((ends - starts).max()), max_seq_len=int(seq_lens.max()),
                   block_table_tensor=cm.block_table_tensor[owner.to(cm.block_table_tensor.device)],
                   causal=False, _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
    if cm.is_prefilling is not None:
        changes["is_prefilling"] = cm.is_prefilling[owner.to(cm.is_prefilling.device)]
    return dataclasses.replace(cm, **changes)


class BD3RunnerMixin:
    """Put before a V1 `GPUModelRunner` subclass in the bases; every hook below exists there."""

    def __init__(self, vllm_config, device) -> None:
        super().__init__(vllm_config, device)
        self.bd3 = vllm_config.model_config.hf_config.to_bd3()
        self._step = None  # the scheduler output while its step executes
        self._blocks: dict[str, list[int]] = {}  # req_id -> tokens decoded in this step
        self._generators: dict[str, torch.Generator] = {}
        self.forward_passes = 0  # model passes run by this runner (benchmarks read it)
        self.traces = RunnerTraces(self.bd3.block_size, self.bd3.mask_id, self.bd3.vocab_size,
                                   vllm_config.model_config.logprobs_mode)
        self.resumes = Resumes()

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _update_states(self, scheduler_output):
        out = super()._update_states(scheduler_output)
        # vLLM's sampler is not used, and its CPU generators cannot be rewound for chunked prefills
        # ("CPU Generator does not use offset"); each request's generator lives in self._generators.
        self.input_batch.generators.clear()
        for rid in scheduler_output.finished_req_ids:
            self._generators.pop(rid, None)
        self.traces.finish(scheduler_output.finished_req_ids)
        self.resumes.finish(scheduler_output.finished_req_ids)
        return out

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        self._step = scheduler_output
        try:
            return super().execute_model(scheduler_output, intermediate_tensors)
        finally:
            self._step = None

    def _input_fits_in_drafter(self, common_attn_metadata) -> bool:
        return True  # the placeholders are masks, never model drafts: never zero them near max_model_len

    def initialize_metadata_builders(self, kv_cache_config, kernel_block_sizes) -> None:
        super().initialize_metadata_builders(kv_cache_config, kernel_block_sizes)
        for groups in self.attn_groups:
            for group in groups:
                group.build_metadata = functools.partial(self._build_blockwise, group.build_metadata)

    def _build_blockwise(self, build, cm, *args, **kwargs):
        if self._step is not None:
            cm = split_into_blocks(cm, self.bd3.block_size)
        return build(cm, *args, **kwargs)

    # ---- the block step -------------------------------------------------------------------------
    def _block_rows(self, step) -> list[tuple[str, int, int, int]]:
        """(req_id, first query token, query length, number of masks) for each request with a block."""
        rows = []
        qsl = self.query_start_loc.cpu  # the host copy: no device read
        for i, rid in enumerate(self.input_batch.req_ids[: self.input_batch.num_reqs]):
            n_masks = len(step.scheduled_spec_decode_tokens.get(rid, ()))
            if n_masks:
                start, end = int(qsl[i]), int(qsl[i + 1])
                if end - start != self.bd3.block_size:  # BD3Scheduler schedules whole blocks only
                    raise RuntimeError(f"request {rid}: a block step of {end - start} tokens with {n_masks} masks "
                                       f"is not one whole block of {self.bd3.block_size}")
                rows.append((rid, start, end - start, n_masks))
        return rows

    def _block_layout(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Built on the host from the scheduler's numbers, moved to the device once: the flat token index
        of every block slot (B, L'), the flat slot of every real token in `block.view(-1)` (n,) with its
        token index (n,), and the placeholder slots (B, L') bool."""
        size = self.bd3.block_size
        start = torch.tensor([r[1] for r in rows])[:, None]
        length = torch.tensor([r[2] for r in rows])[:, None]
        n_masks = torch.tensor([r[3] for r in rows])[:, None]
        slot = torch.arange(size)[None, :]
        real = slot < length  # (B, L')
        index = torch.where(real, start + slot, -1)  # (B, L')
        flat = (torch.arange(len(rows))[:, None] * size + slot)[real]  # (n,)
        placeholder = real & (slot >= length - n_masks)
        to = functools.partial(torch.Tensor.to, device=self.device)
        return to(index), to(flat), to(index[real]), to(placeholder)

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None,
                       **model_kwargs):
        self.forward_passes += 1  # the step's only pass, or its commit pass; denoising passes count in forward()
        run = super()._model_forward
        step = self._step
        self._blocks = {}
        rows = self._block_rows(step) if step is not None and step.scheduled_spec_decode_tokens else []
        if step is not None:
            self.traces.begin_step(self.requests, step, [r[0] for r in rows])
        if not rows:
            return run(input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
        size, mask_id = self.bd3.block_size, self.bd3.mask_id
        index, flat, tokens_at, placeholder = self._block_layout(rows)
        block = torch.zeros(len(rows), size, dtype=torch.long, device=self.device)  # (B, L')
        block.view(-1)[flat] = input_ids[tokens_at].long()
        block.masked_fill_(placeholder, mask_id)  # the placeholders are masks, whatever was drafted
        self.resumes.apply(block, rows, placeholder, self.requests)

        def forward(rows_idx: torch.Tensor, sub: torch.Tensor, read: torch.Tensor | None = None) -> torch.Tensor:
            """One model pass with these rows' blocks in place -> their logits (b, L', V), all slots computed
            (a superset of `read`)."""
            block[rows_idx] = sub
            self.forward_passes += 1
            input_ids[tokens_at] = block.view(-1)[flat].to(input_ids.dtype)
            hidden = run(input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
            h = hidden[index[rows_idx].clamp(min=0).flatten()]  # (b·L', D); padding slots read token 0
            return self.model.compute_logits(h).view(len(rows_idx), size, -1)

        groups: dict = {}
        for r, (rid, *_rest) in enumerate(rows):
            groups.setdefault(self._config(rid), []).append(r)
        for config, members in groups.items():
            idx = torch.tensor(members, device=self.device)
            sub = block[idx].clone()
            gens = [self._generator(rows[r][0]) for r in members]
            recorder = self.traces.recorder(config, self.requests, [rows[r][0] for r in members])
            done = denoise_block(sub, functools.partial(forward, idx), config, gens, mask_id, recorder=recorder)
            block[idx] = sub
            self.traces.block_done(self.requests, [rows[r] for r in members], recorder, done, sub, config, gens)
        input_ids[tokens_at] = block.view(-1)[flat].to(input_ids.dtype)
        hidden = run(input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
        decoded = block.cpu()  # the step's one read of the decoded blocks
        for r, (rid, _, length, n_masks) in enumerate(rows):
            self._blocks[rid] = decoded[r, length - n_masks : length].tolist()
        return hidden

    def _config(self, rid: str):
        return sampler_config(self.requests[rid].sampling_params, self.bd3.block_size)

    def _generator(self, rid: str) -> torch.Generator:
        if rid not in self._generators:
            seed = self.requests[rid].sampling_params.seed
            self._generators[rid] = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        return self._generators[rid]

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        """The decoded blocks as the step's 'accepted' tokens (-1 pads; prefill rows get none)."""
        n = self.input_batch.num_reqs
        width = max([2] + [len(t) for t in self._blocks.values()])
        out = torch.full((n, width), -1, dtype=torch.int32)
        for i, rid in enumerate(self.input_batch.req_ids[:n]):
            tokens = self._blocks.get(rid)
            if tokens:
                out[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        logprobs = self.traces.logprobs_tensors(self.input_batch.req_ids[:n], width, self._blocks)
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs)


class BD3WorkerMixin:
    """What both BD3 workers add to vLLM's worker: the pass counter and the recorded trajectories over RPC."""

    def bd3_forward_passes(self) -> int:
        """Model passes so far (for `LLM.collective_rpc("bd3_forward_passes")`)."""
        return self.model_runner.forward_passes

    def bd3_take_trajectories(self, wanted: list) -> list:
        """Recorded trajectories as JSON, removed from the worker (`vllm_backend.traces` calls it)."""
        return self.model_runner.traces.take(wanted)
