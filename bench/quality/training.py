"""Pretraining the backbone, the linear probe per task, and the expert per task (head frozen).

Every random choice (initialisation, batches, augmentation) comes from a generator seeded by
(seed, stage, task), so a rerun with the same seed reproduces every weight on the same machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bench.quality.model import Backbone, BackboneConfig
from bench.quality.tasks import Split, Task


@dataclass(frozen=True)
class TrainingConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain_steps: int = 1500
    pretrain_lr: float = 2e-3
    probe_steps: int = 300
    probe_lr: float = 2e-2
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    finetune_shift: bool = False
    batch: int = 64


def stage_seed(seed: int, *parts: str) -> int:
    """A stable 63-bit seed for one stage of one run (independent of Python's hash randomisation)."""
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _batches(n: int, batch: int, steps: int, generator: torch.Generator):
    """Indices of ``steps`` minibatches: epochs of a fresh permutation each."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() < batch:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch]
        order = order[batch:]


def _warmup_cosine(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())


def shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """A random shift of the whole batch by up to one pixel each way (zero fill)."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    dy, dx = (torch.randint(0, 3, (2,), generator=generator)).tolist()
    return padded[:, dy : dy + 8, dx : dx + 8]


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Pretraining augmentation: a random shift and light noise."""
    return (shift(x, generator) + 0.05 * torch.randn(x.shape, generator=generator)).clamp(0.0, 1.0)


def pretrain(data: Split, classes: int, config: TrainingConfig, seed: int) -> Backbone:
    """The base backbone: trained with a throwaway head on the pretraining pool."""
    torch.manual_seed(stage_seed(seed, "pretrain", "init"))
    model = Backbone(config.backbone)
    head = nn.Linear(config.backbone.width, classes)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.pretrain_lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _warmup_cosine(s, config.pretrain_steps, max(config.pretrain_steps // 20, 1))
    )
    generator = torch.Generator().manual_seed(stage_seed(seed, "pretrain", "batches"))
    model.train()
    for index in _batches(len(data), config.batch, config.pretrain_steps, generator):
        loss = nn.functional.cross_entropy(head(model(_augment(data.x[index], generator))), data.y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model


@torch.no_grad()
def features(model: Backbone, x: Tensor, chunk: int = 1024) -> Tensor:
    model.eval()
    return torch.cat([model(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


def train_probe(base: Backbone, data: Split, classes: int, config: TrainingConfig, seed: int, task: str) -> nn.Linear:
    """The task's head: multinomial logistic regression on the frozen base's features (full batch)."""
    torch.manual_seed(stage_seed(seed, "probe", task))
    feats = features(base, data.x)
    head = nn.Linear(feats.shape[1], classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.probe_lr)
    for _ in range(config.probe_steps):
        loss = nn.functional.cross_entropy(head(feats), data.y) + 1e-4 * head.weight.square().sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.requires_grad_(False)
    return head


def finetune(base: Backbone, head: nn.Linear, raw: Split, task: Task, config: TrainingConfig, seed: int) -> Backbone:
    """The task's expert: the whole backbone fine-tuned from the base, read out by the frozen probe head.

    ``raw`` is the untransformed training split: each batch is shifted by up to a pixel *before*
    the task's transform, so the augmentation never undoes what the task is.
    """
    model = Backbone(config.backbone)
    model.load_state_dict(base.state_dict())
    head.requires_grad_(False)
    # No weight decay: it would pull every weight toward zero, not toward the base, and grow the task vector.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.finetune_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _warmup_cosine(s, config.finetune_steps, max(config.finetune_steps // 10, 1))
    )
    generator = torch.Generator().manual_seed(stage_seed(seed, "finetune", task.name))
    labels = task.labels(raw.y)
    model.train()
    for index in _batches(len(raw), config.batch, config.finetune_steps, generator):
        images = raw.x[index]
        images = task.images(shift(images, generator) if config.finetune_shift else images, generator)
        loss = nn.functional.cross_entropy(head(model(images)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: Backbone, head: nn.Linear, data: Split) -> float:
    return float((head(features(model, data.x)).argmax(dim=1) == data.y).float().mean())
