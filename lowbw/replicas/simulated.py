"""lowbw-simulate with replicas: R pipelines played side by side, each replica group averaged on the links.

Each replica's pipeline is played by its own :class:`~lowbw.pipeline.player.Player` on the link models
of its own nodes (a :func:`sub_topology` of the whole network: node ``j x S + r`` is rank r of replica
j, lowbw.replicas.layout). After a step, each replica group runs its exchange (``SyncMethod.exchange``)
hop by hop, with exactly the arithmetic of a run on the virtual clock (lowbw.replicas.collective): at
every hop each member sends its chunk or payload to the next member when it is ready, on its own
uplink, and takes the previous member's once its downlink delivers it. The members' nodes are the
ones their pipelines used, so a replica message queues behind the tail of its node's pipeline
traffic, as in a run. The arithmetic of a reduction costs no time, as under planned durations.

Every step is played (no steady-state extrapolation): DiLoCo's steps repeat with period H, not 1.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from lowbw.net.link import LinkModel
from lowbw.net.topology import Topology
from lowbw.pipeline.player import Player
from lowbw.pipeline.stepping import Steps
from lowbw.replicas.collective import Exchange
from lowbw.replicas.layout import Layout

def sub_topology(topo: Topology, nodes: list[int]) -> Topology:
    """The links among ``nodes`` (global ranks), renumbered 0..len(nodes)-1 in that order."""
    pairs = {(a, b): topo.pairs[(na, nb)] for a, na in enumerate(nodes) for b, nb in enumerate(nodes) if a != b}
    return Topology(len(nodes), topo.semantics, tuple(topo.uplink_bps[g] for g in nodes),
                    tuple(topo.downlink_bps[g] for g in nodes), pairs, topo.emulate, topo.framing,
                    topo.duplex_efficiency)


class ReplicaLinks:
    """The link models of R x S nodes: per replica the pipeline's (on its sub-topology), per replica group
    the ring's (on the group's sub-topology); a node's uplink and downlink are one queue for both."""

    def __init__(self, topo: Topology, layout: Layout, make: Callable[[Topology, int], LinkModel]):
        S, R = layout.pipeline_ranks, layout.replicas
        self.layout = layout
        self.pipeline = []
        for j in range(R):
            sub = sub_topology(topo, [j * S + r for r in range(S)])
            self.pipeline.append({r: make(sub, r) for r in range(S)})
        self.ring = []
        for p in range(S):
            sub = sub_topology(topo, layout.group(p))
            self.ring.append({i: make(sub, i) for i in range(R)})

    def ring_exchange(self, p: int, ex: Exchange, ready: list[float]) -> tuple[list[float], dict[tuple[int, int], int]]:
        """Play group p's exchange from each member's ready time; (each member's end, bytes per global link)."""
        R, S = self.layout.replicas, self.layout.pipeline_ranks
        node, ring = [self.pipeline[j][p] for j in range(R)], self.ring[p]
        for i in range(R):  # one node, one queue: the ring starts where the pipeline left the links
            ring[i].uplink_free, ring[i].downlink_free = node[i].uplink_free, node[i].downlink_free
        hops = [ex.hops(R, i) for i in range(R)]
        t, sent = list(ready), {}
        for h in range(len(hops[0])):
            arrival = [ring[i].send((i + 1) % R, hops[i][h], t[i]).arrival for i in range(R)]
            for i in range(R):
                prev = (i - 1) % R
                t[i] = max(t[i], ring[i].deliver(prev, hops[prev][h], arrival[prev]))
                key = (i * S + p, ((i + 1) % R) * S + p)
                sent[key] = sent.get(key, 0) + hops[i][h]
        for i in range(R):
            node[i].uplink_free, node[i].downlink_free = ring[i].uplink_free, ring[i].downlink_free
        return t, sent


def play_replicated(players: list[Player], links: ReplicaLinks, exchanges: Callable[[int], list[Optional[Exchange]]],
                    n_steps: int, measured: Sequence[bool], record: frozenset[int] = frozenset()) -> Steps:
    """Play ``n_steps`` steps of R pipelines and their groups' exchanges (``exchanges(step)[p]``: group p's)."""
    layout = links.layout
    S, R, world = layout.pipeline_ranks, layout.replicas, layout.world
    start, t_prev = [0.0] * world, 0.0
    out = Steps([], [0.0] * world, [], 0)
    for step in range(n_steps):
        end, busy, link_bytes, messages = [0.0] * world, [0.0] * world, {}, 0
        for j, player in enumerate(players):
            base = j * S
            res = player.play({r: start[base + r] for r in range(S)}, step, record=step in record)
            for r in range(S):
                end[base + r], busy[base + r] = res.end[r], res.busy[r]
            for (a, b), n in res.link_bytes.items():
                link_bytes[(base + a, base + b)] = n
            messages += res.messages
            out.events += [e._replace(rank=e.rank + base, peer=e.peer + base if e.peer >= 0 else e.peer)
                           for e in res.events]
        for p, ex in enumerate(exchanges(step)):
            if ex is None:
                continue
            group = layout.group(p)
            done, sent = links.ring_exchange(p, ex, [end[g] for g in group])
            for g, t in zip(group, done):
                end[g] = t
            for k, n in sent.items():
                link_bytes[k] = link_bytes.get(k, 0) + n
            messages += R * len(ex.hops(R, 0))  # every member sends once a hop
        t_end = max(end)
        out.rows.append({"step": step, "step_time_s": t_end - t_prev, "bytes_sent": sum(link_bytes.values()),
                         "bubble_fraction": 1.0 - sum(busy) / (world * (t_end - t_prev)) if t_end > t_prev else 0.0,
                         "messages": messages, "link_bytes": link_bytes})
        if measured[step]:
            out.busy_measured = [a + b for a, b in zip(out.busy_measured, busy)]
        start, t_prev = end, t_end
        out.played += 1
    return out
