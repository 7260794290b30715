"""Moved to :mod:`compositional_muon.training.experiments`; this alias keeps
``python -m compositional_muon.experiments`` and ``import compositional_muon.experiments`` working."""

import sys

from .training import experiments as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
sys.modules[__name__] = _impl
