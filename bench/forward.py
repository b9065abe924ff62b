"""HookedViT vs timm forward throughput on the reference architecture, measured in one run.

    python bench/forward.py [--arch vit_base_patch32_224] [--batch-size 32] [--repeats 5] [--device auto]

Prints images/s for timm, HookedViT without hooks (fused attention) and HookedViT caching
``hook_pattern`` in every layer, and their ratios to timm. Weights are random (same for both):
throughput does not depend on their values. Runs alternate so drift hits both sides equally.
"""
from __future__ import annotations

import argparse
import json
import time

import timm
import torch

from vitcircuits.models.families.timm_vit import config_from_timm, convert_state_dict
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.models.loading import load_into, resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_base_patch32_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)

    ref = timm.create_model(args.arch, pretrained=False).eval()
    ours = HookedViT(config_from_timm(ref))
    load_into(ours, convert_state_dict(ref.state_dict(), ours.cfg), args.arch)
    ref, ours = ref.to(device, dtype), ours.to(device, dtype).eval()
    x = torch.randn(args.batch_size, 3, *ours.cfg.img_size, device=device, dtype=dtype)
    is_pattern = lambda name: name.endswith("hook_pattern")  # noqa: E731

    variants = {
        "timm": lambda: ref(x),
        "hooked_no_hooks": lambda: ours(x),
        "hooked_cache_patterns": lambda: ours.run_with_cache(x, names_filter=is_pattern),
    }
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                times[name].append(timed(fn, device))
    best = {name: min(t) for name, t in times.items()}
    result = {
        "arch": args.arch,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "images_per_s": {name: round(args.batch_size / t, 2) for name, t in best.items()},
        "ratio_no_hooks_vs_timm": round(best["timm"] / best["hooked_no_hooks"], 3),
        "ratio_cache_patterns_vs_timm": round(best["timm"] / best["hooked_cache_patterns"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
