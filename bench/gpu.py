"""Images/s of every image-streaming pass on a device, the decode rate against the model rate,
and GPU utilisation, in one run.

    python bench/gpu.py [--model vit_base_patch32_224 --random-weights] [--images SRC] [--max-images 1000]
                        [--device auto] [--dtype bfloat16] [--batch-size 128] [--num-workers 8]

- **decode**: the loader alone (decode and preprocess in ``--num-workers`` processes, pinned
  memory on a GPU machine), images/s.
- **model**: the forward pass alone on one decoded batch, repeated, images/s (fused attention, no
  hooks).
- **passes**: the overview's predictions, the head atlas (every layer's pattern), the activation
  harvest of one hook, and the mean-ablation statistics, each a full pass through the local
  engine, images/s.

``decode / model`` above 1 means the GPU is never waiting on JPEG decode. On CUDA, GPU utilisation
is sampled every 50 ms during each pass (``torch.cuda.utilization``, which needs ``pynvml``;
"n/a" without it). Runs on the CPU too, where the numbers say how far a CPU falls behind.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from vitcircuits.cache import CacheConfig, harvest
from vitcircuits.composition.necessity import ZStatsPass
from vitcircuits.heads.atlas import AtlasConfig
from vitcircuits.heads.scan import AtlasPass
from vitcircuits.inputs import ImageOptions, ModelOptions, provenance
from vitcircuits.stages.overview import PredictionPass


class Utilisation:
    """GPU utilisation sampled in a thread while the block runs (None off CUDA or without pynvml)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self.stop = device, [], threading.Event()

    def _sample(self) -> None:
        while not self.stop.wait(0.05):
            self.samples.append(torch.cuda.utilization(self.device))

    def __enter__(self) -> Utilisation:
        if self.device.type == "cuda":
            try:
                torch.cuda.utilization(self.device)
            except Exception:  # pynvml missing: utilisation is not measured
                return self
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch32_224")
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights (throughput does not depend on them)")
    parser.add_argument("--images", default="bundled:cifar10")
    parser.add_argument("--max-images", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=8)
    args = parser.parse_args(argv)

    model_options = ModelOptions(model=args.model, random_weights=args.random_weights, device=args.device, dtype=args.dtype)
    loaded = model_options.load()
    device = loaded.model.device
    images = ImageOptions(images=args.images, batch_size=args.batch_size, max_images=args.max_images, num_workers=args.num_workers).open(loaded)
    n = len(images)
    rows = {}

    t0 = time.perf_counter()
    first = None
    for batch in images.batches(progress=False):
        first = batch.images_BCHW if first is None else first
    rows["decode"] = {"images_per_s": round(n / (time.perf_counter() - t0), 1)}

    with torch.inference_mode():
        loaded.model(first)
        sync(device)
        repeats = max(1, n // len(first))
        with Utilisation(device) as util:
            t0 = time.perf_counter()
            for _ in range(repeats):
                loaded.model(first)
            sync(device)
        rows["model"] = {"images_per_s": round(repeats * len(first) / (time.perf_counter() - t0), 1), "gpu_util": util.mean}

    with tempfile.TemporaryDirectory() as tmp:
        hook = f"blocks.{loaded.model.cfg.n_layers // 2}.hook_resid_post"
        passes = {
            "predictions": lambda: images.map(loaded, PredictionPass(0), progress=False),
            "atlas": lambda: images.map(loaded, AtlasPass(AtlasConfig(n_boot=50)), progress=False),
            "harvest": lambda: harvest(Path(tmp), images, loaded, CacheConfig((hook,), dtype="float16"), provenance(loaded, images),
                                       progress=False),
            "ablation statistics": lambda: images.map(loaded, ZStatsPass(), progress=False),
        }
        for name, run in passes.items():
            with Utilisation(device) as util:
                t0 = time.perf_counter()
                run()
                sync(device)
            rows[name] = {"images_per_s": round(n / (time.perf_counter() - t0), 1), "gpu_util": util.mean}

    ratio = round(rows["decode"]["images_per_s"] / rows["model"]["images_per_s"], 2)
    print(f"{'step':<22}{'images/s':>10}{'GPU util %':>12}")
    for name, row in rows.items():
        util = row.get("gpu_util")
        print(f"{name:<22}{row['images_per_s']:>10}{'n/a' if util is None else util:>12}")
    print(f"decode / model: {ratio} ({'the model never waits on decode' if ratio >= 1 else 'decode is the bottleneck: add --num-workers'})")
    summary = {"device": str(device), "dtype": args.dtype, "model": args.model, "images": n, "batch_size": args.batch_size,
               "num_workers": args.num_workers, "rows": rows, "decode_over_model": ratio, "torch": torch.__version__}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
