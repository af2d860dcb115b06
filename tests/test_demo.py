"""The embedded default on the real SmolLM2-135M-Instruct: a couple of steps of configs/demo.yaml, then resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO

from capyft.assets import minilm_dir, smollm2_dir
from capyft.cli import main


@pytest.mark.slow
def test_demo_config_fits_tests_and_resumes(tmp_path):
    common = [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"--model.model_name_or_path={smollm2_dir()}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--data.max_length=384",  # a couple of short steps: this checks the wiring, the demo checks the time
        "--trainer.val_check_interval=2",
        "--checkpoint.every_n_train_steps=2",
    ]
    fit = main(["fit", *common, "--trainer.max_steps=2"])
    run = Path(fit.trainer.log_dir)
    last = run / "checkpoints" / "last.ckpt"
    assert last.exists() and (run / "adapter" / "final" / "adapter_model.safetensors").exists()
    assert fit.trainer.global_step == 2
    assert torch.isfinite(fit.trainer.callback_metrics["val/loss"])
    # a real pretrained chat model starts from a sensible loss on real Capybara answers (random would be ~10.8)
    assert fit.trainer.callback_metrics["val/loss"] < 4.0

    resumed = main(["fit", *common, "--trainer.max_steps=3", f"--ckpt_path={last}"])
    assert resumed.trainer.global_step == 3

    main(
        [
            "test",
            "--config",
            str(run / "config.yaml"),
            f"--ckpt_path={last}",
            f"--model.bertscore.model_type={minilm_dir()}",
            "--model.generation.max_new_tokens=16",
            "--data.test_size=2",
            "--trainer.enable_progress_bar=false",
        ]
    )
    rows = [json.loads(line) for line in (run / "test-last" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["prediction"] and r["base_prediction"] for r in rows)
    metrics = json.loads((run / "test-last" / "test_metrics.json").read_text())
    assert 0 < metrics["test/bertscore_f1"] <= 1 and 0 < metrics["test/base_bertscore_f1"] <= 1
