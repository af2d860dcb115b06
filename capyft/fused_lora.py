"""One autograd node per 4-bit + LoRA linear: the base matmul and the adapter in a single function.

A QLoRA step of a 7-8B model at a few thousand tokens is bound by the host, not the GPU: every one of the 224
quantized linears of Llama-3.1-8B runs, in forward, in the checkpointed recompute and in backward, peft's LoRA
wrapper (four module calls, a defensive clone, casts, a scale and an add) around bitsandbytes' ``MatMul4Bit``
autograd function: about nine autograd nodes and a dozen kernel launches per linear and pass. Here the same
arithmetic runs in one :class:`torch.autograd.Function` whose backward computes the four gradients directly, as
Unsloth's and Axolotl's LoRA kernels do (written here from the math, not from their code).

The results are the ones peft computes: the same bitsandbytes kernels for the frozen 4-bit weight (its
``matmul_4bit`` in forward, ``dequantize_4bit`` + matmul in backward, as its own autograd function does), the
adapter in the same dtype as peft's (the autocast dtype under autocast, the adapter's own dtype otherwise), and
peft's own dropout module, so the random mask is the one peft would draw. ``tests/test_fused_lora.py`` checks
loss, input and adapter gradients against peft's forward.

Layers it does not cover keep peft's forward: DoRA and other variants, a LoRA bias, several adapters, disabled
adapters (the base-model answers of ``compare_base``), merged weights, bitsandbytes' CPU-packed format.

Written against peft 0.21 and bitsandbytes 0.50.2.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

log = logging.getLogger(__name__)


class QLoRALinearFunction(torch.autograd.Function):
    """``y = x W^T (+ bias) + scale * (dropout(x) A^T) B^T`` for an NF4/FP4-quantized, frozen ``W``.

    Gradients flow to ``x`` (through ``W`` and through the adapter) and to ``A`` and ``B``. Against peft's
    forward it saves, per linear and pass, the clone, the scale, the add and the gradient sum at ``x`` (the adapter
    term is added by the matmuls' epilogue) and about ten autograd nodes; it saves the same tensors for backward
    (the adapter's input, its rank-r activation and the dropout mask).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        weight: torch.Tensor,
        quant_state: Any,
        bias: torch.Tensor | None,
        scale: float,
        dropout: float,
        dropout_dtype: torch.dtype,
        lora_dtype: torch.dtype,
    ) -> torch.Tensor:
        import bitsandbytes as bnb

        # grad mode is off inside forward, so matmul_4bit runs the same gemm_4bit kernel as its MatMul4Bit
        out = bnb.matmul_4bit(x, weight, quant_state=quant_state, bias=bias)
        xl, mask = x.to(dropout_dtype), None
        if dropout > 0:  # native_dropout draws the mask nn.Dropout would (same kernel, same random numbers)
            xl, mask = torch.native_dropout(xl, dropout, True)
        xl = xl.to(lora_dtype)
        a, b = lora_a.to(lora_dtype), lora_b.to(lora_dtype)
        h = xl @ a.t()
        if out.dtype == lora_dtype:
            out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t(), alpha=scale)
        else:  # e.g. float32 adapters over float16 compute without autocast: peft casts the adapter's output
            out = out + ((h @ b.t()) * scale).to(out.dtype)
        ctx.save_for_backward(xl, h, a, b, mask)
        ctx.weight, ctx.quant_state, ctx.scale, ctx.dropout = weight, quant_state, scale, dropout
        ctx.x_dtype, ctx.param_dtypes = x.dtype, (lora_a.dtype, lora_b.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        import bitsandbytes.functional as bnbf

        xl, h, a, b, mask = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_2d = grad.reshape(-1, grad.shape[-1])
        g = grad_2d.to(a.dtype) * ctx.scale  # the gradient at the adapter's output
        dh = g @ b  # (tokens, r)
        grad_a = (dh.t() @ xl.reshape(-1, xl.shape[-1])).to(ctx.param_dtypes[0]) if need_a else None
        grad_b = (g.t() @ h.reshape(-1, h.shape[-1])).to(ctx.param_dtypes[1]) if need_b else None
        grad_x = None
        if need_x:
            d_xl = dh @ a  # (tokens, in)
            if mask is not None:
                d_xl = torch.ops.aten.native_dropout_backward(d_xl, mask.view(d_xl.shape), 1.0 / (1.0 - ctx.dropout))
            weight = bnbf.dequantize_4bit(ctx.weight, ctx.quant_state).to(grad.dtype)
            if d_xl.dtype == grad.dtype:
                grad_x = torch.addmm(d_xl, grad_2d, weight)
            else:
                grad_x = grad_2d @ weight + d_xl.to(grad.dtype)
            grad_x = grad_x.view(*grad.shape[:-1], weight.shape[-1]).to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward installed on a peft ``lora.Linear4bit`` (see :func:`fuse_lora_linears`)."""
    base = self.base_layer
    state = getattr(base.weight, "quant_state", None)
    active = self.active_adapters
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(active) != 1
        or active[0] not in self.lora_A
        or active[0] in self.lora_variant
        or state is None
        or getattr(state, "packing_format_for_cpu", False)
    ):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    device = x.device.type
    # As peft: the adapter's matmuls run in the autocast dtype under autocast, else in the adapter's dtype; its
    # input is cast to the adapter's dtype before dropout unless CUDA autocast is on (peft's own test).
    lora_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else lora_a.dtype
    dropout_dtype = x.dtype if torch.is_autocast_enabled() else lora_a.dtype
    bias = None if base.bias is None else base.bias.to(base.compute_dtype)
    out = QLoRALinearFunction.apply(
        x.to(base.compute_dtype),
        lora_a,
        lora_b,
        base.weight,
        state,
        bias,
        self.scaling[name],
        p,
        dropout_dtype,
        lora_dtype,
    )
    return out.to(x.dtype)


def fusable(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA layer over a bitsandbytes 4-bit linear that :func:`fuse_lora_linears`
    covers: one plain LoRA adapter without bias, a known compute dtype."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes support
        return False
    if not isinstance(module, Linear4bit) or len(module.lora_A) != 1 or module.lora_variant:
        return False
    name = next(iter(module.lora_A))
    dropout = module.lora_dropout[name]
    plain_dropout = isinstance(dropout, torch.nn.Identity) or type(dropout) is torch.nn.Dropout
    return plain_dropout and module.lora_B[name].bias is None and module.base_layer.compute_dtype is not None


def fuse_lora_linears(model: torch.nn.Module) -> int:
    """Installs :class:`QLoRALinearFunction` on every :func:`fusable` layer of ``model``; returns how many.

    The layers keep their parameters, names and state dicts: saving, loading, merging and ``disable_adapter()``
    are untouched (a layer falls back to peft's own forward whenever it is not in the plain one-adapter case).
    """
    count = 0
    for module in model.modules():
        if fusable(module) and not isinstance(module.__dict__.get("forward"), types.MethodType):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    log.info("fused_lora: %d 4-bit + LoRA linears run as one autograd function each", count)
    return count
