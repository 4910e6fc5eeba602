"""The model as both roles run it: loading and converting model sources, a span of layers (with
its offloaded weights and KV), and choosing tokens from logits.

    python -m bloombee_stage.model SOURCE     convert once, print the config as JSON
"""
