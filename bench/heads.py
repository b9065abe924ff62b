"""Head-atlas scan cost on the reference architecture, against plain timm forward in the same run.

    python bench/heads.py [--arch vit_base_patch32_224] [--images 256] [--batch-size 32] [--device auto]
    python bench/heads.py --memory          # peak RSS of a scan over 64 vs 1024 images

Throughput: images/s of (a) timm forward and (b) the full scan (HookedViT forward with every
layer's pattern fed to the streaming accumulator), alternating batches so drift hits both.
Memory: each size runs in a fresh subprocess and reports its peak resident set size; the
accumulator keeps only sums, so the two should agree within a few percent. Weights and images
are random: cost does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import timm
import torch

from vitcircuits.heads.atlas import AtlasConfig, accumulate, build_atlas, new_accumulator
from vitcircuits.models.families.timm_vit import config_from_timm, convert_state_dict
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.models.loading import load_into, resolve_device


def models(arch: str, device: torch.device):
    ref = timm.create_model(arch, pretrained=False).eval()
    ours = HookedViT(config_from_timm(ref))
    load_into(ours, convert_state_dict(ref.state_dict(), ours.cfg), arch)
    return ref.to(device), ours.to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(args, device: torch.device) -> dict:
    ref, ours = models(args.arch, device)
    acc = new_accumulator(ours, AtlasConfig())
    g = torch.Generator().manual_seed(0)
    n_batches = args.images // args.batch_size
    batches = [torch.randn(args.batch_size, 3, *ours.cfg.img_size, generator=g) for _ in range(2)]
    t_ref = t_scan = 0.0
    with torch.inference_mode():
        ref(batches[0].to(device))
        for i in range(n_batches):
            x = batches[i % 2].to(device)
            sync(device)
            start = time.perf_counter()
            ref(x)
            sync(device)
            t_ref += time.perf_counter() - start
            start = time.perf_counter()
            accumulate(ours, acc, x, list(range(i * args.batch_size, (i + 1) * args.batch_size)))
            sync(device)
            t_scan += time.perf_counter() - start
        start = time.perf_counter()
        build_atlas(ours, acc, AtlasConfig(), args.arch)
        t_build = time.perf_counter() - start
    n = n_batches * args.batch_size
    return {
        "arch": args.arch, "device": str(device), "images": n, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "timm_images_per_s": round(n / t_ref, 2), "scan_images_per_s": round(n / t_scan, 2),
        "ratio_scan_vs_timm": round(t_ref / t_scan, 3), "atlas_build_s": round(t_build, 2),
    }


def scan_peak_rss(args) -> None:
    device = resolve_device(args.device)
    _, ours = models(args.arch, device)
    acc = new_accumulator(ours, AtlasConfig())
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for start in range(0, args.images, args.batch_size):
            x = torch.randn(args.batch_size, 3, *ours.cfg.img_size, generator=g).to(device)
            accumulate(ours, acc, x, list(range(start, start + args.batch_size)))
    build_atlas(ours, acc, AtlasConfig(), args.arch)
    print(json.dumps({"images": args.images, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def memory(args) -> dict:
    out = {}
    for n in (64, 1024):
        cmd = [sys.executable, __file__, "--peak-rss-only", "--images", str(n), "--arch", args.arch,
               "--batch-size", str(args.batch_size), "--device", args.device]
        out[n] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return {"arch": args.arch, "peak_rss_mb_64": out[64], "peak_rss_mb_1024": out[1024], "ratio_1024_vs_64": round(out[1024] / out[64], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_base_patch32_224")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--memory", action="store_true", help="measure peak memory at 64 vs 1024 images")
    parser.add_argument("--peak-rss-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss_only:
        scan_peak_rss(args)
    elif args.memory:
        print(json.dumps(memory(args), indent=2))
    else:
        print(json.dumps(throughput(args, resolve_device(args.device)), indent=2))


if __name__ == "__main__":
    main()
