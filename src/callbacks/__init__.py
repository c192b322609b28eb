"""Callbacks: per-sample metrics from the module's own log-probs, throughput, an end-of-fit summary, and the
Hugging Face export that links pipeline stages."""

from src.callbacks.export import HFExport
from src.callbacks.logprob import LogProbMetrics
from src.callbacks.summary import FitSummary, TokenThroughput

__all__ = ["FitSummary", "HFExport", "LogProbMetrics", "TokenThroughput"]
