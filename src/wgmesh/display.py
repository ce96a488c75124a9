"""How wgmesh objects render: aligned text tables (terminals, logs), HTML tables
(Jupyter) and topology pictures (hosts, NATs, the internet, relays, peer paths).

Pure formatting shared by the cores' reprs, the node, the lab and the CLI.

Underlay links are grey; a peer pair is drawn green when direct and orange when
relayed, labelled with its latency. Needs the ``plot`` extra (networkx, matplotlib).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["html_table", "human_bytes", "plot_topology", "text_table"]


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: sizes and rates for people (binary units)."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def text_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Aligned columns under upper-case headings; a missing value shows as ``-``."""
    cells = [["-" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def html_table(rows: list[dict[str, Any]], columns: list[str], caption: str = "") -> str:
    """The same table as :func:`text_table`, escaped HTML for Jupyter's ``_repr_html_``."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('-' if r.get(c) is None else str(r.get(c)))}</td>"
                         for c in columns) + "</tr>" for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PathEdge = tuple[str, str, str, float | None]  # a, b, "direct"|"relay", rtt ms


def _require() -> tuple[Any, Any]:
    try:
        import matplotlib

        if not _in_notebook():
            matplotlib.use("Agg")  # scripts and CI have no display
        import matplotlib.pyplot as plt
        import networkx as nx
    except ImportError as e:
        from wgmesh.errors import WgmeshError

        raise WgmeshError("plots need the plot extra: pip install 'wgmesh-kernel[plot]'") from e
    return nx, plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None
    except ImportError:
        return False


def plot_topology(underlay: Iterable[tuple[str, str]], roles: Mapping[str, str],
                  paths: Iterable[PathEdge] = (), title: str = "") -> Any:
    """A matplotlib Figure. ``roles``: name -> internet|nat|relay|control|node."""
    nx, plt = _require()
    g = nx.Graph()
    for name, role in roles.items():
        g.add_node(name, role=role)
    g.add_edges_from(underlay, kind="underlay")
    pos = nx.spring_layout(g, seed=7, k=1.2)
    colors = {"internet": "#9ecae1", "nat": "#fdd0a2", "relay": "#c7e9c0",
              "control": "#dadaeb", "node": "#fcbba1"}
    fig, ax = plt.subplots(figsize=(9, 6))
    nx.draw_networkx_edges(g, pos, ax=ax, edge_color="#bbbbbb", width=1.5)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=900,
                           node_color=[colors.get(roles.get(n, "node"), "#eeeeee") for n in g])
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=8)
    labels = {}
    for a, b, path, rtt in paths:
        if a not in pos or b not in pos:
            continue
        color = "#2ca02c" if path == "direct" else "#ff7f0e"
        nx.draw_networkx_edges(nx.Graph([(a, b)]), pos, ax=ax, edge_color=color, width=2.5,
                               style="solid" if path == "direct" else "dashed",
                               connectionstyle="arc3,rad=0.2", arrows=True, arrowstyle="-")
        labels[(a, b)] = f"{path} {rtt:.1f}ms" if rtt is not None else path
    if labels:
        nx.draw_networkx_edge_labels(g.__class__(list(labels)), pos, edge_labels=labels, ax=ax,
                                     font_size=7)
    ax.set_title(title or "wgmesh topology (green: direct, orange: relayed)")
    ax.axis("off")
    fig.tight_layout()
    return fig
