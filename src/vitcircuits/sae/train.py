"""Training of sparse autoencoders: schedule, AuxK loss, dead-latent tracking, checkpoints.

The data order is a deterministic function of the seed and the step, so a run resumed from a
checkpoint reproduces the weights of an uninterrupted run exactly:

* a ``[N, D]`` tensor is read in a fresh seeded permutation per epoch (``N // batch_size`` full batches
  per epoch, the remainder of each permutation unused);
* an iterable of ``[*, D]`` tensors is re-batched into ``batch_size`` rows; a re-iterable source (a list,
  a :class:`~vitcircuits.sae.harvest.ShuffleBuffer`) must yield the same rows on every pass and is cycled, a one-shot iterator
  ends training early when exhausted. On resume the first ``step`` batches are skipped.

Checkpoints live in ``out_dir/checkpoints/step_XXXXXXXX/``: ``state.safetensors`` (SAE parameters and
buffers plus the ``steps_since_fired`` counters), ``optimizer.pt`` (Adam state, written with
:func:`torch.save` and read back with ``torch.load(weights_only=True)``) and ``state.json`` (step,
history and both configs). Each is written to a temporary folder renamed into place when complete.
The trained SAE is also written to ``out_dir/sae`` in the SAELens layout (see :mod:`vitcircuits.sae.io`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file

from vitcircuits.files import read_json, write_json
from vitcircuits.sae.io import atomic_save_safetensors, save_sae
from vitcircuits.sae.metrics import explained_variance
from vitcircuits.sae.model import SAE, SAEConfig
from vitcircuits.sae.parallel import DataParallel

B_DEC_INITS = ("mean", "geometric_median")
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of :func:`train_sae`.

    Attributes:
        lr: peak Adam learning rate.
        warmup_steps: steps of linear warm-up from ``lr / warmup_steps`` to ``lr``.
        total_steps: number of optimiser steps; ``None`` derives it from ``n_tokens``.
        n_tokens: training tokens (rows), used when ``total_steps`` is ``None``:
            ``ceil(n_tokens / batch_size)`` steps.
        batch_size: rows per step.
        decay_fraction: the learning rate decays linearly to zero over the last this fraction of the
            steps (default: the last 20%).
        seed: seeds the weight initialisation and the data order.
        b_dec_init: ``"mean"`` or ``"geometric_median"`` (Weiszfeld iterations) of a data sample,
            computed on normalised activations.
        init_sample_rows: rows used to estimate the normalisation scale and ``b_dec``.
        geometric_median_iters: Weiszfeld iterations for ``b_dec_init="geometric_median"``.
        adam_betas: Adam ``(beta1, beta2)``.
        checkpoint_every: write a checkpoint every this many steps (``0``: only at the end); needs
            ``out_dir``.
        log_every: record metrics in the history (and refresh the progress bar) every this many steps.
        max_grad_norm: clip the global gradient norm to this before each Adam step (``None``: no
            clipping); 1.0 as in SAELens, which is worth about 2 points of explained variance in short runs.
        keep_checkpoints: how many of the newest checkpoints to keep (older ones are deleted).
    """

    lr: float = 4e-4
    warmup_steps: int = 100
    total_steps: int | None = 1000
    n_tokens: int | None = None
    batch_size: int = 4096
    decay_fraction: float = 0.2
    seed: int = 0
    b_dec_init: str = "geometric_median"
    init_sample_rows: int = 4096
    geometric_median_iters: int = 10
    adam_betas: tuple[float, float] = (0.9, 0.999)
    checkpoint_every: int = 0
    log_every: int = 100
    max_grad_norm: float | None = 1.0
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        if self.total_steps is None and self.n_tokens is None:
            raise ValueError("set total_steps or n_tokens")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")

    @property
    def steps(self) -> int:
        """Number of optimiser steps."""
        if self.total_steps is not None:
            return self.total_steps
        return math.ceil(self.n_tokens / self.batch_size)

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) ``step``: linear warm-up, constant, linear decay to 0."""
        total = self.steps
        decay_start = int(total * (1.0 - self.decay_fraction))
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if step >= decay_start:
            return self.lr * (total - step) / max(total - decay_start, 1)
        return self.lr


def geometric_median(x_ND: torch.Tensor, n_iter: int = 10, eps: float = 1e-8) -> torch.Tensor:
    """Geometric median of the rows of ``x_ND`` by Weiszfeld iterations started at the mean."""
    x = x_ND.double()
    y_D = x.mean(0)
    for _ in range(n_iter):
        w_N = 1.0 / (x - y_D).norm(dim=1).clamp_min(eps)
        y_D = (w_N[:, None] * x).sum(0) / w_N.sum()
    return y_D.to(x_ND.dtype)


def _tensor_stream(x_ND: torch.Tensor, batch_size: int, seed: int, start_step: int) -> Iterator[torch.Tensor]:
    per_epoch = x_ND.shape[0] // batch_size
    if per_epoch == 0:
        raise ValueError(f"need at least batch_size={batch_size} rows, got {x_ND.shape[0]}")
    step, epoch, perm = start_step, -1, None
    while True:
        e, i = divmod(step, per_epoch)
        if e != epoch:
            epoch, perm = e, torch.randperm(x_ND.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
        yield x_ND[perm[i * batch_size : (i + 1) * batch_size]]
        step += 1


def _rebatch(source: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    one_shot = iter(source) is source
    while True:
        pending: list[torch.Tensor] = []
        n_pending, produced = 0, False
        for chunk in source:
            chunk_ND = chunk.reshape(-1, chunk.shape[-1])
            pending.append(chunk_ND)
            n_pending += chunk_ND.shape[0]
            while n_pending >= batch_size:
                pool = torch.cat(pending)
                yield pool[:batch_size]
                produced = True
                pending, n_pending = [pool[batch_size:]], n_pending - batch_size
        if one_shot:
            return
        if not produced:
            raise ValueError(f"the activation source yields fewer than batch_size={batch_size} rows per pass")


def _init_sample(activations: torch.Tensor | Iterable[torch.Tensor], stream: Iterator[torch.Tensor], tcfg: TrainConfig):
    """Return ``(sample_ND, stream)``; for iterables the sample is peeked from (and put back into) the stream."""
    if isinstance(activations, torch.Tensor):
        gen = torch.Generator().manual_seed(tcfg.seed + 7)
        idx = torch.randperm(activations.shape[0], generator=gen)[: tcfg.init_sample_rows]
        return activations[idx], stream
    peeked = list(itertools.islice(stream, math.ceil(tcfg.init_sample_rows / tcfg.batch_size)))
    if not peeked:
        raise ValueError("the activation source is empty")
    return torch.cat(peeked)[: tcfg.init_sample_rows], itertools.chain(peeked, stream)


def _dense_step(sae: SAE, xn_BD: torch.Tensor, dead_F: torch.Tensor):
    """Losses of one step with dense ``[B, F]`` latents (every architecture, any device / dtype).

    Returns ``(loss, mse, aux, l1, recon_BD, feats, fired_F)``; ``feats`` holds the latent activations
    (here ``[B, F]``), ``fired_F`` which latents fired.
    """
    cfg = sae.cfg
    pre_BF = sae.pre_activations(xn_BD)
    feats_BF = sae.activate(pre_BF)
    recon_BD = sae.decode_normalized(feats_BF)
    mse = (recon_BD - xn_BD).pow(2).sum(-1).mean()
    aux = l1 = torch.zeros((), dtype=xn_BD.dtype, device=xn_BD.device)
    if cfg.architecture == "relu":
        l1 = sae.weighted_l1(feats_BF)
        loss = mse + cfg.l1_coefficient * l1
    else:
        if dead_F.any():
            residual_BD = (xn_BD - recon_BD).detach()
            aux = (sae.auxk_reconstruction(pre_BF, dead_F) - residual_BD).pow(2).sum(-1).mean()
        loss = mse + cfg.aux_coefficient * aux
    with torch.no_grad():
        fired_F = (feats_BF > 0).any(0)
    return loss, mse, aux, l1, recon_BD, feats_BF, fired_F


def _sparse_step(sae: SAE, xn_BD: torch.Tensor, dead_F: torch.Tensor):
    """The same losses as :func:`_dense_step` for TopK / BatchTopK, touching only the kept latents.

    The encoder pre-activations are computed densely without autograd (the selection needs them all);
    the kept entries (and the AuxK ones) then re-enter the graph through
    :meth:`SAE.selected_preactivations`, and decoding is a sparse product, so the backward pass costs
    ``O(B * k * D)`` instead of three dense ``B x F x D`` products. Same values and gradients as the dense
    step up to float rounding. ``feats`` is the ``[N]`` vector of kept activations.
    """
    cfg, B = sae.cfg, xn_BD.shape[0]
    xc_BD = xn_BD - sae.b_dec
    with torch.no_grad():
        pre_BF = torch.addmm(sae.b_enc, xc_BD, sae.W_enc)  # = xc @ W_enc + b_enc, one pass over [B, F]
    active, vals_N = sae.select_active(pre_BF)
    feats_N = torch.relu(sae.selected_preactivations(vals_N, xc_BD, active))
    recon_BD = sae.decode_active(feats_N, active, B) + sae.b_dec
    mse = (recon_BD - xn_BD).pow(2).sum(-1).mean()
    aux = torch.zeros((), dtype=xn_BD.dtype, device=xn_BD.device)
    selected = sae.select_auxk(pre_BF, dead_F) if bool(dead_F.any()) else None
    if selected is not None:
        aux_active, aux_vals_N = selected
        aux_feats_N = torch.relu(sae.selected_preactivations(aux_vals_N, xc_BD, aux_active))
        residual_BD = (xn_BD - recon_BD).detach()
        aux = (sae.decode_active(aux_feats_N, aux_active, B) - residual_BD).pow(2).sum(-1).mean()
    loss = mse + cfg.aux_coefficient * aux
    with torch.no_grad():
        fired_F = torch.zeros(cfg.d_sae, dtype=torch.bool, device=xn_BD.device)
        fired_F[active.cols[feats_N > 0]] = True
    return loss, mse, aux, aux.new_zeros(()), recon_BD, feats_N.detach(), fired_F


def _latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted(p for p in (out_dir / CHECKPOINTS_DIR).glob("step_*") if p.is_dir() and p.name[5:].isdigit())
    return ckpts[-1] if ckpts else None


def _save_checkpoint(out_dir: Path, sae: SAE, opt: torch.optim.Optimizer, steps_since_fired_F: torch.Tensor,
                     step: int, history: list[dict], scfg: SAEConfig, tcfg: TrainConfig, data_key: str | None) -> None:
    final = out_dir / CHECKPOINTS_DIR / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {name: tensor.cpu() for name, tensor in {**sae.state_dict(), "steps_since_fired": steps_since_fired_F}.items()}
    atomic_save_safetensors(tensors, tmp / "state.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    state = {"step": step, "history": history, "sae_config": dataclasses.asdict(scfg), "train_config": dataclasses.asdict(tcfg),
             "data_key": data_key}
    write_json(tmp / "state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    older = sorted(p for p in (out_dir / CHECKPOINTS_DIR).glob("step_*") if p.is_dir() and p.name[5:].isdigit())[: -max(tcfg.keep_checkpoints, 1)]
    for path in older:
        shutil.rmtree(path, ignore_errors=True)


def _load_checkpoint(ckpt: Path, sae: SAE, opt: torch.optim.Optimizer, scfg: SAEConfig, tcfg: TrainConfig, data_key: str | None):
    state = read_json(ckpt / "state.json")
    if state.get("data_key") != data_key:
        raise ValueError(f"{ckpt}: the checkpoint was trained on other activations (data key {state.get('data_key')}, now {data_key}); "
                         "refusing to resume: use --force or a new --out")
    if state["sae_config"] != json.loads(json.dumps(dataclasses.asdict(scfg))):
        raise ValueError(f"{ckpt}: SAE config differs from the checkpoint's; refusing to resume")
    if state["train_config"] != json.loads(json.dumps(dataclasses.asdict(tcfg))):
        raise ValueError(f"{ckpt}: train config differs from the checkpoint's; refusing to resume")
    tensors = load_file(str(ckpt / "state.safetensors"))
    steps_since_fired_F = tensors.pop("steps_since_fired")
    sae.load_state_dict(tensors)
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return state["step"], state["history"], steps_since_fired_F


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]SAE"), BarColumn(), MofNCompleteColumn(),
        TextColumn("L0 {task.fields[l0]:.1f}  EV {task.fields[ev]:.3f}  dead {task.fields[dead]:.1%}"),
        TimeRemainingColumn(), disable=not enabled,
    )


def train_sae(
    activations: torch.Tensor | Iterable[torch.Tensor],
    sae_config: SAEConfig,
    train_config: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    data_key: str | None = None,
    parallel: DataParallel | None = None,
    device: str | torch.device = "cpu",
) -> tuple[SAE, list[dict]]:
    """Train an SAE on raw activations (a ``[N, D]`` tensor or an iterable of ``[*, D]`` batches).

    Loss (in the normalised space, squared errors summed over ``D`` and averaged over rows):
    ``mse + aux_coefficient * auxk`` for ``topk`` / ``batchtopk`` and ``mse + l1_coefficient * weighted_l1``
    for ``relu``. AuxK reconstructs the (detached) residual ``x - x_hat`` from the ``aux_k`` largest
    pre-activations among *dead* latents (no firing in the last ``dead_steps_threshold`` steps); it is
    zero when none is dead. After each backward pass the decoder gradient parallel to each decoder row
    is removed and after each Adam step the decoder rows are renormalised. TopK and BatchTopK SAEs in
    float32 / float64 train with a sparse step (:func:`_sparse_step`: same losses and gradients as the
    dense one up to rounding, but only the encoder matmul is dense); ReLU SAEs use the dense step.

    With ``resume=True`` training continues from the latest checkpoint in ``out_dir`` (the configs and
    ``data_key``, a digest of what produced the activations, must match; a mismatch is refused).
    Returns the trained SAE (in eval mode, normalisation *not* folded) and the history: one dict per
    ``log_every`` steps (and the last step) with ``step, lr, loss, mse, aux, l1, l0,
    explained_variance, dead_fraction``.

    ``parallel`` (default: from an initialised process group, :mod:`vitcircuits.sae.parallel`)
    trains data-parallel: each rank takes its slice of every batch and gradients are averaged;
    the history holds the means over ranks, and only rank 0 writes to ``out_dir``. Training runs
    on ``device``; the SAE is returned on the CPU.
    """
    parallel = parallel if parallel is not None else DataParallel.from_process_group()
    writes = parallel is None or parallel.is_main
    scfg, tcfg = sae_config, train_config
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs out_dir")
    if tcfg.checkpoint_every and out is None:
        raise ValueError("checkpoint_every needs out_dir")
    dtype, total = scfg.torch_dtype, tcfg.steps
    sae = SAE(scfg, generator=torch.Generator().manual_seed(tcfg.seed)).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=tcfg.lr, betas=tcfg.adam_betas)
    steps_since_fired_F = torch.zeros(scfg.d_sae, dtype=torch.long, device=device)
    start, history = 0, []
    ckpt = _latest_checkpoint(out) if resume else None
    if ckpt is not None:
        start, history, steps_since_fired_F = _load_checkpoint(ckpt, sae, opt, scfg, tcfg, data_key)
        steps_since_fired_F = steps_since_fired_F.to(device)

    if isinstance(activations, torch.Tensor):
        stream = _tensor_stream(activations.reshape(-1, scfg.d_in), tcfg.batch_size, tcfg.seed, start)
    else:
        stream = itertools.islice(_rebatch(activations, tcfg.batch_size), start, None)
    if ckpt is None:
        sample_ND, stream = _init_sample(activations, stream, tcfg)
        sample_ND = sample_ND.reshape(-1, scfg.d_in).to(device, dtype)
        sae.estimate_norm_scale_(sample_ND)
        xn_ND = sample_ND * sae.norm_scale
        b_dec_D = xn_ND.mean(0) if tcfg.b_dec_init == "mean" else geometric_median(xn_ND, tcfg.geometric_median_iters)
        with torch.no_grad():
            sae.b_dec.copy_(b_dec_D)

    sae.train()
    sparse = sae.supports_sparse_training
    done = saved = start
    with _progress(progress) as bar:
        task = bar.add_task("train", total=total, completed=start, l0=0.0, ev=0.0, dead=0.0)
        for step in range(start, total):
            x_BD = next(stream, None)
            if x_BD is None:
                break
            lr = tcfg.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            if parallel is not None:
                x_BD = parallel.local(x_BD)
            xn_BD = x_BD.to(device, dtype) * sae.norm_scale
            dead_F = steps_since_fired_F >= scfg.dead_steps_threshold
            step_out = _sparse_step(sae, xn_BD, dead_F) if sparse else _dense_step(sae, xn_BD, dead_F)
            loss, mse, aux, l1, recon_BD, feats, fired_F = step_out
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if parallel is not None:
                parallel.average_gradients(sae)
                fired_F = parallel.any(fired_F)
            sae.remove_parallel_decoder_grad_()
            if tcfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), tcfg.max_grad_norm)
            opt.step()
            sae.normalize_decoder_()
            with torch.no_grad():
                steps_since_fired_F = torch.where(fired_F, 0, steps_since_fired_F + 1)
                if scfg.architecture == "batchtopk":
                    sae.update_threshold_(feats)
                    if parallel is not None:
                        sae.threshold.copy_(parallel.mean(sae.threshold))
            done = step + 1
            if done % tcfg.log_every == 0 or done == total:
                values = torch.tensor([loss.item(), mse.item(), aux.item(), l1.item(), float((feats > 0).sum()) / xn_BD.shape[0],
                                       explained_variance(xn_BD.detach(), recon_BD.detach())], dtype=torch.float64, device=loss.device)
                values = (values if parallel is None else parallel.mean(values)).tolist()
                record = {"step": done, "lr": lr, **dict(zip(("loss", "mse", "aux", "l1", "l0", "explained_variance"), values)),
                          "dead_fraction": float(dead_F.float().mean())}
                history.append(record)
                bar.update(task, l0=record["l0"], ev=record["explained_variance"], dead=record["dead_fraction"])
            bar.update(task, completed=done)
            if writes and out is not None and ((tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0) or done == total):
                _save_checkpoint(out, sae, opt, steps_since_fired_F, done, history, scfg, tcfg, data_key)
                saved = done
    if writes and out is not None and saved != done:  # the source ran out before total_steps
        _save_checkpoint(out, sae, opt, steps_since_fired_F, done, history, scfg, tcfg, data_key)
    sae = sae.to("cpu").eval()
    if writes and out is not None:
        save_sae(sae, out / "sae")
    return sae, history
