"""moed.ops."""
