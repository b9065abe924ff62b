"""The spatial control: the same patches at shuffled positions.

Shuffling whole patches keeps every patch's content and the position embeddings (positions are
still 0..P-1) but destroys which patch neighbours which. A mechanism that attends by position
keeps its attention pattern on shuffled images but moves unrelated content; one that matches
content changes its attention.
"""
from __future__ import annotations

import torch


def shuffle_patches(images_BCHW: torch.Tensor, patch_hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Each image with its patch grid randomly permuted (an independent permutation per image)."""
    B, C, H, W = images_BCHW.shape
    ph, pw = patch_hw
    rows, cols = H // ph, W // pw
    patches_BPCpq = images_BCHW.reshape(B, C, rows, ph, cols, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, rows * cols, C, ph, pw)
    perm_BP = torch.stack([torch.randperm(rows * cols, generator=generator) for _ in range(B)])
    shuffled = patches_BPCpq[torch.arange(B)[:, None], perm_BP]
    return shuffled.reshape(B, rows, cols, C, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
