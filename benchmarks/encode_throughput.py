"""Benchmark: ``Encoder.encode`` against ``SentenceTransformer.encode`` on the same exported folder and texts.

Texts of mixed lengths (``--texts``, default 128): Lee background articles cut to lengths drawn log-uniformly between
8 and 2000 characters (seeded), shuffled. Both encoders run in this process on the same folder,
alternating, ``--repeats`` times after one warm-up each; the script prints texts per second, the
median ratio (ours / Sentence-Transformers; > 1 means we are faster) and the largest embedding
difference (must stay <= 1e-5).

    python benchmarks/encode_throughput.py --model runs/contrastive-gemma3-270m/hf
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    from bidirlm_pl.core import assets

    rng = random.Random(seed)
    docs = assets.lee_background()
    texts = []
    for i in range(n):
        doc = docs[i % len(docs)]
        length = int(math.exp(rng.uniform(math.log(8), math.log(2000))))
        texts.append(doc[:length])
    rng.shuffle(texts)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported folder (HF + Sentence-Transformers)")
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: both encoders run there")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both encoders)")
    parser.add_argument("--attn-implementation", default="sdpa",
                        help="ours: sdpa, or torch_varlen on CUDA (packed rows, no padding)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from bidirlm_pl.models.encoder import Encoder

    torch.set_num_threads(args.threads)
    texts = mixed_texts(args.texts)
    ours = Encoder.from_pretrained(args.model, max_length=args.max_length, device=args.device, dtype=args.dtype,
                                   attn_implementation=args.attn_implementation)
    st = SentenceTransformer(args.model, device=args.device,
                             model_kwargs={"dtype": getattr(torch, args.dtype), "attn_implementation": "sdpa"})
    st.max_seq_length = args.max_length
    lengths = [len(ids) for ids in ours.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]]
    print(f"model {args.model}: {len(texts)} texts, tokens min/median/max {min(lengths)}/"
          f"{int(statistics.median(lengths))}/{max(lengths)}, total {sum(lengths)}, batch {args.batch_size}, "
          f"threads {args.threads}, device {args.device}, {args.dtype}, ours {args.attn_implementation}")

    def run_ours():
        return ours.encode(texts, batch_size=args.batch_size, show_progress_bar=False)

    def run_st():
        with torch.inference_mode():
            return st.encode(texts, batch_size=args.batch_size, show_progress_bar=False)

    a, b = run_ours(), run_st()  # warm-up, and the equality check
    diff = float(np.abs(a - b).max())
    times = {"ours": [], "st": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("st", run_st)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ours_s, st_s = statistics.median(times["ours"]), statistics.median(times["st"])
    print(f"Encoder.encode:             {ours_s:7.2f} s  ({len(texts) / ours_s:6.1f} texts/s)  runs {times['ours']}")
    print(f"SentenceTransformer.encode: {st_s:7.2f} s  ({len(texts) / st_s:6.1f} texts/s)  runs {times['st']}")
    print(f"throughput ratio (ours / sentence-transformers): {st_s / ours_s:.3f}")
    print(f"max |embedding difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
