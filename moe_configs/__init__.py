"""moed.moe_configs: tuned fused-MoE configs."""
