"""Peak memory of SAE training from a sharded harvest, at 1× and 8× the data.

    python bench/sae_memory.py [--shards 4] [--scales 1 8] [--shard-rows 16384] [--width 64]

Writes a synthetic harvest (``--shards × scale`` shards of ``--shard-rows`` rows of width
``--width``, in the layout of :mod:`vitcircuits.cache`) and trains a TopK SAE on it for one epoch
through the stage's path (:func:`~vitcircuits.sae.harvest.training_batches`, a shuffle buffer of
65,536 rows, then :func:`~vitcircuits.sae.train.train_sae`), each scale in a fresh process.
Peak memory is the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after imports and harvest writing) minus the resident set at the reset:
the memory training adds. Prints, per scale, the rows, the peak, and the ratio of peaks to the 1×
run; the goal is a ratio near 1 (memory does not grow with the number of shards).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from forward import status_kib  # bench/forward.py, beside this script
from safetensors.torch import save_file

from vitcircuits.cache import CacheConfig, CacheIndex
from vitcircuits.sae.harvest import ShardReader, training_batches
from vitcircuits.sae.model import SAEConfig
from vitcircuits.sae.train import TrainConfig, train_sae

HOOK = "blocks.0.hook_resid_post"


def write_harvest(folder: Path, n_shards: int, shard_rows: int, width: int) -> int:
    """A synthetic harvest of ``n_shards`` shards (64 tokens per image); returns its rows."""
    index = CacheIndex(folder, CacheConfig((HOOK,), shard_rows=shard_rows), {"images": "synthetic"})
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(width, width, generator=g)
    per_image = 64
    for s in range(n_shards):
        first = s * shard_rows // per_image
        images = torch.arange(first, first + shard_rows // per_image)
        tensors = {HOOK: torch.randn(shard_rows, width, generator=g) @ mix, "image_index": images.repeat_interleave(per_image),
                   "view": torch.zeros(shard_rows, dtype=torch.long), "token": torch.arange(per_image).repeat(len(images)),
                   "row": torch.zeros(shard_rows, dtype=torch.long), "col": torch.zeros(shard_rows, dtype=torch.long)}
        name = f"shard_{first:08d}.safetensors"
        save_file(tensors, str(folder / name))
        index.add([{"file": name, "rows": shard_rows, "images": images.tolist()}])
    return n_shards * shard_rows


def child(args) -> None:
    """One scale, in a fresh process."""
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = write_harvest(Path(tmp), args.shards * args.child, args.shard_rows, args.width)
        reader = ShardReader(Path(tmp), HOOK)
        batch = 1024
        steps = reader.n_training_rows(10) // batch
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = status_kib("VmRSS")
        t0 = time.perf_counter()
        train_sae(training_batches(reader, batch, 1, 10, 65536, 0), SAEConfig(d_in=args.width, d_sae=4 * args.width, k=8),
                  TrainConfig(total_steps=steps, batch_size=batch, log_every=max(1, steps // 10), init_sample_rows=8192), progress=False)
        seconds = time.perf_counter() - t0
        peak = status_kib("VmHWM")
    print(json.dumps({"scale": args.child, "rows": rows, "steps": steps, "peak_extra_mb": round((peak - before) / 1024, 1),
                      "seconds": round(seconds, 1)}))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4, help="shards at 1×")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--shard-rows", type=int, default=16384)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args)
        return []
    results = []
    for scale in args.scales:
        command = [sys.executable, __file__, "--child", str(scale), "--shards", str(args.shards), "--shard-rows", str(args.shard_rows),
                   "--width", str(args.width)]
        results.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
    base = results[0]["peak_extra_mb"]
    print(f"{'scale':>6}{'rows':>10}{'steps':>7}{'peak extra MB':>15}{'× 1×':>7}{'seconds':>9}")
    for r in results:
        r["ratio"] = round(r["peak_extra_mb"] / base, 3) if base else None
        print(f"{r['scale']:>6}{r['rows']:>10}{r['steps']:>7}{r['peak_extra_mb']:>15}{r['ratio']:>7}{r['seconds']:>9}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
