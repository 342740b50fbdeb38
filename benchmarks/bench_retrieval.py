"""Exact retrieval: FAISS vs torch brute force, 10k queries over a 100k x 512 gallery.

Usage: python benchmarks/bench_retrieval.py [--queries 10000] [--gallery 100000] [--dim 512] [--hnsw]

Both sides run in this process on the same data and threads; the ratio printed
is torch time / FAISS time (> 1 means FAISS is faster). The data imitate
embeddings: a gallery drawn around 1,000 cluster centres and queries that are
noisy copies of gallery items. "same top-k" is the share of queries whose
ranked neighbour lists are identical in both backends (float32 near-ties can
swap neighbours). With --hnsw it also builds an HNSW index and reports its
recall@10 against the exact result.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import median_time, print_table, save

from halo_embed.eval import VectorIndex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hnsw", action="store_true")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(1000, args.dim, generator=g)
    gallery = centres[torch.randint(0, 1000, (args.gallery,), generator=g)]
    gallery += 0.5 * torch.randn(args.gallery, args.dim, generator=g)
    queries = gallery[torch.randint(0, args.gallery, (args.queries,), generator=g)]
    queries += 0.3 * torch.randn(args.queries, args.dim, generator=g)
    warm = queries[:200]

    rows, payload = [], {"sizes": vars(args)}
    for metric in ("l2", "cosine"):
        faiss_index = VectorIndex(gallery, metric, "faiss")
        torch_index = VectorIndex(gallery, metric, "torch")
        faiss_index.search(warm, args.k), torch_index.search(warm, args.k)  # warm-up
        t_faiss = median_time(lambda: faiss_index.search(queries, args.k), repeats=args.repeats, warmup=0)
        t_torch = median_time(lambda: torch_index.search(queries, args.k), repeats=args.repeats, warmup=0)
        a, b = faiss_index.search(queries, args.k).indices, torch_index.search(queries, args.k).indices
        same = (a == b).all(1).float().mean().item()
        rows.append([metric, f"{t_faiss:.2f}", f"{t_torch:.2f}", f"{t_torch / t_faiss:.2f}", f"{same:.4f}"])
        payload[metric] = {"faiss_s": t_faiss, "torch_s": t_torch, "torch_over_faiss": t_torch / t_faiss,
                           "identical_neighbours": same}
    print(f"exact top-{args.k}: {args.queries} queries x {args.gallery} x {args.dim} gallery")
    print_table(["metric", "faiss s", "torch s", "torch/faiss", "same top-k"], rows)

    if args.hnsw:
        start = time.perf_counter()
        hnsw = VectorIndex(gallery, "l2", "faiss", "hnsw")
        build = time.perf_counter() - start
        t_hnsw = median_time(lambda: hnsw.search(queries, args.k), repeats=args.repeats)
        exact = VectorIndex(gallery, "l2", "faiss").search(queries, args.k).indices
        approx = hnsw.search(queries, args.k).indices
        recall = (approx.unsqueeze(2) == exact.unsqueeze(1)).any(2).float().mean().item()
        print(f"HNSW (M=32, efSearch=128): build {build:.1f} s, search {t_hnsw:.2f} s, recall@{args.k} vs exact {recall:.4f}")
        payload["hnsw"] = {"build_s": build, "search_s": t_hnsw, "recall_vs_exact": recall}
    save("retrieval", payload)


if __name__ == "__main__":
    main()
