"""``QLoRAModule``: a 4-bit (or plain) causal LM with LoRA adapters, trained and evaluated by Lightning."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from capyft import generation, reporting, training
from capyft.answer_hooks import AnswerHooks
from capyft.attention import PACKED_ATTENTION
from capyft.checkpoints import base_model_fingerprint
from capyft.checks import ConfigError
from capyft.evaluation import BERTScoreSettings
from capyft.fused_lora import fuse_lora_linears
from capyft.generation import GenerationSettings
from capyft.levers import compile_decoder_layers, compile_wanted
from capyft.modeling import (
    build_lora_config,
    build_quantization_config,
    causal_lm_loss_sum,
    check_fsdp,
    load_base_model,
    load_tokenizer,
    set_gradient_checkpointing,
    to_dtype,
    wrap_with_lora,
)
from capyft.sizing import (
    EXPERT_KEYS,
    adapter_input_bytes,
    cap_gpu_memory,
    checkpointing_needed,
    norms_per_layer,
    usable_cpu_memory,
    usable_gpu_memory,
)

log = logging.getLogger(__name__)
MONITOR = "val/loss"  # the one metric checkpoints and early stopping watch


class QLoRAModule(AnswerHooks, L.LightningModule):
    """QLoRA: a frozen 4-bit base model plus trainable LoRA adapters.

    The model is built in :meth:`configure_model`, so ``--help``, ``--print_config`` and config checks never load
    weights. Checkpoints hold only the adapter (plus optimizer and loop state), not the frozen base.

    Args:
        model_name_or_path: hub id (e.g. ``meta-llama/Llama-3.1-8B-Instruct``) or local HF model dir.
        load_in_4bit: quantize the frozen base with bitsandbytes (QLoRA); False gives plain LoRA.
        quant_type: ``nf4`` (default, QLoRA paper) or ``fp4``.
        double_quant: quantize the quantization constants too.
        compute_dtype: dtype for matmuls and frozen 16-bit weights: ``float16`` (fits GPUs without bf16),
            ``bfloat16`` or ``float32``.
        quant_storage: packed 4-bit storage dtype; set it to the compute dtype for FSDP.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).
        lora_dropout: dropout on the LoRA input.
        target_modules: module names to adapt, or ``all-linear``.
        use_dora: weight-decomposed LoRA.
        use_rslora: rank-stabilized scaling.
        gradient_checkpointing: recompute activations in backward (non-reentrant): far less memory, ~30% more time.
            ``auto`` (the default): off for a fit whose largest micro-batch (conversations per micro-batch x the
            longest training conversation) fits without it in the memory free once the model is loaded (the CUDA
            GPU's, or on CPU the host's ``MemAvailable``; :func:`capyft.sizing.checkpointing_needed`), else on; on
            under FSDP, with eager attention and for mixtures of experts. Decided at the start of training and
            logged; the loss and gradients are the same either way.
        attn_implementation: ``sdpa_packed`` (default: PyTorch SDPA; with ``data.padding_free`` each packed
            conversation runs through causal flash attention, never across conversations), ``sdpa``, ``eager``,
            ``flash_attention_2`` or ``flex_attention``.
        liger_kernels: Liger's fused RMSNorm, SwiGLU and RoPE kernels on CUDA (``pip install liger-kernel``; skipped
            with a warning on CPU or when missing).
        offload_embeddings: keep the frozen input embedding table in CPU memory (1 GiB saved for Llama-3's 128k
            vocabulary in 16 bits; only the looked-up rows travel). Skipped on CPU or when tied to the output head.
        compile_layers: regional ``torch.compile`` of each decoder layer during ``fit`` (one graph for all layers,
            dynamic lengths; validation and generation stay eager): less host work per step (an 8B step on an H200
            made 25k operator calls instead of 56k). Turns ``liger_kernels`` off (inductor fuses the same
            elementwise work). On an H200 (reference config, 4 x 1, one call, no recomputation): 8,701 real tokens/s
            by mean against 7,145 eager, and ~90 s more for the whole command (compiling); with recomputation 6,829
            against 4,992-5,837, +0.7 GiB, 45-65 s of compiling.
            ``auto``: on for fits of at least 1,000 optimizer steps (where the compile is earned back) on CUDA GPUs of
            at least 16 GiB with triton and a C compiler; off for shorter fits (the reference's 125 steps), on
            smaller GPUs (they keep the memory), on CPU and under FSDP (never run compiled).
        fused_lora: run each 4-bit + LoRA linear as one autograd function (:mod:`capyft.fused_lora`): the same
            results as peft's forward with ten fewer autograd nodes per layer. Off by default: on an H200 it was no
            faster on the reference config (two runs: -4% and +2% by mean) and held 0.26 GiB more; +10% on a CPU.
        optimizer: ``adamw`` (torch) or ``paged_adamw_8bit`` (bitsandbytes; GPU).
        learning_rate: peak learning rate (QLoRA: 2e-4).
        weight_decay: AdamW weight decay on the adapter weights.
        warmup_steps: linear warmup, in optimizer steps.
        lr_schedule: decay after warmup: ``cosine``, ``linear`` or ``constant``.
        loss_chunk_size: tokens per output-head + cross-entropy chunk; bounds logit memory (0: no chunking). 256
            keeps the fp32 logits of a chunk at 128 MiB for a 128k vocabulary.
        trust_remote_code: run model code from the hub repo; off unless you trust it.
        generation: how ``test``/``predict`` answer prompts (``--model.generation.max_new_tokens`` etc.; greedy).
        bertscore: how ``test`` scores answers (``--model.bertscore.model_type`` etc.; roberta-large, layer 17).
        compare_base: ``test`` also answers with the adapter disabled and logs ``test/base_bertscore_*``.
        val_answers: at each validation during ``fit``, answer this many fixed validation prompts (greedy, at most
            ``val_answer_tokens`` new tokens) and log prompt, reference and answer to TensorBoard text
            (``val/answers``), so the curves come with the answers they stand for; 0 turns it off.
        val_answer_tokens: most new tokens per validation answer. Each costs about one decode step: 32 tokens took
            3.4 s per validation on average for the 8B model on an H200 (13 fits, 1.8-5.5 s). Their time is logged
            as ``val/answer_seconds``.
    """

    def __init__(
        self,
        model_name_or_path: str,
        load_in_4bit: bool = True,
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        compute_dtype: Literal["float16", "bfloat16", "float32"] = "float16",
        quant_storage: str | None = None,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        target_modules: list[str] | str = "all-linear",
        use_dora: bool = False,
        use_rslora: bool = False,
        gradient_checkpointing: bool | Literal["auto"] = "auto",
        attn_implementation: str = "sdpa_packed",
        liger_kernels: bool = True,
        offload_embeddings: bool = True,
        compile_layers: bool | Literal["auto"] = False,
        fused_lora: bool = False,
        optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        loss_chunk_size: int = 256,
        trust_remote_code: bool = False,
        generation: GenerationSettings = GenerationSettings(),  # noqa: B008 (frozen dataclass: safe to share)
        bertscore: BERTScoreSettings = BERTScoreSettings(),  # noqa: B008
        compare_base: bool = False,
        val_answers: int = 2,
        val_answer_tokens: int = 32,
    ) -> None:
        super().__init__()
        # Evaluation settings stay out of the checkpoint's hyper-parameters: they belong to each evaluation, not to the
        # trained adapter (the run's config.yaml keeps the ones it trained with; chat reads them from there).
        self.save_hyperparameters(
            ignore=["generation", "bertscore", "compare_base", "val_answers", "val_answer_tokens"]
        )
        self.generation, self.bertscore = generation, bertscore
        self.compare_base = compare_base
        self.val_answers, self.val_answer_tokens = val_answers, val_answer_tokens
        self.model: Any = None
        self.tokenizer: Any = None
        self._compiled = False  # whether configure_model compiled the decoder layers (compile_layers, fit only)
        self.strict_loading = False  # checkpoints hold the adapter only, not the frozen base
        # the optimizer step in progress: its share of the token-mean loss, trained tokens, start time
        self._step_loss: torch.Tensor | float = 0.0
        self._step_tokens: torch.Tensor | int = 0
        self._step_start: float | None = None
        self._step_inputs: torch.Tensor | int = 0

    # ---- building -------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Loads the base model (4-bit on its device), adds LoRA; runs once, before the strategy wraps the model."""
        if self.model is not None:
            return
        hp = self.hparams
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        dtype = hp.compute_dtype
        if device.type == "cpu" and dtype == "float16":
            # fp16 compute on CPU: one QLoRA step of SmolLM2 took 42 s against 3.5 s in bf16 (measured here, torch 2.13)
            log.info("compute_dtype float16 is GPU-only in practice; using bfloat16 on CPU")
            dtype = "bfloat16"
        from lightning.pytorch.strategies import FSDPStrategy

        fsdp = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        # training only: generation's changing shapes and caches would recompile at every step (validation runs
        # eagerly too, see on_validation_start); auto never under FSDP, where compiled layers have not run
        wanted = hp.get("compile_layers", False)
        fitting = wanted and self._trainer is not None and self.trainer.state.fn == "fit"
        auto_ok = not (fsdp and wanted == "auto")
        self._compiled = bool(fitting) and auto_ok and compile_wanted(wanted, device, self._planned_steps())
        if fsdp:
            check_fsdp(self.trainer.strategy.kwargs, hp.load_in_4bit, hp.quant_storage, dtype, self.trainer.precision)
        cap_gpu_memory(device)  # CAPYFT_GPU_MEMORY_GIB, before anything is loaded
        quantization = build_quantization_config(
            hp.load_in_4bit, hp.quant_type, hp.double_quant, dtype, hp.quant_storage
        )
        self.tokenizer = load_tokenizer(hp.model_name_or_path, hp.trust_remote_code)
        # `device` is this rank's own device (cuda:<local rank> under DDP): each rank loads its own full copy
        base = load_base_model(
            hp.model_name_or_path,
            quantization,
            dtype,
            hp.attn_implementation,
            device,
            hp.trust_remote_code,
            # Liger's autograd functions fail to trace under torch.compile (torch 2.11, liger-kernel 0.8.5, H200)
            liger_kernels=hp.liger_kernels and not self._compiled,
            offload_embeddings=hp.offload_embeddings,
        )
        lora = build_lora_config(
            hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.target_modules, hp.use_dora, hp.use_rslora
        )
        # auto starts on (the memory-safe side); on_train_start turns it off where the micro-batches fit without it
        self.model = wrap_with_lora(base, lora, hp.gradient_checkpointing in (True, "auto"))
        if hp.get("fused_lora") and hp.load_in_4bit:
            fuse_lora_linears(self.model)
        if self._compiled:  # after LoRA, so the adapters are inside the compiled graph
            compile_decoder_layers(self.model)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        share = 100 * trainable / total
        log.info("LoRA: %s trainable of %s parameters (%.3f%%)", f"{trainable:,}", f"{total:,}", share)

    def _planned_steps(self) -> int | None:
        """The fit's optimizer steps as the datamodule plans them (None when it cannot tell)."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if not hasattr(datamodule, "planned_steps"):
            return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        return datamodule.planned_steps(
            trainer.accumulate_grad_batches, trainer.world_size, trainer.max_epochs, trainer.max_steps
        )

    # Set by capyft's CLI, whose process ends with its run. At the end of fit/validate/test/predict Lightning's
    # strategy moves the module to CPU memory, freeing the GPU for whatever the process does next; after the CLI's run
    # nothing comes next, and moving a 4-bit 8B model (and the scorer) took 3.4 s of a 76 s test command on an H200.
    stays_on_device_at_teardown = False

    def cpu(self) -> QLoRAModule:
        """Moves the module to CPU memory, except at the end of a CLI run (``stays_on_device_at_teardown``)."""
        return self if self.stays_on_device_at_teardown else super().cpu()

    # ---- checkpoint: adapter weights only, plus RNG state for exact resume ----------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        full = super().state_dict(*args, **kwargs)
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if k in trainable}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = training.rng_state()
        # what the adapter was trained on, so a resume can tell a moved base folder from another model
        checkpoint["base_model"] = base_model_fingerprint(self.model.config if self.model is not None else None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_adapter_fits(checkpoint.get("state_dict") or {})
        if checkpoint.get("rng_states") is not None:
            training.restore_rng_state(checkpoint["rng_states"])

    def _check_adapter_fits(self, saved: dict[str, Any]) -> None:
        """Refuses a checkpoint whose adapter is not this module's (other target modules, rank or model): with
        ``strict_loading`` off it would load partly or not at all, silently leaving the base model's behaviour.

        Skipped before the model is built (``load_from_checkpoint``) and under FSDP, whose flattened parameters
        carry other names and shapes.
        """
        from lightning.pytorch.strategies import FSDPStrategy

        if self.model is None or (self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)):
            return
        own = {name: tuple(p.shape) for name, p in self.named_parameters() if p.requires_grad}
        theirs = {name: tuple(t.shape) for name, t in saved.items()}
        sides = training.adapter_mismatch(own, theirs)
        if sides:
            raise ConfigError(
                f"ckpt_path: the checkpoint's adapter does not fit this model's ({sides}); set "
                "--model.target_modules, --model.lora_r and --model.use_dora as the checkpoint was trained, or give "
                "another --ckpt_path"
            )

    # ---- training -------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss over the trained tokens of ``batch`` and their count."""
        return causal_lm_loss_sum(self.model, batch, self.hparams.loss_chunk_size)

    def on_train_start(self) -> None:
        self.model.train()  # Lightning switches the LightningModule, but a model loaded by HF starts in eval mode
        self._align_log_step = True
        if self.hparams.get("gradient_checkpointing") == "auto":
            self._resolve_checkpointing()

    @property
    def checkpointing(self) -> bool:
        """Whether the decoder layers recompute their activations in backward now."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if hasattr(base, "is_activation_checkpointing"):  # transformers >= 5.24 renamed is_gradient_checkpointing
            return bool(base.is_activation_checkpointing)
        return bool(getattr(base, "is_gradient_checkpointing", False))

    def _resolve_checkpointing(self) -> None:
        """``gradient_checkpointing: auto``: off when the fit's largest micro-batch fits without it, else on."""
        reason = self._checkpointing_obstacle()
        if reason is None:  # configure_model turned it on
            set_gradient_checkpointing(self.model, False)
        log.info(
            "gradient_checkpointing auto: %s", f"on, {reason}" if reason else "off, the micro-batches fit without it"
        )

    def _checkpointing_obstacle(self) -> str | None:
        from lightning.pytorch.strategies import FSDPStrategy

        device = self.trainer.strategy.root_device
        if device.type not in ("cuda", "cpu"):
            return "CUDA GPUs and CPUs only (it sizes by their free memory)"
        if isinstance(self.trainer.strategy, FSDPStrategy):
            return "always under FSDP"
        hp = self.hparams
        if hp.attn_implementation not in ("sdpa", *PACKED_ATTENTION, "flash_attention_2", "flash_attention_3"):
            return f"{hp.attn_implementation} attention keeps what the estimate does not count (SDPA and flash only)"
        text = self.model.config.get_text_config()
        if any((getattr(text, key, None) or 0) > 1 for key in EXPERT_KEYS):
            return "mixture-of-experts layers keep what the estimate does not count (dense layers only)"
        bound = getattr(self.trainer.datamodule, "micro_batch_token_bound", None)
        tokens = bound() if callable(bound) else None
        if tokens is None:
            return "the largest micro-batch is unknown (no capyft data module)"
        cuda = device.type == "cuda"
        usable = usable_gpu_memory(device) if cuda else usable_cpu_memory()
        if usable is None:
            return "this system does not tell the host memory available"
        width = to_dtype(hp.compute_dtype).itemsize
        adapter_bytes = adapter_input_bytes(hp.load_in_4bit, hp.lora_dropout, width, cuda)
        return checkpointing_needed(text, tokens, usable, adapter_bytes, width, norms_per_layer(self.model))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if getattr(self, "_align_log_step", False):
            # Lightning logs at its count of stepped batches, which a checkpoint saved at an epoch's last batch
            # restores one short of the optimizer step: log at the optimizer step, as an uninterrupted run does.
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step
            self._align_log_step = False

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self._step_start is None:  # first micro-batch of this optimizer step
            self._step_start = time.perf_counter()
        loss_sum, n_tokens = self(batch)
        # Normalize by the trained tokens of the whole optimizer step (all micro-batches, all ranks), so the
        # gradient is the token-mean however the step is split. Lightning divides by accumulate_grad_batches and
        # DDP averages over ranks: multiply both back.
        step_tokens = batch["step_tokens"].to(loss_sum.device).float()
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        # Accumulate as tensors: a float() here would make the host wait for the forward pass before it can queue
        # the backward kernels (QLoRA steps are launch-bound); the step's metrics sync once, before the update.
        self._step_loss = self._step_loss + loss_sum.detach() / step_tokens
        self._step_tokens = self._step_tokens + n_tokens.detach()
        mask = batch.get("attention_mask")  # input tokens, padding excluded (a packed row has none)
        self._step_inputs = self._step_inputs + (mask.sum() if mask is not None else batch["input_ids"].numel())
        return loss_sum / step_tokens * scale

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # no gradients: NonFiniteGuard dropped a non-finite step's (see capyft.callbacks); log its norm as NaN
        norms = torch._foreach_norm(grads) if grads else [torch.tensor(float("nan"))]  # one fused kernel
        grad_norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
        elapsed = max(time.perf_counter() - self._step_start, 1e-9)
        loss, rate, grad_norm = training.reduce_step_metrics(
            self.trainer.strategy, float(self._step_loss), int(self._step_tokens), elapsed, grad_norm
        )
        metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/tokens_per_sec": rate,
            "train/lr": optimizer.param_groups[0]["lr"],
        }
        if torch.cuda.is_available():
            metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            metrics["train/peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        metrics["train/input_tokens"] = float(self._step_inputs)  # this rank's, for throughput over whole steps
        self.log_dict(metrics, on_step=True, prog_bar=False, sync_dist=False, batch_size=1)
        bar = {"loss": metrics["train/loss"], "tok/s": metrics["train/tokens_per_sec"]}
        self.log_dict(bar, prog_bar=True, logger=False, batch_size=1)
        self._step_loss, self._step_tokens, self._step_start, self._step_inputs = 0.0, 0, None, 0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n_tokens = self(batch)
        if self._val_sums is None:
            self._val_sums = torch.zeros(2, dtype=torch.float64, device=loss_sum.device)
        self._val_sums += torch.stack([loss_sum.detach().double(), n_tokens.double()])  # no host sync per batch

    def on_validation_start(self) -> None:
        self._val_start = time.perf_counter()
        if self._compiled:
            # no-grad passes and generation would each compile graphs of their own (~10-15 s each for 8B)
            torch.compiler.set_stance("force_eager")

    def on_validation_epoch_start(self) -> None:
        self._val_sums: torch.Tensor | None = None

    def _log_val_loss(self) -> None:
        """The token-weighted mean loss over the whole validation set, all ranks' shards summed (one collective)."""
        sums = self._val_sums if self._val_sums is not None else torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self.log(MONITOR, float(sums[0] / sums[1].clamp(min=1)), prog_bar=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        if self._trainer is not None:
            self._log_val_loss()
        if self._trainer is None or self.trainer.state.fn != "fit" or self.trainer.sanity_checking:
            return
        if self.val_answers > 0:
            start = time.perf_counter()
            self._log_val_answers()
            self.log("val/answer_seconds", time.perf_counter() - start, rank_zero_only=True, batch_size=1)
        if torch.cuda.is_available():  # the run's peak so far, this validation and its answers included
            self.log("val/peak_reserved_gib", torch.cuda.max_memory_reserved() / 2**30, batch_size=1)

    def on_validation_end(self) -> None:
        if self._compiled:
            torch.compiler.set_stance("default")
        # A validation inside an accumulation window is not training time: keep it out of train/tokens_per_sec.
        if self._step_start is not None and self._trainer is not None and self.trainer.state.fn == "fit":
            self._step_start += time.perf_counter() - self._val_start

    def _log_val_answers(self) -> None:
        """Answers the first ``val_answers`` validation prompts and logs them as TensorBoard text at this step."""
        datamodule = self.trainer.datamodule
        batch = datamodule.sample_prompts(self.val_answers) if hasattr(datamodule, "sample_prompts") else None
        if batch is None or not self.trainer.is_global_zero:
            return
        batch = {
            **batch,
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }
        settings = GenerationSettings(max_new_tokens=self.val_answer_tokens)
        records, _ = generation.answer_batch(self.model, self.tokenizer, batch, settings)
        # at the step Lightning logs this validation's scalars (val/loss) at, so text and curves line up
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        reporting.log_text(self.loggers, "val/answers", reporting.examples_markdown(records), step)

    # ---- optimizer ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = training.build_optimizer(params, hp.optimizer, hp.learning_rate, hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = training.lr_lambda(hp.lr_schedule, hp.warmup_steps, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- adapter export -------------------------------------------------------------------------------------
    def save_adapter(self, directory: str | Path) -> Path:
        """Writes the adapter in PEFT's format (``adapter_config.json`` + safetensors) with the tokenizer."""
        directory = Path(directory)
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        return directory
