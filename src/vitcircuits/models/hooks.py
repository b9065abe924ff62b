"""Hook points and the hook/cache API (TransformerLens-style names and semantics).

A :class:`HookPoint` is an identity module placed on every named activation. Hook functions
have the signature ``fn(tensor, hook) -> tensor | None``; returning a tensor replaces the
activation. A hook point without hooks returns its input untouched at the cost of one
attribute check.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Union

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]
NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]


class HookPoint(nn.Module):
    """Identity on an activation, where hooks can read or replace it."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""

    @property
    def has_hooks(self) -> bool:
        return bool(self._forward_hooks)

    def add_hook(self, fn: HookFn) -> torch.utils.hooks.RemovableHandle:
        def wrapper(module: nn.Module, args: tuple, output: torch.Tensor):
            return fn(output, self)

        return self.register_forward_hook(wrapper)

    def remove_hooks(self) -> None:
        self._forward_hooks.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x) if self._forward_hooks else x


def names_filter_fn(names_filter: NamesFilter) -> Callable[[str], bool]:
    """Turn ``None`` (everything), a name, a list of names or a predicate into a predicate."""
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    wanted = set(names_filter)
    return lambda name: name in wanted


class ActivationCache(dict):
    """Activations by hook name, with a few conveniences for stacking per-layer values."""

    def stack(self, template: str, n_layers: int) -> torch.Tensor:
        """Stack ``template.format(l)`` over layers, e.g. ``'blocks.{}.attn.hook_pattern'``."""
        return torch.stack([self[template.format(layer)] for layer in range(n_layers)])


class HookedRootModule(nn.Module):
    """Mixin giving a module with HookPoints the hooks context manager, run_with_hooks and
    run_with_cache. Subclasses call :meth:`setup_hooks` at the end of ``__init__``."""

    hook_dict: dict[str, HookPoint]

    def setup_hooks(self) -> None:
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def reset_hooks(self) -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks()

    def _resolve(self, name_or_filter: str | Callable[[str], bool]) -> list[HookPoint]:
        if isinstance(name_or_filter, str):
            if name_or_filter not in self.hook_dict:
                raise KeyError(f"no hook point named {name_or_filter!r}; see model.hook_names")
            return [self.hook_dict[name_or_filter]]
        return [hp for name, hp in self.hook_dict.items() if name_or_filter(name)]

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = ()) -> Iterator[None]:
        """Add hooks for the duration of a ``with`` block; they are removed on exit, even on error."""
        handles = []
        try:
            for name_or_filter, fn in fwd_hooks:
                handles.extend(hp.add_hook(fn) for hp in self._resolve(name_or_filter))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def run_with_hooks(self, *args, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (), **kwargs):
        """Run ``forward`` with temporary hooks."""
        with self.hooks(fwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(
        self,
        *args,
        names_filter: NamesFilter = None,
        device: torch.device | str | None = None,
        detach: bool = True,
        **kwargs,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Run ``forward`` and return ``(output, cache)`` with every activation that passes
        ``names_filter``. Only requested hooks are attached, so unrequested attention patterns
        are never materialised."""
        cache = ActivationCache()
        keep = names_filter_fn(names_filter)

        def save(tensor: torch.Tensor, hook: HookPoint) -> None:
            value = tensor.detach() if detach else tensor
            cache[hook.name] = value.to(device) if device is not None else value

        hooks = [(name, save) for name in self.hook_dict if keep(name)]
        with self.hooks(hooks):
            out = self(*args, **kwargs)
        return out, cache


PER_TOKEN_SUFFIXES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                      "hook_normalized", "hook_q", "hook_k", "hook_v", "hook_z", "hook_pre", "hook_post", "hook_result")


def check_hooks(model, hooks: tuple[str, ...]) -> None:
    """Refuse hook names the model lacks, and hooks without one vector per token (one line each)."""
    for name in hooks:
        if name not in model.hook_dict:
            raise ValueError(f"unknown hook {name!r}; `vitcircuits info MODEL` lists the hook names")
        if (name.startswith("ln_final") and model.cfg.final_norm == "pooled") or not name.endswith(PER_TOKEN_SUFFIXES):
            raise ValueError(f"hook {name!r} is not per-token; cache takes per-token hooks such as blocks.3.hook_resid_post")
