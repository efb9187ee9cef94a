"""Pick the strategy for a plan's layout (world size > 1)."""

from __future__ import annotations

from typing import Any

from planner.planfile import Plan


def make_strategy(plan: Plan) -> Any:
    lay = plan.layout
    if lay.engine == "deepspeed":
        from executor.parallel.deepspeed_engine import DeepSpeedStrategy

        return DeepSpeedStrategy(plan)
    if lay.pp > 1:
        from executor.parallel.pp import PipelineStrategy

        return PipelineStrategy(plan)
    from executor.parallel.spmd import SPMDStrategy

    return SPMDStrategy(plan)
