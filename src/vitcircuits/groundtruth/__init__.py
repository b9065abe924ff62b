"""Known answers to score the detectors against: planted models (``planted``, ``planted_circuits``,
``planted_family``), their scoring (``ground_truth``), and the organisms' measured causal edges
(``organism_benchmark``). ``bench/ground_truth.py`` prints the tables."""
