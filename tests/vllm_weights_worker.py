"""Job of tests/vllm_jobs.py for tests/test_vllm_weights.py: either decode the prompts on a fresh engine, or
start on one checkpoint and go through a series of weight updates, decoding after each; returns the token
ids, errors and version labels. The engine runs in the job's process unless the job sets
VLLM_ENABLE_V1_MULTIPROCESSING=1 ("update-mp")."""
from vllm_jobs import engine

CASES = [{"temperature": 0.0, "seed": 1}, {"temperature": 1.0, "seed": 7}]
MAX_TOKENS = 20


def _generate(llm, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = []
    for case in CASES:
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **case)
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        out.append([list(r.outputs[0].token_ids) for r in res])
    return out


def _attempt(llm, source, version):
    from vllm_backend.rollout import update_weights

    try:
        update_weights(llm, source, version)
        return None
    except Exception as err:
        return f"{type(err).__name__}: {err}"


def _source(spec, key):
    """A checkpoint path from the spec, or a state dict in memory (as a trainer would hand it over)."""
    from safetensors.torch import load_file

    if key in spec["paths"]:
        return spec["paths"][key]
    state = load_file(spec["paths"][key.removesuffix("_state").removesuffix("_broken")])
    return {k: v for k, v in state.items() if k != spec["drop"]} if key.endswith("_broken") else state


def _updates(llm, spec) -> dict:
    """Bad updates first (each must leave the engine as it was), then good ones, each labelled by its key."""
    from vllm_backend.rollout import weight_version

    prompts, out = spec["prompts"], {"versions": [weight_version(llm)]}
    out["before"] = _generate(llm, prompts)
    out["errors"] = {key: _attempt(llm, _source(spec, key), "bad") for key in spec["bad"]}
    out["errors"]["version"] = _attempt(llm, spec["paths"]["new"], "")
    out["after_bad"] = _generate(llm, prompts)
    out["versions"].append(weight_version(llm))
    for key in spec["good"]:
        error = _attempt(llm, _source(spec, key), key)
        if error:
            raise RuntimeError(f"update from {key} failed: {error}")
        out[key] = _generate(llm, prompts)
        out["versions"].append(weight_version(llm))
    return out


def run(spec: dict):
    # "update-mp": the engine in its own processes; the BD3 workers carry the update call without a flag
    with engine(spec["checkpoint"], max_model_len=128, seed=0, enforce_eager=True, keep=spec.get("keep")) as llm:
        return _generate(llm, spec["prompts"]) if spec["mode"] == "fresh" else _updates(llm, spec)
