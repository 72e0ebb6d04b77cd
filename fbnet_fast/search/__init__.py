"""The search and everything around it: its settings, data, the loop with its run
directory, the evaluation of the final architectures, plots, distributed runs, and
training a found architecture from scratch."""
from .config import PRESETS, SearchConfig, build_space, make_config
from .loop import SearchResult, run_search
from .train import TrainConfig, train

__all__ = ["PRESETS", "SearchConfig", "build_space", "make_config", "SearchResult",
           "run_search", "TrainConfig", "train"]
