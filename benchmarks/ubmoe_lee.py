"""UBMoE on the Lee corpus: causal perplexity on held-out text and Lee similarity Spearman, per variant.

Variants, all measured in the same run on the same text:

* ``original``      — the base model (Gemma3-270M or a tiny model).
* ``bi-FFN``        — the bidirectionally fine-tuned FFNs alone (UBMoE routed ``forced1``), used causally.
* ``UBMoE``         — learned routing (the folder's ``generate`` routing, e.g. soft) for generation;
                      the ``embed`` routing (default ``forced1``) for embeddings.
* ``UBMoE top1``    — the same routers with top-1 dispatch (each token through one expert only).

(``forced0`` is the original model exactly — tests prove it — so it is not measured again.)

Perplexity: the last ``--holdout`` Lee background documents (never seen in training), packed into
``--max-length`` rows, causal attention. Spearman: the 50 Lee documents, bidirectional attention,
mean pooling, cosine over the 1225 pairs vs the human ratings. Ratios are against ``original``.

    python benchmarks/ubmoe_lee.py --original gemma3-270m --ubmoe runs/ubmoe/gemma3-270m/stage2/hf
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bidirlm_pl import load_backbone, moe
from bidirlm_pl.evaluation.embedding import lee_spearman
from bidirlm_pl.evaluation.generation import causal_perplexity
from bidirlm_pl.models.encoder import Encoder
from bidirlm_pl.moe.data import split_documents


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", default="gemma3-270m")
    parser.add_argument("--ubmoe", required=True, help="a UBMoE folder (stage-2 output)")
    parser.add_argument("--holdout", type=int, default=30)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--embed-length", type=int, default=512)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    held_out = split_documents(None, args.holdout)[1]
    rows = {}

    spearman_cache: dict[tuple[str, str | None], float] = {}

    def measure(name, model, tok, routing_generate, routing_embed, key):
        t0 = time.time()
        if moe.is_ubmoe(model):
            moe.set_routing(model, routing_generate)
        ppl = causal_perplexity(model, tok, held_out, max_length=args.max_length)
        if (key, routing_embed) not in spearman_cache:  # same weights and routing: same embeddings
            if moe.is_ubmoe(model):
                moe.set_routing(model, routing_embed)
            spearman_cache[key, routing_embed] = lee_spearman(
                Encoder(model, tok, normalize=False, max_length=args.embed_length, bidirectional=True))
        rows[name] = {"perplexity": ppl, "spearman": spearman_cache[key, routing_embed],
                      "generate_routing": routing_generate, "embed_routing": routing_embed}
        print(f"  measured {name} in {time.time() - t0:.0f}s", flush=True)

    original, tok = load_backbone(args.original, bidirectional=False)
    measure("original", original, tok, None, None, "original")
    del original
    model, tok = moe.load_ubmoe(args.ubmoe, bidirectional=False)
    spec = moe.spec_of(model)
    measure("bi-FFN (forced1)", model, tok, "forced1", "forced1", "ubmoe")
    measure("UBMoE (learned)", model, tok, spec.mode_routing["generate"], spec.mode_routing["embed"], "ubmoe")
    measure("UBMoE top1", model, tok, "top1", spec.mode_routing["embed"], "ubmoe")
    base = rows["original"]
    print(f"\nheld-out Lee perplexity ({len(held_out)} docs, causal) and Lee Spearman (50 docs, bidirectional mean)")
    print(f"{'variant':<20} {'gen routing':<12} {'perplexity':>11} {'ppl/orig':>9} {'emb routing':<12} "
          f"{'spearman':>9} {'rho-orig':>9}")
    for name, r in rows.items():
        print(f"{name:<20} {r['generate_routing']!s:<12} {r['perplexity']:>11.3f} "
              f"{r['perplexity'] / base['perplexity']:>9.3f} {r['embed_routing']!s:<12} "
              f"{r['spearman']:>9.4f} {r['spearman'] - base['spearman']:>+9.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
