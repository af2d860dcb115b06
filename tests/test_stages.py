"""Several stages in one process, and checkpoints met by another module: nothing a stage does may leak into the next.

On the tiny 2-layer 4-bit Llama (``tiny_model``), CPU.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import fit_args

from capyft.assets import minilm_dir
from capyft.checks import ConfigError
from capyft.data import SAMPLE_DATA
from capyft.datamodule import ChatDataModule
from capyft.evaluation import BERTScoreSettings
from capyft.generation import GenerationSettings
from capyft.model import QLoRAModule


def tiny_module(model_dir, **overrides) -> QLoRAModule:
    settings = {
        "load_in_4bit": True,
        "compute_dtype": "float32",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "gradient_checkpointing": True,  # the path these tests covered before auto became the default
        "learning_rate": 0.03,
        "warmup_steps": 0,
        "generation": GenerationSettings(max_new_tokens=4),
        "bertscore": BERTScoreSettings(model_type=str(minilm_dir()), num_layers=6),
    }
    return QLoRAModule(str(model_dir), **(settings | overrides))


def tiny_data(model_dir) -> ChatDataModule:
    return ChatDataModule(
        str(model_dir), str(SAMPLE_DATA), train_size=4, val_size=2, test_size=2, max_length=128, batch_size=2
    )


def trainer(root: Path, **overrides) -> L.Trainer:
    settings = {
        "default_root_dir": root,  # test / predict write their answers into the run dir
        "accelerator": "cpu",
        "max_steps": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return L.Trainer(**(settings | overrides))


def four_bit_state(module: QLoRAModule) -> dict[str, object]:
    """Each 4-bit layer's packed weight bytes and its quantization state (absmax, nesting, CPU packing flag)."""
    state = {}
    for name, layer in module.model.named_modules():
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            quant = layer.weight.quant_state
            state[name] = (
                layer.weight.data.clone(),
                quant.absmax.clone(),
                quant.nested,
                getattr(quant, "packing_format_for_cpu", False),
            )
    return state


def packed_layers(module: QLoRAModule) -> list[str]:
    return [name for name, s in four_bit_state(module).items() if s[3]]


def layer0_grads(module: QLoRAModule, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of layer 0's LoRA weights for ``batch`` (the layer the bitsandbytes trap cut off first)."""
    module.model.train()
    module.model.zero_grad()
    loss_sum, n_tokens = module(batch)
    (loss_sum / n_tokens).backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if ".layers.0." in n and p.requires_grad}
    module.model.zero_grad()
    return grads


class PackedAtStageEnd(L.Callback):
    """Records which 4-bit layers bitsandbytes packed during a test or predict stage (callbacks run before the
    module's own ``on_*_end``)."""

    def __init__(self) -> None:
        self.packed: list[str] = []

    def on_predict_end(self, trainer: L.Trainer, pl_module: QLoRAModule) -> None:
        self.packed = packed_layers(pl_module)

    on_test_end = on_predict_end


def test_fit_after_predict_and_test_trains_the_unpacked_4bit_layers(tiny_model, tmp_path):
    """fit, predict, test, fit in one process: after each middle stage the 4-bit layers are exactly as the first
    fit left them, so gradients equal those of a run without the middle stages."""
    L.seed_everything(0)
    module, data = tiny_module(tiny_model), tiny_data(tiny_model)
    trainer(tmp_path).fit(module, datamodule=data)
    batch = next(iter(data.train_dataloader()))
    reference, before = layer0_grads(module, batch), four_bit_state(module)
    assert reference and all(g.abs().sum() > 0 for g in reference.values())

    for stage in ("predict", "test"):
        spy = PackedAtStageEnd()
        run = trainer(tmp_path, callbacks=[spy], limit_test_batches=1, limit_predict_batches=1)
        getattr(run, stage)(module, datamodule=data)
        # never packed, not even during the stage: packing rounds the block scales, so it would score other weights
        assert spy.packed == [] and packed_layers(module) == [], stage
        for name, (data_before, absmax_before, nested_before, _) in before.items():
            data_after, absmax_after, nested_after, _ = four_bit_state(module)[name]
            assert torch.equal(data_after, data_before) and torch.equal(absmax_after, absmax_before), name
            assert nested_after == nested_before, name

        after = layer0_grads(module, batch)
        assert after.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(after[name], reference[name], rtol=0, atol=0, msg=f"{stage}: {name}")

    trainer(tmp_path, max_steps=3).fit(module, datamodule=data)  # and a whole second fit trains through every layer
    assert packed_layers(module) == []


@pytest.fixture(scope="module")
def qv_checkpoint(tmp_path_factory, tiny_model) -> Path:
    """``last.ckpt`` of a 3-step fit through the CLI with a q_proj,v_proj adapter of rank 8."""
    from capyft.cli import main

    args = ["--trainer.max_steps=3", "--model.target_modules=[q_proj,v_proj]"]
    cli = main(fit_args(tmp_path_factory.mktemp("qv"), tiny_model, SAMPLE_DATA, *args))
    return Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    ("overrides", "this_model"),
    [
        ({"target_modules": ["k_proj", "o_proj"]}, "k_proj,o_proj r=8, 2 layers, 8 tensors"),
        ({"target_modules": ["q_proj", "v_proj"], "lora_r": 4}, "q_proj,v_proj r=4, 2 layers, 8 tensors"),
        (
            {"target_modules": "all-linear"},
            "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj r=8, 2 layers, 28 tensors",
        ),
    ],
    ids=["k_o", "rank_4", "all_linear"],
)
def test_checkpoint_of_another_adapter_is_refused(tiny_model, qv_checkpoint, overrides, this_model, tmp_path):
    module = tiny_module(tiny_model, **overrides)
    with pytest.raises(ConfigError) as err:
        trainer(tmp_path, limit_val_batches=1).validate(
            module, datamodule=tiny_data(tiny_model), ckpt_path=qv_checkpoint
        )
    assert str(err.value) == (
        "ckpt_path: the checkpoint's adapter does not fit this model's (checkpoint adapter: q_proj,v_proj r=8, "
        f"2 layers, 8 tensors; this model: {this_model}); set --model.target_modules, --model.lora_r and "
        "--model.use_dora as the checkpoint was trained, or give another --ckpt_path"
    )


def test_checkpoint_of_the_same_adapter_loads(tiny_model, qv_checkpoint, tmp_path):
    module = tiny_module(tiny_model, target_modules=["q_proj", "v_proj"])
    trainer(tmp_path, limit_val_batches=1).validate(module, datamodule=tiny_data(tiny_model), ckpt_path=qv_checkpoint)
    saved = torch.load(qv_checkpoint, weights_only=True)["state_dict"]
    own = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert own.keys() == saved.keys()
    assert all(torch.equal(own[n], saved[n]) for n in own)
    assert any(n.endswith("lora_B.default.weight") and saved[n].abs().sum() > 0 for n in saved)  # trained weights
