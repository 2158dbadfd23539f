"""Every task YAML loads with lm-eval's own loader; the zero-shot detokenizers do what they claim."""
from pathlib import Path

import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

TASKS = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
YAMLS = sorted(TASKS.rglob("*.yaml"))


def test_every_task_folder_has_a_readme():
    folders = {p.parent for p in YAMLS}
    assert len(folders) == 5 and all((f / "README.md").is_file() for f in folders)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_loads_and_functions_resolve(path):
    cfg = load_yaml(path)
    assert cfg["task"] == path.stem
    for key in ("doc_to_target", "process_results", "custom_dataset", "doc_to_choice"):
        if key in cfg and not isinstance(cfg[key], str):
            assert callable(cfg[key]), key


def test_local_tasks_build_from_the_bundled_data():
    for name in ("synthetic_ppl", "synthetic_mc", "synthetic_gen", "copy_gen"):
        task = ConfigurableTask(config=load_yaml(TASKS / name / f"{name}.yaml"))
        docs = list(task.test_docs())
        assert len(docs) in (100, 200, 400)
        assert task.doc_to_target(docs[0]) is not None


def test_zeroshot_tasks_make_one_corpus_of_detokenised_documents():
    import datasets

    from bd3_plugin.likelihood.zeroshot import RECORD_SEPARATOR, ScoredLoglikelihood

    cfg = load_yaml(TASKS / "bd3_zeroshot" / "bd3_zs_wikitext.yaml")
    split = datasets.Dataset.from_list([{"text": " = = Early life = = \n"}, {"text": ""},
                                        {"text": " He was born in 1 @,@ 900 , in a small @-@ town . \n"}])
    (doc,) = list(cfg["process_docs"](split))
    # The reference's rules keep a line's leading space (it is part of the text GPT-2 sees).
    assert doc["records"] == [" == Early life ==\n", "", " He was born in 1,900, in a small-town.\n"]
    assert cfg["doc_to_target"](doc) == RECORD_SEPARATOR.join(doc["records"])
    ptb = load_yaml(TASKS / "bd3_zeroshot" / "bd3_zs_ptb.yaml")
    (pdoc,) = list(ptb["process_docs"](datasets.Dataset.from_list(
        [{"sentence": "the company 's shares did n't rise N \\/ N points"}])))
    assert pdoc["records"] == ["the company's shares didn't rise 1 / 1 points"]
    results = cfg["process_results"](doc, [ScoredLoglikelihood(-3.0, 12)])
    assert results["token_perplexity"] == (-3.0, 12)
    assert results["word_perplexity"] == (-3.0, 12) and results["bits_per_byte"] == (-3.0, 18 + 40)
    assert "token_perplexity" not in cfg["process_results"](doc, [-3.0])  # a model without a token count
