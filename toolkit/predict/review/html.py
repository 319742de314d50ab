"""The `tk review` page: one self-contained HTML file (inline CSS, thumbnails as data URIs,
charts as inline SVG, no script, no external URL). Rendering only: the numbers come from
:mod:`toolkit.predict.review.analysis`, the thumbnails from a callable."""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolkit.predict.review.analysis import Review

Thumb = Callable[[str], str]  # path -> data URI ("" when it cannot be read)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;
color:#1d2430;background:#fff;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;
border-bottom:1px solid #d8dde6;padding-bottom:4px}
.muted{color:#5b6576}.num{text-align:right;font-variant-numeric:tabular-nums}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #d8dde6;padding:3px 8px}
th{background:#f3f5f9;text-align:left}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #d8dde6;border-radius:6px;
padding:8px 14px;min-width:110px}.card b{display:block;font-size:20px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:132px;border:1px solid #d8dde6;border-radius:6px;padding:4px;
font-size:12px;overflow-wrap:anywhere}
figure img{width:124px;height:124px;object-fit:contain;background:#f3f5f9;display:block}
.bad{color:#b3261e}.ok{color:#1b6e20}.pair{margin:10px 0}
td.cm{text-align:right;min-width:28px}td img{width:72px;height:72px;object-fit:contain}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _img(thumb: Thumb, path: str) -> str:
    uri = thumb(path)
    if not uri:
        return '<div class="muted">(unreadable)</div>'
    return f'<img alt="{_e(os.path.basename(path))}" src="{uri}">'


def _figure(thumb: Thumb, path: str, lines: list[str], cls: str = "thumb") -> str:
    caption = "<br>".join(lines)
    return (f'<figure class="{cls}" title="{_e(path)}">{_img(thumb, path)}'
            f"<figcaption>{caption}</figcaption></figure>")


def _summary(r: Review) -> str:
    cards = [("images", str(r.images)), ("unreadable", str(len(r.failed))),
             ("accuracy", f"{r.accuracy:.4f}"), ("macro F1", f"{r.macro_f1:.4f}")]
    if r.top5 is not None:
        cards.append(("top-5", f"{r.top5:.4f}"))
    cards.append(("likely label errors", str(len(r.label_issues))))
    cards.append(("near-duplicates", str(r.duplicates_total + r.train_duplicates_total)))
    body = "".join(f'<div class="card"><span class="muted">{_e(k)}</span><b '
                   f'data-key="{_e(k)}">{_e(v)}</b></div>' for k, v in cards)
    failed = ""
    if r.failed:
        items = "".join(f"<li>{_e(f['path'])}: {_e(f['error'])}</li>" for f in r.failed[:50])
        more = f"<li>... and {len(r.failed) - 50} more</li>" if len(r.failed) > 50 else ""
        failed = f"<p>Unreadable images (left out):</p><ul>{items}{more}</ul>"
    return (f'<section id="summary"><h2>Summary</h2><div class="cards">{body}</div>{failed}'
            "</section>")


def _per_class(r: Review) -> str:
    rows = "".join(
        f"<tr><td>{_e(c['name'])}</td><td class=num>{c['precision']:.4f}</td>"
        f"<td class=num>{c['recall']:.4f}</td><td class=num>{c['f1']:.4f}</td>"
        f"<td class=num>{c['support']}</td></tr>" for c in r.per_class)
    return ('<section id="per-class"><h2>Per class</h2><table><tr><th>class</th>'
            "<th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
            f"{rows}</table></section>")


def _confusion(r: Review) -> str:
    peak = max([1, *(v for row in r.confusion for v in row)])
    head = "".join(f"<th>{_e(c)}</th>" for c in r.classes)
    body = []
    for c, row in zip(r.classes, r.confusion, strict=True):
        cells = "".join(
            f'<td class="cm" style="background:rgba(33,100,200,{0.85 * v / peak:.2f});'
            f'color:{"#fff" if v > peak / 2 else "#1d2430"}">{v}</td>' for v in row)
        body.append(f"<tr><th>{_e(c)}</th>{cells}</tr>")
    return ('<section id="confusion"><h2>Confusion matrix</h2><p class="muted">rows: true '
            "class, columns: predicted class</p><table><tr><th></th>"
            f"{head}</tr>{''.join(body)}</table></section>")


def _confused(r: Review, thumb: Thumb) -> str:
    if not r.confused_pairs:
        return ('<section id="confused-pairs"><h2>Most confused pairs</h2><p>No '
                "confusions.</p></section>")
    parts = []
    for pair in r.confused_pairs:
        figs = "".join(_figure(thumb, r.paths[i], [f"score {r.scores[i]:.3f}"])
                       for i in pair["examples"])
        parts.append(f'<div class="pair"><b>{_e(pair["true"])}</b> predicted as '
                     f'<b>{_e(pair["predicted"])}</b>: {pair["count"]} image(s)'
                     f'<div class="gallery">{figs}</div></div>')
    return ('<section id="confused-pairs"><h2>Most confused pairs</h2>'
            f"{''.join(parts)}</section>")


def _losses(r: Review, thumb: Thumb) -> str:
    figs = "".join(
        _figure(thumb, r.paths[x["index"]],
                [f"true <b>{_e(x['true'])}</b>",
                 f'predicted <b class="{"ok" if x["true"] == x["predicted"] else "bad"}">'
                 f"{_e(x['predicted'])}</b> {x['score']:.3f}",
                 f"loss {x['loss']:.3f}"], "loss")
        for x in r.top_losses)
    return (f'<section id="top-losses"><h2>Top {len(r.top_losses)} losses</h2>'
            '<p class="muted">the images whose given label the model finds least likely '
            "(loss = -log score of the given label)</p>"
            f'<div class="gallery">{figs}</div></section>')


def _issues(r: Review, thumb: Thumb, csv_name: str) -> str:
    shown = r.label_issues[:60]
    figs = "".join(
        _figure(thumb, r.paths[x["index"]],
                [f"given <b>{_e(x['given'])}</b> {x['given_score']:.3f}",
                 f"likely <b>{_e(x['suggested'])}</b> {x['suggested_score']:.3f}"], "issue")
        for x in shown)
    more = (f"<p>... {len(r.label_issues) - len(shown)} more in the csv.</p>"
            if len(r.label_issues) > len(shown) else "")
    return ('<section id="label-issues"><h2>Likely label errors</h2>'
            f"<p>{len(r.label_issues)} image(s) whose given label the model finds unlikely "
            "while confident in another class (confident learning), most likely first. "
            f"<b>{_e(csv_name)}</b> lists every reviewed image (flagged ones first): fix its "
            "<code>label</code> column and pass the file back as <code>--data</code> (to "
            "<code>tk review</code>, or to <code>tk finetune</code> with <code>--opt "
            "dataset.allow_outside_root=true</code>).</p>"
            f'<div class="gallery">{figs}</div>{more}</section>')


def _duplicates(r: Review, thumb: Thumb) -> str:
    rows = "".join(
        f"<tr><td>{_img(thumb, r.paths[d['a']])}</td><td>{_img(thumb, r.paths[d['b']])}</td>"
        f"<td class=num>{d['cosine']:.4f}</td><td>{_e(r.paths[d['a']])}<br>"
        f"{_e(r.paths[d['b']])}</td></tr>" for d in r.duplicates[:40])
    train_rows = "".join(
        f"<tr><td>{_img(thumb, r.paths[d['a']])}</td><td>{_img(thumb, d['train'])}</td>"
        f"<td class=num>{d['cosine']:.4f}</td><td>{_e(r.paths[d['a']])}<br>"
        f"{_e(d['train'])}</td></tr>" for d in r.train_duplicates[:40])
    head = "<tr><th>image</th><th>duplicate</th><th>cosine</th><th>paths</th></tr>"
    within = (f"<table>{head}{rows}</table>" if rows else "<p>None.</p>")
    against = (f"<table>{head}{train_rows}</table>" if train_rows else "<p>None.</p>")
    return ('<section id="duplicates"><h2>Near-duplicates</h2>'
            f'<p>Cosine similarity of the backbone features at or above <b>{r.threshold}</b>.'
            " A reviewed image that is also a training image inflates the accuracy above."
            f'</p><h3>Against the training images (<span data-key="train-duplicates">'
            f"{r.train_duplicates_total}</span> pair(s))</h3>"
            f'<p class="muted">{_e(r.train_note)}</p>{against}'
            f'<h3>Within the reviewed images (<span data-key="duplicates">{r.duplicates_total}'
            f"</span> pair(s))</h3>{within}</section>")


def _svg_reliability(bins: list[dict[str, float]], title: str) -> str:
    w, h, pad = 260, 260, 30
    inner = w - 2 * pad
    bars = []
    for b in bins:
        if not b["count"]:
            continue
        x = pad + b["lo"] * inner
        bw = (b["hi"] - b["lo"]) * inner
        bh = b["accuracy"] * inner
        gap = b["confidence"] * inner
        bars.append(f'<rect x="{x:.1f}" y="{pad + inner - bh:.1f}" width="{bw - 1:.1f}" '
                    f'height="{bh:.1f}" fill="#2164c8"/>'
                    f'<rect x="{x:.1f}" y="{pad + inner - gap:.1f}" width="{bw - 1:.1f}" '
                    f'height="2" fill="#b3261e"/>')
    return (f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">'
            f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{_e(title)}</text>'
            f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="none" '
            f'stroke="#999"/><line x1="{pad}" y1="{pad + inner}" x2="{pad + inner}" '
            f'y2="{pad}" stroke="#999" stroke-dasharray="4"/>{"".join(bars)}'
            f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle" font-size="11">confidence'
            f'</text><text x="10" y="{h / 2}" font-size="11" transform="rotate(-90 10 '
            f'{h / 2})" text-anchor="middle">accuracy</text></svg>')


def _calibration(r: Review) -> str:
    c = r.calibration
    fitted = c.get("fitted") or {}
    if not fitted:
        where = " (the model has no calibration record: scores are the raw softmax)"
    elif fitted.get("rejected"):
        where = (f" (tk finetune fitted {fitted.get('fitted', 0):.3f} on {fitted.get('images')}"
                 f" validation images and kept 1: {fitted['rejected']})")
    else:
        where = (f" (fitted by tk finetune on {fitted.get('images')} validation images: ECE "
                 f"{fitted.get('ece_before', 0):.4f} -> {fitted.get('ece_after', 0):.4f} there)")
    return ('<section id="calibration"><h2>Calibration</h2>'
            f"<p>Temperature <b>{c['temperature']:.3f}</b>{_e(where)}. Expected calibration "
            f"error on these images ({c['bins']} bins): raw softmax "
            f'<b data-key="ece-raw">{c["ece_raw"]:.4f}</b>, with the temperature '
            f'<b data-key="ece-calibrated">{c["ece_calibrated"]:.4f}</b>. Bars: accuracy per '
            "confidence bin; red marks: mean confidence; the diagonal is perfect calibration."
            f'</p><div class="cards">{_svg_reliability(c["bins_raw"], "raw softmax")}'
            f'{_svg_reliability(c["bins_calibrated"], "calibrated")}</div></section>')


def _svg_lines(series: list[tuple[str, list[float], str]], epochs: list[int], title: str,
               ymax: float | None = None) -> str:
    w, h, pad = 380, 240, 36
    iw, ih = w - 2 * pad, h - 2 * pad
    values = [v for _, vs, _ in series for v in vs]
    top = ymax if ymax is not None else max([1e-9, *values]) * 1.05
    lo_e, hi_e = min(epochs), max(epochs)

    def xy(e: int, v: float) -> str:
        x = pad + (0.5 if hi_e == lo_e else (e - lo_e) / (hi_e - lo_e)) * iw
        return f"{x:.1f},{pad + ih - min(v, top) / top * ih:.1f}"

    lines, legend = [], []
    for k, (name, vs, colour) in enumerate(series):
        pts = " ".join(xy(e, v) for e, v in zip(epochs, vs, strict=True))
        lines.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" '
                     'stroke-width="2"/>' + "".join(
                         f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2.5" '
                         f'fill="{colour}"/>' for p in pts.split()))
        legend.append(f'<text x="{pad + 8 + 90 * k}" y="{pad + 14}" font-size="11" '
                      f'fill="{colour}">{_e(name)}</text>')
    return (f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">'
            f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{_e(title)}</text>'
            f'<rect x="{pad}" y="{pad}" width="{iw}" height="{ih}" fill="none" stroke="#999"/>'
            f'{"".join(lines)}{"".join(legend)}'
            f'<text x="{pad}" y="{h - 8}" font-size="11">epoch {lo_e}</text>'
            f'<text x="{pad + iw}" y="{h - 8}" font-size="11" text-anchor="end">epoch {hi_e}'
            f'</text><text x="4" y="{pad + 4}" font-size="10">{top:.3g}</text></svg>')


def _training(r: Review) -> str:
    h = [m for m in r.history if "epoch" in m]
    if not h:
        return ('<section id="training"><h2>Training curves</h2><p>No training history in '
                "the model's metadata.</p></section>")
    epochs = [int(m["epoch"]) for m in h]

    def col(key: str) -> list[float]:
        return [float(m.get(key, 0.0)) for m in h]

    loss = _svg_lines([("train", col("train_loss"), "#2164c8"),
                       ("val", col("val_loss"), "#e07b00")], epochs, "loss")
    acc = _svg_lines([("train", col("train_acc"), "#2164c8"),
                      ("val", col("val_acc"), "#e07b00")], epochs, "accuracy", ymax=1.0)
    return ('<section id="training"><h2>Training curves</h2>'
            f'<div class="cards">{loss}{acc}</div></section>')


def render(r: Review, thumb: Thumb, *, csv_name: str, generated: str = "") -> str:
    """The whole page."""
    head = (f"<h1>Review of model {_e(r.model)}</h1><p class=muted>data: {_e(r.data)}"
            f"{' &middot; ' + _e(generated) if generated else ''}</p>")
    body = "".join([head, _summary(r), _per_class(r), _confusion(r), _confused(r, thumb),
                    _losses(r, thumb), _issues(r, thumb, csv_name), _duplicates(r, thumb),
                    _calibration(r), _training(r)])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>tk review: {_e(r.model)}</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
