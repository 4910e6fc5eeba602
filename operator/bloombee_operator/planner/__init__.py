"""Placement of layer spans on stages. Pure Python, no torch."""

from bloombee_operator.planner.split import equal_split

__all__ = ["equal_split"]
