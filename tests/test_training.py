"""Training through the real CLI and Trainer on a tiny random Llama: what changes, what is saved, what resumes."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import REPO, fit_args, saved_activation_bytes, scalars
from safetensors.torch import load_file

from capyft.cli import main
from capyft.datamodule import ChatDataModule
from capyft.model import QLoRAModule
from capyft.modeling import set_gradient_checkpointing as set_checkpointing


def test_fit_trains_adapter_only_and_logs(tmp_path, tiny_model, uneven_colors):
    cli = main(fit_args(tmp_path, tiny_model, uneven_colors, "--trainer.max_steps=24", "--model.learning_rate=0.03"))
    run = Path(cli.trainer.log_dir)
    module = cli.model

    # trainable weights changed, every base weight bit-identical to the saved model
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    fresh = QLoRAModule(
        **{k: v for k, v in module.hparams.items() if not k.startswith("_")}
    )  # same 4-bit quantization, untrained: packed weights must match
    fresh.configure_model()
    fresh_params = dict(fresh.model.get_base_model().named_parameters())
    lora_b = [p for n, p in module.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero
    base = module.model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        if param.__class__.__name__ == "Params4bit":
            assert torch.equal(param.data, fresh_params[name].data), name
            continue
        assert torch.equal(param.detach().cpu(), original[key].to(param.dtype)), name
    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)

    # loss falls on the learnable toy set; TensorBoard holds train and val loss
    train = scalars(run, "train/loss")
    val = scalars(run, "val/loss")
    assert len(train) == 24 and val
    steps = sorted(train)
    assert sum(train[s] for s in steps[-3:]) / 3 < 0.9 * sum(train[s] for s in steps[:3]) / 3
    assert set(scalars(run, "train/tokens_per_sec")) and set(scalars(run, "train/grad_norm"))

    # the checkpoint holds only adapter tensors (plus optimizer and loop state)
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert {"optimizer_states", "lr_schedulers", "loops"} <= set(ckpt)
    print(f"last.ckpt: {last.stat().st_size / 1e6:.2f} MB for {len(ckpt['state_dict'])} adapter tensors")

    # the PEFT-format adapter loads with PeftModel.from_pretrained and gives the module's logits
    from peft import PeftModel

    final = run / "adapter" / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert set(load_file(final / "adapter_model.safetensors"))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), final).eval()
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits.float()
        got = plain(input_ids=ids).logits.float()
    # the module's base is 4-bit: compare with a 4-bit reload through the same path instead of fp32 when 4-bit
    if module.hparams.load_in_4bit:
        reloaded = PeftModel.from_pretrained(module.model.get_base_model(), final, adapter_name="reloaded")
        reloaded.set_adapter("reloaded")
        with torch.no_grad():
            got = reloaded(input_ids=ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # the saved config reproduces the run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["model_name_or_path"] == str(tiny_model)
    assert "tokenizer_name_or_path" not in saved["data"]
    assert cli.datamodule.hparams.tokenizer_name_or_path == str(tiny_model)  # linked
    assert saved["trainer"]["max_steps"] == 24


def test_adapter_loads_into_plain_base(tmp_path, tiny_model, uneven_colors):
    """Plain LoRA (no 4-bit): the exported adapter on a fresh fp32 base gives the module's logits exactly."""
    cli = main(fit_args(tmp_path, tiny_model, uneven_colors, "--trainer.max_steps=3", "--model.load_in_4bit=false"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = cli.model.eval()
    fresh = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), Path(cli.trainer.log_dir) / "adapter" / "final"
    )
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, module.model(input_ids=ids).logits)


def test_resume_matches_uninterrupted(tmp_path, tiny_model, uneven_colors):
    common = ["--model.lora_dropout=0.2", "--trainer.val_check_interval=3", "--checkpoint.every_n_train_steps=3"]
    straight = main(fit_args(tmp_path / "a", tiny_model, uneven_colors, "--trainer.max_steps=8", *common))
    # the interrupted run has the same plan (max_steps 8, so the same LR schedule) but stops after step 3
    stop = '--trainer.callbacks+={"class_path": "helpers.StopAtStep", "init_args": {"step": 3}}'
    first = main(fit_args(tmp_path / "b", tiny_model, uneven_colors, "--trainer.max_steps=8", *common, stop))
    assert first.trainer.global_step == 3
    run_b = Path(first.trainer.log_dir)
    resumed = main(
        fit_args(tmp_path / "b", tiny_model, uneven_colors, "--trainer.max_steps=8", *common)
        + [f"--ckpt_path={run_b / 'checkpoints' / 'last.ckpt'}"]
    )
    assert resumed.trainer.global_step == straight.trainer.global_step == 8
    a = scalars(Path(straight.trainer.log_dir), "train/loss")
    b = {**scalars(run_b, "train/loss"), **scalars(Path(resumed.trainer.log_dir), "train/loss")}
    assert sorted(a) == sorted(b) == list(range(8))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step
    lr_a, lr_b = scalars(Path(straight.trainer.log_dir), "train/lr"), scalars(Path(resumed.trainer.log_dir), "train/lr")
    assert all(lr_a[s] == pytest.approx(lr_b[s]) for s in lr_b)


class GradRecorder(L.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def first_step_grads(
    model_dir: Path, data: Path, batch, accumulate: int, tmp_path: Path, model_args: dict | None = None, **data_args
) -> dict:
    torch.manual_seed(0)
    settings = {"load_in_4bit": False, "compute_dtype": "float32", "lora_dropout": 0.0, "lora_r": 4}
    settings["gradient_checkpointing"] = True  # the path these tests covered before auto became the default
    module = QLoRAModule(str(model_dir), **(settings | (model_args or {})))
    datamodule = ChatDataModule(
        str(model_dir),
        source=str(data),
        train_size=8,
        val_size=0,
        test_size=0,
        batch_size=batch,
        max_length=128,
        **data_args,
    )
    recorder = GradRecorder()
    trainer = L.Trainer(
        max_steps=1,
        accumulate_grad_batches=accumulate,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule)
    recorder.grads["accumulate"] = torch.tensor(trainer.accumulate_grad_batches)
    return recorder.grads


def test_accumulation_is_token_weighted(tmp_path, tiny_model, uneven_colors):
    big = first_step_grads(tiny_model, uneven_colors, batch=4, accumulate=1, tmp_path=tmp_path)
    small = first_step_grads(tiny_model, uneven_colors, batch=1, accumulate=4, tmp_path=tmp_path)
    assert big.pop("accumulate") == 1 and small.pop("accumulate") == 4
    assert big and big.keys() == small.keys()
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-7)


def test_auto_batch_size_keeps_the_step_and_its_gradient(tmp_path, tiny_model, uneven_colors):
    """batch_size auto with a 2-conversation token budget runs 2 x 2: the same step, the same gradient as 4 x 1."""
    big = first_step_grads(tiny_model, uneven_colors, batch=4, accumulate=1, tmp_path=tmp_path)
    fixed = first_step_grads(tiny_model, uneven_colors, batch=2, accumulate=2, tmp_path=tmp_path)
    auto = first_step_grads(
        tiny_model, uneven_colors, "auto", accumulate=1, tmp_path=tmp_path, step_size=4, micro_batch_tokens=2 * 128 + 5
    )
    assert int(auto.pop("accumulate")) == 2 and int(fixed.pop("accumulate")) == 2 and int(big.pop("accumulate")) == 1
    assert big and big.keys() == auto.keys() == fixed.keys()
    for name in big:
        torch.testing.assert_close(auto[name], fixed[name], rtol=0, atol=0)  # the fixed 2 x 2 split, bit for bit
        torch.testing.assert_close(auto[name], big[name], rtol=1e-4, atol=1e-6)  # fp32 summation order only


def test_checkpointing_off_trains_like_checkpointing_on(tmp_path, tiny_model, uneven_colors, caplog):
    """What ``gradient_checkpointing: auto`` changes is memory and time, not the step: the first step's gradients
    are the same with and without recomputation, bit for bit in float32 on CPU, LoRA dropout included (the recompute
    replays the same masks)."""
    caplog.set_level("INFO", logger="capyft.model")
    grads = {
        on: first_step_grads(
            tiny_model, uneven_colors, 2, 2, tmp_path, {"gradient_checkpointing": on, "lora_dropout": 0.1}
        )
        for on in (True, False, "auto")  # auto: on when built, turned off at the start of training (ample memory)
    }
    assert "gradient_checkpointing auto: off, the micro-batches fit without it" in caplog.text
    plain = first_step_grads(tiny_model, uneven_colors, 2, 2, tmp_path, {"lora_dropout": 0.0})
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 1
    for name in grads[True]:
        torch.testing.assert_close(grads[False][name], grads[True][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(grads["auto"][name], grads[True][name], rtol=0, atol=0, msg=name)
    assert any(
        not torch.equal(grads[True][name], plain[name]) for name in plain if name != "accumulate"
    )  # dropout acted


def llama_shaped(dropout: float, checkpointing: bool):
    """A 2-layer Llama with the 8B model's shape ratios (intermediate 3.5 x hidden, grouped heads), plain LoRA on
    every linear layer, bf16 weights on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from capyft.modeling import build_lora_config, wrap_with_lora

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=896,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    return wrap_with_lora(base, build_lora_config(r=4, alpha=8, dropout=dropout), checkpointing).train()


def kept_per_token(model) -> float:
    """Bytes autograd keeps for backward per token of a forward pass (the slope from 128 to 384 tokens)."""

    def kept(tokens: int) -> int:
        ids = torch.randint(0, 128, (1, tokens))
        return saved_activation_bytes(model, lambda: model(input_ids=ids, use_cache=False))

    return (kept(384) - kept(128)) / 256


@pytest.mark.parametrize("dropout", [0.1, 0.0], ids=["lora-dropout", "no-dropout"])
def test_activation_estimate_bounds_what_autograd_keeps_without_checkpointing(dropout):
    """``gradient_checkpointing: auto`` turns checkpointing off from :func:`activation_bytes_per_token`: per token
    it must not undercount what a layer keeps for backward, nor overcount it by much (a too-cautious estimate keeps
    checkpointing where it is not needed). Plain LoRA in bf16 here; ``tests/test_gpu.py`` checks the 4-bit path."""
    from capyft.sizing import activation_bytes_per_token, adapter_input_bytes

    model = llama_shaped(dropout, checkpointing=False)
    per_token = kept_per_token(model)
    adapter_bytes = adapter_input_bytes(load_in_4bit=False, lora_dropout=dropout, width=2)  # as QLoRAModule does
    estimate = activation_bytes_per_token(model.config, False, adapter_bytes, width=2, in_flight=False)
    assert per_token <= estimate <= 1.25 * per_token, (per_token, estimate)
    # with checkpointing, each layer keeps its input only: far less, which the checkpointed estimate covers
    checkpointed = llama_shaped(dropout, checkpointing=True)
    kept = kept_per_token(checkpointed)
    assert kept <= activation_bytes_per_token(checkpointed.config, True) and kept < per_token / 8


def test_activation_estimate_bounds_4bit_layers_under_cpu_autocast(tiny_model):
    """The demo's path: bitsandbytes 4-bit layers with LoRA dropout under bf16 autocast on CPU, where peft casts
    each adapter's input to float32 (it tells autocast by CUDA's flag), which ``adapter_input_bytes`` counts."""
    from capyft.modeling import build_lora_config, build_quantization_config, load_base_model, wrap_with_lora
    from capyft.sizing import activation_bytes_per_token, adapter_input_bytes, norms_per_layer, usable_cpu_memory

    quantization = build_quantization_config(True, "nf4", True, "bfloat16", None)
    cpu = torch.device("cpu")
    base = load_base_model(
        str(tiny_model), quantization, "bfloat16", "sdpa_packed", cpu, liger_kernels=False, offload_embeddings=False
    )
    model = wrap_with_lora(base, build_lora_config(r=4, alpha=8, dropout=0.1), False).train()

    def kept(tokens: int) -> int:
        ids = torch.randint(3, 200, (1, tokens))

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=ids, use_cache=False)

        return saved_activation_bytes(model, forward)

    per_token = (kept(384) - kept(128)) / 256
    adapter_bytes = adapter_input_bytes(load_in_4bit=True, lora_dropout=0.1, width=2, cuda=False)
    estimate = activation_bytes_per_token(
        model.config, False, adapter_bytes, norms=norms_per_layer(model), in_flight=False
    )
    assert per_token <= estimate <= 1.5 * per_token, (per_token, estimate)
    assert usable_cpu_memory() > 2**28  # Linux tells MemAvailable


def test_auto_checkpointing_turns_off_only_where_the_largest_micro_batch_fits(monkeypatch, caplog):
    from types import SimpleNamespace

    from capyft import model as model_module
    from capyft.sizing import CHECKPOINTING_HEADROOM, activation_bytes_per_token, checkpointing_needed

    caplog.set_level("INFO", logger="capyft.model")
    llama8b = SimpleNamespace(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    )
    assert activation_bytes_per_token(llama8b, True) == 606_208  # 0.58 MiB, the measured checkpointed slope
    assert activation_bytes_per_token(llama8b, False, 3) == 10_240_000  # 9.8 MiB: 17x
    assert checkpointing_needed(llama8b, 4 * 2048, 133 * 2**30) is None  # an H200 once the 8B model is loaded
    reason = checkpointing_needed(llama8b, 2048, 2 * 2**30)  # an 8 GB card: one conversation a micro-batch
    assert reason.startswith("a micro-batch of up to 2048 tokens would keep about 19.5 GiB of activations")
    exact = 4 * 2048 * activation_bytes_per_token(llama8b, False, 3) / CHECKPOINTING_HEADROOM
    assert checkpointing_needed(llama8b, 4 * 2048, int(exact) + 1) is None
    assert checkpointing_needed(llama8b, 4 * 2048, int(exact) - 1) is not None

    # the module: resolved at the start of training from the micro-batch bound and the free GPU memory
    module = QLoRAModule("unused", load_in_4bit=True, gradient_checkpointing="auto", lora_dropout=0.05)
    module.model = llama_shaped(0.05, checkpointing=True)
    per_token = activation_bytes_per_token(module.model.config, False, 3)
    module._trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cuda", 0)),
        datamodule=SimpleNamespace(micro_batch_token_bound=lambda: 1000),
    )
    for free, stays_on in [(1000 * per_token, True), (2 * 1000 * per_token, False)]:
        monkeypatch.setattr(model_module, "usable_gpu_memory", lambda device, free=free: free)
        set_checkpointing(module.model, True)
        module._resolve_checkpointing()
        assert module.checkpointing is stays_on, free
        assert module.model.get_base_model().model.layers[0].gradient_checkpointing is stays_on
    assert "gradient_checkpointing auto: on, a micro-batch of up to 1000 tokens" in caplog.text
    assert "gradient_checkpointing auto: off, the micro-batches fit without it" in caplog.text
    embeddings = module.model.get_input_embeddings()
    set_checkpointing(module.model, True)
    set_checkpointing(module.model, True)  # twice: still one hook, which turning it off removes
    set_checkpointing(module.model, False)
    assert not embeddings(torch.tensor([[1, 2]])).requires_grad and not module.checkpointing
    # on CPU from the host memory available; 4-bit layers under CPU autocast keep float32 adapter inputs (8 bytes)
    module._trainer.strategy.root_device = torch.device("cpu")
    on_cpu = activation_bytes_per_token(module.model.config, False, 8)
    for free, stays_on in [(1000 * on_cpu, True), (2 * 1000 * on_cpu, False), (None, True)]:
        monkeypatch.setattr(model_module, "usable_cpu_memory", lambda free=free: free)
        set_checkpointing(module.model, True)
        module._resolve_checkpointing()
        assert module.checkpointing is stays_on, free
    assert "on, this system does not tell the host memory available" in caplog.text
    module._trainer.strategy.root_device = torch.device("mps")
    assert module._checkpointing_obstacle() == "CUDA GPUs and CPUs only (it sizes by their free memory)"
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), datamodule=None)
    assert "largest micro-batch is unknown" in module._checkpointing_obstacle()

    module.model.config.num_local_experts = 8  # a mixture of experts: not what the estimate counts
    assert module._checkpointing_obstacle().startswith("mixture-of-experts layers")
    del module.model.config.num_local_experts
    module.hparams.attn_implementation = "eager"  # keeps each layer's attention probabilities
    assert module._checkpointing_obstacle().startswith("eager attention keeps what the estimate does not count")
    module.hparams.attn_implementation = "sdpa_packed"

    from lightning.pytorch.strategies import FSDPStrategy

    class OnAGPU(FSDPStrategy):
        root_device = torch.device("cuda", 0)

    module._trainer = SimpleNamespace(
        strategy=OnAGPU.__new__(OnAGPU), datamodule=SimpleNamespace(micro_batch_token_bound=lambda: 1)
    )
    monkeypatch.setattr(model_module, "usable_gpu_memory", lambda device: 2**50)  # room to spare: only FSDP says no
    assert module._checkpointing_obstacle() == "always under FSDP"


def test_gpu_memory_cap_holds_the_process_to_the_gib_it_names(monkeypatch, tmp_path, tiny_model, uneven_colors):
    """``CAPYFT_GPU_MEMORY_GIB``: a GPU shared with other work, or a large GPU standing in for a small one. The
    allocator is held to it and every ``auto`` sizes from it; a value that is no size fails before anything loads."""
    from types import SimpleNamespace

    from capyft import sizing
    from capyft.checks import ConfigError
    from capyft.levers import compile_toolchain_missing, compile_wanted

    gib = 2**30
    monkeypatch.delenv("CAPYFT_GPU_MEMORY_GIB", raising=False)
    assert sizing.gpu_memory_cap() is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * gib, 141 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 7 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5 * gib)
    cuda = torch.device("cuda", 0)
    assert sizing.usable_gpu_memory(cuda) == 102 * gib  # free + cached: all of an H200's
    monkeypatch.setenv("CAPYFT_GPU_MEMORY_GIB", "7.5")
    assert sizing.gpu_memory_cap() == int(7.5 * gib)
    assert sizing.usable_gpu_memory(cuda) == int(2.5 * gib)  # 7.5 less the 5 GiB allocated
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 8 * gib)
    assert sizing.usable_gpu_memory(cuda) == 0

    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=150 * gib))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: fractions.append((f, device)))
    sizing.cap_gpu_memory(torch.device("cpu"))
    sizing.cap_gpu_memory(cuda)
    assert fractions == [(7.5 / 150, cuda)]
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    assert not compile_wanted("auto", cuda, steps=5000)  # an "8 GB" GPU keeps its memory, as a real one does
    monkeypatch.setenv("CAPYFT_GPU_MEMORY_GIB", "40")
    assert compile_wanted("auto", cuda, steps=5000) is (compile_toolchain_missing("cuda") is None)

    for bad in ("0", "-2", "lots", "inf"):
        monkeypatch.setenv("CAPYFT_GPU_MEMORY_GIB", bad)
        with pytest.raises(ValueError, match="CAPYFT_GPU_MEMORY_GIB"):
            sizing.gpu_memory_cap()
    with pytest.raises(ConfigError, match=r"CAPYFT_GPU_MEMORY_GIB='inf': give the GiB this process may use"):
        main(fit_args(tmp_path, tiny_model, uneven_colors))
    assert not (tmp_path / "runs").exists()  # nothing written, no model loaded

    from capyft import model as model_module

    calls = []  # the module applies the cap on its own device, before it loads the model
    load = model_module.load_base_model
    monkeypatch.delenv("CAPYFT_GPU_MEMORY_GIB")
    monkeypatch.setattr(model_module, "cap_gpu_memory", lambda device: calls.append(device))
    monkeypatch.setattr(model_module, "load_base_model", lambda *a, **k: calls.append("load") or load(*a, **k))
    cli = main(fit_args(tmp_path, tiny_model, uneven_colors, "--trainer.max_steps=1"))
    assert calls == [cli.trainer.strategy.root_device, "load"]


def test_micro_batch_token_bound_is_the_longest_conversations_times_the_micro_batch():
    data = ChatDataModule("tok", batch_size=3, pad_to_multiple_of=8)
    assert data.micro_batch_token_bound() is None  # not set up yet
    from datasets import Dataset

    data.splits = {"train": Dataset.from_dict({"input_ids": [[1] * 5, [1] * 37, [1] * 12]})}
    assert data.micro_batch_token_bound() == 3 * 40


def test_micro_batch_split_fits_the_budget_and_keeps_the_step():
    from capyft.sizing import micro_batch_split

    assert micro_batch_split(4, 2048, None) == (4, 1)  # no budget (CPU): the whole step at once
    assert micro_batch_split(4, 2048, 10**6) == (4, 1)  # a large GPU
    assert micro_batch_split(4, 2048, 4096) == (2, 2)  # an 8 GB GPU: <= 4096-token micro-batches
    assert micro_batch_split(4, 2048, 3000) == (1, 4)
    assert micro_batch_split(4, 2048, 100) == (1, 4)  # never below one conversation
    assert micro_batch_split(6, 1024, 4096) == (3, 2)  # a divisor, so every step holds exactly 6
    with pytest.raises(ValueError, match="step_size"):
        micro_batch_split(0, 2048, None)
    with pytest.raises(ValueError, match="step_size"):
        ChatDataModule("tok", batch_size="auto")


def test_training_after_validation_moves_weights(tmp_path, tiny_model, uneven_colors):
    """bitsandbytes' CPU trap: a no-grad pass must not stop gradients through the 4-bit layers."""

    def lora_delta(*extra: str) -> float:
        cli = main(
            fit_args(
                tmp_path / str(len(extra)),
                tiny_model,
                uneven_colors,
                "--trainer.max_steps=4",
                "--model.lora_dropout=0.0",
                *extra,
            )
        )
        return sum(p.detach().abs().sum().item() for n, p in cli.model.named_parameters() if "lora_B" in n)

    without_val = lora_delta("--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0")
    with_val = lora_delta("--trainer.val_check_interval=1", "--trainer.num_sanity_val_steps=2")
    assert with_val == pytest.approx(without_val, rel=1e-4)


@pytest.mark.slow
def test_compiled_fit_trains_compiled_and_validates_eagerly(tmp_path, tiny_model, uneven_colors, monkeypatch):
    """``compile_layers``: training steps run the compiled layers, before and after a validation; the validation
    (its loss and its answers) runs eagerly, so it compiles no graph of its own and leaves compiled training on."""
    import torch._dynamo

    from capyft import levers
    from capyft import model as model_module

    calls: list[int] = []

    def counting_backend(graph, example_inputs):  # runs the captured graph as is, counting its calls
        def run(*args):
            calls.append(1)
            return graph.forward(*args)

        return run

    monkeypatch.setattr(
        model_module, "compile_decoder_layers", lambda m: levers.compile_decoder_layers(m, backend=counting_backend)
    )
    seen: dict[str, list[int]] = {"start": [], "end": []}
    start, end = QLoRAModule.on_validation_start, QLoRAModule.on_validation_end

    def on_start(self):
        seen["start"].append(len(calls))
        start(self)

    def on_end(self):
        end(self)
        seen["end"].append(len(calls))

    monkeypatch.setattr(QLoRAModule, "on_validation_start", on_start)
    monkeypatch.setattr(QLoRAModule, "on_validation_end", on_end)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    args = ["--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.num_sanity_val_steps=1"]
    args += ["--model.load_in_4bit=false", "--model.compile_layers=true", "--model.val_answers=1"]
    args += ["--model.val_answer_tokens=3"]
    cli = main(fit_args(tmp_path, tiny_model, uneven_colors, *args))
    assert cli.model._compiled
    assert len(seen["start"]) == 3  # the sanity check, after step 2, after step 4
    assert seen["start"] == seen["end"]  # no compiled call inside a validation
    assert 0 == seen["start"][0] < seen["start"][1] < seen["start"][2] <= len(calls)  # steps 3-4 ran compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no graph for no-grad passes or decoding
    assert set(scalars(Path(cli.trainer.log_dir), "val/loss"))


def test_compile_layers_auto_compiles_on_large_cuda_gpus_only(monkeypatch, caplog):
    from types import SimpleNamespace

    import torch.utils._triton

    from capyft.levers import compile_wanted

    caplog.set_level("INFO", logger="capyft.levers")
    assert compile_wanted(True, "cpu") and not compile_wanted(False, "cuda")
    assert compile_wanted(True, "cpu", steps=1)  # true is true, however short the fit
    assert not compile_wanted("auto", "cpu")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    for gib, wanted in [(8, False), (12, False), (16, True), (141, True)]:
        props = SimpleNamespace(total_memory=gib * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        assert compile_wanted("auto", "cuda:0") is wanted, gib
        assert compile_wanted("auto", "cuda:0", steps=1000) is wanted, gib
        assert not compile_wanted("auto", "cuda:0", steps=999), gib
        assert not compile_wanted("auto", "cuda:0", steps=125), gib  # the reference fit: too short to earn it back
    assert "compile_layers auto: eager, 125 optimizer steps do not earn back the compile" in caplog.text
    assert "compile_layers auto: eager, a 12 GiB GPU keeps" in caplog.text
    assert "compile_layers auto: compiling the decoder layers" in caplog.text
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert not compile_wanted("auto", "cuda:0")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setenv("PATH", "")  # no C compiler for triton's launcher
    monkeypatch.delenv("CC", raising=False)
    assert not compile_wanted("auto", "cuda:0")


@pytest.mark.parametrize("split", [["--data.batch_size=2"], ["--data.batch_size=auto", "--data.step_size=4"]])
def test_compile_auto_sees_the_steps_the_fit_takes(tmp_path, tiny_model, uneven_colors, monkeypatch, split):
    """What ``compile_layers: auto`` weighs, the fit's planned optimizer steps, is what the fit then takes."""
    seen = []
    monkeypatch.setattr("capyft.model.compile_wanted", lambda setting, device, steps: seen.append(steps) or False)
    args = ["--trainer.max_steps=-1", "--trainer.max_epochs=2", "--model.compile_layers=auto", "--data.max_length=256"]
    cli = main(fit_args(tmp_path, tiny_model, uneven_colors, *args, *split, "--trainer.limit_val_batches=0"))
    assert seen == [cli.trainer.global_step] and cli.trainer.global_step > 2


def test_compile_true_without_a_compiler_fails_before_loading(tmp_path, tiny_model, uneven_colors, monkeypatch):
    from capyft.checks import ConfigError

    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"model\.compile_layers: true .* needs a C\+\+ compiler .* on PATH"):
        main(fit_args(tmp_path, tiny_model, uneven_colors, "--model.compile_layers=true"))
    assert not (tmp_path / "runs").exists()  # nothing written, no model loaded


def test_planned_steps_count_the_fit_before_it_starts():
    auto = ChatDataModule("tok", batch_size="auto", step_size=4, max_length=2048)
    assert auto.planned_steps(1, 1, 1) is None  # not set up yet
    auto.splits = {"train": list(range(500))}
    assert auto.planned_steps(1, 1, 1) == 125  # the reference config: 500 conversations, 4 a step
    assert auto.planned_steps(1, 2, 3) == 189  # 2 devices of 4 conversations a step: 63 steps an epoch
    assert auto.planned_steps(1, 1, 3, max_steps=100) == 100
    assert auto.planned_steps(1, 1, -1) is None and auto.planned_steps(1, 1, None, max_steps=7) == 7
    fixed = ChatDataModule("tok", batch_size=2)
    fixed.splits = {"train": list(range(10))}
    assert fixed.planned_steps(2, 1, 1) == 3  # micro-batches of 2, 2 per step: ceil(10 / 4)


def test_every_config_parses():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for config in configs:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config), "--print_config"])
        assert exit_info.value.code == 0, config


@pytest.mark.parametrize("which", ["best", "last"])
def test_test_subcommand_finds_the_runs_checkpoint(tmp_path, tiny_model, uneven_colors, which):
    """`test --config <run>/config.yaml --ckpt_path best|last` in a fresh process evaluates that run, into its dir."""
    from capyft.assets import minilm_dir

    fit = main(fit_args(tmp_path, tiny_model, uneven_colors, "--trainer.max_steps=4", "--trainer.val_check_interval=2"))
    run = Path(fit.trainer.log_dir)
    tested = main(
        [
            "test",
            "--config",
            str(run / "config.yaml"),
            f"--ckpt_path={which}",
            "--trainer.enable_progress_bar=false",
            f"--model.bertscore.model_type={minilm_dir()}",
            "--model.bertscore.num_layers=6",
            "--model.generation.max_new_tokens=4",
        ]
    )
    expected = (
        fit.trainer.checkpoint_callback.best_model_path if which == "best" else str(run / "checkpoints" / "last.ckpt")
    )
    assert Path(tested.trainer.ckpt_path).resolve() == Path(expected).resolve()
    out = run / f"test-{Path(expected).stem}"  # one folder per evaluation, named for the checkpoint
    assert (out / "predictions.jsonl").exists() and (out / "test_metrics.json").exists()


def test_saved_config_reproduces_the_run(tmp_path, tiny_model, uneven_colors):
    """`fit --config <run>/config.yaml` alone repeats the run: the same losses, step for step."""
    first = main(
        fit_args(tmp_path / "a", tiny_model, uneven_colors, "--trainer.max_steps=5", "--model.lora_dropout=0.1")
    )
    run = Path(first.trainer.log_dir)
    again = main(
        [
            "fit",
            "--config",
            str(run / "config.yaml"),
            f"--trainer.logger.init_args.save_dir={tmp_path / 'b'}",
        ]
    )
    assert scalars(Path(again.trainer.log_dir), "train/loss") == scalars(run, "train/loss")
