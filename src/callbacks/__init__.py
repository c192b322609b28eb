"""Callbacks: per-sample metrics from the module's own log-probs, throughput, and an end-of-fit summary."""

from src.callbacks.logprob import LogProbMetrics
from src.callbacks.summary import FitSummary, Throughput

__all__ = ["FitSummary", "LogProbMetrics", "Throughput"]
