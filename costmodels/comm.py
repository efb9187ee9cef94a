"""Collective communication times on the links a group crosses.

The cluster is a networkx graph: GPUs hang off their node's scale-up switch (NVSwitch /
xGMI) and, through one NIC per GPU (rail-optimised), off the scale-out fabric. A process
group's bandwidth is the bottleneck edge capacity on the paths between its ring neighbours;
its latency is the sum of per-hop latencies. Ranks are ordered tp (fastest) -> cp -> dp -> pp,
as Megatron-Core and torchtitan build their meshes, so a group is described by its
(stride, size) within that order.

Cost formulas are the alpha-beta model (Thakur, Rabenseifner & Gropp 2005): with n ranks,
message S bytes, per-rank bandwidth B and latency alpha,
  ring all-reduce     2(n-1) alpha + 2 (n-1)/n S/B
  tree all-reduce     2 log2(n) alpha + 2 S/B          (NCCL's double binary tree)
  all-gather / reduce-scatter   (n-1) alpha + (n-1)/n S/B   (S = the full gathered size)
  point-to-point      alpha + S/B
  all-to-all          (n-1) alpha + (n-1)/n S/B
NCCL picks the faster of ring and tree; so do we.
"""

from __future__ import annotations

from functools import lru_cache

import networkx as nx
import numpy as np

from costmodels.hardware import get_accelerator
from costmodels.specs import ClusterSpec

ArrayLike = float | np.ndarray

NVLINK_LATENCY_S = 1e-6  # one NVLink ring step (NCCL tuning tables: ~0.6-1 us hardware latency)
NET_LATENCY_S = 5e-6  # one ring step across NICs (NCCL tuning tables: IB/RoCE ~3-6 us)


def cluster_graph(cluster: ClusterSpec, max_nodes: int = 4) -> nx.Graph:
    """The link graph of (up to `max_nodes` of) the cluster. Edge attributes: `gbps` (GB/s per
    direction) and `latency` (s). Nodes: ("gpu", i), ("switch", node), "fabric"."""
    acc = get_accelerator(cluster.accelerator)
    up = cluster.scaleup_gbps or acc.scaleup_gbps
    out = cluster.scaleout_gbps or acc.scaleout_gbps
    g = nx.Graph()
    per_node = cluster.gpus_per_node
    n_nodes = min(cluster.num_nodes, max_nodes)
    domain = cluster.domain_size
    for i in range(min(cluster.num_gpus, per_node * n_nodes)):
        node = i // per_node
        dom = i // max(domain, 1)
        g.add_edge(("gpu", i), ("switch", dom), gbps=up, latency=NVLINK_LATENCY_S / 2)
        if cluster.num_gpus > domain:
            g.add_edge(("gpu", i), ("nic", i), gbps=out, latency=NET_LATENCY_S / 4)
            g.add_edge(("nic", i), "fabric", gbps=out * per_node, latency=NET_LATENCY_S / 4)
        g.nodes[("gpu", i)]["node"] = node
    return g


def _path_bottleneck(g: nx.Graph, a: tuple, b: tuple) -> tuple[float, float]:
    """Best (bandwidth, latency) between two GPUs: widest path, then its latency."""
    best_bw, best_lat = 0.0, 0.0
    for path in nx.all_shortest_paths(g, a, b):
        edges = list(zip(path[:-1], path[1:], strict=True))
        bw = min(g.edges[e]["gbps"] for e in edges)
        lat = sum(g.edges[e]["latency"] for e in edges)
        if bw > best_bw:
            best_bw, best_lat = bw, lat
    return best_bw, best_lat


@lru_cache(maxsize=4096)
def group_link(cluster: ClusterSpec, stride: int, size: int, collective: bool = True) -> tuple[float, float]:
    """(GB/s per rank per direction, per-hop latency s) of a collective over ranks
    0, stride, 2 stride, ... (`size` of them).

    Each ring hop is classified by whether its two ranks share a scale-up domain; one
    representative hop of each class is routed on the link graph (two domains suffice: all
    cross-domain hops look alike), and the ring runs at its slowest hop.

    A group that leaves its domain is not limited to one NIC: NCCL builds one ring (channel)
    per NIC on rail-optimised fabrics, so the k members a domain holds drive k NICs at once
    and the group's inter-domain traffic shares k x NIC (the node's aggregate egress when
    the group spans every GPU of it). Intra-domain links still carry the whole volume, so
    the group runs at min(scale-up, k x NIC). A point-to-point send (`collective=False`:
    pipeline stages, the context-parallel K/V ring) crosses on its own NIC only.
    """
    if size <= 1:
        return float("inf"), 0.0
    domain = cluster.domain_size
    ranks = [k * stride for k in range(size)]
    hops = list(zip(ranks, ranks[1:] + ranks[:1], strict=True))
    crosses = any(a // domain != b // domain for a, b in hops)
    stays = any(a // domain == b // domain for a, b in hops)
    two_domains = ClusterSpec(
        cluster.accelerator, num_gpus=min(cluster.num_gpus, 2 * domain),
        gpus_per_node=cluster.gpus_per_node, scaleup_gbps=cluster.scaleup_gbps,
        scaleout_gbps=cluster.scaleout_gbps, nvlink_domain=cluster.nvlink_domain,
    ) if cluster.num_gpus > domain else cluster
    g = cluster_graph(two_domains, max_nodes=max(2, -(-2 * domain // cluster.gpus_per_node)))
    results = []
    if stays and domain > 1:
        results.append(_path_bottleneck(g, ("gpu", 0), ("gpu", 1)))
    if crosses:
        nic_bw, lat = _path_bottleneck(g, ("gpu", 0), ("gpu", domain))
        per_domain = sum(1 for r in ranks if r // domain == 0)  # members of the first domain
        rails = max(1, per_domain) if collective else 1  # one NIC per GPU
        up = results[0][0] if results else float("inf")
        results.append((min(nic_bw * rails, up), lat))
    bw = min(r[0] for r in results)
    lat = max(r[1] for r in results)
    return bw, lat


def group_crosses_nodes(cluster: ClusterSpec, stride: int, size: int) -> bool:
    return size > 1 and stride * size > cluster.domain_size


# --------------------------------------------------------------------------- collectives


def ring_allreduce_time(nbytes: ArrayLike, n: ArrayLike, gbps: ArrayLike, latency: ArrayLike) -> ArrayLike:
    n = np.maximum(n, 1)
    return np.where(n > 1, 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / (gbps * 1e9), 0.0)


def tree_allreduce_time(nbytes: ArrayLike, n: ArrayLike, gbps: ArrayLike, latency: ArrayLike) -> ArrayLike:
    n = np.maximum(n, 1)
    return np.where(n > 1, 2 * np.log2(n) * latency + 2 * nbytes / (gbps * 1e9), 0.0)


def allreduce_time(nbytes: ArrayLike, n: ArrayLike, gbps: ArrayLike, latency: ArrayLike) -> ArrayLike:
    """NCCL chooses ring or tree per message size; take the faster."""
    return np.minimum(
        ring_allreduce_time(nbytes, n, gbps, latency), tree_allreduce_time(nbytes, n, gbps, latency)
    )


def allgather_time(nbytes_gathered: ArrayLike, n: ArrayLike, gbps: ArrayLike, latency: ArrayLike) -> ArrayLike:
    n = np.maximum(n, 1)
    return np.where(n > 1, (n - 1) * latency + (n - 1) / n * nbytes_gathered / (gbps * 1e9), 0.0)


reduce_scatter_time = allgather_time  # same volume and steps, reverse direction
alltoall_time = allgather_time  # each rank sends (n-1)/n of its buffer


def p2p_time(nbytes: ArrayLike, gbps: ArrayLike, latency: ArrayLike) -> ArrayLike:
    return latency + nbytes / (gbps * 1e9)


def ring_allreduce_bus_bytes(nbytes: ArrayLike, n: ArrayLike) -> ArrayLike:
    """Bytes each rank sends in a ring all-reduce: 2 (n-1)/n S (the mission's 2P(N-1)/N)."""
    n = np.maximum(n, 1)
    return 2 * (n - 1) / n * nbytes
