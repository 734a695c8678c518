"""What every generator shares: the GAN image range and a deterministic, batched sampling API."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.errors import ConfigError


def labels_per_class(n_per_class: int, num_classes: int) -> torch.Tensor:
    """``[0]*n + [1]*n + ... + [C-1]*n`` as int64, the label vector for N samples per class."""
    if n_per_class < 1 or num_classes < 1:
        raise ConfigError(f"n_per_class={n_per_class}, num_classes={num_classes}; expected positive integers")
    return torch.arange(num_classes).repeat_interleave(n_per_class)


class Generator(nn.Module):
    """Base of the generators: ``forward(z, y)`` gives images in [-1, 1]; :meth:`sample` gives [0, 1].

    Subclasses set ``z_dim`` and ``condition`` (``"class"``, ``"continuous"`` or ``"none"``) and, for
    class-conditional ones, ``num_classes``.
    """

    z_dim: int
    condition: str = "none"
    num_classes: int | None = None

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_labels(self, y: torch.Tensor | None) -> None:
        """Refuse labels that do not fit the condition, naming the bad values."""
        if self.condition == "none":
            return
        if y is None:
            raise ConfigError(f"{type(self).__name__} is {self.condition}-conditional: labels are required")
        if self.condition == "class":
            if y.is_floating_point() or (len(y) and (y.min() < 0 or y.max() >= (self.num_classes or 0))):
                raise ConfigError(
                    f"class labels must be integers in [0, {self.num_classes}); got {y.dtype} "
                    f"in [{y.min().item() if len(y) else '-'}, {y.max().item() if len(y) else '-'}]"
                )
        elif len(y) and (y.min() < 0 or y.max() > 1):
            raise ConfigError(
                "continuous labels must be normalised to [0, 1]; got values in "
                f"[{y.min().item():.4g}, {y.max().item():.4g}]"
            )

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor | Sequence[float] | int,
        z: torch.Tensor | None = None,
        seed: int | None = None,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Generate images in [0, 1] (returned on the CPU, float32).

        Args:
            labels: the label of every image (class ids, or continuous labels in [0, 1]); an int
                ``n`` asks an unconditional generator for ``n`` images.
            z: latent codes, ``len(labels) x z_dim``; drawn from N(0, I) when ``None``.
            seed: seed of the latent draw (on the CPU, so the same seed gives the same images
                on every device); ``None`` uses the global RNG.
            batch_size: images per forward pass.
            device: where to run; the generator is moved there (default: where its weights are).
            progress: show a progress bar over the batches.
        """
        if isinstance(labels, int):
            if self.condition != "none":
                raise ConfigError(
                    f"{type(self).__name__} is {self.condition}-conditional: pass one label per image, not a count"
                )
            n, y_all = labels, None
        else:
            y_all = torch.as_tensor(labels)
            if self.condition == "class":
                y_all = y_all.long()
            elif self.condition == "continuous":
                y_all = y_all.float()
            n = len(y_all)
        self.check_labels(y_all)
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}; expected a positive integer")
        if z is None:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            z = torch.randn(n, self.z_dim, generator=gen)
        elif tuple(z.shape) != (n, self.z_dim):
            raise ConfigError(f"z has shape {tuple(z.shape)}; expected ({n}, {self.z_dim})")
        if device is not None:
            self.to(device)
        param = next(self.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        was_training = self.training
        self.eval()
        out = []
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="sampling", unit="batch")
        try:
            for s in starts:
                zb = z[s : s + batch_size].to(device)
                yb = None if y_all is None else y_all[s : s + batch_size].to(device)
                out.append(((self(zb, yb).float() + 1) / 2).clamp(0, 1).cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0)
