"""The one-shot supernet: every architecture of a space as a slice of the largest network's weights.

Weight sharing as in Once-for-All (Cai et al., 2020), HAT (Wang et al., 2020) and AutoTinyBERT (Yin
et al., 2021): a sub-network with ``n_layers`` layers, width ``d``, ``h`` heads and feed-forward
width ``f`` uses the first ``n_layers`` layers of the largest network and, in every weight matrix,
the leading rows and columns its shape needs (the fused query/key/value matrix is sliced per block,
so the sub-network's queries, keys and values are the leading rows of each). Head count only
changes how the ``d`` query dimensions are split, so every head count shares the same weights.

``Supernet.bind(arch)`` returns a *shell*: a normal lmforge model built at the sub-network's shape
whose parameters are replaced by those slices (views of the supernet's parameters, so gradients flow
into the shared weights and any code that runs the model, e.g. a task's loss, runs the sub-network
unchanged). ``extract(arch)`` copies the slices into a standalone model. Training uses the sandwich
rule (Yu & Huang, 2019, "Universally Slimmable Networks"; BigNAS): each step sums the losses of the
largest, the smallest and ``n_random`` random sub-networks (``SandwichTask``), through the one loop.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.nas.space import Arch, SearchSpace
from lmforge.tasks.base import LossOutput

QKV = "attn.qkv."  # the fused query/key/value projection: sliced block by block


def slice_weight(name: str, full: Tensor, shape: torch.Size, d_full: int) -> Tensor:
    """The part of ``full`` that a sub-network's parameter of ``shape`` uses (a view where possible)."""
    if QKV in name:  # rows [q; k; v], each d_full long: the leading rows of each block
        d = shape[0] // 3
        blocks = [full[i * d_full : i * d_full + d] for i in range(3)]
        return torch.cat([b[:, : shape[1]] if b.dim() == 2 else b for b in blocks])
    return full[tuple(slice(0, n) for n in shape)]


class Supernet(nn.Module):
    """The largest model of a space (``full``) and its sub-networks as weight slices."""

    def __init__(self, build: Callable[[Arch], nn.Module], space: SearchSpace, *, cache: int = 8) -> None:
        super().__init__()
        space.check_supernet()
        self.space, self.largest = space, space.largest
        self.full = build(self.largest)
        self.cfg = self.full.encoder.cfg if hasattr(self.full, "encoder") else self.full.cfg
        self._build = build
        self._shells: OrderedDict[Arch, tuple[nn.Module, list[tuple[nn.Module, str, str]]]] = OrderedDict()
        self._cache = cache

    def _shell(self, arch: Arch) -> tuple[nn.Module, list[tuple[nn.Module, str, str]]]:
        """A model of ``arch``'s shape with its parameters removed (they are assigned per call)."""
        if arch in self._shells:
            self._shells.move_to_end(arch)
            return self._shells[arch]
        if not self.space.contains(arch) and arch != self.largest:
            raise UserError(f"architecture {arch.name} is not in the search space")
        with torch.device("meta"):  # the shell's own parameters are never used: allocate none
            shell = self._build(arch)
        slots = []
        for qualified, _ in list(shell.named_parameters()):
            owner_name, _, attr = qualified.rpartition(".")
            owner = shell.get_submodule(owner_name)
            slots.append((owner, attr, qualified))
        shapes = {qualified: p.shape for qualified, p in shell.named_parameters()}
        for owner, attr, _ in slots:
            del owner._parameters[attr]
        for name, buf in list(shell.named_buffers()):  # constants (e.g. CRF masks): recomputed for real
            owner_name, _, attr = name.rpartition(".")
            full_buf = self.full.get_buffer(name)
            shell.get_submodule(owner_name)._buffers[attr] = full_buf[tuple(slice(0, n) for n in buf.shape)]
        entry = (shell, [(owner, attr, qualified, shapes[qualified]) for owner, attr, qualified in slots])
        self._shells[arch] = entry
        if len(self._shells) > self._cache:
            self._shells.popitem(last=False)
        return entry

    def sliced(self, arch: Arch) -> dict[str, Tensor]:
        """The parameters of ``arch``'s sub-network, by name (slices of the shared weights)."""
        _, slots = self._shell(arch)
        params = dict(self.full.named_parameters())
        d_full = self.largest.d_model
        return {
            qualified: slice_weight(qualified, params[qualified], shape, d_full) for _, _, qualified, shape in slots
        }

    def bind(self, arch: Arch) -> nn.Module:
        """``arch``'s sub-network as a model computing with the shared weights (gradients reach them)."""
        shell, slots = self._shell(arch)
        tensors = self.sliced(arch)
        for owner, attr, qualified, _ in slots:
            setattr(owner, attr, tensors[qualified])
        return shell.train(self.training)

    def extract(self, arch: Arch) -> nn.Module:
        """A standalone model of ``arch`` holding copies of its slices of the shared weights."""
        model = self._build(arch)
        with torch.no_grad():
            model.load_state_dict({k: v.detach().clone() for k, v in self.sliced(arch).items()}, strict=False)
        missing = {k for k, _ in model.named_parameters()} - set(self.sliced(arch))
        if missing:
            raise RuntimeError(f"sub-network parameters without a slice: {sorted(missing)}")
        return model


class SandwichTask:
    """Trains a ``Supernet`` on a fine-tuning task with the sandwich rule.

    Each batch carries its sub-networks (drawn in ``collate`` from the loop's seeded generator, so a
    resumed run draws the same ones): the largest, the smallest and ``n_random`` random architectures.
    The loss is the sum of theirs; the reported counts (accuracy) are the largest network's. Dev
    evaluation scores the largest network, which then picks the best checkpoint.
    """

    def __init__(self, task: Any, space: SearchSpace, *, n_random: int = 2) -> None:
        self.task, self.space, self.n_random = task, space, n_random
        self.name = f"supernet-{task.name}"
        self.train_items, self.val_items = task.train_items, task.val_items
        self.train_lengths = getattr(task, "train_lengths", None)
        self.selection = getattr(task, "selection", ("loss", "min"))

    def collate(self, items: list[Any], *, generator: torch.Generator) -> dict[str, Any]:
        batch = self.task.collate(items, generator=generator)
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        batch["archs"] = [self.space.largest, self.space.smallest] + [
            self.space.sample(rng) for _ in range(self.n_random)
        ]
        return batch

    def loss(self, model: Supernet, batch: dict[str, Any]) -> LossOutput:
        total, counts = None, {}
        for i, arch in enumerate(batch["archs"]):
            out = self.task.loss(model.bind(arch), batch)
            total = out.loss_sum if total is None else total + out.loss_sum
            if i == 0:
                counts = out.counts
        return LossOutput(total, counts)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return self.task.metrics(sums)

    def flops(self, model: Supernet, batch: dict[str, Any]) -> float:
        return sum(self.task.flops(model.bind(arch), batch) for arch in batch["archs"])

    def evaluate(self, model: Supernet, *, device: torch.device) -> dict:
        return self.task.evaluate(model.bind(model.largest), device=device)
