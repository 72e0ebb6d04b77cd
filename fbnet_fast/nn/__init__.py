"""The networks: the search space and architectures as data, the reference candidate
blocks, ``MixedBlock`` (one searchable layer), ``SuperNet`` and the discrete ``FBNet``.

The fused implementations of ``MixedBlock`` live in ``fbnet_fast.backends``; see
docs/architecture.md for what each layer of the package may import.
"""
from .architecture import ZOO, Architecture, resolve_arch, sample_architectures
from .blocks import build_block
from .mixed_block import MixedBlock
from .models import FBNet, count_costs, create_model
from .space import CANDIDATES, SearchSpace
from .supernet import SuperNet

__all__ = ["ZOO", "Architecture", "resolve_arch", "sample_architectures", "build_block",
           "MixedBlock", "FBNet", "count_costs", "create_model", "CANDIDATES", "SearchSpace",
           "SuperNet"]
