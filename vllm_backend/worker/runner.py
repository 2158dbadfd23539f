"""BD3RunnerMixin: vLLM's V1 model runner, taught to denoise blocks. It is composed with the CPU runner
(`cpu_worker.py`) and with the GPU runner (`gpu_worker.py`); this module imports neither.

In one engine step, every request that has MASK placeholders scheduled (a block step) gets its whole block
decoded by `bd3_plugin.sampling.denoise.denoise_block`, the loop the core's sampler uses. The step's query for such
a request is its block, preceded by the previous block when that one was decoded in the previous step
(`engine.BD3Scheduler` leaves it uncomputed): the step's first pass, vLLM's own, runs the model over all
the step's tokens and so writes the previous block's clean K/V, the other requests' prefill chunks and the
first state of every block; its hidden states give every block's first logits. Each further pass runs the
model over just the rows of one sampler group, with attention metadata for those blocks alone, and the
output layer runs only at the slots the sampler reads. No pass commits: the block's clean K/V is written
by the first pass of the request's next step, and a request that ends needs none. Attention metadata is
split at absolute multiples of L' and made non-causal (`block_metadata`), so prefill is block-causal and a
block sees the cached prefix and itself, exactly the core's masks.
"""
from __future__ import annotations

import functools
import random

import torch
from vllm.forward_context import get_forward_context, set_forward_context
from vllm.v1.outputs import SamplerOutput

from bd3_plugin.sampling.denoise import denoise_block

from vllm_backend.worker.block_metadata import split_into_blocks, take_blocks
from vllm_backend.worker.params import sampler_config
from vllm_backend.worker.recording import RunnerTraces
from vllm_backend.worker.reserve import block_step_rows, worst_block_step
from vllm_backend.worker.resume import Resumes



def scatter_read_logits(output_layer, hidden: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """`output_layer` on the slots where `read` (b, L') is True, zeros elsewhere: (b, L', V). The slots are
    found once (`nonzero`, one host sync on CUDA) and used for the gather and the scatter, where indexing
    by the boolean mask twice would find them twice."""
    flat = hidden.flatten(0, 1)
    slots = read.flatten().nonzero().squeeze(1)
    chosen = output_layer(flat.index_select(0, slots))  # (k, V)
    logits = chosen.new_zeros(flat.shape[0], chosen.shape[-1])
    logits.index_copy_(0, slots, chosen)
    return logits.view(*hidden.shape[:2], -1)


class BD3RunnerMixin:
    """Put before a V1 `GPUModelRunner` subclass in the bases; every hook below exists there."""

    def __init__(self, vllm_config, device) -> None:
        super().__init__(vllm_config, device)
        self.bd3 = vllm_config.model_config.hf_config.to_bd3()
        self._step = None  # the scheduler output while its step executes
        self._split: dict = {}  # KV-cache group id -> the step's split attention metadata
        self._own_build: dict = {}  # id(attention group) -> its builder call, unwrapped
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
        self._split = {}
        try:
            return super().execute_model(scheduler_output, intermediate_tensors)
        finally:
            self._step = None
            self._split = {}

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        # `_sample` reads no logits (the blocks are decoded inside `_model_forward`): with no logits
        # indices, the output layer vLLM runs after the model (at every block slot) gets no rows.
        logits_indices, spec_decode_metadata, max_sampled = super()._prepare_inputs(scheduler_output,
                                                                                    num_scheduled_tokens)
        return logits_indices[:0], spec_decode_metadata, max_sampled

    def _dummy_sampler_run(self, hidden_states):
        out = super()._dummy_sampler_run(hidden_states)
        # The profiling pass's peak sizes the KV cache: a block step's sampler memory must be in it.
        sched = self.scheduler_config
        size = self.bd3.block_size
        rows = block_step_rows(sched.max_num_seqs, sched.max_num_batched_tokens, size)
        worst_block_step(self.model.compute_logits, hidden_states.shape[-1], hidden_states.dtype,
                         hidden_states.device, rows, size, self.bd3.mask_id)
        return out

    def _input_fits_in_drafter(self, common_attn_metadata) -> bool:
        return True  # the placeholders are masks, never model drafts: never zero them near max_model_len

    def initialize_metadata_builders(self, kv_cache_config, kernel_block_sizes) -> None:
        super().initialize_metadata_builders(kv_cache_config, kernel_block_sizes)
        self._own_build = {}
        for groups in self.attn_groups:
            for group in groups:
                self._own_build[id(group)] = group.build_metadata
                group.build_metadata = functools.partial(self._build_blockwise, group)

    def _build_blockwise(self, group, cm, *args, **kwargs):
        if self._step is not None:
            cm = split_into_blocks(cm, self.bd3.block_size)
            self._split[group.kv_cache_group_id] = cm
        return self._own_build[id(group)](cm, *args, **kwargs)

    # ---- the block step -------------------------------------------------------------------------
    def _block_rows(self, step) -> list[tuple[str, int, int]]:
        """(req_id, first query token of its block, number of masks) for each request with a block. The
        block is the query's last L' tokens; a query of 2 L' starts with the previous block, clean."""
        size = self.bd3.block_size
        rows = []
        qsl = self.query_start_loc.cpu  # the host copy: no device read
        for i, rid in enumerate(self.input_batch.req_ids[: self.input_batch.num_reqs]):
            n_masks = len(step.scheduled_spec_decode_tokens.get(rid, ()))
            if n_masks:
                length = int(qsl[i + 1]) - int(qsl[i])
                if length not in (size, 2 * size) or n_masks > size:  # BD3Scheduler schedules whole blocks
                    raise RuntimeError(f"request {rid}: a block step of {length} tokens with {n_masks} masks is "
                                       f"not one or two whole blocks of {self.bd3.block_size}")
                rows.append((rid, int(qsl[i + 1]) - size, n_masks))
        return rows

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None,
                       **model_kwargs):
        self.forward_passes += 1  # the step's first pass; the further passes count in _group_forward
        run = super()._model_forward
        step = self._step
        self._blocks = {}
        rows = self._block_rows(step) if step is not None and step.scheduled_spec_decode_tokens else []
        if step is not None:
            self.traces.begin_step(self.requests, step, [r[0] for r in rows])
        if not rows:
            return run(input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
        size = self.bd3.block_size
        slot = torch.arange(size)[None, :]
        index = (torch.tensor([r[1] for r in rows])[:, None] + slot).to(self.device)  # (B, L') token of each slot
        placeholder = (slot >= size - torch.tensor([r[2] for r in rows])[:, None]).to(self.device)  # (B, L')
        block = input_ids[index].long().masked_fill_(placeholder, self.bd3.mask_id)  # masks, whatever was drafted
        self.resumes.apply(block, rows, placeholder, self.requests)
        input_ids[index] = block.to(input_ids.dtype)
        hidden = run(input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)

        groups: dict = {}
        for r, (rid, *_rest) in enumerate(rows):
            groups.setdefault(self._config(rid), []).append(r)
        for config, members in groups.items():
            idx = torch.tensor(members, device=self.device)
            sub = block[idx]  # (b, L'), a copy
            forward = self._group_forward(hidden[index[idx]], sub.clone(), [rows[r][1] for r in members], positions,
                                          run)
            gens = [self._generator(rows[r][0]) for r in members]
            recorder = self.traces.recorder(config, self.requests, [rows[r][0] for r in members])
            done = denoise_block(sub, forward, config, gens, self.bd3.mask_id, recorder=recorder)
            block[idx] = sub
            self.traces.block_done(self.requests, [rows[r] for r in members], recorder, done, sub, config, gens)
        decoded = block.cpu()  # the step's one read of the decoded blocks
        for r, (rid, _, n_masks) in enumerate(rows):
            self._blocks[rid] = decoded[r, size - n_masks :].tolist()
        return hidden

    def _group_forward(self, first: torch.Tensor, entered: torch.Tensor, starts: list[int], positions: torch.Tensor,
                       run):
        """The `forward(block, read=None)` that `denoise_block` calls for one sampler group whose blocks
        start at the step's query tokens `starts`: logits (b, L', V), exact where `read` (b, L') is True
        (everywhere when None), zeros elsewhere. A call with the blocks as they entered the step
        (`entered` (b, L'); the loop's first call) is answered from the step's first pass (`first`, hidden
        states (b, L', D)); every other call runs the model over these b blocks alone, under attention
        metadata built once for them."""
        size = self.bd3.block_size
        pending = [first]
        tokens = (torch.tensor(starts)[:, None] + torch.arange(size)).flatten().to(self.device)  # (b·L',)
        where = positions[tokens]
        context: list = []

        def forward(block: torch.Tensor, read: torch.Tensor | None = None) -> torch.Tensor:
            if pending and torch.equal(block, entered):
                return self._logits(pending.pop(), read)
            pending.clear()
            if not context:
                context.append(self._blocks_context(starts, tokens))
            self.forward_passes += 1
            attn_metadata, slot_mapping = context[0]
            with set_forward_context(attn_metadata, self.vllm_config, num_tokens=len(tokens),
                                     slot_mapping=slot_mapping):
                hidden = run(block.flatten(), where)  # (b·L', D)
            return self._logits(hidden.view(len(starts), size, -1), read)

        return forward

    def _blocks_context(self, starts: list[int], tokens: torch.Tensor) -> tuple[dict, dict]:
        """Per-layer attention metadata and slot mapping for a pass over just the blocks that start at
        the step's query tokens `starts` (`tokens` (b·L',) their token indices in the step)."""
        attn_metadata = {}
        for gid, groups in enumerate(self.attn_groups):
            cm = take_blocks(self._split[gid], starts, self.bd3.block_size)
            for group in groups:
                attn_metadata.update(dict.fromkeys(group.layer_names, self._own_build[id(group)](cm)))
        slot_mapping = {name: m[tokens] for name, m in get_forward_context().slot_mapping.items()}
        return attn_metadata, slot_mapping

    def _logits(self, hidden: torch.Tensor, read: torch.Tensor | None) -> torch.Tensor:
        """Hidden states (b, L', D) -> logits (b, L', V); the output layer runs only where `read` is True."""
        if read is None:
            return self.model.compute_logits(hidden.flatten(0, 1)).view(*hidden.shape[:2], -1)
        return scatter_read_logits(self.model.compute_logits, hidden, read)

    def _config(self, rid: str):
        return sampler_config(self.requests[rid].sampling_params, self.bd3.block_size)

    def _generator(self, rid: str) -> torch.Generator:
        """The request's generator, on the model's device: its draws need no copy to the device, and a seed
        gives the tokens of `generate` with `seeded_generators([seed], device)` (on CUDA not the CPU's)."""
        if rid not in self._generators:
            seed = self.requests[rid].sampling_params.seed
            seed = seed if seed is not None else random.getrandbits(63)
            self._generators[rid] = torch.Generator(self.device).manual_seed(seed)
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
        """Recorded trajectories as JSON, removed from the worker (`vllm_backend.server.traces` calls it)."""
        return self.model_runner.traces.take(wanted)
