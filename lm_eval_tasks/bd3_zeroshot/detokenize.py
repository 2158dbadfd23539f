"""The reference's detokenisers and corpus preparation for the BD3 paper's zero-shot perplexity suite.

The detokenisers apply the reference's rules (kuleshov-group/bd3lms, dataloader.py), in its order, to
each document; AG News has none there and none here. Each task turns its split into one corpus: a single
document holding the split's documents joined by bd3_plugin.likelihood.zeroshot.RECORD_SEPARATOR, which the `bd3`
model scores with the paper's protocol (rows of model_length tokens; see bd3_plugin/likelihood/zeroshot.py).
"""
import re

import datasets

from bd3_plugin.likelihood.zeroshot import join_records

# Each rule is ("str", old, new) for a plain replacement or ("re", pattern, replacement).
WIKITEXT = (
    ("str", "s '", "s'"),
    ("re", r"/' [0-9]/", r"/'[0-9]/"),  # kept as the reference has it (it matches literal slashes)
    ("str", " @-@ ", "-"), ("str", " @,@ ", ","), ("str", " @.@ ", "."),
    ("str", " : ", ": "), ("str", " ; ", "; "), ("str", " . ", ". "), ("str", " ! ", "! "),
    ("str", " ? ", "? "), ("str", " , ", ", "),
    ("re", r"\(\s*([^\)]*?)\s*\)", r"(\1)"), ("re", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("re", r"{\s*([^}]*?)\s*}", r"{\1}"), ("re", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("re", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("str", "= = = =", "===="), ("str", "= = =", "==="), ("str", "= =", "=="),
    ("str", " \u00b0 ", "\u00b0"), ("str", " \n", "\n"), ("str", "\n ", "\n"),
    ("str", " N ", " 1 "), ("str", " 's", "'s"),
)
PTB = (
    ("str", " 's", "'s"), ("str", "s ' ", "s' "), ("str", " n't", "n't"), ("str", " \n ", "\n"),
    ("str", "\\/", "/"),
    # ten passes, as in the reference: overlapping " N N " needs more than one
    *(("str", " N ", " 1 "),) * 10,
    ("str", "$ 1", "$1"), ("str", "# 1", "#1"), ("str", "<unk>", "?"),
)
LM1B = (
    ("str", "http : / / ", "http://"), ("str", "https : / / ", "https://"),
    ("re", r" \'(\w+)", r"'\1"), ("re", r" (\w+) \. ", r" \1. "), ("re", r" (\w+) \.$", r" \1."),
    ("str", " ? ", "? "), ("re", r" \?$", "?"), ("str", " ! ", "! "), ("re", r" \!$", "!"),
    ("str", " , ", ", "), ("str", " : ", ": "), ("str", " ; ", "; "), ("str", " / ", "/"),
    ("re", r"\" ([^\"]+) \"", r'"\1"'), ("re", r"\' ([^\']+) \'", r"'\1'"),
    ("re", r"\( ([^\(\)]+) \)", r"(\1)"), ("re", r"\[ ([^\[\]]+) \]", r"[\1]"),
    ("str", "$ ", "$"), ("str", "\u00a3 ", "\u00a3"),
)


def apply_rules(text: str, rules) -> str:
    for kind, old, new in rules:
        text = text.replace(old, new) if kind == "str" else re.sub(old, new, text)
    return text


def wikitext(text: str) -> str:
    return apply_rules(text, WIKITEXT)


def ptb(text: str) -> str:
    return apply_rules(text, PTB)


def lm1b(text: str) -> str:
    return apply_rules(text, LM1B)


def lambada(text: str) -> str:
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific(text: str) -> str:
    return lm1b(wikitext(text))


def ag_news(text: str) -> str:
    return text  # the reference applies no detokeniser to AG News


def _corpus(field: str, detokenize):
    def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
        return datasets.Dataset.from_list([{"records": [detokenize(t) for t in dataset[field]]}])
    return process_docs


ptb_corpus = _corpus("sentence", ptb)
wikitext_corpus = _corpus("text", wikitext)
lm1b_corpus = _corpus("text", lm1b)
lambada_corpus = _corpus("text", lambada)
ag_news_corpus = _corpus("text", ag_news)
scientific_corpus = _corpus("article", scientific)


def corpus_text(doc) -> str:
    return join_records(doc["records"])


def process_results(doc, results):
    """token_perplexity is the paper's metric (per model token, over the rows scored); the word and byte
    perplexities divide the same log-likelihood by the corpus's words and bytes."""
    (loglikelihood,) = results
    records = doc["records"]
    n_words = sum(len(r.split()) for r in records)
    n_bytes = sum(len(r.encode("utf-8")) for r in records)
    out = {"word_perplexity": (loglikelihood, n_words), "byte_perplexity": (loglikelihood, n_bytes),
           "bits_per_byte": (loglikelihood, n_bytes)}
    tokens = getattr(loglikelihood, "tokens", None)  # reported by `--model bd3`
    if tokens is not None:
        out["token_perplexity"] = (float(loglikelihood), tokens)
    return out
