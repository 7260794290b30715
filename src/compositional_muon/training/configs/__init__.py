"""JSON configs of the experiments runner (``python -m compositional_muon.experiments --config NAME``)."""
