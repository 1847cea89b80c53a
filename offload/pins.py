"""How many experts a layer's cache may pin: the one rule the engine's caches (which size their rounds by it) and the
daemon's placement manager (which plans within it) share; standard library only, so the daemon imports it."""

from __future__ import annotations


def pin_budget(slots: int, num_experts: int, fraction: float) -> int:
    """Pins for a layer with `slots` cache slots: `fraction` of them, one left to serve misses; none when every
    expert is resident (nothing to keep)."""
    if slots >= num_experts:
        return 0
    return max(0, min(slots - 1, int(fraction * slots)))
