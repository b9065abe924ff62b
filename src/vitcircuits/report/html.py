"""A self-contained HTML page: inline CSS, images embedded as data URIs, all text escaped, a sticky
table of contents built from the page's sections, and collapsible galleries."""
from __future__ import annotations

import base64
from html import escape
from pathlib import Path

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1320px;margin:0 auto;padding:0 1rem;color:#222}
.layout{display:grid;grid-template-columns:12.5rem minmax(0,1fr);gap:2rem}
#toc{position:sticky;top:0;align-self:start;max-height:100vh;overflow-y:auto;padding:1rem 0;font-size:.9rem}
#toc ol{list-style:none;padding:0;margin:.4rem 0}#toc li{margin:.3rem 0}#toc a{color:#0b5cad;text-decoration:none}
#toc a:hover{text-decoration:underline}main{min-width:0;padding-bottom:4rem}section{scroll-margin-top:.5rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;display:block;max-width:100%;overflow-x:auto}
td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;font-size:.9rem}
th{background:#f3f3f3}figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}img{max-width:100%}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4rem .8rem}
details{border:1px solid #ddd;border-radius:4px;margin:.8rem 0}details>:not(summary){margin-left:.8rem;margin-right:.8rem}
summary{cursor:pointer;font-weight:600;background:#f3f3f3;padding:.35rem .8rem}
.counts{display:flex;gap:1rem;flex-wrap:wrap;margin:.6rem 0}.count{border:1px solid #ccc;border-radius:4px;padding:.3rem .9rem;text-align:center}
.count b{display:block;font-size:1.5rem}.key-figure{margin-top:0}.key-figure img{max-height:62vh}
.summary-grid{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1.5rem;align-items:start}
@media (max-width:800px){.layout,.summary-grid{display:block}#toc{position:static;border-bottom:1px solid #ddd;max-height:none}
#toc ol{display:flex;flex-wrap:wrap;gap:.2rem 1rem}}
"""


class Section(str):
    """A section's HTML that also knows its anchor and title (for the table of contents)."""

    anchor: str
    title: str

    def __new__(cls, title: str, body_html: str, anchor: str) -> Section:
        text = super().__new__(cls, f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>{body_html}</section>')
        text.anchor, text.title = anchor, title
        return text


def table(rows: list[tuple], header: tuple | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def figure(png: Path, caption: str, css_class: str = "") -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    cls = f' class="{css_class}"' if css_class else ""
    return f'<figure{cls}><img alt="{escape(caption)}" src="data:image/png;base64,{data}"><figcaption>{escape(caption)}</figcaption></figure>'


def section(title: str, body_html: str, anchor: str) -> Section:
    """A titled section with the anchor that the table of contents links to."""
    return Section(title, body_html, anchor)


def details(summary: str, body_html: str) -> str:
    """A collapsible block, closed until clicked (long galleries)."""
    return f"<details><summary>{escape(summary)}</summary>{body_html}</details>"


def gallery(title: str, figures: list[tuple[Path, str]]) -> str:
    """``(png, caption)`` figures in a collapsed :func:`details` block titled with their number; "" for none."""
    if not figures:
        return ""
    return details(f"{title} ({len(figures)} figure{'s' if len(figures) > 1 else ''})", "".join(figure(*f) for f in figures))


def paragraph(text: str, css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return f"<p{cls}>{escape(text)}</p>"


def toc(sections: list[str]) -> str:
    """The table of contents: one link per :class:`Section` in ``sections``, in order."""
    items = "".join(f'<li><a href="#{escape(s.anchor)}">{escape(s.title)}</a></li>' for s in sections if isinstance(s, Section))
    return f'<nav id="toc" aria-label="Contents"><strong>Contents</strong><ol>{items}</ol></nav>'


def page(title: str, sections: list[str]) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body>'
        f'<div class="layout">{toc(sections)}<main><h1>{escape(title)}</h1>{"".join(sections)}</main></div></body></html>\n'
    )
