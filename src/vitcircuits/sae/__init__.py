"""Sparse autoencoders on ViT activations.

* :mod:`vitcircuits.sae.model`: :class:`SAEConfig` and :class:`SAE` (TopK, BatchTopK and ReLU+L1
  architectures, unit-norm decoder rows, foldable input normalisation).
* :mod:`vitcircuits.sae.train`: :class:`TrainConfig`, :func:`train_sae` (Adam, warm-up and linear
  decay, AuxK loss, dead-latent tracking, checkpoints with exact resume).
* :mod:`vitcircuits.sae.harvest`: reading harvest shards, and :class:`ShuffleBuffer` (bounded-memory shuffling).
* :mod:`vitcircuits.sae.metrics`: L0, explained variance, dead / dense fractions, density histograms.
* :mod:`vitcircuits.sae.io`: save and load in the SAELens folder layout (``cfg.json`` +
  ``sae_weights.safetensors``).
"""
