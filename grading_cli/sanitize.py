"""Learner output that reaches an instructor: feedback HTML, the autograded notebook formgrader renders,
report.md. Learner code may print anything, so nothing it wrote may run or restructure the page.

Two walls for HTML: outputs are reduced to inert types (text, PNG/JPEG/GIF images, HTML cleaned by bleach
to plain table and text markup; no JavaScript, SVG, widgets or raw markdown), learner markdown has its raw
HTML escaped and ``javascript:`` links disabled; and every feedback page carries a Content-Security-Policy
that forbids all scripts, so a miss in the first wall still runs nothing. report.md gets ``md_escape``.
"""
from __future__ import annotations

import copy
import functools
import re

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline' data:; font-src data:; "
       "script-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-src 'none'")
KEEP = ("text/plain", "image/png", "image/jpeg", "image/gif")
HTML_TAGS = ["table", "thead", "tbody", "tfoot", "tr", "th", "td", "caption", "colgroup", "col", "div", "span",
             "p", "br", "b", "i", "em", "strong", "code", "pre", "ul", "ol", "li", "h4", "h5", "h6", "small", "sub",
             "sup", "hr"]
HTML_ATTRS = {"*": ["class"], "td": ["colspan", "rowspan"], "th": ["colspan", "rowspan"]}
JS_LINK = re.compile(r"(?i)(j\s*a\s*v\s*a\s*s\s*c\s*r\s*i\s*p\s*t|v\s*b\s*s\s*c\s*r\s*i\s*p\s*t|data)\s*:")


def clean_html(text: str) -> str:
    import bleach

    return bleach.clean(text, tags=HTML_TAGS, attributes=HTML_ATTRS, protocols=[], strip=True, strip_comments=True)


def clean_output(output):
    """An inert copy of one output (see the module docstring)."""
    out = copy.deepcopy(output)
    if "data" in out:
        data = {k: v for k, v in out["data"].items() if k in KEEP}
        html = out["data"].get("text/html")
        if html is not None:
            data["text/html"] = clean_html(html if isinstance(html, str) else "".join(html))
        if "text/plain" not in data and "text/markdown" in out["data"]:
            data["text/plain"] = out["data"]["text/markdown"]
        out["data"] = data
        out["metadata"] = {k: v for k, v in out.get("metadata", {}).items() if k in KEEP and isinstance(v, dict)
                           and set(v) <= {"width", "height"}}
    return out


def clean_markdown(source: str) -> str:
    """Learner markdown shown as written, without raw HTML or script links."""
    text = source.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return JS_LINK.sub(lambda m: m.group(1) + "\uff1a", text)  # a full-width colon: no scheme, nothing runs


def clean_notebook(nb, learner_markdown=lambda cell: True):
    """``nb`` with every output made inert and the markdown cells ``learner_markdown`` selects escaped."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [clean_output(o) for o in cell.get("outputs", [])]
        elif cell.cell_type == "markdown" and learner_markdown(cell):
            cell.source = clean_markdown(cell.source)
        cell.pop("attachments", None)
    nb.metadata.pop("widgets", None)
    return nb


@functools.cache
def _exporter():
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="classic")


def to_html(nb) -> str:
    """The page of a cleaned notebook, with the Content-Security-Policy first in <head>."""
    body, _ = _exporter().from_notebook_node(nb)
    meta = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
    head = re.search(r"<head[^>]*>", body)
    return body[:head.end()] + meta + body[head.end():] if head else meta + body


def md_escape(text, limit: int = 300) -> str:
    """Learner-derived text as one inert markdown table cell / list item: no new lines, headings, tables,
    links, HTML or emphasis."""
    text = " ".join(str(text).split())[:limit]
    text = text.replace("\\", "\\\\")
    text = re.sub(r"([`*_\[\]#|<>])", r"\\\1", text)
    return text.replace("&", "&amp;")
