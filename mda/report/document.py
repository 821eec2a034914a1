"""A document rendered twice: Markdown (images linked by relative paths) and one self-contained
HTML file (images inlined). The MDA report and the SMDA report are both built on it."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import pandas as pd


class Document:
    """Blocks rendered both as Markdown and as one HTML file with the images inlined.
    Inline markup in text: **bold** and `code`."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str):
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str):
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]):
        self.blocks.append(("bullets", items))

    def table(self, frame: pd.DataFrame):
        self.blocks.append(("table", frame))

    def image(self, path: Path, caption: str, link: str):
        """A PNG: embedded from `path` in the HTML, linked as `link` (relative to report.md) in Markdown."""
        self.blocks.append(("image", Path(path), caption, link))

    def code(self, text: str):
        self.blocks.append(("code", text))

    def rich(self, html_text: str, fallback: "Document"):
        """Raw HTML in the HTML rendering; `fallback`'s blocks in the Markdown one."""
        self.blocks.append(("rich", html_text, fallback))

    def markdown(self) -> str:
        out = []
        for kind, *rest in self.blocks:
            if kind == "heading":
                out.append("#" * rest[0] + " " + rest[1])
            elif kind == "paragraph":
                out.append(rest[0])
            elif kind == "bullets":
                out.append("\n".join(f"- {item}" for item in rest[0]))
            elif kind == "table":
                frame = rest[0]
                cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
                out.append("\n".join([cells(frame.columns), cells(["---"] * len(frame.columns))]
                                     + [cells(r) for r in frame.itertuples(index=False)]))
            elif kind == "image":
                out.append(f"![{rest[1]}]({rest[2]})\n\n*{rest[1]}*")
            elif kind == "code":
                out.append("```\n" + rest[0].rstrip("\n") + "\n```")
            elif kind == "rich":
                out.append(rest[1].markdown().rstrip("\n"))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = []
        for kind, *rest in self.blocks:
            if kind == "heading":
                out.append(f"<h{rest[0]}>{_inline(rest[1])}</h{rest[0]}>")
            elif kind == "paragraph":
                out.append(f"<p>{_inline(rest[0])}</p>")
            elif kind == "bullets":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in rest[0]) + "</ul>")
            elif kind == "table":
                frame = rest[0]
                head = "".join(f"<th>{_inline(str(c))}</th>" for c in frame.columns)
                body = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>"
                               for row in frame.itertuples(index=False))
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "image":
                data = base64.b64encode(rest[0].read_bytes()).decode()
                out.append(f'<figure><img alt="{html.escape(rest[1])}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{_inline(rest[1])}</figcaption></figure>")
            elif kind == "code":
                out.append(f"<pre>{html.escape(rest[0])}</pre>")
            elif kind == "rich":
                out.append(rest[0])
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
                 "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}"
                 "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
                 "figcaption{font-style:italic;color:#444}code{background:#f0f0f0}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)
