"""Adapters for training frameworks: Hugging Face transformers (:mod:`.hf`), Lightning
(:mod:`.lightning`) and torchtitan (:mod:`.torchtitan`).

Each submodule imports its framework lazily (inside functions) or on import of that submodule only;
``import compositional_muon`` never imports this package, and this package never imports the
training tools. Install the framework with the matching extra: ``pip install
"compositional-muon[hf]"``, ``[lightning]`` or ``[torchtitan]``.
"""

from ._common import OPTIMIZER_NAMES, OptimizerChoice, build_for_model

__all__ = ["OPTIMIZER_NAMES", "OptimizerChoice", "build_for_model"]
