"""moed.engine."""
