"""Placement of layer spans on stages: performance model, DP planner, baselines. Pure Python + numpy."""

from bloombee_operator.planner.cost import (
    Link,
    Links,
    ModelProfile,
    Node,
    Options,
    Plan,
    PlanningError,
    Workload,
    evaluate,
)
from bloombee_operator.planner.dp import plan
from bloombee_operator.planner.split import equal_split

__all__ = [
    "Link",
    "Links",
    "ModelProfile",
    "Node",
    "Options",
    "Plan",
    "PlanningError",
    "Workload",
    "equal_split",
    "evaluate",
    "plan",
]
