"""fp16 gradient-scaler calibration is not non-finite training: ``NonFiniteGuard`` counts scaler skips apart.

Lightning's own ``16-mixed`` plugin with a real ``torch.amp.GradScaler`` runs on CPU (torch 2.13 autocasts to
float16 there), on a small regression model: an inflated initial scale makes the first steps' fp16 gradients
overflow, exactly as a GPU run's calibration does.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from capyft.callbacks import NonFiniteError, NonFiniteGuard

INFLATED = 2.0**30  # fp16 gradients of this model overflow until the scaler has halved it 18 times (to 4,096)


class Regression(L.LightningModule):
    """Linear regression; ``nan_loss_from`` poisons the loss, ``nan_grads`` the gradients only (finite loss)."""

    def __init__(self, nan_loss_from: int | None = None, nan_grads: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.nan_loss_from = nan_loss_from
        if nan_grads:
            self.net[0].weight.register_hook(lambda grad: grad * float("nan"))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        if self.nan_loss_from is not None and self.global_step >= self.nan_loss_from:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(256, 16, generator=generator)
        data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True) + 3.0)
        return torch.utils.data.DataLoader(data, batch_size=16)


def fit(module: Regression, guard: NonFiniteGuard, init_scale: float, max_steps: int) -> L.Trainer:
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer = L.Trainer(
        accelerator="cpu",
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[guard],
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return trainer


def test_scaler_calibration_skips_are_counted_apart_and_do_not_stop_the_run():
    module, guard = Regression(), NonFiniteGuard(max_nonfinite_steps=3)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = fit(module, guard, INFLATED, max_steps=30)
    scaler = trainer.precision_plugin.scaler
    assert guard.scaler_skips > 3  # more than max_nonfinite_steps: the old guard stopped this run
    assert scaler.get_scale() == INFLATED / 2**guard.scaler_skips  # every skip the scaler made, and only those
    assert guard.skipped == 0 and guard.in_a_row == 0 and trainer.global_step == 30
    assert trainer.callback_metrics["train/scaler_skips"] == guard.scaler_skips
    assert trainer.callback_metrics["train/skipped_steps"] == 0
    assert any(not torch.equal(v, start[k]) for k, v in module.state_dict().items())  # it trained afterwards
    assert all(torch.isfinite(v).all() for v in module.state_dict().values())
    assert guard.state_dict()["scaler_skips"] == guard.scaler_skips  # kept in checkpoints


def test_nonfinite_loss_stops_the_run_with_a_scaler():
    module, guard = Regression(nan_loss_from=0), NonFiniteGuard(max_nonfinite_steps=3)
    with pytest.raises(NonFiniteError, match=r"^3 optimizer steps in a row \(steps 0-2\) had a non-finite loss"):
        fit(module, guard, INFLATED, max_steps=30)
    assert guard.skipped == 3 and guard.scaler_skips == 0


def test_gradients_that_stay_nonfinite_below_the_scale_floor_stop_the_run():
    """Finite loss, NaN gradients whatever the scale: the scaler skips at 8, 4, 2 and 1, then the guard counts."""
    module, guard = Regression(nan_grads=True), NonFiniteGuard(max_nonfinite_steps=3, min_loss_scale=1.0)
    with pytest.raises(NonFiniteError, match=r"^3 optimizer steps in a row \(steps 4-6\)"):
        fit(module, guard, init_scale=8.0, max_steps=30)
    assert guard.scaler_skips == 4 and guard.skipped == 3


def test_without_a_scaler_nonfinite_gradients_are_the_guards():
    module, guard = Regression(nan_grads=True), NonFiniteGuard(max_nonfinite_steps=3)
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=[guard],
        max_steps=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(NonFiniteError, match=r"^3 optimizer steps in a row \(steps 0-2\)"):
        trainer.fit(module)
    assert guard.skipped == 3 and guard.scaler_skips == 0
    assert "train/scaler_skips" not in trainer.callback_metrics
