"""Throughput of the ``ray`` engine with 1 and 2 workers against the local engine, on the same work.

    python bench/scale.py [--model bundled:shapes-vit] [--images bundled:shapes] [--repeats 3]
                          [--batch-size 50] [--shard-images 100] [--ray-address ADDR]

The work is the head-atlas pass (:class:`~vitcircuits.heads.scan.AtlasPass`) over every image,
``--repeats`` times per engine (the image list repeated, so decode and forward are both in it).
Prints images/s per engine, the ratio to the local engine, the time the driver spent merging
partial results (the merge overhead) as a share of the run, and checks that every engine counted
every image once. The local engine runs with the driver's torch threads; each Ray worker with
one (Ray's default for a 1-CPU actor), so on a machine with C cores, C workers is the fair match
for the local engine. Start-up (cluster, model replicas) is timed apart from throughput.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace

import torch

from vitcircuits.engine import EngineOptions
from vitcircuits.heads.atlas import AtlasConfig
from vitcircuits.heads.scan import AtlasPass
from vitcircuits.inputs import ImageOptions, ModelOptions


@dataclass(frozen=True)
class TimedMerge:
    """An atlas pass whose merges are timed on the driver."""

    work: AtlasPass
    seconds: list

    def start(self, model):
        return self.work.start(model)

    def step(self, model, part, batch):
        return self.work.step(model, part, batch)

    def finish(self, model, part):
        return self.work.finish(model, part)

    def merge(self, first, later):
        t0 = time.perf_counter()
        merged = self.work.merge(first, later)
        self.seconds.append(time.perf_counter() - t0)
        return merged


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled:shapes-vit")
    parser.add_argument("--images", default="bundled:shapes")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the images per engine")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--shard-images", type=int, default=100)
    parser.add_argument("--ray-address", default=None, help="cluster to join (default: a local one)")
    args = parser.parse_args(argv)

    model = ModelOptions(model=args.model, device="cpu")
    loaded = model.load()
    base = ImageOptions(images=args.images, batch_size=args.batch_size).open(loaded)
    images = replace(base, source=replace(base.source, items=base.source.items * args.repeats))
    work = AtlasPass(AtlasConfig(n_boot=50))
    rows, results = [], {}
    for name, options in (("local", EngineOptions(shard_images=args.shard_images)),
                          ("ray, 1 worker", EngineOptions(engine="ray", workers=1, shard_images=args.shard_images, ray_address=args.ray_address)),
                          ("ray, 2 workers", EngineOptions(engine="ray", workers=2, shard_images=args.shard_images, ray_address=args.ray_address))):
        t0 = time.perf_counter()
        engine = options.start(model, loaded)
        started = time.perf_counter() - t0
        merges: list[float] = []
        t0 = time.perf_counter()
        streamed = replace(images, engine=engine).map(loaded, TimedMerge(work, merges), progress=False)
        seconds = time.perf_counter() - t0
        engine.close()
        results[name] = streamed.result.acc
        rows.append({"engine": name, "start_s": round(started, 2), "images_per_s": round(len(images) / seconds, 1),
                     "merge_share": round(sum(merges) / seconds, 4), "n_images": streamed.result.acc.n_images})
    local = rows[0]["images_per_s"]
    print(f"{'engine':<16}{'start s':>9}{'images/s':>10}{'× local':>9}{'merge share':>13}{'images':>8}")
    for row in rows:
        row["ratio_to_local"] = round(row["images_per_s"] / local, 3)
        print(f"{row['engine']:<16}{row['start_s']:>9}{row['images_per_s']:>10}{row['ratio_to_local']:>9}{row['merge_share']:>13.2%}{row['n_images']:>8}")
    same = all(torch.allclose(results["local"].kernel_sum_LHO, acc.kernel_sum_LHO, rtol=1e-12, atol=0) for acc in results.values())
    summary = {"rows": rows, "same_atlas_sums": same, "torch_threads": torch.get_num_threads(), "images": len(images)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
