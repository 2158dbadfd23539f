"""The tiny world: synthetic sources with exact probabilities, their data sets, and the checkpoints trained
on them (shipped under ``bd3_plugin/checkpoints`` and ``bd3_plugin/data``), so that everything runs the
moment the package is installed.

- ``grammar``: the English-like grammar (a probabilistic automaton with exact log p(doc)) and its tokenizer;
- ``copying``: the copy task, a low-entropy source whose prompt fully determines a long answer;
- ``data``: held-out documents and items, multiple-choice pairs, generation prompts, training streams per
  source, bundled checkpoint paths;
- ``copy_eval``: exact correctness of a checkpoint's copies and tokens per denoising pass;
- ``report``: every bundled checkpoint against the source's exact entropy (``bd3 world``).
"""
