"""moed.engine: the inference engine that runs in each worker process.

sequence (request state), kv_pages (page accounting), scheduler (continuous batching), sampler,
model_runner (one step through the network), cuda_graphs (decode graphs), compiled (torch.compile'd
decoder layers for large eager steps), spec_decode (MTP draft worker and verifier), llm_engine (the
in-process API), worker (the process the daemon talks to over `protocol`).
"""
