import datasets

from bd3_plugin.tinyworld.data import read_heldout


def load(**kwargs):
    docs = read_heldout()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"text": d.text, "tokens": d.tokens, "logprob": d.logprob} for d in docs])})


def doc_to_target(doc):
    return doc["text"] + " <eos>"  # the end of the document is part of what is scored


def process_results(doc, results):
    (loglikelihood,) = results
    # Word-level tokenizer: one word, one token; the EOS counts as a word, as it does in the source.
    return {"word_perplexity": (loglikelihood, doc["tokens"]),
            "true_word_perplexity": (doc["logprob"], doc["tokens"]),
            "bits_per_byte": (loglikelihood, len(doc_to_target(doc).encode()))}
