"""The search and everything around it: its settings (config), data, the run directory
with checkpoint and resume (rundir), the loop, the evaluation of the final architectures
(evaluate), the end of a search (summary), plots, distributed runs, training a found
architecture from scratch (train), and the random-architecture baseline (baseline)."""
from .baseline import run_baseline
from .config import PRESETS, SearchConfig, build_space, make_config
from .loop import SearchResult, run_search
from .train import TrainConfig, train

__all__ = ["PRESETS", "SearchConfig", "build_space", "make_config", "SearchResult",
           "run_search", "TrainConfig", "train", "run_baseline"]
