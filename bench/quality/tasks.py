"""The benchmark's data: scikit-learn's bundled digits, split once, and the tasks built over them.

The 1,797 8×8 images are split (stratified, by a fixed seed that does not change with the
training seed) into a pretraining pool and a task pool; the task pool is split again into
train / validation / test. Every task transforms the same task-pool images, so a task's test
images are never seen by pretraining, by any probe or by any expert's fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

SPLIT_SEED = 20250
# Fixed for every run: what a task *is* must not change with the training seed.
TASK_SEED = 7
NOISE_STD = 0.3


@dataclass(frozen=True)
class Split:
    """Images (N, 8, 8) in [0, 1] and labels (N,)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.numel())


@dataclass(frozen=True)
class DigitSplits:
    pretrain: Split
    pretrain_val: Split
    train: Split
    val: Split
    test: Split


def load_splits(pretrain_fraction: float = 0.4) -> DigitSplits:
    """Stratified splits of sklearn's digits: pretraining (with its own held-out check) and the task pool."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    index = torch.arange(len(y)).numpy()
    pre, pool = train_test_split(index, train_size=pretrain_fraction, stratify=y.numpy(), random_state=SPLIT_SEED)
    pre_train, pre_val = train_test_split(pre, test_size=0.15, stratify=y[pre].numpy(), random_state=SPLIT_SEED)
    train, rest = train_test_split(pool, train_size=0.5, stratify=y[pool].numpy(), random_state=SPLIT_SEED)
    val, test = train_test_split(rest, train_size=0.5, stratify=y[rest].numpy(), random_state=SPLIT_SEED)

    def take(ix) -> Split:
        ix = torch.as_tensor(sorted(ix))
        return Split(x[ix].contiguous(), y[ix].contiguous())

    return DigitSplits(take(pre_train), take(pre_val), take(train), take(val), take(test))


@dataclass(frozen=True)
class Task:
    """A task: a fixed transform of the images and a fixed relabelling, with its number of classes."""

    name: str
    description: str
    images: Callable[[Tensor, torch.Generator], Tensor]
    labels: Callable[[Tensor], Tensor]
    classes: int = 10

    def apply(self, split: Split, part: str) -> Split:
        """The task's version of a split; its random parts (noise) are a fixed draw per split name."""
        generator = torch.Generator().manual_seed(TASK_SEED * 1000 + sum(map(ord, part)))
        return Split(self.images(split.x, generator).contiguous(), self.labels(split.y))


def _same(y: Tensor) -> Tensor:
    return y


def _pixel_permutation() -> Tensor:
    return torch.randperm(64, generator=torch.Generator().manual_seed(TASK_SEED))


def _noise(x: Tensor, generator: torch.Generator) -> Tensor:
    return (x + NOISE_STD * torch.randn(x.shape, generator=generator)).clamp(0.0, 1.0)


_PERMUTATION = _pixel_permutation()

TASKS: dict[str, Task] = {
    "rot90": Task("rot90", "rotated 90° counter-clockwise", lambda x, _: torch.rot90(x, 1, (1, 2)), _same),
    "rot180": Task("rot180", "rotated 180°", lambda x, _: torch.rot90(x, 2, (1, 2)), _same),
    "transpose": Task("transpose", "mirrored about the main diagonal", lambda x, _: x.transpose(1, 2), _same),
    "hflip": Task("hflip", "mirrored left-right", lambda x, _: torch.flip(x, (2,)), _same),
    "invert": Task("invert", "inverted intensities (1 − x)", lambda x, _: 1.0 - x, _same),
    "permute": Task(
        "permute",
        "a fixed random permutation of the 64 pixels",
        lambda x, _: x.reshape(-1, 64)[:, _PERMUTATION].reshape(-1, 8, 8),
        _same,
    ),
    "noise": Task("noise", f"Gaussian pixel noise, σ = {NOISE_STD}, clipped to [0, 1]", _noise, _same),
    "roll_shift": Task(
        "roll_shift",
        "rolled 3 pixels right and 2 down (wrapping), labels shifted y → (y + 1) mod 10",
        lambda x, _: torch.roll(x, (2, 3), (1, 2)),
        lambda y: (y + 1) % 10,
    ),
    "parity_rot270": Task(
        "parity_rot270",
        "rotated 270°, labels regrouped to parity (even / odd)",
        lambda x, _: torch.rot90(x, 3, (1, 2)),
        lambda y: y % 2,
        classes=2,
    ),
}

DEFAULT_TASKS = ["rot90", "rot180", "transpose", "hflip", "invert", "permute", "noise", "roll_shift"]
