"""The tiny world: synthetic sources with exact probabilities, their data sets, and the checkpoints trained
on them (shipped under ``bd3_plugin/checkpoints`` and ``bd3_plugin/data``), so that everything runs the
moment the package is installed.

- ``grammar``: the English-like grammar (a probabilistic automaton with exact log p(doc)) and its tokenizer;
- ``data``: held-out documents, multiple-choice pairs, generation prompts, bundled checkpoint paths;
- ``report``: every bundled checkpoint against the source's exact entropy (``bd3 world``).
"""
