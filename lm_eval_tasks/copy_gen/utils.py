import datasets

from bd3_plugin.tinyworld.copying import CopySource
from bd3_plugin.tinyworld.data import read_copy_heldout
from bd3_plugin.tinyworld.grammar import text_words

_SOURCE = CopySource()


def load(**kwargs):
    items = [{"prompt": i.prompt, "answer": i.answer} for i in read_copy_heldout()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})


def process_results(doc, results):
    # The completion stops before <eos>; one that ran out of tokens instead has a word too many.
    (completion,) = results
    return {"exact": float(_SOURCE.is_correct(doc["prompt"].split(), text_words(completion)))}
