"""Small, reproducibly trained "model organisms" with measurable circuits, bundled with vitcircuits:
the shapes task (``shapes_task``) and its organism (``shapes``), and the CIFAR-10 organism
(``cifar``, the negative control), which holds the training loop both share. Checkpoints are in
timm hub layout under ``vitcircuits/assets/organisms``; ``vitcircuits train-organism`` retrains them.
"""
