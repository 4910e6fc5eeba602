"""The words of a DistributedLLM's status: phases, condition types, condition and event reasons.

The CRD's schema takes its enums from here (``bloombee_operator.crd``) and the reconcile steps
write only these members, so a status the code writes is always one the API server admits.
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    PENDING = "Pending"
    MEASURING = "Measuring"  # probes starting or measuring the links between clusters
    PLANNING = "Planning"
    DEPLOYING = "Deploying"
    READY = "Ready"
    DEGRADED = "Degraded"  # something had died or gone missing and was re-created
    FAILED = "Failed"  # the spec cannot be served as written; not retried


class ConditionType(StrEnum):
    LINKS_MEASURED = "LinksMeasured"
    PLANNED = "Planned"
    STAGES_READY = "StagesReady"
    DEGRADED = "Degraded"
    PLAN_SWITCHING = "PlanSwitching"  # a new plan's stages beside the old plan's, until the old are removed
    READY = "Ready"  # derived from the others


class Reason(StrEnum):
    """CamelCase reasons of conditions and events."""

    # Permanent failures: the spec or its model cannot be served.
    INVALID_SPEC = "InvalidSpec"
    MODEL_UNREADABLE = "ModelUnreadable"
    UNPLANNABLE = "Unplannable"
    # Links.
    SINGLE_CLUSTER = "SingleCluster"
    MEASURED = "Measured"
    PROBES_STARTING = "ProbesStarting"
    REMOTE_CLUSTER = "RemoteCluster"  # a remote cluster's API server cannot be reached (retried)
    # Plan and children.
    PLANNED = "Planned"
    KEPT = "Kept"  # the running plan stays under hysteresis
    DEPLOYING = "Deploying"
    DEPLOYED = "Deployed"
    ALL_READY = "AllReady"
    WAITING = "Waiting"
    RESTORED = "Restored"
    ALL_PRESENT = "AllPresent"
    SERVING = "Serving"
    NOT_READY = "NotReady"
    # Plan switches (make-before-break).
    SWITCHING = "Switching"  # the old plan serves until the new one's stages are ready and its generations end
    SWITCHED = "Switched"  # the old plan's children were removed
    ONE_PLAN = "OnePlan"  # no switch under way
    # What the kubelet or the scheduler says of a child's pod (bloombee_operator.faults).
    IMAGE_PULL_FAILED = "ImagePullFailed"
    CONTAINER_FAILED = "ContainerFailed"
    OOM_KILLED = "OOMKilled"
    UNSCHEDULABLE = "Unschedulable"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"
