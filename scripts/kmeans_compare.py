#!/usr/bin/env python3
"""The two k-means variants on the features the cluster loss clusters, scored against the labels.

    python scripts/kmeans_compare.py runs/demo/checkpoints/ckpt-000001200 [--seeds 0 1 2]

Embeds the colour phase images of the checkpoint's training domains with its encoder (as the
trainer does before every epoch's clustering), runs ``loss.kmeans`` = euclidean (the original's
faiss k-means) and spherical with the checkpoint's k, niter and nredo, and prints each one's NMI
and ARI to the class labels (which training never sees), mean ± std over the seeds, as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from dgucdir.cluster import run_kmeans
from dgucdir.cluster_features import training_features
from dgucdir.data.manifest import Manifest
from dgucdir.data.spec import PipelineSpec
from dgucdir.model.loading import encoder_from_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    encoder, cfg = encoder_from_checkpoint(args.checkpoint)
    device = torch.device("cpu")
    spec = PipelineSpec.for_device(cfg.data.image_size, cfg.data.num_threads, device)
    feats, labels, _, _ = training_features(encoder, cfg, Manifest.load(cfg.data.manifest), spec, device)
    lc = cfg.loss
    result: dict = {"checkpoint": str(args.checkpoint), "points": len(feats), "k": lc.num_clusters,
                    "niter": lc.kmeans_niter, "nredo": lc.kmeans_nredo, "seeds": args.seeds}
    for kind in ("euclidean", "spherical"):
        nmi, ari, seconds = [], [], []
        for seed in args.seeds:
            start = time.perf_counter()
            out = run_kmeans(kind, feats, lc.num_clusters, lc.kmeans_niter, lc.kmeans_nredo, seed,
                             lc.kmeans_max_points_per_centroid)
            seconds.append(time.perf_counter() - start)
            nmi.append(normalized_mutual_info_score(labels.tolist(), out.assignments.tolist()))
            ari.append(adjusted_rand_score(labels.tolist(), out.assignments.tolist()))
        result[kind] = {name: [round(statistics.mean(v), 4), round(statistics.pstdev(v), 4)]
                        for name, v in (("NMI", nmi), ("ARI", ari), ("seconds", seconds))}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
