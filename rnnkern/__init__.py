"""rnnkern: fused LSTM/GRU/RNN kernels that record the gradient norm at every timestep."""

from ._version import __version__

__all__ = ["__version__"]
