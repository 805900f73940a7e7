"""The one evaluation forward pass: logits of a whole uint8 set, behind validation, test metrics, TTA,
predict and compare."""

from __future__ import annotations

import torch
from torch import nn

from classlab.train.speed import channels_last_input, is_channels_last
from classlab.transforms import BatchTransform


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, transform: BatchTransform, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """Logits for a whole uint8 set, in large batches, with the model in eval mode. Always fp32, also after
    mixed-precision training, so the test loss and the stored probabilities carry no bf16 / fp16 rounding."""
    was_training = model.training
    model.eval()
    channels_last = is_channels_last(model)
    out = []
    for i in range(0, len(images), batch_size):
        x = channels_last_input(transform(images[i : i + batch_size].to(device, non_blocking=True)), channels_last)
        out.append(model(x).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
