"""Every mistake a user can make on the command line ends in a short message, never a traceback.

Each case runs the real command (``loramix.cli.main``) and checks the exit code (2: bad input,
1: the run failed), that the message names the file / key / option and says what to do, and that
no "Traceback" is printed. Issue 13 lists the cases; ``test_run_folder.py`` has the run-folder and
full-disk ones. Tiny models only: the whole file runs in well under a minute.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import loramix
from cli_setup import question_rows, tiny_model_folder, write_config, write_jsonl
from conftest import perturb_adapter
from loramix.cli import COMMANDS, UsageError, build_parser, default_threads, main
from tiny_tokenizer import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A model folder, one of another shape, LoRA and MoRE adapters for the first, a run folder, data."""
    root = tmp_path_factory.mktemp("cli")
    f = {"root": root, "model": tiny_model_folder(root / "model"),
         "wide": tiny_model_folder(root / "wide", hidden_size=64, intermediate_size=96),
         "qa": write_jsonl(root / "qa.jsonl", question_rows(6))}
    for name, config in [("lora", loramix.LoraConfig(r=2, alpha=4)),
                         ("more", loramix.MoreConfig(max_rank=2, alpha=4, tasks=["arc-e", "boolq"]))]:
        model = transformers.AutoModelForCausalLM.from_pretrained(f["model"])
        model.config._name_or_path = str(f["model"])
        f[name] = loramix.save_adapter(loramix.inject(model, config), root / name)
    run = root / "runs" / "a"
    shutil.copytree(f["lora"], run / "adapter")
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1, "lm_loss": 2.0}\n')
    (run / "train_config.yaml").write_text("max_steps: 1\n")
    f["run"] = run
    return f


def fails(capsys, argv: list[str], code: int = 2) -> str:
    """Run ``loramix ARGV``; check the exit code, a short message and no traceback; return stderr."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"loramix {argv[0]}: error:")]
    assert lines, err
    assert "Traceback" not in err
    return lines[0]


def test_train_model_is_a_missing_folder(files, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "no-such-model", str(files["qa"]), str(tmp_path / "run"))
    line = fails(capsys, ["train", str(cfg)])
    assert f"{cfg}: model {tmp_path / 'no-such-model'}: no such folder" in line
    assert not (tmp_path / "run").exists()


def test_train_unsupported_model_family(files, tmp_path, capsys):
    folder = tmp_path / "neox"
    cfg = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=len(tiny_tokenizer()))
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    line = fails(capsys, ["train", str(write_config(tmp_path / "cfg.yaml", folder, str(files["qa"]),
                                                    str(tmp_path / "run")))])
    assert "model family 'gpt_neox' is not supported" in line and "registry.py" in line


def test_non_utf8_data_file_names_file_and_line(files, tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(question_rows(1)[0]).encode() + b"\n" + '{"question": "café?", "choices": ["a", "b"], '
                    '"answer": 0}\n'.encode("latin-1"))
    cfg = write_config(tmp_path / "cfg.yaml", files["model"], str(bad), str(tmp_path / "run"))
    assert f"{bad}:2: not UTF-8 text" in fails(capsys, ["train", str(cfg)])
    assert f"{bad}:2: not UTF-8 text" in fails(capsys, ["eval", "--model", str(files["model"]), "--tasks", str(bad)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(files, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", files["model"], str(files["qa"]), str(tmp_path / "run"), device="cuda")
    assert f"{cfg}: device 'cuda': CUDA is not available" in fails(capsys, ["train", str(cfg)])
    line = fails(capsys, ["eval", "--model", str(files["model"]), "--tasks", str(files["qa"]), "--device", "cuda:1"])
    assert "--device 'cuda:1': CUDA is not available" in line


def test_run_folder_given_as_adapter_folder(files, capsys):
    run = str(files["run"])
    assert run in fails(capsys, ["eval", "--adapter", run, "--tasks", str(files["qa"])])
    assert run in fails(capsys, ["generate", "--adapter", run, "hello"])
    assert run in fails(capsys, ["export", run, "--format", "peft", "--out", str(files["root"] / "o")])


def test_truncated_safetensors_in_export(files, tmp_path, capsys):
    adapter = shutil.copytree(files["lora"], tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    line = fails(capsys, ["export", str(adapter), "--format", "peft", "--out", str(tmp_path / "o")])
    assert str(weights) in line


def test_adapter_on_a_base_of_another_shape_names_the_base(files, capsys):
    line = fails(capsys, ["eval", "--model", str(files["wide"]), "--adapter", str(files["lora"]),
                          "--tasks", str(files["qa"])])
    assert str(files["wide"]) in line and str(files["model"]) in line


def test_more_generate_needs_task(files, capsys):
    line = fails(capsys, ["generate", "--adapter", str(files["more"]), "Is the sky green?"])
    assert "MoRE adapter" in line and "--task NAME (arc-e, boolq)" in line
    assert "unknown task 'piqa'" in fails(capsys, ["generate", "--adapter", str(files["more"]), "--task", "piqa", "x"])


def test_more_generate_without_task_uses_the_default_task(files, tmp_path, capsys):
    """A MoRE adapter with a default_task answers without --task exactly as with that task."""
    model = transformers.AutoModelForCausalLM.from_pretrained(files["model"])
    model.config._name_or_path = str(files["model"])
    model = loramix.inject(model, loramix.MoreConfig(max_rank=2, alpha=4, tasks=["arc-e", "boolq"],
                                                     default_task="boolq"))
    perturb_adapter(model, seed=3, every_std=0.5)  # trained-looking weights: the two tasks answer differently
    adapter = loramix.save_adapter(model, tmp_path / "more")
    argv = ["generate", "--adapter", str(adapter), "--no-stream", "--max-new-tokens", "8", "Is the sky green?"]
    answers = {}
    for task in (None, "boolq", "arc-e"):
        assert main(argv + (["--task", task] if task else [])) == 0
        answers[task] = capsys.readouterr().out
    assert answers[None] == answers["boolq"] != answers["arc-e"]


def test_bad_generate_options(capsys):
    assert "--max-new-tokens must be at least 1, got 0" in fails(capsys, ["generate", "--max-new-tokens", "0", "hi"])
    assert "--threads must be at least 1" in fails(capsys, ["generate", "--threads", "0", "hi"])
    assert "--dtype: unknown dtype 'f33'" in fails(capsys, ["generate", "--dtype", "f33", "hi"])


def test_offline_hub_id_fails_at_once(files, tmp_path, capsys, monkeypatch):
    """Offline (here: a Hub endpoint that refuses connections), a mistyped Hub id is looked up only in the
    local cache instead of ~50 s of retries."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    cfg = write_config(tmp_path / "cfg.yaml", "nobody/no-such-model", str(files["qa"]), str(tmp_path / "run"))
    line = fails(capsys, ["train", str(cfg)])
    assert "model 'nobody/no-such-model'" in line and "unreachable" in line


def alias_bomb(levels: int = 9, width: int = 9, flow: bool = False) -> str:
    """YAML whose aliases repeat each level ``width`` times ("billion laughs"): width**levels values."""
    refs = lambda i: ", ".join([f"*a{i - 1}" if i else "lol"] * width)  # noqa: E731
    if flow:
        return "[" + ", ".join(f"&a{i} [{refs(i)}]" for i in range(levels)) + "]"
    return "".join(f"a{i}: &a{i} [{refs(i)}]\n" for i in range(levels))


def test_yaml_alias_bomb_is_refused_wherever_loramix_reads_yaml(files, tmp_path, capsys):
    """Issue 21 case 6: nine levels of nine aliases (9**9 values) hung `loramix train` for minutes while
    the loaded config was walked; every YAML a user gives is read by one reader that counts the values."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    line = fails(capsys, ["train", str(bomb)])
    assert str(bomb) in line and "aliases" in line and "100000 values" in line
    multi = tmp_path / "multi.yaml"  # a multi-adapter config's included config
    multi.write_text(f"model: {files['model']}\nadapters:\n  - name: a\n    config: {bomb}\n")
    line = fails(capsys, ["train", str(multi)])
    assert f"{multi} adapters[0]" in line and str(bomb) in line and "aliases" in line
    template = tmp_path / "template.yaml"  # a prompt template file
    template.write_text(alias_bomb() + "kind: instruction\nprompt: '{instruction}'\ntarget: '{output}'\n")
    cfg = write_config(tmp_path / "cfg.yaml", files["model"], str(files["qa"]), str(tmp_path / "run"))
    line = fails(capsys, ["train", str(cfg), f"data.template={template}"])
    assert str(template) in line and "aliases" in line
    line = fails(capsys, ["train", str(cfg), f"betas={alias_bomb(flow=True)}"])  # a key=value override
    assert "command line: the value of 'betas'" in line and "aliases" in line
    (tmp_path / "loop.yaml").write_text("betas: &b [0.9, *b]\n")  # an alias inside what it names: endless
    line = fails(capsys, ["train", str(tmp_path / "loop.yaml")])
    assert str(tmp_path / "loop.yaml") in line and "endless" in line


@pytest.mark.parametrize("seed", [10**23, 2**64, -1])
def test_seed_out_of_range_names_the_key_and_the_flag(files, tmp_path, capsys, seed):
    """Issue 21 case 9: a seed beyond what torch's generator takes was "unexpected ValueError: Overflow when
    unpacking long long" after the model had loaded; now the key or flag is named before anything runs."""
    cfg = write_config(tmp_path / "cfg.yaml", files["model"], str(files["qa"]), str(tmp_path / "run"), seed=seed)
    line = fails(capsys, ["train", str(cfg)])
    assert f"{cfg}: 'seed' must be an integer from 0 to 2**63 - 1, got {seed}" in line
    assert not (tmp_path / "run").exists()
    multi = tmp_path / "multi.yaml"
    multi.write_text(f"model: {files['model']}\nadapters:\n  - name: a\n    config: {cfg}\n    seed: 1\n"
                     f"  - name: b\n    config: {cfg}\n    output_dir: {tmp_path / 'b'}\n")
    assert f"{multi} adapters[1]: 'seed' must be" in fails(capsys, ["train", str(multi)])
    line = fails(capsys, ["generate", "--model", str(files["model"]), "--seed", str(seed), "--temperature", "1", "hi"])
    assert f"--seed must be an integer from 0 to 2**63 - 1, got {seed}" in line
    bench = ["bench", "--model", str(files["model"]), "--steps", "1", "--seed", str(seed)]
    assert f"--seed must be an integer from 0 to 2**63 - 1, got {seed}" in fails(capsys, bench)


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(UsageError, match="max-new-tokens"):
        main(["generate", "--max-new-tokens", "0", "hi", "--debug"])
    monkeypatch.setenv("LORAMIX_DEBUG", "1")
    with pytest.raises(UsageError, match="max-new-tokens"):
        main(["generate", "--max-new-tokens", "0", "hi"])


def test_torn_last_metrics_line_is_skipped_with_a_warning(tmp_path, capsys):
    lines = [{"type": "train", "step": s, "lm_loss": 2.0 / s} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "train", "st')
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "line 3: skipped an incomplete last record" in captured.err and "loss.png" in captured.out


def test_help_shows_no_empty_defaults(capsys):
    for command in COMMANDS:
        text = build_parser(command).format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, command
        assert "--debug" in text
        if command in ("train", "eval", "generate", "merge", "export", "bench"):
            assert "--threads" in text, command
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"loramix {loramix.__version__}"
    assert 1 <= default_threads() <= (torch.get_num_threads() + 64)


def test_eval_limit_zero_means_all(files, capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(files["model"]), "--tasks", str(files["qa"]), "--limit", "0",
                 "--protocol", "label", "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["results"][str(files["qa"])]["label"]["n"] == 6
    assert "--limit must be >= 0" in fails(capsys, ["eval", "--tasks", str(files["qa"]), "--limit", "-1"])


def test_one_adapter_option_parser_for_every_command(capsys):
    """eval, serve and bench read ``--adapter`` with one parser: a bare folder only where allowed, an empty
    FOLDER never (eval took ``a=`` as the folder "" before), one message for a name given twice."""
    from loramix.cli import parse_adapters

    assert parse_adapters(["a=x", "runs/mix/adapter"], bare_folder=True) == {"a": "x", "mix": "runs/mix/adapter"}
    with pytest.raises(UsageError, match="NAME=FOLDER"):
        parse_adapters(["a="], bare_folder=True)
    with pytest.raises(UsageError, match="NAME=FOLDER"):
        parse_adapters(["runs/mix/adapter"])  # serve and bench: NAME=FOLDER only
    for command in ("eval", "serve"):
        line = fails(capsys, [command, "--adapter", "a=x", "--adapter", "a=y"])
        assert "two adapters are named 'a' (x, y)" in line and "NAME=FOLDER" in line


def test_generate_positional_prompt_streams_the_greedy_text(files, capsys):
    from loramix.serve import generate_text
    from loramix.hub import load_model

    assert main(["generate", "--model", str(files["model"]), "the cat sat", "--max-new-tokens", "8", "--raw"]) == 0
    printed = capsys.readouterr().out
    model, tok = load_model(str(files["model"]))
    want = generate_text(model, tok, "the cat sat", raw=True, max_new_tokens=8)
    assert printed.strip() == want.strip() and want.strip()


def test_data_paths_resolve_against_the_yaml_folder(files, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    shutil.copy(files["qa"], folder / "mine.jsonl")
    cfg = write_config(folder / "cfg.yaml", files["model"], "mine.jsonl", str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)  # mine.jsonl is not in the working directory, but next to the YAML
    assert main(["train", str(cfg.relative_to(tmp_path)), "--print-config"]) == 0
    assert "- configs/mine.jsonl" in capsys.readouterr().out
    (folder / "mine.jsonl").unlink()
    line = fails(capsys, ["train", "configs/cfg.yaml"])
    assert "configs/cfg.yaml: data.train[0]: mine.jsonl: no such file" in line and "configs" in line


def test_bench_prints_no_profiler_lines(capfd):
    tiny = ["--layers", "1", "--hidden", "32", "--intermediate", "48", "--heads", "2", "--kv-heads", "1", "--vocab",
            "64", "--batch", "1", "--seq-len", "8", "--experts", "2", "--top-k", "1", "--rank", "2", "--steps", "1",
            "--warmup", "0", "--variants", "loramix-lora", "--threads", "1"]
    assert main(["bench", *tiny]) == 0
    captured = capfd.readouterr()
    assert "loramix-lora" in captured.out
    assert "profiler_start" not in captured.err and "Memory block of unknown size" not in captured.err


def test_a_fresh_process_prints_no_import_noise(files):
    """The console script in a new process (where transformers first imports torchao and bitsandbytes):
    no kernel-loading or deprecation lines from those packages, and --debug lets them through again."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "loramix", "generate", "--model", str(files["model"]), "the cat", "--max-new-tokens",
            "2", "--threads", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    noise = [line for line in proc.stderr.splitlines()
             if any(s in line for s in ("Failed to load", "Enum subclass", "kernels-community"))]
    assert not noise, noise
