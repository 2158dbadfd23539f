import pytest
import torch

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.likelihood.scoring import score_documents
from bd3_plugin.tinyworld.grammar import build_tokenizer
from bd3_plugin.tinyworld.data import stream_ids, training_docs
from bd3_plugin.training.trainer import TrainConfig, Trainer, loss_fn, resampled_noise, rows_from_stream

TC = dict(block_size=4, model_length=32, hidden_dim=64, n_heads=2, n_blocks=2, cond_dim=16, batch_size=8,
          warmup=5, lr=3e-3, save_every=5)


@pytest.fixture(scope="module")
def data():
    tok = build_tokenizer()
    return rows_from_stream(stream_ids(training_docs(300, seed=1), tok), 32), tok


def make(tmp_path, data, **kw):
    rows, tok = data
    return Trainer(TrainConfig(**(TC | kw)), rows, len(tok), tok.mask_token_id, tmp_path, tok)


def test_training_lowers_the_loss(tmp_path, data):
    trainer = make(tmp_path, data, steps=40)
    fixed = data[0][:32]
    before = loss_fn(trainer.model.eval(), fixed, torch.Generator().manual_seed(0), trainer.tc).item()
    trainer.run(progress=False)
    after = loss_fn(trainer.model.eval(), fixed, torch.Generator().manual_seed(0), trainer.tc).item()
    assert after < before - 0.5, (before, after)


def test_resume_continues_the_same_run(tmp_path, data):
    straight = make(tmp_path / "a", data, steps=10)
    straight.run(progress=False)
    first = make(tmp_path / "b", data, steps=5)
    first.run(progress=False)
    resumed = make(tmp_path / "b", data, steps=10)
    assert resumed.resume() and resumed.step == 5
    resumed.run(progress=False)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-4)
    # Multithreaded scatter-adds in the backward may round differently from run to run.
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        make(tmp_path / "b", data, steps=10, lr=1e-2).resume()


def test_saved_checkpoint_reloads_with_the_same_nelbo(tmp_path, data):
    trainer = make(tmp_path, data, steps=5)
    trainer.run(progress=False)
    ckpt = load_checkpoint(tmp_path)
    docs = [d.tolist() for d in data[0][:4]]
    a = score_documents(trainer.ema, docs, bos_id=1, mc_samples=2, seed=3)
    b = score_documents(ckpt.model, docs, bos_id=1, mc_samples=2, seed=3)
    assert torch.allclose(a, b, rtol=1e-5)
    assert ckpt.config.sampling_eps_min == pytest.approx(1e-3) and ckpt.tokenizer.mask_token_id == 2


def test_resampling_keeps_block_mask_rates_in_range(data):
    rows, tok = data
    cfg = TrainConfig(**TC, steps=1).model_config(len(tok), tok.mask_token_id).replace(block_size=8)
    draw = resampled_noise(rows[:16], cfg, torch.Generator().manual_seed(0), 0.3, 0.8)
    frac = (draw.x_t == cfg.mask_id).float()[:, 8:].reshape(16, -1, 8).mean(-1)
    assert frac.min() >= 0.3 and frac.max() <= 0.8


def test_copy_source_rows_hold_whole_documents():
    """`--source copy`: each 128-token row is two documents, each from its leading EOS, over the grammar's
    tokenizer; the rows decode to documents the copy source gives probability."""
    from bd3_plugin.tinyworld.copying import CopySource
    from bd3_plugin.cli.train import training_data

    rows, tok = training_data("synthetic", None, 128, 50, "copy")
    assert rows.shape == (25, 128) and len(tok) == len(build_tokenizer())
    source = CopySource()
    for row in rows[:5]:
        for unit in row.view(2, 64):  # (documents, leading EOS + document)
            words = tok.convert_ids_to_tokens(unit.tolist())
            assert words[0] == tok.eos_token and source.log_prob(words[1:]) > -float("inf")


def test_bad_source_is_refused(tmp_path):
    from bd3_plugin.cli.train import training_data

    with pytest.raises(ValueError, match="--source must be one of grammar, copy"):
        training_data("synthetic", None, 128, 10, "sorting")
    text = tmp_path / "t.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="applies to --data synthetic only"):
        training_data(str(text), tmp_path, 128, 10, "copy")


def test_init_from_starts_at_another_runs_weights(tmp_path, data):
    """A run at L' = 8 warm-started from an L' = 4 checkpoint begins at exactly its weights (the noise
    schedule buffers stay this run's own); another architecture is refused."""
    first = make(tmp_path / "a", data, steps=5)
    first.run(progress=False)
    warm = make(tmp_path / "b", data, steps=5, block_size=8, init_from=str(tmp_path / "a"), eps_min=0.3)
    saved = load_checkpoint(tmp_path / "a").model.state_dict()
    for name, tensor in warm.model.state_dict().items():
        if "sampling_eps" not in name:
            assert torch.equal(tensor, saved[name]), name
    assert warm.model.config.block_size == 8 and float(warm.model.sampling_eps_min) == pytest.approx(0.3)
    assert all(torch.equal(a, b) for a, b in zip(warm.ema.state_dict().values(), warm.model.state_dict().values()))
    with pytest.raises(ValueError, match="another architecture"):
        make(tmp_path / "c", data, steps=5, hidden_dim=32, init_from=str(tmp_path / "a"))
