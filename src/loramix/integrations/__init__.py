"""loramix inside other tools: transformers Trainer and TRL (``hf``), lm-evaluation-harness (``lm_eval``)."""
