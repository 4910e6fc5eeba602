"""BloomBee control plane: resource model, planner, reconcile and backends. Never imports torch."""
