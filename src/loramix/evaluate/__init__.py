"""Evaluation: multiple-choice accuracy (label-logit and log-likelihood protocols).

Example:
    >>> from loramix.evaluate import evaluate_multiple_choice
    >>> evaluate_multiple_choice(model, tokenizer, load_examples("arc-e", "validation"), protocol="loglik")
    >>> evaluate_many(multi_model, tokenizer, {"a": arc_e, "b": arc_e})   # several adapters, one pass
"""

from .accuracy import PROTOCOLS, evaluate_many, evaluate_multiple_choice, label_token_ids

__all__ = ["PROTOCOLS", "evaluate_many", "evaluate_multiple_choice", "label_token_ids"]
