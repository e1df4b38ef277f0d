"""Evaluation: exact match of generated replies, perplexity and passkey retrieval against length, the sample a
run ends with, and the summary of a sweep. Imports model and data, never train."""

from llm.eval.exact_match import exact_match, generate_replies
from llm.eval.sample import SampleSettings, generate_sample

__all__ = ["SampleSettings", "exact_match", "generate_replies", "generate_sample"]
