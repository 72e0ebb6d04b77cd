"""Latency lookup tables: op keys, the table and its file formats, measuring a table on
this machine, validating it against whole networks, and the FBNet loss that reads it."""
from .formats import Entry
from .keys import OpKey, block_key, head_key, layer_keys, parse_key, required_keys, stem_key
from .loss import FBNetLoss, LossParts
from .measuring import calibrate, measure, measure_networks
from .table import LatencyTable
from .timing import steady_heap
from .validation import validate, validate_many

__all__ = ["OpKey", "block_key", "head_key", "layer_keys", "parse_key", "required_keys",
           "stem_key", "FBNetLoss", "LossParts", "calibrate", "measure", "measure_networks",
           "Entry", "LatencyTable", "steady_heap", "validate", "validate_many"]
