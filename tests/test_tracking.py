"""``report_to``: the records of metrics.jsonl reach real TensorBoard event files (read back with
TensorBoard's own EventAccumulator), also across a kill and resume; bad tracker names are config errors."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from loramix.config import ConfigError
from loramix.train.tracking import flatten
from test_train import Kill, config, kill_after, mc_examples, metric_records, trainer


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The same records, from metrics.jsonl, as tag → [(step, value)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in metric_records(run_dir):
        step, values = flatten(record)
        for tag, value in values.items():
            out.setdefault(tag, []).append((step, value))
    return out


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-6, abs=1e-6), tag


def test_tensorboard_gets_every_metrics_record(tmp_path, single_thread):
    cfg = config(tmp_path, max_steps=3, report_to=["tensorboard"])
    trainer(cfg, eval_examples=mc_examples(4, seed=9)).run()
    got, want = scalars(tmp_path / "run"), expected(tmp_path / "run")
    assert {"train/loss", "train/lm_loss", "train/aux_loss", "train/lr", "eval/label/accuracy"} <= set(got)
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3]
    assert_same(got, want)


def test_tensorboard_after_kill_and_resume_holds_each_step_once(tmp_path, single_thread):
    cfg = config(tmp_path, max_steps=4, save_every=2, report_to="tensorboard")
    with pytest.raises(Kill):
        trainer(cfg, callbacks=[kill_after(3)]).run()  # step 3 was logged, its checkpoint never written
    trainer(config(tmp_path, max_steps=4, save_every=2, report_to="tensorboard", resume=True)).run()
    got = scalars(tmp_path / "run")
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]
    assert_same(got, expected(tmp_path / "run"))


@pytest.mark.parametrize("value, message", [
    (["tensorbored"], "'report_to' names 'tensorbored'; choose from tensorboard, wandb, trackio, mlflow"),
    ([3], "'report_to' must be a list of tracker names"),
])
def test_report_to_errors_name_the_key(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, report_to=value)


def test_report_to_a_tracker_that_is_not_installed(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="'report_to' names 'wandb', which is not installed: pip install wandb"):
        config(tmp_path, report_to=["wandb"])


def test_several_adapters_each_report_to_their_own_tensorboard(tmp_path, single_thread):
    """A joint run: each adapter's records reach the event files of its own folder (with MixLoRA's z-loss)."""
    from loramix.train import Trainer
    from test_train import word_tokenizer
    from tiny_models import tiny_model

    configs = {"mix": config(tmp_path / "mix", max_steps=2, report_to=["tensorboard"],
                             adapter={"kind": "mixlora", "r": 4, "num_experts": 4, "top_k": 2, "z_loss_coef": 0.01}),
               "lora": config(tmp_path / "lora", max_steps=3, grad_accum=1, report_to=["tensorboard"],
                              adapter={"kind": "lora", "r": 2})}
    Trainer(configs, model=tiny_model("llama", seed=0), tokenizer=word_tokenizer(),
            train_examples={"mix": mc_examples(16), "lora": mc_examples(16, seed=1)},
            eval_examples={"mix": mc_examples(4, seed=9), "lora": []}).run()
    for name, steps in (("mix", [1, 2]), ("lora", [1, 2, 3])):
        got = scalars(tmp_path / name / "run")
        assert [s for s, _ in got["train/loss"]] == steps, name
        assert_same(got, expected(tmp_path / name / "run"))
    assert {"train/aux_loss", "train/z_loss", "eval/label/accuracy"} <= set(scalars(tmp_path / "mix" / "run"))
