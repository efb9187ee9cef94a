"""Pipeline bubbles and collective times on known links."""

import networkx as nx
import pytest

from costmodels import comm
from costmodels.pipeline import CODE, bubble_time
from costmodels.specs import ClusterSpec


def test_bubble_ratios():
    # Narayanan et al. 2021, Sec. 2.2: (p-1)/m of the ideal m (F+B+W) for 1F1B, (p-1)/(v m)
    # interleaved; F, B, W the micro-batch's forward, input- and weight-gradient seconds.
    ideal = 8 * (1.0 + 1.0 + 1.0)
    assert bubble_time(CODE["1f1b"], 4, 1, 1.0, 1.0, 1.0) / ideal == pytest.approx(3 / 8)
    assert bubble_time(CODE["interleaved"], 4, 2, 1.0, 1.0, 1.0) / ideal == pytest.approx(3 / 16)
    # Share of the step: (p-1)/(m+p-1), the mission's expression.
    b = bubble_time(CODE["1f1b"], 8, 1, 1.0, 1.0, 1.0)
    assert b / (32 * 3.0 + b) == pytest.approx(7 / 39)
    assert bubble_time(CODE["1f1b"], 1, 1, 1.0, 1.0, 1.0) == 0


def test_ring_allreduce_on_a_known_link():
    # 1 GB over 8 ranks at 100 GB/s per direction, no latency: 2 (n-1)/n S / B = 17.5 ms.
    t = comm.ring_allreduce_time(1e9, 8, 100.0, 0.0)
    assert t == pytest.approx(0.0175)
    # Bytes sent per rank: 2 P (N-1)/N (the mission's DDP volume).
    assert comm.ring_allreduce_bus_bytes(1e9, 8) == pytest.approx(1.75e9)
    # Latency term: 2 (n-1) alpha.
    assert comm.ring_allreduce_time(0.0, 8, 100.0, 1e-5) == pytest.approx(14e-5)


def test_allgather_and_p2p():
    assert comm.allgather_time(8e9, 8, 100.0, 0.0) == pytest.approx(0.07)
    assert comm.p2p_time(1e9, 50.0, 1e-5) == pytest.approx(0.02001)
    assert comm.allreduce_time(1e9, 1, 100.0, 1e-5) == 0


def test_group_bandwidth_from_graph():
    c = ClusterSpec("h100-sxm", 32)
    g = comm.cluster_graph(c)
    assert isinstance(g, nx.Graph) and g.number_of_nodes() > 32
    assert comm.group_link(c, 1, 8)[0] == 450  # TP inside a node: NVLink
    assert comm.group_link(c, 8, 4)[0] == 50  # DP across nodes: one 400 Gb/s NIC per GPU
    assert comm.group_link(c, 2, 4)[0] == 450  # stride 2 x 4 = 8 stays in a node
    h800 = ClusterSpec("h800", 16)
    assert comm.group_link(h800, 1, 8)[0] == 200  # H800's reduced NVLink
    assert comm.group_crosses_nodes(c, 8, 2)
