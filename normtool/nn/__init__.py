"""Training-time layers and reference models (plain torch; no dependency on the graph)."""

from normtool.nn.cnn import SmallCNN, cnn_config
from normtool.nn.powernorm import PowerNorm, group_scale
from normtool.nn.rmsnorm import CRMSNorm, RMSNorm
from normtool.nn.transformer import ReferenceTransformer, transformer_config
from normtool.nn.unified_norm import UnifiedNorm
from normtool.nn.ws_conv import WSConv2d

__all__ = [
    "CRMSNorm",
    "PowerNorm",
    "RMSNorm",
    "ReferenceTransformer",
    "SmallCNN",
    "UnifiedNorm",
    "WSConv2d",
    "cnn_config",
    "group_scale",
    "transformer_config",
]
