"""Data-parallel runs through the real CLI: two CPU processes (DDP over gloo) on a tiny 4-bit Llama.

Lightning's DDP launcher re-runs the command line once per extra rank, so every DDP run here is a subprocess
``python -m capyft ...``. A 2-process run (batch 1 per rank) and a 1-process run (batch 2) see the same rows in
each optimizer step; with the token-weighted loss their gradients, hence their loss curves and adapters, agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import REPO, StopAtStep, fit_args, offline_env, scalars

from capyft.cli import main

STEPS = 4  # 8 training rows, global batch 2: one epoch
# Dropout off: a 1-process and a 2-process run draw different masks. A large constant learning rate makes every
# step move the adapter, so a wrong gradient on any step shows in the later losses.
COMMON = [
    "--seed_everything=0",
    f"--trainer.max_steps={STEPS}",
    "--trainer.val_check_interval=2",
    "--checkpoint.every_n_train_steps=2",
    "--model.lora_dropout=0.0",
    "--model.learning_rate=0.01",
    "--model.warmup_steps=0",
    "--model.lr_schedule=constant",
    "--data.train_size=8",
    "--data.val_size=1",
    "--data.test_size=3",  # 3 test prompts on 2 ranks: uneven shards
]
DDP = ["--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=1"]


class AdapterDump(L.Callback):
    """Each rank saves its trainable (LoRA) weights to ``<out_dir>/rank<N>.pt`` when training ends."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save(weights, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def callback(cls: type, **init_args) -> str:
    spec = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}
    return f"--trainer.callbacks+={json.dumps(spec)}"


def capyft(*args: str) -> None:
    """Runs ``python -m capyft ARGS`` in a fresh process, as a user would; DDP spawns the second rank from it."""
    drop = ("PL_", "MASTER_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")  # no state from this process
    env = {k: v for k, v in offline_env().items() if not k.startswith(drop)} | {"TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "capyft", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, uneven_colors) -> dict[str, Path]:
    """A 1-process run (batch 2), and a 2-process DDP run (batch 1 per rank) interrupted at step 2 and resumed."""
    root = tmp_path_factory.mktemp("runs")
    single = main(fit_args(root / "single", tiny_model, uneven_colors, *COMMON, "--data.batch_size=2"))
    dumps = root / "dumps"
    dumps.mkdir()
    ddp_args = fit_args(root / "ddp", tiny_model, uneven_colors, *COMMON, *DDP)
    capyft(*ddp_args, callback(StopAtStep, step=2))
    first = root / "ddp" / "runs" / "tiny" / "version_0"
    capyft(*ddp_args, callback(AdapterDump, out_dir=str(dumps)), f"--ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    return {
        "single": Path(single.trainer.log_dir),
        "first": first,
        "resumed": first.parent / "version_1",
        "dumps": dumps,
    }


def test_ddp_matches_one_process_and_resumes(runs):
    """Same rows per step: the exact global token-mean loss and the gradient match the 1-process run, step by step."""
    single, first, resumed = runs["single"], runs["first"], runs["resumed"]
    for tag in ("train/loss", "train/grad_norm"):
        one = scalars(single, tag)
        two = {**scalars(first, tag), **scalars(resumed, tag)}  # steps 0-1, then 2-3 after resuming
        assert sorted(one) == sorted(two) == list(range(STEPS)), tag
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-6), (tag, step)
    # every step moved the adapter (lr 0.01, nonzero gradient), so matching later steps means matching updates
    assert all(norm > 0 for norm in scalars(single, "train/grad_norm").values())
    val_one, val_two = scalars(single, "val/loss"), scalars(resumed, "val/loss")
    last = max(val_one)
    assert last in val_two and val_two[last] == pytest.approx(val_one[last], rel=1e-4)


def test_ddp_ranks_hold_one_adapter_written_once(runs):
    rank0, rank1 = (torch.load(runs["dumps"] / f"rank{r}.pt") for r in (0, 1))
    assert rank0 and rank0.keys() == rank1.keys() and all("lora_" in name for name in rank0)
    assert all(w.abs().sum() > 0 for name, w in rank0.items() if "lora_B" in name)  # trained: lora_B starts at 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # DDP keeps the replicas bit-identical

    # the exported adapter is rank 0's weights, and those of the 1-process run up to float error
    from safetensors.torch import load_file

    def exported(run: Path) -> dict[str, torch.Tensor]:
        return load_file(run / "adapter" / "final" / "adapter_model.safetensors")

    two, one = exported(runs["resumed"]), exported(runs["single"])
    assert two.keys() == one.keys() and len(two) == len(rank0)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-5)

    # one run dir per launch, written by rank 0 alone: no second version dir from rank 1, one set of checkpoints
    ddp_root = runs["first"].parent
    assert sorted(p.name for p in ddp_root.iterdir()) == ["version_0", "version_1"]
    assert (runs["resumed"] / "checkpoints" / "last.ckpt").exists()
    ckpt = torch.load(runs["resumed"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS and all("lora_" in k for k in ckpt["state_dict"])


def test_ddp_test_predictions_complete_and_in_order(runs, uneven_colors):
    """``test`` on 2 ranks: each rank answers its share; predictions.jsonl holds every test row once, in order."""
    from capyft.assets import minilm_dir

    rows = [json.loads(line) for line in uneven_colors.read_text().splitlines()]
    run = runs["resumed"]
    capyft(
        "test",
        "--config",
        str(run / "config.yaml"),
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        f"--model.bertscore.model_type={minilm_dir()}",
        "--model.bertscore.num_layers=6",
        "--model.generation.max_new_tokens=4",
    )
    records = [json.loads(line) for line in (run / "test-last" / "predictions.jsonl").read_text().splitlines()]
    assert [r["row"] for r in records] == [9, 10, 11]  # after 8 train and 1 val rows
    for record in records:
        expected = rows[record["row"]]["messages"]
        assert record["reference"] == expected[-1]["content"]
        assert record["prompt"][-1]["content"] == expected[0]["content"]
        assert isinstance(record["prediction"], str) and "f1" in record
    summary = json.loads((run / "test-last" / "test_metrics.json").read_text())
    assert summary["num_examples"] == 3


# ---- FSDP: no CPU run is possible (Lightning and torch refuse FSDP without a GPU), so check its settings ----------
@pytest.mark.parametrize(
    ("storage", "compute", "precision", "fix"),
    [
        (None, "bfloat16", "bf16-mixed", "--model.quant_storage=bfloat16"),
        ("float16", "bfloat16", "bf16-true", "--model.quant_storage=bfloat16"),
        ("float16", "float16", "bf16-mixed", "--model.compute_dtype=bfloat16"),
        ("float16", "float16", "64-true", "precision bf16-mixed, 16-mixed or 32-true"),
    ],
)
def test_fsdp_refuses_storage_it_cannot_shard(storage, compute, precision, fix):
    from capyft.modeling import check_fsdp_quant_storage

    with pytest.raises(ValueError, match=fix.replace(".", r"\.")):
        check_fsdp_quant_storage(storage, compute, precision)


@pytest.mark.parametrize(("storage", "precision"), [("float16", "16-mixed"), ("bfloat16", "bf16-mixed")])
def test_fsdp_accepts_matching_storage(storage, precision):
    from capyft.modeling import check_fsdp_quant_storage

    check_fsdp_quant_storage(storage, storage, precision)


def test_fsdp_auto_wrap_policy_units(tiny_model):
    """A unit per decoder layer and per LoRA weight (float32, unlike the 16-bit base); nothing else."""
    from capyft.modeling import build_lora_config, fsdp_auto_wrap_policy, load_base_model, wrap_with_lora

    model = wrap_with_lora(load_base_model(str(tiny_model), None, "bfloat16"), build_lora_config(r=4))
    wrapped = {name for name, module in model.named_modules() if fsdp_auto_wrap_policy(module, False, 0)}
    layers = {name for name in wrapped if name.endswith(tuple(f"layers.{i}" for i in range(2)))}
    lora = wrapped - layers
    assert len(layers) == 2 and lora and all(name.rsplit(".", 2)[-2] in ("lora_A", "lora_B") for name in lora)
    for name in lora:
        params = list(model.get_submodule(name).parameters())
        assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert all(fsdp_auto_wrap_policy(module, True, 0) for module in model.modules())  # recursion goes everywhere


def test_fsdp_misconfiguration_fails_before_loading(tiny_model, monkeypatch):
    """configure_model under an FSDP strategy: the setting to change is named before any weight is loaded."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from capyft.model import QLoRAModule
    from capyft.modeling import fsdp_auto_wrap_policy

    def configure(policy=None, **hparams) -> QLoRAModule:
        module = QLoRAModule(str(tiny_model), **hparams)
        strategy = FSDPStrategy(auto_wrap_policy=policy, parallel_devices=[torch.device("cpu")])
        fit = SimpleNamespace(state=SimpleNamespace(fn="fit"), max_steps=1000, datamodule=None)
        module._trainer = SimpleNamespace(strategy=strategy, precision="bf16-mixed", **vars(fit))
        module.configure_model()
        return module

    with pytest.raises(ValueError, match=r"--model\.quant_storage=bfloat16"):
        configure(compute_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"auto_wrap_policy=capyft\.modeling\.fsdp_auto_wrap_policy"):
        configure(compute_dtype="bfloat16", quant_storage="bfloat16")
    with pytest.raises(ValueError, match=r"auto_wrap_policy"):
        configure(compute_dtype="bfloat16", load_in_4bit=False)
    configure(fsdp_auto_wrap_policy, compute_dtype="bfloat16", quant_storage="bfloat16")  # accepted: loads
    # compile_layers auto stays off under FSDP, even where it would compile a long fit (compiled FSDP never ran)
    monkeypatch.setattr("capyft.model.compile_wanted", lambda *args: True)
    monkeypatch.setattr("capyft.model.compile_decoder_layers", lambda model: None)
    settings = {"compute_dtype": "bfloat16", "quant_storage": "bfloat16"}
    assert not configure(fsdp_auto_wrap_policy, compile_layers="auto", **settings)._compiled
    assert configure(fsdp_auto_wrap_policy, compile_layers=True, **settings)._compiled  # asked for: compiled
