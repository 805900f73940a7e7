"""Temperature scaling (Guo et al. 2017): one scalar T > 0 that divides a trained model's logits, fitted by
minimising the negative log-likelihood on the validation split. T changes no prediction (argmax of z / T is
the argmax of z), only how confident the probabilities are: T > 1 softens an over-confident model.

Fitted with LBFGS in float64 on log T (so T stays positive), from T = 1; the logits are the fp32 ones of
`train.forward.predict_logits`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from classlab.metrics import expected_calibration_error

MAX_ITER = 200


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = MAX_ITER) -> dict:
    """{"temperature": T, "fitted_on": "validation", "images": N, "nll_before", "nll_after", "ece_before",
    "ece_after"} for validation logits [N, K] and labels [N]. T = 1 when the fit does not lower the NLL."""
    z = logits.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        # the gradient of one scalar parameter, taken directly: the model's one training step (train/fit.py)
        # keeps src/'s only .backward call
        loss = F.cross_entropy(z / log_t.exp(), y)
        (log_t.grad,) = torch.autograd.grad(loss, [log_t])
        return loss.detach()

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        before = float(F.cross_entropy(z, y))
        t = float(log_t.exp())
        after = float(F.cross_entropy(z / t, y)) if math.isfinite(t) else math.inf
    if not (math.isfinite(t) and t > 0 and after <= before):
        t, after = 1.0, before
    return {"temperature": t, "fitted_on": "validation", "images": len(y), "nll_before": before, "nll_after": after,
            "ece_before": expected_calibration_error(z.softmax(1), y),
            "ece_after": expected_calibration_error((z / t).softmax(1), y)}
