"""`bd3 nelbo`: the NELBO (an upper bound on the NLL) of a text, or of the tiny world's held-out documents
beside their exact NLL."""
from __future__ import annotations

import math
from pathlib import Path

from bd3_plugin.cli.common import UsageError, add_checkpoint, load, subparser, user_input


def add_parser(sub) -> None:
    p = subparser(sub, "nelbo", help="NELBO (an upper bound on the NLL) of a text")
    add_checkpoint(p)
    p.add_argument("--text-file", type=Path,
                   help="text to score (default: the bundled held-out documents of the synthetic language, "
                        "reported next to their exact NLL)")
    p.add_argument("--lines", action="store_true", help="each non-empty line is a document ending in EOS")
    p.add_argument("--estimator", default=None,
                   help="auto, exact, stratified or mc: how the bound's expectation is computed (default: auto)")
    p.add_argument("--passes", type=int, default=None, help="the most 2L passes per window (default: 16)")
    p.add_argument("--mc-samples", type=int, default=None,
                   help="Monte Carlo samples of t: the same as --estimator mc --passes K, with a standard error "
                        "(default: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> dict:
    from bd3_plugin.likelihood.estimators import check_fits, choose_estimator
    from bd3_plugin.likelihood.scoring import eval_interval, report, score_documents
    from bd3_plugin.tinyworld.data import HELDOUT, read_heldout, true_nll_per_token

    with user_input():
        estimator = choose_estimator(args.estimator, args.passes, args.mc_samples)
    truth = None
    if args.text_file is None:
        heldout = read_heldout(HELDOUT)
        texts = [d.text for d in heldout]
        lines = True
        truth = true_nll_per_token(heldout)
    else:
        if not args.text_file.is_file():
            raise UsageError(f"no such text file: {args.text_file}")
        text = args.text_file.read_text()
        texts = [t for t in text.splitlines() if t.strip()] if args.lines else [text]
        lines = args.lines
        if not "".join(texts).strip():
            raise UsageError(f"{args.text_file} is empty")
    ckpt = load(args)
    with user_input():
        check_fits(estimator, ckpt.model.config.block_size, *eval_interval(ckpt.model.config.block_size))
    eos = [ckpt.eos_id] if lines and ckpt.eos_id is not None else []
    docs = [ckpt.encode(t) + eos for t in texts]
    per_doc = score_documents(ckpt.model, docs, bos_id=ckpt.tokenizer.bos_token_id, estimator=estimator,
                              seed=args.seed, batch_size=args.batch_size, progress=not args.json)
    rep = report(per_doc, sum(len(d) for d in docs), estimator)
    out = rep.as_dict() | {"documents": len(docs), "block_size": ckpt.config.block_size}
    if truth is not None:
        out |= {"true_nll_per_token": truth, "true_ppl": math.exp(truth)}
    if not args.json:
        err = f" ± {rep.mc_stderr:.4f}" if rep.mc_stderr is not None else ""
        how = (f"{rep.mc_samples} MC sample(s)" if estimator.name == "mc"
               else f"estimator {estimator.name}, ≤ {estimator.passes} passes")
        print(f"{len(docs)} documents, {rep.tokens} tokens  NLL bound {rep.nll_per_token:.4f}{err} nats/token  "
              f"perplexity ≤ {rep.ppl_bound:.3f}  ({how}, L'={ckpt.config.block_size})")
        if truth is not None:
            print(f"exact NLL of the source {truth:.4f} nats/token  perplexity {math.exp(truth):.3f}")
    return out
