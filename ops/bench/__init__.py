"""moed.ops.bench: benchmarks that print figures as ratios to ceilings measured in the same run."""
