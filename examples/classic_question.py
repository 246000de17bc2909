"""The classic question: "autograd says X, my finite difference says Y - which is wrong?"

A float32 ReLU network with a scalar output. SciPy's ``approx_fprime`` (a forward difference, here
with a step of 1e-6) and a hand-rolled central difference at h=1e-6 both disagree with autograd, by
tens of percent. Autograd is right: in float32 two outputs near 0.2 differ by whole multiples of
2^-26, so a difference quotient at h=1e-6 can only move in steps of ~0.0075 - round-off, not calculus.
``probe()`` explains it: float64 differences, a step sized for the dtype, a measured noise floor.

    python examples/classic_question.py
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import approx_fprime
from torch import nn

from lightning_gradprobe import probe


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(1, 10)

    leaf = x.clone().requires_grad_()
    (autograd,) = torch.autograd.grad(model(leaf).sum(), leaf)
    autograd = autograd[0].numpy().astype(np.float64)

    def f(v: np.ndarray) -> float:
        with torch.no_grad():
            return float(model(torch.from_numpy(v.astype(np.float32)).unsqueeze(0)))

    scipy_estimate = approx_fprime(x[0].numpy().astype(np.float64), f, 1e-6)
    h = 1e-6
    central = np.array([(f(x[0].numpy() + h * e) - f(x[0].numpy() - h * e)) / (2 * h) for e in np.eye(10)])
    quantum = float(np.spacing(np.float32(abs(f(x[0].numpy()))))) / (2 * h)

    def relative(estimate: np.ndarray) -> float:
        return float(np.linalg.norm(estimate - autograd) / np.linalg.norm(autograd))

    print(f"output value                          {f(x[0].numpy()):.6f}")
    print(f"autograd  d/dx0                       {autograd[0]:+.6f}")
    scipy_error = relative(scipy_estimate)
    print(f"scipy approx_fprime(eps=1e-6) d/dx0   {scipy_estimate[0]:+.6f}   relative error {scipy_error:.2f}")
    print(f"central difference h=1e-6     d/dx0   {central[0]:+.6f}   relative error {relative(central):.2f}")
    print(f"float32 output spacing / 2h = {quantum:.4f}: the difference quotient can only move in such steps\n")

    report = probe(model, x)
    print(report)
    print(
        f"\nVerdict: {report.verdicts[0]}. Autograd is right; the naive check was round-off. probe() evaluated the "
        f"model in float64 with a step of {float(report.steps[0]):.1e} (eps^(1/3) of float64 x the input's "
        f"scale), whose own error bound was {float(report.fd_error[0].max()):.1e} relative."
    )


if __name__ == "__main__":
    main()
