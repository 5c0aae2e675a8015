"""Evaluation: BN re-calibration, subnet accuracy, Pareto report."""
