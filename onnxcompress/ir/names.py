"""Naming conventions of the rewritten graph: the nodes a factorization creates are named
`<layer>/<marker><part>` (Tucker2 `/t2_`, CP `/cp_`, SVD `/svd_`), so later passes can tell chain nodes from
original layers and map a node back to the layer it came from."""
from __future__ import annotations

import glob
from typing import Iterable

CHAIN_MARKERS = ("/t2_", "/cp_", "/svd_")


def is_chain_node(name: str) -> bool:
    return any(m in name for m in CHAIN_MARKERS)


def layer_of(node_name: str) -> str:
    """The original layer a chain node was made from (the node name itself for other nodes)."""
    for m in CHAIN_MARKERS:
        i = node_name.rfind(m)
        if i >= 0:
            return node_name[:i]
    return node_name


def exact_globs(names: Iterable[str]) -> list[str]:
    """Exact node names as fnmatch globs (escapes [, ], *, ?)."""
    return [glob.escape(n) for n in names]
