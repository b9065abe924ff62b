"""The ``vitcircuits`` command line: :mod:`~vitcircuits.cli.commands` (the app), shared options
(:mod:`~vitcircuits.cli.options`), the one error wrapper (:mod:`~vitcircuits.cli.errors`) and the
``sae``, ``necessity`` and ``train-organism`` commands."""
from vitcircuits.cli.commands import app

__all__ = ["app"]
