"""Architecture description of a pre-norm ViT and the layout of its token sequence."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

Activation = Literal["gelu", "gelu_tanh", "quick_gelu"]
FinalNorm = Literal["tokens", "pooled", "none"]
Pooling = Literal["token", "avg", "none"]


@dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token sits in the sequence ``[CLS?, DIST?, registers…, patches]``.

    Patches are stored row-major: patch ``(row, col)`` is token ``patch_start + row * cols + col``.
    """

    cls_index: int | None
    """Index of the class token, or None when the model has none."""
    dist_index: int | None
    """Index of the DeiT distillation token, or None."""
    register_slice: tuple[int, int]
    """``[start, stop)`` of the register tokens (empty when there are none)."""
    patch_start: int
    """Index of the first patch token (= number of prefix tokens)."""
    rows: int
    """Patch-grid height."""
    cols: int
    """Patch-grid width."""

    @property
    def n_patches(self) -> int:
        return self.rows * self.cols

    @property
    def n_tokens(self) -> int:
        return self.patch_start + self.n_patches

    @property
    def n_registers(self) -> int:
        return self.register_slice[1] - self.register_slice[0]

    def patch_index(self, row: int, col: int) -> int:
        """Token index of the patch at grid position ``(row, col)``."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"patch ({row}, {col}) is outside the {self.rows}x{self.cols} grid")
        return self.patch_start + row * self.cols + col

    def patch_position(self, token: int) -> tuple[int, int]:
        """Grid ``(row, col)`` of a patch token index."""
        p = token - self.patch_start
        if not (0 <= p < self.n_patches):
            raise IndexError(f"token {token} is not a patch token")
        return divmod(p, self.cols)

    def neighbour_block_NN(self) -> torch.Tensor:
        """``[N, N]`` additive attention mask of a neighbour-blocked layer
        (:attr:`ViTConfig.neighbour_blocked_layers`): ``-inf`` from each patch query to the patch
        keys at Chebyshev distance 1, 0 elsewhere."""
        rows_P, cols_P = (t.flatten() for t in torch.meshgrid(torch.arange(self.rows), torch.arange(self.cols), indexing="ij"))
        distance_PP = torch.maximum((rows_P[:, None] - rows_P).abs(), (cols_P[:, None] - cols_P).abs())
        mask_NN = torch.zeros(self.n_tokens, self.n_tokens)
        mask_NN[self.patch_start :, self.patch_start :] = torch.where(distance_PP == 1, float("-inf"), 0.0)
        return mask_NN


@dataclass(frozen=True)
class ViTConfig:
    """Everything needed to build a :class:`~vitcircuits.models.HookedViT`.

    Converters (``vitcircuits.models.families``) produce this from timm or transformers models.
    """

    d_model: int
    """Residual-stream width D."""
    n_layers: int
    """Number of transformer blocks L."""
    n_heads: int
    """Attention heads per block H."""
    d_head: int
    """Width of one head Dh (``n_heads * d_head`` need not equal ``d_model``)."""
    d_mlp: int
    """Hidden width of the MLP."""
    patch_size: tuple[int, int]
    """Patch height and width in pixels."""
    img_size: tuple[int, int]
    """Input height and width in pixels; the grid is ``img_size // patch_size``."""
    in_chans: int = 3
    """Input image channels."""
    class_token: bool = True
    """Prepend a learned class token."""
    dist_token: bool = False
    """Prepend a DeiT distillation token after the class token."""
    dist_head: bool = True
    """With a distillation token and classes: average the class head and a distillation head
    (DeiT's inference rule). False: only the class head is used."""
    n_registers: int = 0
    """Number of register tokens after the class/distillation tokens."""
    pos_embed_prefix: bool = True
    """Position embeddings also cover the prefix tokens (False: patches only, as DINOv2-reg, DeiT-3)."""
    patch_bias: bool = True
    """The patch-embedding convolution has a bias (CLIP has none)."""
    qkv_bias: bool = True
    """The fused query/key/value projection has a bias."""
    layer_scale: bool = False
    """Per-channel learned scales on the attention and MLP outputs (CaiT/DINOv2)."""
    pre_norm: bool = False
    """LayerNorm after the embeddings, before the first block (CLIP's ``ln_pre``)."""
    final_norm: FinalNorm = "tokens"
    """``tokens``: LayerNorm every token after the last block; ``pooled``: LayerNorm after pooling
    (timm's ``fc_norm``, CLIP's ``post_layernorm``); ``none``."""
    pooling: Pooling = "token"
    """``token``: read the class token; ``avg``: mean of patch tokens; ``none``: return all tokens."""
    activation: Activation = "gelu"
    """MLP non-linearity: exact GELU, tanh-approximated GELU or CLIP's quick-GELU."""
    ln_eps: float = 1e-6
    """LayerNorm epsilon."""
    n_classes: int = 0
    """Classifier outputs; 0 means no head (the model returns pooled features)."""
    head_bias: bool = True
    """The classifier head has a bias (CLIP's projection has none)."""
    neighbour_blocked_layers: tuple[int, ...] = ()
    """Layers whose patch queries cannot attend to the 8 patches around them (each patch itself and
    the prefix tokens stay open): the co-perturbation of the training-dynamics study
    (``docs/dynamics.md``), read from an organism's ``config.json``. Not a timm feature: timm runs
    such a model without the block."""

    def __post_init__(self) -> None:
        if self.pooling == "token" and not self.class_token:
            raise ValueError("token pooling needs a class token")
        if self.dist_token and not self.class_token:
            raise ValueError("a distillation token needs a class token")
        rows, cols = self.grid
        if rows < 1 or cols < 1 or self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} is not a positive multiple of patch_size {self.patch_size}")
        if any(not 0 <= layer < self.n_layers for layer in self.neighbour_blocked_layers):
            raise ValueError(f"neighbour_blocked_layers {list(self.neighbour_blocked_layers)}: not layers of a {self.n_layers}-layer model")

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]

    @property
    def n_prefix(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.n_registers

    @property
    def layout(self) -> TokenLayout:
        rows, cols = self.grid
        reg_start = int(self.class_token) + int(self.dist_token)
        return TokenLayout(
            cls_index=0 if self.class_token else None,
            dist_index=1 if self.dist_token else None,
            register_slice=(reg_start, reg_start + self.n_registers),
            patch_start=self.n_prefix,
            rows=rows,
            cols=cols,
        )

    def replace(self, **changes) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
