"""Training tools built on the optimizer library: models, data, recipes, checkpoints, the training
CLI (``python -m compositional_muon.train``) and the experiments runner.

The library (:mod:`compositional_muon`) never imports this package.
"""
