"""Moved to :mod:`compositional_muon.training.train`; this alias keeps
``python -m compositional_muon.train`` and ``import compositional_muon.train`` working."""

import sys

from .training import train as _impl

if __name__ == "__main__":
    _impl.cli()
sys.modules[__name__] = _impl
