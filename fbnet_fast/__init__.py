"""fbnet_fast: FBNet differentiable architecture search with fused, memory-light kernels.

The package is layered (docs/architecture.md): ``nn`` (search space, architectures,
blocks, MixedBlock, SuperNet, model zoo), ``backends`` (the implementations of
MixedBlock and the one place that picks among them), ``latency`` (lookup tables and the
FBNet loss), ``search`` (the search loop, data, training) and ``cli``.
"""
from . import backends
from .backends import get_backend, set_backend
from .latency import FBNetLoss, LatencyTable
from .nn import (CANDIDATES, ZOO, Architecture, FBNet, MixedBlock, SearchSpace, SuperNet,
                 build_block, count_costs, create_model)
from .search import SearchConfig, TrainConfig, make_config, run_search, train

__version__ = "0.1.0"

__all__ = ["backends", "get_backend", "set_backend", "FBNetLoss", "LatencyTable",
           "CANDIDATES", "ZOO", "Architecture", "FBNet", "MixedBlock", "SearchSpace",
           "SuperNet", "build_block", "count_costs", "create_model", "SearchConfig",
           "TrainConfig", "make_config", "run_search", "train"]
