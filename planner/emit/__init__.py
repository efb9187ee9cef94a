"""One module per launch-file target; `planner.emitters` is their registry."""
