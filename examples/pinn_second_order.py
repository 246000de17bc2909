"""A wrong double backward caught: a physics-informed network whose loss uses ``d2u/dx2`` from autograd.

The network learns ``u(x)`` with ``u'' = -pi^2 sin(pi x)`` on ``[-1, 1]`` and ``u(+-1) = 0`` (solution
``sin(pi x)``). Its loss differentiates the network twice with autograd, so training consumes the backward
of the backward. ``FusedTanh`` writes its own backward, and its backward's own backward, as people do for
speed; the buggy one drops the term through the saved output (as if that intermediate were detached). Its
first derivative is exact, so a first-order gradient check passes; the PDE residual the optimiser sees is
silently wrong, and nothing crashes. ``GradProbe(second_order=True, on_alert="stop")`` stops it at the first
validation and names the activation; ``--fixed`` trains through.

    python examples/pinn_second_order.py            # stops after the first epoch, says why
    python examples/pinn_second_order.py --fixed    # trains all epochs
"""

from __future__ import annotations

import argparse
import math
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradprobe import GradProbe, GradProbeStoppingReason


class FusedTanh(torch.autograd.Function):
    """``tanh`` whose backward is itself a custom Function (so that its double backward is hand-written too)."""

    @staticmethod
    def forward(ctx, x, correct):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        ctx.correct = correct
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return TanhBackward.apply(grad, y, ctx.correct), None


class TanhBackward(torch.autograd.Function):
    """``grad * (1 - y^2)``, and its own backward."""

    @staticmethod
    def forward(ctx, grad, y, correct):
        ctx.save_for_backward(grad, y)
        ctx.correct = correct
        return grad * (1 - y * y)

    @staticmethod
    def backward(ctx, g):
        grad, y = ctx.saved_tensors
        through_y = -2 * y * grad * g if ctx.correct else None  # the bug: this term is dropped
        return g * (1 - y * y), through_y, None


class Tanh(nn.Module):
    def __init__(self, correct: bool) -> None:
        super().__init__()
        self.correct = correct

    def forward(self, x):
        return FusedTanh.apply(x, self.correct)


class Poisson1D(pl.LightningModule):
    """``u'' = -pi^2 sin(pi x)``, ``u(+-1) = 0``: the physics-informed loss."""

    def __init__(self, correct: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 32), Tanh(correct), nn.Linear(32, 32), Tanh(correct), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        x = x.clone().requires_grad_(True)
        u = self(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
        residual = d2u + math.pi**2 * torch.sin(math.pi * x)
        boundary = self(torch.tensor([[-1.0], [1.0]], device=self.device))
        loss = residual.pow(2).mean() + 100 * boundary.pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, u = batch
        self.log("val/max_error", (self(x) - u).abs().max())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def loaders() -> tuple[DataLoader, DataLoader]:
    collocation = torch.linspace(-1, 1, 256).unsqueeze(1)
    checkpoints = torch.linspace(-0.95, 0.95, 64).unsqueeze(1)
    train = DataLoader(TensorDataset(collocation), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(checkpoints, torch.sin(math.pi * checkpoints)), batch_size=64)
    return train, val


def main(argv: list[str] | None = None) -> tuple[pl.Trainer, GradProbe]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed", action="store_true", help="use the correct double backward")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*cannot run under torch.func.*")  # expected: classic autograd.Functions
    pl.seed_everything(0, verbose=False)
    train, val = loaders()
    probe = GradProbe(second_order=True, target=None, on_alert="stop")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[probe],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Poisson1D(correct=args.fixed), train, val)
    report = probe.last_report
    assert report is not None and report.second_order is not None
    first = ", ".join(f"{v} {c}" for v, c in report.counts.items() if c)
    if probe.stopping_reason is not GradProbeStoppingReason.NOT_STOPPED:
        print(f"\nStopped after epoch {trainer.current_epoch}: {probe.stopping_reason_message}")
        print(f"\nFirst-order check: {first}. Second order: {report.second_order}")
    else:
        error = float(trainer.callback_metrics["val/max_error"])
        print(
            f"\nTrained all {trainer.current_epoch} epochs (max |u - sin(pi x)| = {error:.3f}); first-order check: "
            f"{first}; second order checked at every probe ({probe.probes_done}), no alert."
        )
    return trainer, probe


if __name__ == "__main__":
    main()
