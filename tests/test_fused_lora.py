"""The fused 4-bit + LoRA linear computes what peft's forward computes: loss, input and adapter gradients.

Each test runs the same model twice from the same random state, once through peft's own ``lora.Linear4bit``
forward and once through :func:`capyft.fused_lora.fuse_lora_linears`, with LoRA dropout on and gradient
checkpointing (the training setup), and compares.
"""

from __future__ import annotations

import types

import pytest
import torch

from capyft.fused_lora import fusable, fuse_lora_linears
from capyft.modeling import build_lora_config, build_quantization_config, load_base_model, wrap_with_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qlora_model(path, dtype: str = "float32", dropout: float = 0.1, use_dora: bool = False, checkpointing=True):
    quantization = build_quantization_config(True, "nf4", True, dtype)
    base = load_base_model(str(path), quantization, dtype, "sdpa", "cpu")
    model = wrap_with_lora(base, build_lora_config(8, 16, dropout, TARGETS, use_dora), checkpointing)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A without a gradient
            torch.nn.init.normal_(param, std=0.05)
    return model


def unfuse(model) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), types.MethodType):
            del module.forward


def loss_and_grads(model, batch, autocast: torch.dtype | None = None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the dropout masks
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads


def random_batch(vocab: int, rows: int = 2, length: int = 24) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def assert_close_grads(fused, plain, relative_error):
    """Every adapter gradient of ``fused`` is within ``relative_error`` (in norm) of ``plain``'s, and not zero."""
    assert fused.keys() == plain.keys() and len(fused) == 2 * 2 * len(TARGETS)
    for name in plain:
        assert plain[name].abs().sum() > 0, name  # a gradient that is really there
        error = (fused[name] - plain[name]).norm() / plain[name].norm()
        assert error <= relative_error, (name, float(error))


def test_fused_training_step_equals_peft_in_float32(tiny_model):
    model = qlora_model(tiny_model)
    batch = random_batch(model.config.vocab_size)
    plain_loss, plain = loss_and_grads(model, batch)
    assert fuse_lora_linears(model) == 2 * len(TARGETS)
    fused_loss, fused = loss_and_grads(model, batch)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert_close_grads(fused, plain, 1e-6)
    # the dropout is really drawn: another seed gives another loss
    torch.manual_seed(8)
    assert not torch.allclose(model(**batch).loss.detach(), fused_loss)


def test_fused_training_step_equals_peft_under_bfloat16_autocast(tiny_model):
    model = qlora_model(tiny_model, dtype="bfloat16")
    batch = random_batch(model.config.vocab_size)
    plain_loss, plain = loss_and_grads(model, batch, torch.bfloat16)
    fuse_lora_linears(model)
    fused_loss, fused = loss_and_grads(model, batch, torch.bfloat16)
    # The same products, rounded at other points: the adapter term is added inside the matmul (one rounding, not
    # peft's three), and where several bfloat16 gradients meet at one input (q, k, v; gate, up) they are summed in
    # another order. bfloat16 rounds at 2^-8 = 0.4%: the loss moves by ~1e-5, gradients by ~1% after two layers
    # (peft against itself: 0).
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-4, atol=0)
    assert_close_grads(fused, plain, 3e-2)  # 2.0% seen
    for name, grad in fused.items():  # gradients land in the adapters' own float32
        assert grad.dtype == torch.float32, name


def test_fused_without_dropout_and_without_checkpointing(tiny_model):
    model = qlora_model(tiny_model, dropout=0.0, checkpointing=False)
    batch = random_batch(model.config.vocab_size)
    plain_loss, plain = loss_and_grads(model, batch)
    fuse_lora_linears(model)
    fused_loss, fused = loss_and_grads(model, batch)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert_close_grads(fused, plain, 1e-6)


@torch.no_grad()
def test_fused_inference_and_disabled_adapters_equal_peft(tiny_model):
    model = qlora_model(tiny_model).eval()
    batch = random_batch(model.config.vocab_size)
    tuned = model(**batch).logits
    with model.disable_adapter():
        base = model(**batch).logits
    fuse_lora_linears(model)
    torch.testing.assert_close(model(**batch).logits, tuned, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():  # compare_base: the fused layers fall back to the base weights alone
        torch.testing.assert_close(model(**batch).logits, base, rtol=0, atol=0)
    assert not torch.allclose(tuned, base)


def test_layers_outside_the_plain_case_keep_peft_forward(tiny_model):
    dora = qlora_model(tiny_model, use_dora=True)
    assert not any(fusable(m) for m in dora.modules())
    assert fuse_lora_linears(dora) == 0
    model = qlora_model(tiny_model)
    assert fuse_lora_linears(model) == 2 * len(TARGETS)
    assert fuse_lora_linears(model) == 0  # installing twice changes nothing


@pytest.mark.parametrize("fused", [True, False])
def test_module_option_installs_the_fused_path(tiny_model, fused):
    from capyft.model import QLoRAModule

    module = QLoRAModule(str(tiny_model), compute_dtype="float32", fused_lora=fused, target_modules=TARGETS)
    module.configure_model()
    installed = sum(isinstance(m.__dict__.get("forward"), types.MethodType) for m in module.model.modules())
    assert installed == (2 * len(TARGETS) if fused else 0)
