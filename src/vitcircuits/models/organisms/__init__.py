"""Small, reproducibly trained "model organisms" bundled with vitcircuits.

`cifar` trains the offline default model: a 65-token timm ViT on CIFAR-10,
saved in timm hub layout under ``vitcircuits/assets/organisms/cifar10-vit``.
"""
