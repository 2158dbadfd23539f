import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bd3_plugin.core.checkpoint import CheckpointError, is_hub_id, load_checkpoint, load_model, save_checkpoint
from bd3_plugin.core.config import BD3Config, ConfigError
from bd3_plugin.sampling.config import SamplerConfig
from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.model import BD3LM
from bd3_plugin.likelihood.nelbo import nelbo_terms
from bd3_plugin.core.generators import seeded_generators
from helpers import assert_close, random_model, tiny_config, word_tokenizer
from test_config import RELEASED


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = random_model(tiny_config(var_min=True, sampling_eps_min=0.3, sampling_eps_max=0.8))
    save_checkpoint(model, tmp_path / "a", tokenizer=word_tokenizer())
    ckpt = load_checkpoint(tmp_path / "a")
    assert ckpt.config == model.config
    a, b = model.state_dict(), ckpt.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert float(b["sampling_eps_min"]) == pytest.approx(0.3)
    assert ckpt.encode("the cat sees a dog") == [0, 2, 5, 1, 3] and ckpt.eos_id == 21
    save_checkpoint(ckpt.model, tmp_path / "b", tokenizer=ckpt.tokenizer)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    x = torch.randint(0, 20, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # same weights; kernels may round differently on differently aligned buffers
        assert_close(model(x), ckpt.model(x), 1e-5, "reloaded logits")


def test_loader_names_every_bad_tensor(tmp_path):
    save_checkpoint(random_model(), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["backbone.blocks.1.attn_out.weight"]
    state["backbone.blocks.0.extra"] = torch.zeros(3)
    state["backbone.blocks.0.norm1.weight"] = torch.zeros(65)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert "missing tensors: backbone.blocks.1.attn_out.weight" in msg
    assert "unexpected tensors: backbone.blocks.0.extra" in msg
    assert "backbone.blocks.0.norm1.weight (65,) != expected (64,)" in msg


def test_var_min_checkpoint_without_its_buffers_is_refused(tmp_path):
    save_checkpoint(random_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text()) | {"var_min": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensors: sampling_eps_max, sampling_eps_min"):
        load_model(tmp_path)


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2/config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="not a BD3-LM config"):
        load_model(tmp_path / "gpt2")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights/config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path / "noweights")


def test_released_shapes_load_strictly_and_run(tmp_path):
    """A checkpoint with the released key names and shapes (12 × 768, vocab 50258, var_min buffers)."""
    cfg = BD3Config.from_dict(RELEASED)
    model = BD3LM(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0), adaln_zero=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert state["backbone.blocks.11.attn_qkv.weight"].shape == (2304, 768)
    assert state["backbone.output_layer.linear.weight"].shape == (50258, 768)
    assert sum(v.numel() for k, v in state.items() if k != "backbone.rotary_emb.inv_freq") == 169_627_218 + 2
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(RELEASED))
    del model, state
    loaded = load_model(tmp_path)
    x = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        terms = nelbo_terms(loaded, x, seeded_generators([0]))
    assert torch.isfinite(terms).all() and terms[0, 1:].sum() > 0
    g = generate(loaded, [x[0, :6].tolist()], SamplerConfig(max_new_tokens=8, top_p=0.9),
                 seeded_generators([0])).generations[0]
    assert len(g.tokens) == 8 and 50257 not in g.tokens


@pytest.mark.parametrize("name, hub", [
    ("kuleshov-group/bd3lm-owt-block_size4", True), ("org/model.v2", True), ("runs/*", False), ("runs/[ab]", False),
    ("./runs/ckpt", False), ("/abs/ckpt", False), ("~/ckpt", False), ("runs/a/ckpt", False), ("ckpt", False),
])
def test_only_owner_slash_name_may_be_a_hub_id(name, hub):
    """Anything else is a local path, so a sweep can call it missing without asking the hub."""
    assert is_hub_id(name) is hub
