import datasets

from bd3_plugin.tinyworld.grammar import Source, text_words
from bd3_plugin.tinyworld.data import generation_prompts

_SOURCE = Source()


def load(**kwargs):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(generation_prompts())})


def process_results(doc, results):
    (completion,) = results
    return {"valid": float(_SOURCE.is_valid(text_words(doc["prompt"] + " " + completion)))}
