"""moed.daemon: the serving daemon (ZMQ service, tokenisation, metrics, systemd, worker supervision).

Never imports torch: the engine runs in worker processes (moed.engine.worker).
"""
