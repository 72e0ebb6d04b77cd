"""fbnet_fast: FBNet differentiable architecture search with fused, memory-light kernels."""
from . import backends
from .backends import set_backend, get_backend
from .space import CANDIDATES, Architecture, SearchSpace
from .blocks import build_block
from .mixed_block import MixedBlock
from .models import FBNet, ZOO, create_model, count_costs
from .supernet import SuperNet
from .latency import LatencyTable
from .loss import FBNetLoss
from .search import SearchConfig, make_config, run_search
from .train import TrainConfig, train

__version__ = "0.1.0"
