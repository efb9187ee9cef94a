"""The system a plan runs on: nodes of identical accelerators (`ClusterSpec`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from costmodels.spec_checks import positive_int, require


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes of identical accelerators: an NVLink (scale-up) domain inside each node and
    NICs (scale-out) between nodes. Bandwidths default to the accelerator catalog's.
    """

    accelerator: str
    num_gpus: int
    gpus_per_node: int = 8
    scaleup_gbps: float = 0.0  # GB/s per GPU per direction inside a node; 0 = catalog
    scaleout_gbps: float = 0.0  # GB/s per GPU per direction across nodes; 0 = catalog
    nvlink_domain: int = 0  # GPUs sharing the scale-up fabric (NVL72: 72); 0 = gpus_per_node
    extra: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # 2**24 GPUs: rank strides and group sizes pack into one int64 key (costmodels.cases)
        positive_int(self, "num_gpus", maximum=2**24)
        positive_int(self, "gpus_per_node", maximum=2**24)
        if self.num_gpus > self.gpus_per_node:
            require(
                self.num_gpus % self.gpus_per_node == 0,
                f"cluster: {self.num_gpus} GPUs is not a whole number of {self.gpus_per_node}-GPU "
                "nodes; change --gpus or --gpus-per-node",
            )

    @property
    def num_nodes(self) -> int:
        return max(1, math.ceil(self.num_gpus / self.gpus_per_node))

    @property
    def domain_size(self) -> int:
        """GPUs reachable over the scale-up fabric."""
        domain = self.nvlink_domain
        if not domain:
            from costmodels.hardware import ACCELERATORS  # the catalog's rack-scale domains

            acc = ACCELERATORS.get(self.accelerator)
            domain = max(acc.nvlink_domain if acc else 0, self.gpus_per_node)
        return min(self.num_gpus, domain)
