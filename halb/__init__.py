"""halb: a highly available load-balancer cluster (Raft-replicated state, quorum-leased VIP)."""

__version__ = "0.1.0"
