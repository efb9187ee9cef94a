"""The unit the training loop consumes: packed rows plus everything attention needs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

IGNORE_INDEX = -100  # labels that carry no loss (torch.nn.functional.cross_entropy default)


@dataclass
class Batch:
    """Rows of packed documents.

    input_ids, labels, position_ids, doc_ids: [B, T]; `labels` is already aligned with the
    outputs (CLM/FIM: the next token; MLM: the original token at chosen positions) and is
    IGNORE_INDEX where no loss is taken. `position_ids` restart at 0 at every document
    (RoPE), `doc_ids` number the documents inside each row. `sample_ids` [B]: the global
    index of each row in the data stream (exactly-once accounting). `loss_weight` scales this
    batch's loss (1.0 normally; fault injection uses it to plant spikes and NaNs).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    sample_ids: torch.Tensor
    loss_weight: float = 1.0

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def num_targets(self) -> int:
        """Positions that carry loss (the normaliser of the mean token loss)."""
        return int((self.labels != IGNORE_INDEX).sum().item())

    def select(self, rows: slice | torch.Tensor) -> Batch:
        return replace(
            self,
            input_ids=self.input_ids[rows],
            labels=self.labels[rows],
            position_ids=self.position_ids[rows],
            doc_ids=self.doc_ids[rows],
            sample_ids=self.sample_ids[rows],
        )

    def split(self, rows_per_micro: int) -> list[Batch]:
        """Consecutive micro-batches of `rows_per_micro` rows (the last may be smaller)."""
        return [
            self.select(slice(i, i + rows_per_micro)) for i in range(0, self.rows, rows_per_micro)
        ]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            input_ids=mv(self.input_ids),
            labels=mv(self.labels),
            position_ids=mv(self.position_ids),
            doc_ids=mv(self.doc_ids),
            sample_ids=self.sample_ids,
        )
