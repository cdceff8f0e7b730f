"""Per-target requantization of Step3 weights (block-fp8 / bf16 -> int8, int4, fp8)."""
