"""The project's recipe in PyTorch, for ``scripts/benchmark_training.py``: the same
network (``keras_resnet.torch_reference``), optimiser, weight-decay rule, label
smoothing, one-cycle schedule and on-device pad-crop / flip as ``training.py``,
so that images/s and accuracy compare like with like. torch is a dev
dependency; nothing in the training path imports this module.
"""

import math
import time

import numpy as np
import torch
from torch import nn

from keras_resnet.model import MODELS
from keras_resnet.torch_reference import build_reference
from keras_resnet.training import LR_REFERENCE_BATCH, ONE_CYCLE_START


def one_cycle(step, peak, total, warmup):
    """The LR of ``training.make_schedule``'s "onecycle" at ``step`` (Keras's
    CosineDecay with a linear warm-up from ``peak * ONE_CYCLE_START``)."""
    if step < warmup:
        start = peak * ONE_CYCLE_START
        return start + (peak - start) * step / warmup
    done = min(step - warmup, total - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * done))


def pad_crop_flip(images, padding, generator):
    """Per image: a random shift of at most ``padding`` pixels (zero fill) and a
    random horizontal flip, on the device (NCHW)."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), device=images.device,
                            generator=generator)
    rows = (offsets[:, :1] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (offsets[:, 1:] + torch.arange(w, device=images.device))[:, None, None, :]
    flip = torch.rand(n, device=images.device, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[torch.arange(n, device=images.device)[:, None, None, None], channels,
                  rows, cols]


class TorchRecipe:
    """A network of ``keras_resnet.MODELS`` (ResNet18 by default) with the CIFAR stem,
    trained with the project's recipe on uint8 NHWC arrays."""

    # Defaults: training.TrainConfig's (the stem's whitening start and TTA, one-off
    # extras that change neither a step nor its cost, are left out on both sides).
    def __init__(self, *, num_classes, mean, std, batch_size, total_steps, lr=0.4,
                 weight_decay=5e-4, label_smoothing=0.1, warmup_steps=0, padding=2,
                 device="cpu", compile_model=False, bf16=False, seed=0, model="resnet18"):
        torch.manual_seed(seed)
        self.device, self.bf16, self.batch_size = torch.device(device), bf16, batch_size
        # Zero-init residual, as the recipe: the last BN gamma of each block starts at 0.
        model = build_reference(MODELS[model], num_classes, "cifar", zero_init_residual=True)
        model = model.to(self.device, memory_format=torch.channels_last)
        self.model = torch.compile(model) if compile_model else model
        decay = [p for p in model.parameters() if p.ndim > 1]  # no decay on BN / biases
        rest = [p for p in model.parameters() if p.ndim <= 1]
        self.peak = lr * batch_size / LR_REFERENCE_BATCH
        fused = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": weight_decay}, {"params": rest,
                                                               "weight_decay": 0.0}],
            lr=self.peak, momentum=0.9, nesterov=True, **fused)
        self.total, self.warmup, self.step_count = total_steps, warmup_steps, 0
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.padding = padding

    def _inputs(self, images):
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        return x

    def train_batches(self, images, labels, batches):
        """One step per index array in ``batches``; returns seconds (synchronised)."""
        self.model.train()
        start = time.perf_counter()
        for pick in batches:
            x = pad_crop_flip(self._inputs(images[pick]), self.padding, self.generator)
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(labels[pick].astype(np.int64)).to(self.device)
            for group in self.optimizer.param_groups:
                group["lr"] = one_cycle(self.step_count, self.peak, self.total, self.warmup)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                loss = self.loss(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step_count += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    @torch.no_grad()
    def accuracy(self, images, labels, batch_size=500):
        self.model.eval()
        right = 0
        for s in range(0, len(images), batch_size):
            x = (self._inputs(images[s:s + batch_size]) - self.mean) / self.std
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                logits = self.model(x.contiguous(memory_format=torch.channels_last))
            right += int((logits.argmax(1).cpu().numpy() == labels[s:s + batch_size]).sum())
        return right / len(images)
