"""Self-contained HTML pages: search hits (``jobs/search.py --html``) and a run report (``jobs/report.py``).

One file each, no external requests: styles inline, thumbnails inlined as
small JPEG data URIs, the error chart as inline SVG, so a page opens offline
and can be mailed or attached to a ticket.  Every value from the data is
HTML-escaped; a caption cannot inject markup.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping
from typing import Any

from workers.thumbnails import Thumbnail

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px}
.card img{display:block;max-width:160px;max-height:160px;margin-bottom:6px}
.missing{width:160px;height:90px;background:#eee;color:#844;font-size:12px;padding:6px;box-sizing:border-box;
 overflow:hidden;margin-bottom:6px}
.caption{font-weight:600}.meta{color:#666;font-size:12px;word-break:break-all}
.error{color:#a33}ul.answers{margin:4px 0;padding-left:18px}
table.summary td{padding:2px 10px 2px 0}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def clock(seconds: float | None) -> str:
    """``83.5`` -> ``1:23.5``: how a person reads a position in a video; anything else as written (``nan``)."""
    if seconds is None:
        return ""
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return str(seconds)  # a crafted frame_time: shown, not computed with
    minutes, rest = divmod(float(seconds), 60.0)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" if hours else f"{minutes}:{rest:04.1f}"


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
        f"<meta name=viewport content='width=device-width'><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )


def _lookup(thumbs: Mapping[tuple, Thumbnail], row: Mapping[str, Any]) -> Thumbnail | None:
    return thumbs.get((row.get("source"), row.get("key"), row.get("frame_time")))


def _thumb(thumb: Thumbnail | None) -> str:
    if thumb is not None and thumb.data_uri:
        return f"<img class=thumb alt='thumbnail' src='{thumb.data_uri}'>"
    reason = thumb.reason if thumb is not None else "no thumbnail"
    return f"<div class='missing placeholder' title='{_e(reason)}'>image unavailable: {_e(reason)}</div>"


def card(row: Mapping[str, Any], thumb: Thumbnail | None, extra: str = "") -> str:
    """One row as a card: thumbnail (or placeholder with reason), caption, answers, where it came from."""
    answers = row.get("answers") or []
    items = "".join(f"<li><b>{_e(a.get('question'))}</b> {_e(a.get('answer'))}</li>" for a in answers)
    at = f" at {clock(row.get('frame_time'))}" if row.get("frame_time") is not None else ""
    caption = row.get("caption")
    error = row.get("error")
    text = (
        f"<div class=caption>{_e(caption)}</div>"
        if caption is not None
        else f"<div class=error>{_e(row.get('error_kind'))}: {_e(error)}</div>"
        if error
        else ""
    )
    return (
        f"<div class=card data-id='{_e(row.get('id'))}'>{_thumb(thumb)}{text}"
        f"{'<ul class=answers>' + items + '</ul>' if items else ''}"
        f"<div class=meta>{_e(row.get('source'))} :: {_e(row.get('key'))}{_e(at)}{extra}</div></div>"
    )


def hits_page(query: str, mode: str, hits: list[dict[str, Any]], thumbs: Mapping[tuple, Thumbnail]) -> str:
    cards = "".join(
        card(h, _lookup(thumbs, h), f" · score {h['score']:.4f}") for h in hits
    )
    body = (
        f"<h1>{len(hits)} hit(s) for “{_e(query)}”</h1><p class=meta>mode: {_e(mode)}</p>"
        f"<div class=cards>{cards or '<p>No hits.</p>'}</div>"
    )
    return _page(f"search: {query}", body)


def error_chart(errors: Mapping[str, int]) -> str:
    """Horizontal bars, one per error kind, largest first, as inline SVG."""
    if not errors:
        return "<p>No error rows.</p>"
    kinds = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))
    top = max(errors.values())
    bar, label, width = 22, 190, 360
    parts = []
    for i, (kind, n) in enumerate(kinds):
        y = i * (bar + 6)
        w = max(2, round(width * n / top))
        parts.append(
            f"<g class=bar data-kind='{_e(kind)}' data-count='{n}'><title>{_e(kind)}: {n}</title>"
            f"<text x=0 y={y + 16} font-size=12>{_e(kind)}</text>"
            f"<rect x={label} y={y} width={w} height={bar} fill='#c55'></rect>"
            f"<text x={label + w + 6} y={y + 16} font-size=12>{n}</text></g>"
        )
    height = len(kinds) * (bar + 6)
    return (
        f"<svg id=errors-chart role=img aria-label='error rows by kind' width={label + width + 80} "
        f"height={height} xmlns='http://www.w3.org/2000/svg'>{''.join(parts)}</svg>"
    )


def report_page(
    output_url: str,
    summary: Mapping[str, Any] | None,
    errors: Mapping[str, int],
    rows: int,
    sample: Iterable[Mapping[str, Any]],
    thumbs: Mapping[tuple, Thumbnail],
) -> str:
    fields = [("output", output_url), ("rows", rows), ("error rows", sum(errors.values()))]
    if summary:
        # The run's scalar figures; its nested config stays in _summary.json.
        fields += [(k, v) for k, v in summary.items() if isinstance(v, str | int | float) and k != "output"]
    table = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in fields)
    cards = "".join(card(r, _lookup(thumbs, r)) for r in sample)
    body = (
        f"<h1>Run report</h1><table class=summary>{table}</table>"
        f"<h2>Errors by kind</h2>{error_chart(errors)}"
        f"<h2>Sample rows</h2><div class=cards>{cards or '<p>No rows.</p>'}</div>"
    )
    return _page(f"report: {output_url}", body)
