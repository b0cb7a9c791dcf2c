"""Optional TensorBoard logging of a training run (``fit(tensorboard=DIR)``, ``--tensorboard DIR``).

``torch.utils.tensorboard.SummaryWriter`` needs the ``tensorboard`` package, an optional extra
(``pip install 'lrcompress[tensorboard]'``), imported only when logging is asked for. Scalars,
with the update count as the step:

- ``train/loss`` (the mini-batch loss) and ``train/lr`` after every update;
- ``val/<metric>`` and ``train/loss_mean`` (since the previous evaluation) at every evaluation;
- ``test/<metric>`` once, at the end, with the returned weights.

    $ tensorboard --logdir runs/tb     # then open http://localhost:6006
"""

from __future__ import annotations

import math
import os

from ..errors import ConfigError

EXTRA_HINT = "pip install 'lrcompress[tensorboard]'"


def require() -> None:
    """Raise ``ConfigError`` (one line naming the extra) when TensorBoard logging cannot work."""
    try:
        import tensorboard  # noqa: F401  (what SummaryWriter needs)
    except ImportError:
        raise ConfigError(f"--tensorboard needs the tensorboard package: {EXTRA_HINT}") from None


class TensorBoardLog:
    """Scalars of one run in ``log_dir`` (made if needed). ``purge_step`` (a resumed run's
    update count) drops events an earlier, interrupted session wrote after its checkpoint."""

    def __init__(self, log_dir: str | os.PathLike, *, purge_step: int | None = None):
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step or None)

    def update(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def evaluation(self, record: dict) -> None:
        """One ``metrics.jsonl`` record: ``step``, ``train_loss`` and the ``val`` metrics."""
        step = record["step"]
        if math.isfinite(record["train_loss"]):
            self.writer.add_scalar("train/loss_mean", record["train_loss"], step)
        for name, value in record.get("val", {}).items():
            self.writer.add_scalar(f"val/{name}", value, step)

    def final(self, split: str, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        self.writer.close()
