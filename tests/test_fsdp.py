"""FSDP2 under torchrun (``distributed: fsdp``, gloo on CPU): the frozen base is sharded with ``fully_shard``
per decoder layer, the adapters stay full fp32 tensors, and two processes reach the same adapter as one process
with the same global batch, for LoRA and MixLoRA; a checkpoint resumes under FSDP; the saved adapter loads
in a plain single process.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from loramix.adapters.io import load_adapter
from loramix.models.inject import adapter_parameters
from test_distributed import adapter, eval_records, max_diff, one_process, settings, torchrun
from tiny_models import batch, tiny_model

ADAPTERS = {
    "lora": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "mixlora": {"kind": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2, "dropout": 0.0},
}


def test_fsdp_two_processes_match_one_process_and_the_adapter_loads_anywhere(tmp_path):
    runs = [settings(tmp_path / f"fsdp-{kind}", grad_accum=1, adapter=cfg, distributed="fsdp", save_every=2)
            for kind, cfg in ADAPTERS.items()]
    # and a run resumed from the MixLoRA run's step-2 checkpoint, in a fresh folder
    runs.append(dict(runs[-1], output_dir=str(tmp_path / "fsdp-resumed"),
                     resume=str(tmp_path / "fsdp-mixlora" / "checkpoints" / "step-2")))
    proc = torchrun(runs, tmp_path, timeout=300)  # all runs in one launch: start-up dominates on CPU
    assert proc.returncode == 0, proc.stderr[-4000:]
    # every rank of every run held DTensor shards of the base (2 layers' weights, embeddings, norms, head)
    lines = [ln for ln in proc.stdout.splitlines() if " completed step 4 sharded " in ln]
    assert len(lines) == 6 and all(int(ln.rsplit(" ", 1)[1]) > 10 for ln in lines), proc.stdout
    # the checkpoint holds full adapter tensors and resumes under FSDP to the same weights
    resumed = adapter(tmp_path / "fsdp-resumed")
    assert max_diff(resumed, adapter(tmp_path / "fsdp-mixlora")) <= 1e-6
    step2 = load_file(str(tmp_path / "fsdp-mixlora" / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in step2.items()} == {k: v.shape for k, v in resumed.items()}
    assert max_diff(step2, resumed) > 1e-4  # steps 3-4 were really run after the resume

    for kind, cfg in ADAPTERS.items():
        single, start, single_eval = one_process(tmp_path / f"single-{kind}", adapter=cfg)
        fsdp = adapter(tmp_path / f"fsdp-{kind}")
        assert max_diff(single, start) > 1e-3  # training moved the adapter
        assert max_diff(fsdp, single) <= 1e-5
        # evaluation under FSDP: every rank scores the whole set (forwards are collectives), logged once
        evals = eval_records(tmp_path / f"fsdp-{kind}")
        assert len(evals) == 1 and evals[0]["label"] == single_eval["label"]

        # the FSDP-written adapter folder loads into a plain model in this (single, non-distributed) process
        loaded = load_adapter(tiny_model("llama", seed=0), tmp_path / f"fsdp-{kind}" / "adapter")
        reference = load_adapter(tiny_model("llama", seed=0), tmp_path / f"single-{kind}" / "adapter")
        params = adapter_parameters(loaded)
        # (the file of a LoRA adapter uses PEFT's key names; the loaded model, loramix's)
        assert params.keys() == adapter_parameters(reference).keys() and all(p.dtype == torch.float32 for p in params.values())
        ids, mask, _ = batch(size=2, length=9, seed=5)
        with torch.no_grad():
            got = loaded(input_ids=ids, attention_mask=mask).logits
            want = reference(input_ids=ids, attention_mask=mask).logits
        assert float((got - want).abs().max()) <= 1e-4
