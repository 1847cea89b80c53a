"""moed.kernels."""
