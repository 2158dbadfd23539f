import pytest

from bd3_plugin.core.config import BD3Config, ConfigError

# config.json of kuleshov-group/bd3lm-owt-block_size4 (spec §1.5)
RELEASED = {
    "_name_or_path": "kuleshov-group/bd3lm-owt-block_size4", "architectures": ["BD3LM"], "attn_backend": "sdpa",
    "auto_map": {"AutoConfig": "configuration_bd3lm.BD3LMConfig", "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
    "block_size": 4, "cond_dim": 128, "cross_attn": True, "dropout": 0.1, "hidden_dim": 768, "model_length": 1024,
    "model_type": "bd3lm", "n_blocks": 12, "n_heads": 12, "return_dict": False, "sampling_eps_max": 0.999,
    "sampling_eps_min": 0.001, "time_conditioning": False, "torch_dtype": "float32",
    "transformers_version": "4.49.0", "var_min": True, "vocab_size": 50258,
}
MDLM = {"architectures": ["MDLM"], "auto_map": {}, "model_type": "mdlm", "cond_dim": 128, "dropout": 0.1,
        "hidden_dim": 768, "model_length": 1024, "n_blocks": 12, "n_heads": 12, "return_dict": False,
        "time_conditioning": False, "torch_dtype": "float32", "transformers_version": "4.38.2", "vocab_size": 50258}


def test_released_config():
    cfg = BD3Config.from_dict(RELEASED)
    assert (cfg.block_size, cfg.model_length, cfg.head_dim, cfg.mask_id, cfg.num_blocks) == (4, 1024, 64, 50257, 256)
    assert cfg.var_min and cfg.sampling_eps_max == 0.999


def test_mdlm_config_is_one_block():
    cfg = BD3Config.from_dict(MDLM)
    assert cfg.block_size == cfg.model_length == 1024 and not cfg.var_min


def test_round_trip():
    cfg = BD3Config.from_dict(RELEASED).replace(mask_token_id=7)
    assert BD3Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("change,needle", [
    ({"block_size": 5}, "block_size 5 does not divide model_length 1024"),
    ({"model_type": "gpt2"}, "not a BD3-LM config"),
    ({"n_heads": 7}, "n_heads 7 does not divide hidden_dim 768"),
    ({"time_conditioning": True}, "time_conditioning=True is not supported"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"mask_token_id": 50258}, "mask_token_id 50258 outside"),
])
def test_bad_configs_name_the_field(change, needle):
    with pytest.raises(ConfigError, match=needle):
        BD3Config.from_dict(RELEASED | change)
