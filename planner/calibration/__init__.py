"""Calibration, torch-free, in one place: reading measured runs (`runs_table` for a runs CSV,
`measured_runs` for `meshplan run` directories, `framework_logs` for Megatron / torchtitan /
DeepSpeed / NeMo logs), scoring the cost model on published runs (`published`), fitting the
profile and cross-validating it. `meshplan validate` and `meshplan calibrate` are thin
commands over these modules."""
