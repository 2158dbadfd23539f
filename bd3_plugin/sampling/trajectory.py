"""The trajectory of a block-diffusion rollout: which pass revealed every token, with which probabilities.

A `Trajectory` holds, for one sequence, every slot of every block the sampler denoised (the last block
whole, tokens after the stop point included and marked as not in the output), the pass that revealed each
slot, its log-probability under the distribution actually sampled and under the raw model, the entropy of
the sampled distribution, and one row per sampler step. None of the samplers re-masks a token, so the state
at (block b, pass p) is: everything before block b clean, and the slots of b revealed before pass p.

Recording goes through `denoise_block`'s `recorder` argument, so every engine that runs the shared loop
(the core's KV cache, the vLLM runner) produces the same record: a `BlockRecorder` watches one block of a
batch, and a `TrajectoryBuilder` per sequence appends the blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bd3_plugin.core.subs import subs_log_softmax
from bd3_plugin.sampling.config import SamplerConfig
from bd3_plugin.sampling.registry import sampler_for
from bd3_plugin.sampling.samplers import StepResult, token_probs


def raw_log_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log p_θ at temperature 1 with SUBS (the mask is never predicted), float64 (…, V)."""
    return subs_log_softmax(logits, mask_id, torch.float64)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """−Σ q log q over the last dimension (nats); 0·log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def token_terms(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int, temperature: float, top_p: float,
                top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For logits (n, V) and the tokens (n,) taken from them: log-prob under the sampled distribution
    (temperature, top-k, nucleus, SUBS), under the raw model, and the sampled distribution's entropy, float64.

    At temperature 0 the sampled distribution is a point mass on the argmax: log-prob 0 and entropy 0.
    """
    raw = raw_log_probs(logits, mask_id).gather(-1, tokens[:, None]).squeeze(-1)
    if temperature == 0:
        zero = torch.zeros_like(raw)
        return zero, raw, zero
    q = token_probs(logits, mask_id, temperature, top_p, top_k)  # (n, V)
    return q.gather(-1, tokens[:, None]).squeeze(-1).log(), raw, entropy(q)


@dataclass(frozen=True, eq=False)  # tensors have no single truth value: compare fields explicitly
class StepTable:
    """One row per sampler step of one sequence (S,). A step that reveals nothing (DDPM) is a row too:
    its selection term is part of the trajectory's probability."""

    block: torch.Tensor  # block index in the sequence (position // L')
    pass_index: torch.Tensor  # pass within the block whose logits the step used (1-based)
    step: torch.Tensor  # the row's cumulative denoising pass
    grid: torch.Tensor  # step index within the block, 0-based (DDPM: t = 1 − grid/steps)
    n_masked: torch.Tensor  # masked slots before the step
    n_revealed: torch.Tensor
    logprob_tokens: torch.Tensor  # Σ sampled log-prob of the tokens revealed
    logprob_select: torch.Tensor  # log-prob of which positions were revealed; NaN where select_known is False
    select_known: torch.Tensor  # False where the threshold sampler's fallback fired (no closed form)
    entropy_mean: torch.Tensor  # mean entropy of the revealed tokens' distributions; NaN if none

    def __post_init__(self) -> None:
        sizes = {f: getattr(self, f).shape for f in self.__dataclass_fields__}
        if len(set(sizes.values())) != 1 or len(next(iter(sizes.values()))) != 1:
            raise ValueError(f"step table fields must be 1-D of one length, got {sizes}")


@dataclass(frozen=True, eq=False)
class Trajectory:
    """One sequence's rollout. Slot arrays (N,) cover every slot of every denoised block, N = blocks · L'."""

    prompt: tuple[int, ...]
    block_size: int
    mask_id: int
    tokens: torch.Tensor  # (N,) the slots' final tokens, tail after the stop point included
    reveal_pass: torch.Tensor  # (N,) pass within the block that revealed the slot (1-based); 0 = given
    reveal_step: torch.Tensor  # (N,) the row's cumulative pass that revealed it; 0 = given
    reveal_grid: torch.Tensor  # (N,) step index within the block that revealed it; -1 = given
    logprob: torch.Tensor  # (N,) float64 under the sampled distribution (temperature, top-k, nucleus, SUBS); 0 if given
    logprob_raw: torch.Tensor  # (N,) float64 under the raw model (temperature 1, SUBS); 0 if given
    entropy: torch.Tensor  # (N,) float64 entropy of the sampled distribution at that pass; 0 if given
    in_output: torch.Tensor  # (N,) bool: the slot is part of the returned tokens
    steps: StepTable
    sampler: SamplerConfig  # the rollout's settings
    seed: int  # the seed of the row's generator (drawn when none was given)
    seed_drawn: bool  # the seed was drawn by `generate`, not given
    seed_replays: bool  # a fresh generator with `seed`, alone in a batch, regenerates this row exactly
    finish_reason: str
    denoise_passes: int  # denoising passes this row took part in
    commit_passes: int  # passes that only stored clean blocks of this row (a prompt longer than the window)

    def __post_init__(self) -> None:
        if len(self.tokens) % self.block_size:
            raise ValueError(f"{len(self.tokens)} slots is not a whole number of blocks of {self.block_size}")
        for name in ("reveal_pass", "reveal_step", "reveal_grid", "logprob", "logprob_raw", "entropy",
                     "in_output"):
            if getattr(self, name).shape != self.tokens.shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"tokens {tuple(self.tokens.shape)}")

    @property
    def first_block(self) -> int:
        """Index of the first denoised block: the one holding the prompt's tail."""
        return len(self.prompt) // self.block_size

    @property
    def block(self) -> torch.Tensor:
        return self.first_block + torch.arange(len(self.tokens)) // self.block_size  # (N,)

    @property
    def slot(self) -> torch.Tensor:
        return torch.arange(len(self.tokens)) % self.block_size  # (N,)

    @property
    def output(self) -> list[int]:
        return self.tokens[self.in_output].tolist()

    def sequence(self) -> torch.Tensor:
        """The whole clean sequence: the prompt's whole blocks, then every denoised slot."""
        head = torch.tensor(self.prompt[: self.first_block * self.block_size], dtype=torch.long)
        return torch.cat((head, self.tokens))

    def state(self, block: int, pass_index: int) -> torch.Tensor:
        """Block `block`'s L' slots as the model saw them at that pass: masks where revealed at or after it."""
        i = (block - self.first_block) * self.block_size
        if pass_index < 1:
            raise ValueError(f"pass_index counts from 1 (pass 0 marks given slots), got {pass_index}")
        if not 0 <= i < len(self.tokens):
            raise ValueError(f"block {block} was not denoised (blocks {self.first_block}.."
                             f"{self.first_block + len(self.tokens) // self.block_size - 1})")
        tokens = self.tokens[i : i + self.block_size]
        passes = self.reveal_pass[i : i + self.block_size]
        return torch.where(passes >= pass_index, torch.full_like(tokens, self.mask_id), tokens)

    def to_json(self) -> dict:
        """Plain lists and numbers (NaN as None), e.g. for a server response; `from_json` inverts it."""
        def plain(v):
            return [None if x != x else x for x in v.tolist()] if torch.is_tensor(v) else v

        out = {f: plain(getattr(self, f)) for f in self.__dataclass_fields__ if f not in ("steps", "sampler")}
        out["steps"] = {f: plain(getattr(self.steps, f)) for f in self.steps.__dataclass_fields__}
        out["sampler"] = {f: getattr(self.sampler, f) for f in self.sampler.__dataclass_fields__}
        return out

    @classmethod
    def from_json(cls, data: dict) -> Trajectory:
        def tensor(v, like: torch.Tensor) -> torch.Tensor:
            return torch.tensor([float("nan") if x is None else x for x in v], dtype=like.dtype)

        kinds = {"logprob": torch.float64, "logprob_raw": torch.float64, "entropy": torch.float64,
                 "in_output": torch.bool}
        steps_kinds = {"logprob_tokens": torch.float64, "logprob_select": torch.float64,
                       "entropy_mean": torch.float64, "select_known": torch.bool}
        fields = {k: v for k, v in data.items() if k not in ("steps", "sampler")}
        for name in ("tokens", "reveal_pass", "reveal_step", "reveal_grid", *kinds):
            fields[name] = tensor(data[name], torch.empty(0, dtype=kinds.get(name, torch.long)))
        steps = StepTable(**{k: tensor(v, torch.empty(0, dtype=steps_kinds.get(k, torch.long)))
                             for k, v in data["steps"].items()})
        return cls(**fields | {"prompt": tuple(data["prompt"]), "steps": steps,
                               "sampler": SamplerConfig(**data["sampler"])})


@dataclass
class BlockRecord:
    """What a `BlockRecorder` saw for a batch of B rows: slot fields (B, L'), step fields (S, B)."""

    reveal_pass: torch.Tensor
    reveal_grid: torch.Tensor
    logprob: torch.Tensor
    logprob_raw: torch.Tensor
    entropy: torch.Tensor
    live: torch.Tensor  # (S, B) the row had masks at that step
    step_pass: torch.Tensor
    n_masked: torch.Tensor
    n_revealed: torch.Tensor
    logprob_tokens: torch.Tensor
    logprob_select: torch.Tensor
    select_known: torch.Tensor
    entropy_mean: torch.Tensor


class BlockRecorder:
    """Passed to `denoise_block(..., recorder=...)`: records one block of a batch, step by step."""

    def __init__(self, config, mask_id: int) -> None:
        self.config = config
        self.mask_id = mask_id
        self.sampler = sampler_for(config, mask_id)

    def begin(self, block: torch.Tensor) -> None:
        b, size = block.shape
        f64 = dict(dtype=torch.float64, device=block.device)
        self.reveal_pass = torch.zeros(b, size, dtype=torch.long, device=block.device)
        self.reveal_grid = torch.full((b, size), -1, dtype=torch.long, device=block.device)
        self.logprob, self.logprob_raw, self.entropy = (torch.zeros(b, size, **f64) for _ in range(3))
        self.rows: list[tuple[torch.Tensor, ...]] = []

    def step(self, logits: torch.Tensor, masked: torch.Tensor, result: StepResult, passes: torch.Tensor, grid: int,
             t: float, s: float) -> None:
        """One sampler step: logits (B, L', V) it used, the masks before it, its result (threshold: tokens
        are the proposals at every masked slot), each row's pass count (B,), the grid index and levels. The
        sampler's distributions come from `result.probs` at `result.scored`, and `logits` is read only at the
        revealed slots; a result without them has them computed here, at every masked slot."""
        cfg = self.config
        sampler = self.sampler
        where = result.scored
        probs = result.probs
        if probs is None:
            where = masked
            probs = token_probs(logits[masked], self.mask_id, cfg.temperature, cfg.top_p, cfg.top_k)
        reveal = result.reveal
        tok = result.tokens[result.reveal]
        raw = raw_log_probs(logits[reveal], self.mask_id).gather(-1, tok[:, None]).squeeze(-1)
        q_tok = probs[reveal[where]].gather(-1, tok[:, None]).squeeze(-1)  # (n,) the sampler's p of each token
        if cfg.temperature == 0:  # a point mass on the argmax
            lp = torch.zeros_like(raw)
            ent = torch.zeros_like(raw)
        else:
            lp = q_tok.log()
            ent = entropy(probs[reveal[where]])
        self.logprob[reveal] = lp
        self.logprob_raw[reveal] = raw
        self.entropy[reveal] = ent
        self.reveal_pass[reveal] = passes[:, None].expand_as(reveal)[reveal]
        self.reveal_grid[reveal] = grid
        row = reveal.nonzero()[:, 0]  # (n,) row of each revealed slot, row-major like logits[reveal]
        n_masked = masked.sum(dim=1)
        n_revealed = reveal.sum(dim=1)
        lp_sum = torch.zeros(len(masked), dtype=torch.float64, device=masked.device).index_add_(0, row, lp)
        ent_sum = torch.zeros_like(lp_sum).index_add_(0, row, ent)
        t_level = torch.tensor(t, dtype=torch.float64, device=masked.device)
        s_level = torch.tensor(s, dtype=torch.float64, device=masked.device)
        select = sampler.selection_log_prob(n_masked, n_revealed, t_level, s_level)
        if sampler.selection_reads_left:
            left = masked & ~reveal
            select = select + torch.zeros_like(lp_sum).index_add_(0, left.nonzero()[:, 0],
                                                                  sampler.left_log_prob(probs[left[where]]))
        q = torch.zeros(reveal.shape, dtype=torch.float64, device=reveal.device)
        q[reveal] = q_tok
        known = sampler.selection_known(reveal, q)
        select = torch.where(known, select, torch.full_like(select, float("nan")))
        self.rows.append((n_masked > 0, passes.clone(), n_masked, n_revealed, lp_sum, select, known,
                          ent_sum / n_revealed))

    def finish(self) -> BlockRecord:
        cols = [torch.stack(c) for c in zip(*self.rows)]  # each (S, B)
        return BlockRecord(self.reveal_pass, self.reveal_grid, self.logprob, self.logprob_raw, self.entropy, *cols)


class TrajectoryBuilder:
    """Appends one sequence's blocks, row `row` of each `BlockRecord`, and builds its `Trajectory`."""

    def __init__(self, prompt, block_size: int, mask_id: int, sampler, seed: int, seed_drawn: bool,
                 seed_replays: bool) -> None:
        self.head = dict(prompt=tuple(prompt), block_size=block_size, mask_id=mask_id, sampler=sampler,
                         seed=seed, seed_drawn=seed_drawn, seed_replays=seed_replays)
        self.slots: list[tuple[torch.Tensor, ...]] = []
        self.step_rows: list[tuple[torch.Tensor, ...]] = []

    @property
    def seed(self) -> int:
        return self.head["seed"]

    def add_block(self, record: BlockRecord, row: int, tokens: torch.Tensor, steps_before: int) -> None:
        """`tokens` (L',) the block's final slots; `steps_before` the row's denoising passes before it."""
        p = record.reveal_pass[row]
        self.slots.append((tokens.cpu().clone(), p.cpu(), torch.where(p > 0, p + steps_before, 0).cpu(),
                           record.reveal_grid[row].cpu(), record.logprob[row].cpu(), record.logprob_raw[row].cpu(),
                           record.entropy[row].cpu()))
        live = record.live[:, row]
        passes = record.step_pass[:, row][live]
        block = len(self.head["prompt"]) // self.head["block_size"] + len(self.slots) - 1
        self.step_rows.append((torch.full_like(passes, block).cpu(), passes.cpu(), (passes + steps_before).cpu(),
                               torch.arange(len(live))[live.cpu()], *(getattr(record, f)[:, row][live].cpu() for f in
                               ("n_masked", "n_revealed", "logprob_tokens", "logprob_select", "select_known",
                                "entropy_mean"))))

    def build(self, n_output: int, finish_reason: str, denoise_passes: int, commit_passes: int) -> Trajectory:
        """`n_output`: how many generated slots, in order, are the returned tokens."""
        tokens, passes, step, grid, lp, raw, ent = (torch.cat(c) for c in zip(*self.slots))
        generated = passes > 0
        in_output = generated & (generated.long().cumsum(0) <= n_output)
        steps = StepTable(*(torch.cat(c) for c in zip(*self.step_rows)))
        return Trajectory(tokens=tokens, reveal_pass=passes, reveal_step=step, reveal_grid=grid, logprob=lp,
                          logprob_raw=raw, entropy=ent, in_output=in_output, steps=steps,
                          finish_reason=finish_reason, denoise_passes=denoise_passes, commit_passes=commit_passes,
                          **self.head)
