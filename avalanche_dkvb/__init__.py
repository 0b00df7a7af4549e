"""avalanche-dkvb: the Discrete Key-Value Bottleneck (Träuble, Goyal et al., ICML 2023) for Avalanche."""

from avalanche_dkvb.bottleneck import KeyValueBottleneck
from avalanche_dkvb.count_values import VALUE_RULES, CountValues, values_from_counts
from avalanche_dkvb.decoders import DECODERS, LinearDecoder, MeanDecoder, MLPDecoder, create_decoder
from avalanche_dkvb.key_init import ema_init_keys, init_keys, kmeans_init_keys
from avalanche_dkvb.model import DKVBModel, create_dkvb_model
from avalanche_dkvb.moment_values import MomentValues
from avalanche_dkvb.plugin import DKVBPlugin, check_local_optimizer
from avalanche_dkvb.strategy import DKVB

__all__ = [
    "DECODERS", "DKVB", "DKVBModel", "DKVBPlugin", "KeyValueBottleneck", "LinearDecoder", "MeanDecoder", "MLPDecoder",
    "check_local_optimizer", "create_decoder", "create_dkvb_model", "ema_init_keys", "init_keys",
    "kmeans_init_keys",
]
__all__ += ["CountValues", "MomentValues", "VALUE_RULES", "values_from_counts"]
