import datasets

from bd3_plugin.tinyworld.data import mc_pairs


def load(**kwargs):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(mc_pairs())})


def doc_to_choice(doc):
    return [c + " <eos>" for c in doc["choices"]]
