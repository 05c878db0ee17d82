"""Network-namespace lab for real VIP drills (root only). See docs/lab.md."""
from __future__ import annotations

from .topology import (BE_ADDRS, CLIENT_ADDR, DEFAULT_PREFIX, DEFAULT_SUBNET, LB_ADDRS, VIP,
                       Host, Lab, LabError, list_netns)

__all__ = ["BE_ADDRS", "CLIENT_ADDR", "DEFAULT_PREFIX", "DEFAULT_SUBNET", "LB_ADDRS", "VIP",
           "Host", "Lab", "LabError", "list_netns"]
