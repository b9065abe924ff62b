"""HookedViT vs timm (and nnsight) forward throughput on the reference architecture, in one run.

    python bench/forward.py [--arch vit_base_patch32_224] [--batch-size 32] [--repeats 5]
                            [--device auto] [--threads N] [--no-memory]

Prints images/s, their ratios to timm, and peak memory for:

- ``timm``: plain timm ``VisionTransformer`` (fused attention);
- ``timm_unfused``: the same weights with ``fused_attn = False`` on every block, for reference:
  the explicit attention that any method exposing the pattern has to pay for;
- ``hooked_no_hooks``: HookedViT without hooks (fused attention);
- ``hooked_cache_patterns``: ``HookedViT.run_with_cache`` of ``hook_pattern`` in every layer;
- ``nnsight_cache_patterns``: ``nnsight.NNsight`` around a copy of the timm model with
  ``fused_attn = False``, saving every block's ``attn.attn_drop`` input (the post-softmax pattern;
  the dropout is identity in eval) inside one trace. Skipped, with one line saying how to install
  it, when nnsight is not importable.

Weights are random, the same for every method (throughput does not depend on their values), and
every method runs on the same batch. Before timing, the patterns nnsight saves are checked against
HookedViT's ``hook_pattern`` (max abs diff printed; must be < 1e-5 in float32). Runs alternate so
drift hits every method equally; the best of ``--repeats`` is reported.

Peak memory. On CUDA: ``torch.cuda.max_memory_allocated`` during one call of the method minus the
memory allocated before it, in this process. On CPU: each method runs in a fresh subprocess that
builds only what it needs, resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``, Linux), runs the method twice, and reports the high-water mark
(``VmHWM``) minus the resident set before the first call: the peak extra resident memory of the
forward, its activations and whatever it keeps (the cache). ``VmHWM`` rather than ``ru_maxrss``:
after ``exec`` the latter also carries the forked parent's high-water mark. Where /proc is not
available, the absolute ``ru_maxrss`` is reported and the extra is left out. ``cache_mb`` is the
size of the saved patterns themselves.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

import timm
import torch

from vitcircuits.models.families.timm_vit import config_from_timm, convert_state_dict
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.models.loading import load_into, resolve_device

try:
    import nnsight
except ImportError:
    nnsight = None

INSTALL_HINT = "nnsight is not installed, skipping its row (pip install nnsight to add it)"
METHODS = ["timm", "timm_unfused", "hooked_no_hooks", "hooked_cache_patterns", "nnsight_cache_patterns"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def nnsight_patterns(wrapped, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention pattern, [batch, head, query, key], read by nnsight in one trace."""
    with wrapped.trace(x):
        patterns = nnsight.save([])
        for block in wrapped.blocks:
            patterns.append(block.attn.attn_drop.input)
    return patterns


def build(args, device: torch.device, dtype: torch.dtype, wanted: list[str]):
    """The methods in ``wanted`` as zero-argument callables on one batch, all with the same weights."""
    torch.manual_seed(0)
    ref = timm.create_model(args.arch, pretrained=False).eval()
    fns, models = {}, {}
    if {"hooked_no_hooks", "hooked_cache_patterns"} & set(wanted):
        ours = HookedViT(config_from_timm(ref))
        load_into(ours, convert_state_dict(ref.state_dict(), ours.cfg), args.arch)
        models["ours"] = ours = ours.to(device, dtype).eval()
    if {"timm_unfused", "nnsight_cache_patterns"} & set(wanted):
        unfused = copy.deepcopy(ref)
        for block in unfused.blocks:
            block.attn.fused_attn = False
        models["unfused"] = unfused = unfused.to(device, dtype)
    ref = ref.to(device, dtype)
    x = torch.randn(args.batch_size, 3, *ref.patch_embed.img_size, device=device, dtype=dtype)
    is_pattern = lambda name: name.endswith("hook_pattern")  # noqa: E731

    if "timm" in wanted:
        fns["timm"] = lambda: ref(x)
    if "timm_unfused" in wanted:
        fns["timm_unfused"] = lambda: unfused(x)
    if "hooked_no_hooks" in wanted:
        fns["hooked_no_hooks"] = lambda: ours(x)
    if "hooked_cache_patterns" in wanted:
        fns["hooked_cache_patterns"] = lambda: ours.run_with_cache(x, names_filter=is_pattern)
    if "nnsight_cache_patterns" in wanted:
        # A copy, so that the wrapper cannot touch the models the other rows time.
        models["wrapped"] = wrapped = nnsight.NNsight(copy.deepcopy(unfused))
        fns["nnsight_cache_patterns"] = lambda: nnsight_patterns(wrapped, x)
    return fns, models, x


def check_nnsight(models: dict, x: torch.Tensor, dtype: torch.dtype) -> float:
    """Max abs difference between nnsight's saved patterns and HookedViT's ``hook_pattern``."""
    ours = models["ours"]
    _, cache = ours.run_with_cache(x, names_filter=lambda name: name.endswith("hook_pattern"))
    expected = cache.stack("blocks.{}.attn.hook_pattern", ours.cfg.n_layers).float()
    got = torch.stack(nnsight_patterns(models["wrapped"], x)).float()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    diff = (got - expected).abs().max().item()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert diff < tolerance, f"nnsight patterns differ from hook_pattern by {diff:.3g} (>= {tolerance})"
    return diff


def cache_bytes(result) -> int:
    """Bytes of the patterns a method keeps: HookedViT's cache or nnsight's list."""
    if isinstance(result, tuple):
        tensors = [t for name, t in result[1].items() if name.endswith("hook_pattern")]
    elif isinstance(result, list):
        tensors = result
    else:
        return 0
    return sum(t.numel() * t.element_size() for t in tensors)


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def memory_child(args, device: torch.device, dtype: torch.dtype) -> None:
    """Runs in a fresh process: the peak extra resident memory of one method (see the docstring)."""
    fns, _, _ = build(args, device, dtype, [args.memory_child])
    fn = fns[args.memory_child]
    with torch.inference_mode():
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets the resident-set high-water mark, VmHWM
            before, reset = status_kib("VmRSS"), True
        except OSError:
            before, reset = None, False
        result = fn()
        del result
        result = fn()
    peak = status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "peak_rss_mb": round(peak / 1024, 1),
        "peak_extra_mb": round((peak - before) / 1024, 1) if reset else None,
        "cache_mb": round(cache_bytes(result) / 2**20, 2),
    }))


def memory_of(name: str, args) -> dict:
    command = [sys.executable, __file__, "--memory-child", name, "--arch", args.arch,
               "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cuda_memory(fn, device: torch.device) -> dict:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_extra_mb": round((peak - before) / 2**20, 1), "cache_mb": round(cache_bytes(result) / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_base_patch32_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    if args.memory_child:
        memory_child(args, device, dtype)
        return

    wanted = METHODS if nnsight is not None else [m for m in METHODS if m != "nnsight_cache_patterns"]
    if nnsight is None:
        print(INSTALL_HINT)
    variants, models, x = build(args, device, dtype, wanted)

    times = {name: [] for name in variants}
    with torch.inference_mode():
        pattern_diff = check_nnsight(models, x, dtype) if nnsight is not None else None
        if pattern_diff is not None:
            print(f"nnsight patterns vs hook_pattern: max abs diff {pattern_diff:.3g}")
        for fn in variants.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                times[name].append(timed(fn, device))
    best = {name: min(t) for name, t in times.items()}

    memory = {}
    if not args.no_memory:
        for name, fn in variants.items():
            memory[name] = cuda_memory(fn, device) if device.type == "cuda" else memory_of(name, args)

    result = {
        "arch": args.arch,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "nnsight": getattr(nnsight, "__version__", None),
        "images_per_s": {name: round(args.batch_size / t, 2) for name, t in best.items()},
        "ratio_vs_timm": {name: round(best["timm"] / t, 3) for name, t in best.items()},
        "ratio_no_hooks_vs_timm": round(best["timm"] / best["hooked_no_hooks"], 3),
        "ratio_cache_patterns_vs_timm": round(best["timm"] / best["hooked_cache_patterns"], 3),
        "memory": memory,
        "nnsight_pattern_max_abs_diff": pattern_diff,
    }
    for name in best:
        mem = memory.get(name, {})
        extra = f"  peak extra {mem['peak_extra_mb']} MB" if mem.get("peak_extra_mb") is not None else ""
        print(f"{name:24s} {result['images_per_s'][name]:8.2f} images/s  "
              f"{result['ratio_vs_timm'][name]:.3f} x timm{extra}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
