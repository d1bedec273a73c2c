"""Ways of changing a backbone behind one interface (attach, trainable parameters, save/load)."""
from .base import Adapter, count_parameters, freeze
from .svd import SVDAdapter, SVDConfig

__all__ = ["Adapter", "SVDAdapter", "SVDConfig", "count_parameters", "freeze"]
