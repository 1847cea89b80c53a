"""moed.model."""
