"""A report as a list of blocks, rendered to Markdown and to one self-contained HTML file (PNGs embedded).

Blocks: ("h1", text), ("h2", text), ("p", text), ("table", headers, rows), ("img", file, title).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}th{background:#f3f3f3}"
    "img{max-width:100%}"
)


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "h1":
            out.append(f"# {rest[0]}\n")
        elif kind == "h2":
            out.append(f"## {rest[0]}\n")
        elif kind == "p":
            out.append(f"{rest[0]}\n")
        elif kind == "table":
            headers, rows = rest
            out.append("| " + " | ".join(headers) + " |")
            out.append("|" + "---|" * len(headers))
            out += ["| " + " | ".join(r) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})\n")
    return "\n".join(out)


def to_html(blocks: list[tuple], out_dir: Path, title: str = "lorafleet report") -> str:
    e = html.escape
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "table":
            headers, rows = rest
            head = "".join(f"<th>{e(h)}</th>" for h in headers)
            trs = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((out_dir / rest[0]).read_bytes()).decode()
            body.append(f'<img alt="{e(rest[1])}" src="data:image/png;base64,{data}">')
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title><style>{STYLE}</style>'
        f"</head><body>{''.join(body)}</body></html>"
    )
