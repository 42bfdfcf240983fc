"""The real model (POLICY_MODEL_PATH=smollm2): preference pairs made from its own answers, and detectors that
measure an instruction's effect from generations."""
