"""Trainer's one-adapter surface: ``Trainer(config)`` is a set of one job; its names and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from loramix.config import ConfigError
from loramix.train import Trainer
from test_train import config, mc_examples, word_tokenizer
from tiny_models import tiny_model

LORA = {"kind": "lora", "r": 2, "alpha": 4, "dropout": 0.0}


def test_a_named_run_refuses_the_empty_name(tmp_path: Path) -> None:
    # the empty name is Trainer(config)'s one adapter: a named run using it would read as that one
    with pytest.raises(ConfigError, match="non-empty name"):
        Trainer({"": config(tmp_path / "a", adapter=LORA), "b": config(tmp_path / "b", adapter=LORA)})


def test_trainer_job_names_what_is_missing(tmp_path: Path) -> None:
    one = Trainer(config(tmp_path / "one", adapter=LORA))
    with pytest.raises(AttributeError, match=r"setup\(\) builds them"):
        one.step  # noqa: B018 (before setup there is no job to read)
    two = Trainer({"a": config(tmp_path / "a", adapter=LORA), "b": config(tmp_path / "b", adapter=LORA)},
                  model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
                  train_examples={"a": mc_examples(4, seed=1), "b": mc_examples(4, seed=2)}, eval_examples={})
    two.setup()
    try:
        with pytest.raises(AttributeError, match=r"2 jobs \['a', 'b'\].*trainer\.jobs\[name\]"):
            two.job  # noqa: B018
    finally:
        two.cleanup()
