"""Evaluation by generation: exact match on held-out prompts (and, later, length extrapolation)."""

from llm.eval.exact_match import exact_match, generate_replies

__all__ = ["exact_match", "generate_replies"]
