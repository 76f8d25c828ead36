"""Write one shard file per client for a real Flower deployment; prints each node's ``--node-config`` value.
Usage: ``python -m lightning_unlearn.federated.flower.prepare_data --out /tmp/unlearn-nodes --num-clients 3``."""
from __future__ import annotations

import argparse
from pathlib import Path

from lightning_unlearn.federated.partitions import DATASETS, FederatedPartitions, save_partition


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for client<k>.pt files")
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data-root", default=None, help="MNIST folder (dataset=mnist)")
    p.add_argument("--num-clients", type=int, default=3)
    p.add_argument("--partition", default="iid")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args(argv)
    parts = FederatedPartitions(a.dataset, a.num_clients, a.partition, a.alpha, a.seed, a.batch_size, a.data_root)
    fdm = parts.datamodule()
    paths = [save_partition(fdm, k, Path(a.out) / f"client{k}.pt") for k in range(a.num_clients)]
    for k, path in enumerate(paths):
        print(f"client {k}: --node-config \"data-path='{path.resolve()}'\"")
    return paths


if __name__ == "__main__":
    main()
