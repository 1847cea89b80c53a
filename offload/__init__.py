"""moed.offload: host expert store, GPU expert cache, miss service (copies and CPU experts), prefetch, placement.

host_store.py (pinned slabs), expert_cache.py (slot pools and tables), runner.py (OffloadMoERunner),
cpu_experts.py (CPU expert kernel), prefetch.py, placement.py, stats.py, traces.py (benchmark routing traces).
The claim / copy kernels live in kernels/expert_copy.py.
"""
