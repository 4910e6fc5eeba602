"""The stage server's side of the data plane: one layer span served over HTTP, its sessions
and KV caches, and the verification of drafted tokens. Never imports the gateway.

    python -m bloombee_stage.stage --model SOURCE --layers 0:10
"""
