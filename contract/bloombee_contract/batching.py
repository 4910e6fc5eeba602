"""How the gateway packs rows into steps: its rule, which the planner's cost model follows."""

from __future__ import annotations

# Rows up to this many positions (decode steps, verification of drafts, short uncached prompts) are
# packed into micro-batches; a longer row (a prefill) goes alone, as a step of its own.
SHORT_ROW = 16
