"""Train a BD3-LM on the synthetic source or a text file (spec §3.5, scaled down).

The data comes in as rows of token ids (`rows_from_stream`); `bd3 train` (cli/train.py) makes them from the
tiny world's sources or a text file.

AdamW, linear warm-up then constant, gradient clipping, EMA weights (what the checkpoint holds), an
optional clipped noise schedule U[β, ω] with per-block resampling, a progress bar, and a trainer state
saved every `--save-every` steps from which `--resume` continues.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bd3_plugin.core.checkpoint import save_checkpoint
from bd3_plugin.core.config import BD3Config
from bd3_plugin.core.model import BD3LM
from bd3_plugin.likelihood.nelbo import default_eligible, draw_noise, terms_from_logits
from bd3_plugin.likelihood.noise import mask_tokens

STATE = "trainer_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    block_size: int
    model_length: int = 128
    hidden_dim: int = 128
    n_heads: int = 4
    n_blocks: int = 4
    cond_dim: int = 64
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    eps_min: float = 1e-3  # training noise interval U[eps_min, eps_max]; (1, 1) is full masking
    eps_max: float = 1.0
    resample: bool = False  # redraw a block's mask until its masked fraction lies in [eps_min, eps_max]
    seed: int = 0
    save_every: int = 200
    init_from: str | None = None  # start from this checkpoint's weights (same architecture, any block size)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup", "save_every"):
            if getattr(self, name) < (0 if name == "warmup" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.eps_min <= self.eps_max <= 1:
            raise ValueError(f"need 0 < eps_min <= eps_max <= 1, got ({self.eps_min}, {self.eps_max})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")

    def model_config(self, vocab_size: int, mask_id: int) -> BD3Config:
        return BD3Config(vocab_size=vocab_size, model_length=self.model_length, block_size=self.block_size,
                         hidden_dim=self.hidden_dim, n_heads=self.n_heads, n_blocks=self.n_blocks,
                         cond_dim=self.cond_dim, dropout=0.0, mask_token_id=mask_id, var_min=True,
                         sampling_eps_min=self.eps_min, sampling_eps_max=self.eps_max)


def rows_from_stream(ids: list[int], length: int) -> torch.Tensor:
    """Wrap a token stream into rows of `length`, dropping the remainder (the reference's OWT wrapping)."""
    n = len(ids) // length
    if n == 0:
        raise ValueError(f"the training data has {len(ids)} tokens, fewer than one row of {length}")
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


def resampled_noise(x0: torch.Tensor, cfg: BD3Config, gen: torch.Generator, lo: float, hi: float):
    """A noise draw whose every block has a masked fraction in [lo, hi] (spec §3.2 resampling)."""
    eligible = default_eligible(torch.ones_like(x0, dtype=torch.bool))
    draw = draw_noise(x0, eligible, cfg.block_size, cfg.mask_id, gen, eps_min=lo, eps_max=hi)
    size = cfg.block_size
    for _ in range(100):
        frac = (draw.x_t == cfg.mask_id).float().view(x0.shape[0], -1, size).mean(-1)  # (B, n_blocks)
        bad = ((frac < lo) & (lo > 1e-3)) | ((frac > hi) & (hi < 1.0))
        if not bad.any():
            break
        redo = bad.repeat_interleave(size, dim=1) & eligible
        fresh = mask_tokens(x0, draw.t_tok, redo, cfg.mask_id, gen)
        draw = type(draw)(torch.where(redo, fresh, draw.x_t), draw.t_tok)
    return draw


def loss_fn(model: BD3LM, x0: torch.Tensor, gen: torch.Generator, tc: TrainConfig) -> torch.Tensor:
    """Training NELBO: the bound's terms averaged over all tokens (the reference's normalisation)."""
    cfg = model.config
    if tc.resample:
        draw = resampled_noise(x0, cfg, gen, tc.eps_min, tc.eps_max)
    else:
        eligible = default_eligible(torch.ones_like(x0, dtype=torch.bool))
        draw = draw_noise(x0, eligible, cfg.block_size, cfg.mask_id, gen, eps_min=tc.eps_min, eps_max=tc.eps_max)
    logits = model.forward_train(draw.x_t, x0)
    return terms_from_logits(logits, draw, x0, cfg.mask_id).mean()


class Trainer:
    def __init__(self, tc: TrainConfig, rows: torch.Tensor, vocab_size: int, mask_id: int, out: Path,
                 tokenizer=None, device: str = "cpu") -> None:
        self.tc = tc
        self.rows = rows
        self.out = Path(out)
        self.tokenizer = tokenizer
        self.device = device
        torch.manual_seed(tc.seed)
        self.model = BD3LM(tc.model_config(vocab_size, mask_id)).to(device)
        self.model.reset_parameters(torch.Generator().manual_seed(tc.seed))
        if tc.init_from is not None:
            self._warm_start(tc.init_from, mask_id)
        self.ema = copy.deepcopy(self.model).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=tc.weight_decay)
        self.gen = torch.Generator().manual_seed(tc.seed + 1)
        self.step = 0
        self.losses: list[float] = []

    def _warm_start(self, path: str, mask_id: int) -> None:
        """Fine-tune from another run's weights: the block size only changes the attention masks, so a
        model trained at one L' is a starting point for another (the BD3 paper's recipe from MDLM)."""
        from bd3_plugin.core.checkpoint import load_checkpoint

        src = load_checkpoint(path)
        if src.config.mask_id != mask_id:
            raise ValueError(f"--init-from {path}: its mask id {src.config.mask_id} is not the tokenizer's {mask_id}")
        theirs = src.model.state_dict()
        mine = self.model.state_dict()
        bad = sorted(k for k in mine.keys() | theirs.keys()
                     if k not in mine or k not in theirs or mine[k].shape != theirs[k].shape)
        if bad:
            raise ValueError(f"--init-from {path}: another architecture ({len(bad)} tensors differ, e.g. {bad[0]})")
        own_schedule = {k: v for k, v in mine.items() if k.endswith(("sampling_eps_min", "sampling_eps_max"))}
        self.model.load_state_dict(theirs | own_schedule)

    def resume(self) -> bool:
        path = self.out / STATE
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)

        def fixed(d: dict) -> dict:  # the settings a resumed run may not change
            return {k: v for k, v in d.items() if k not in ("steps", "save_every")}

        if fixed(state["train_config"]) != fixed(asdict(self.tc)):
            raise ValueError(f"{path} was written with other settings; use a new --out or the same flags")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        self.step = state["step"]
        self.losses = state["losses"]
        return True

    def save(self) -> None:
        save_checkpoint(self.ema, self.out, tokenizer=self.tokenizer)
        state = {"train_config": asdict(self.tc), "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.opt.state_dict(), "generator": self.gen.get_state(), "step": self.step,
                 "losses": self.losses}
        tmp = self.out / (STATE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.out / STATE)  # atomic: a kill mid-save leaves the previous state

    def train_step(self) -> float:
        tc = self.tc
        idx = torch.randint(self.rows.shape[0], (tc.batch_size,), generator=self.gen)
        x0 = self.rows[idx].to(self.device)
        lr = tc.lr * min(1.0, (self.step + 1) / max(tc.warmup, 1))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        loss = loss_fn(self.model, x0, self.gen, tc)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.step()
        self.step += 1
        decay = min(tc.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)
        return loss.item()

    def run(self, progress: bool = True) -> list[float]:
        from tqdm import tqdm

        bar = tqdm(total=self.tc.steps, initial=self.step, desc=f"train L'={self.tc.block_size}",
                   disable=not progress, unit="step")
        while self.step < self.tc.steps:
            self.losses.append(self.train_step())
            bar.update(1)
            window = self.losses[-50:]
            bar.set_postfix(loss=f"{sum(window) / len(window):.3f}")
            if self.step % self.tc.save_every == 0 or self.step == self.tc.steps:
                self.save()
        bar.close()
        return self.losses
