"""The data plane: proxies client traffic to backends from an immutable routing snapshot.

It never imports the Raft layer (halb.control): the node builds a RoutingSnapshot from the
replicated state plus local health, and hands it over; the data plane keeps serving from
the last snapshot it got when the cluster has no quorum (static stability).
"""
