import datasets

from bd3_plugin.tinyworld.data import read_heldout
from bd3_plugin.likelihood.zeroshot import join_records


def load(**kwargs):
    docs = read_heldout()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"text": d.text, "tokens": d.tokens, "logprob": d.logprob} for d in docs])})


def doc_to_target(doc):
    return doc["text"] + " <eos>"  # the end of the document is part of what is scored


def _token_perplexity(loglikelihood) -> dict:
    tokens = getattr(loglikelihood, "tokens", None)  # reported by `--model bd3`
    return {} if tokens is None else {"token_perplexity": (float(loglikelihood), tokens)}


def process_results(doc, results):
    (loglikelihood,) = results
    # Word-level tokenizer: one word, one token; the EOS counts as a word, as it does in the source.
    return {"word_perplexity": (loglikelihood, doc["tokens"]),
            "true_word_perplexity": (doc["logprob"], doc["tokens"]),
            "bits_per_byte": (loglikelihood, len(doc_to_target(doc).encode()))} | _token_perplexity(loglikelihood)


def load_corpus(n_docs=None, corpus_docs=None, **kwargs):
    """The held-out set as one corpus for the paper's row protocol: every document with its `<eos>`, in
    order (the end of a document is a token of this language, so the stream keeps it). `--metadata
    '{"n_docs": N}'` keeps the first N documents. `corpus_docs=K` cuts them into corpora of K documents
    each, every one its own stream with its own dropped remainder, as the reference wraps per batch of
    documents (`datasets.map(batched=True)`): a task of many documents, which a sharded sweep can split."""
    docs = read_heldout()[: None if n_docs is None else int(n_docs)]
    size = len(docs) if corpus_docs is None else int(corpus_docs)
    corpora = [docs[i : i + size] for i in range(0, len(docs), size)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"records": [doc_to_target({"text": d.text}) for d in c], "tokens": sum(d.tokens for d in c)}
         for c in corpora])})


def corpus_text(doc):
    return join_records(doc["records"])


def corpus_results(doc, results):
    (loglikelihood,) = results
    return {"bits_per_byte": (loglikelihood, sum(len(r.encode()) for r in doc["records"]))} | \
        _token_perplexity(loglikelihood)
