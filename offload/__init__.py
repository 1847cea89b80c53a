"""moed.offload."""
