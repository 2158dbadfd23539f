"""Detokenizers and metric plumbing for the BD3 paper's zero-shot perplexity suite.

The corpora come pre-tokenized (spaces around punctuation, PTB/WikiText escapes); the paper scores them
after undoing that, so that the GPT-2 tokenizer sees ordinary text.
"""
import re


def _common(text: str) -> str:
    text = re.sub(r" ([.,;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", text)
    text = text.replace(" ' ", "' ")
    text = re.sub(r'" ([^"]*?) "', r'"\1"', text)
    return re.sub(r"[ \t]+", " ", text).strip()


def wikitext(doc) -> str:
    text = doc["page"]
    for escaped, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        text = text.replace(escaped, plain)
    text = re.sub(r"= = = (.*?) = = =", r"=== \1 ===", text)
    text = re.sub(r"= = (.*?) = =", r"== \1 ==", text)
    return "\n".join(_common(line) for line in text.split("\n"))


def ptb(doc) -> str:
    text = doc["sentence"].replace("\\/", "/")
    return _common(text)


def lambada(doc) -> str:
    return _common(doc["text"].replace("“", '"').replace("”", '"'))


def lm1b(doc) -> str:
    return _common(doc["text"].replace(" @-@ ", "-"))


def ag_news(doc) -> str:
    return _common(doc["text"].replace("\\", " "))


def scientific(doc) -> str:
    text = doc["article"].replace(" @xmath", " @math").replace("@xcite", "[cite]")
    return _common(text)


def _bytes_and_words(text: str) -> tuple[int, int]:
    return len(text.encode("utf-8")), len(re.split(r"\s+", text.strip()))


def results_for(detokenize):
    def process_results(doc, results):
        (loglikelihood,) = results
        n_bytes, n_words = _bytes_and_words(detokenize(doc))
        return {"word_perplexity": (loglikelihood, n_words), "byte_perplexity": (loglikelihood, n_bytes),
                "bits_per_byte": (loglikelihood, n_bytes)}
    return process_results


wikitext_results = results_for(wikitext)
ptb_results = results_for(ptb)
lambada_results = results_for(lambada)
lm1b_results = results_for(lm1b)
ag_news_results = results_for(ag_news)
scientific_results = results_for(scientific)
