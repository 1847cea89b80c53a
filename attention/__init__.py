"""moed.attention."""
