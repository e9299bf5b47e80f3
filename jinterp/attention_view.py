"""An attention-pattern viewer as self-contained HTML: the prompt's tokens and each head's attention,
with inline CSS and JavaScript only (nothing is fetched when it is viewed), embeddable in a run
report or saved as its own page.

Pick a layer and a head (or the mean over heads); hover (or click) a token to make it the query:
every token is shaded by the attention it receives from there, and the full query x key heatmap of
the head is shown below. A page URL can open on a view: ``page.html#layer=3&head=1&query=7``.
Tokens are shown as text, never as markup: a token ``<script>`` displays as such.
"""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path

import numpy as np

MAX_GRID = 160  # longer prompts show the token view only: a bigger table is too slow to draw

STYLE = """
.jattn { font: 14px/1.4 system-ui, sans-serif; margin: 1em 0; }
.jattn-controls label { margin-right: 1em; }
.jattn-tokens { margin: 0.8em 0; line-height: 2.1; }
.jattn-token { font-family: ui-monospace, monospace; white-space: pre; padding: 2px 1px; margin: 0 1px;
  border: 1px solid #ddd; border-radius: 3px; cursor: pointer; }
.jattn-token.jattn-query { outline: 2px solid #d62728; }
.jattn-caption { color: #555; font-size: 0.9em; }
.jattn-grid { border-collapse: collapse; margin-top: 0.6em; font-size: 10px; }
.jattn-grid td { width: 14px; height: 14px; padding: 0; border: 0; }
.jattn-grid th { font-family: ui-monospace, monospace; font-weight: normal; white-space: pre; padding: 0 3px;
  text-align: right; max-width: 10em; overflow: hidden; }
.jattn-grid thead th { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; height: 7em; }
.jattn-grid tr.jattn-query th { color: #d62728; }
"""

# Reads its data from the JSON script next to it; builds everything with textContent (no innerHTML),
# so token text never becomes markup.
SCRIPT = r"""
(function () {
  const root = document.getElementById(__VIEWER_ID__);
  const data = JSON.parse(document.getElementById(__VIEWER_ID__ + "-data").textContent);
  const n = data.tokens.length;
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  // Indices into data.layers and data.heads (data.heads.length: the mean over heads); the last token asks.
  const state = {layer: data.start[0], head: data.start[1], query: n - 1};
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.has("layer")) { const i = data.layers.indexOf(Number(hash.get("layer"))); if (i >= 0) state.layer = i; }
  if (hash.has("head")) {
    const h = hash.get("head");
    const i = h === "mean" ? data.heads.length : data.heads.indexOf(Number(h));
    if (i >= 0) state.head = i;
  }
  if (hash.has("query")) { const q = Number(hash.get("query")); if (q >= 0 && q < n) state.query = q; }

  const controls = el("div", "jattn-controls");
  const select = (label, options, key) => {
    const wrap = el("label", "", label + " ");
    const s = el("select");
    s.className = "jattn-" + key;
    options.forEach((text, i) => { const o = el("option", "", text); o.value = i; s.appendChild(o); });
    s.value = state[key];
    s.addEventListener("change", () => { state[key] = Number(s.value); draw(); });
    wrap.appendChild(s);
    controls.appendChild(wrap);
  };
  select("Layer", data.layers.map(String), "layer");
  select("Head", data.heads.map(String).concat(["mean"]), "head");
  root.appendChild(controls);

  const tokens = el("div", "jattn-tokens");
  const spans = data.tokens.map((t, i) => {
    const s = el("span", "jattn-token", t);
    s.dataset.position = i;
    const pick = () => { state.query = i; draw(); };
    s.addEventListener("mouseenter", pick);
    s.addEventListener("click", pick);
    tokens.appendChild(s);
    return s;
  });
  root.appendChild(tokens);
  const caption = el("div", "jattn-caption");
  root.appendChild(caption);

  // The pattern of the chosen layer and head: rows are queries.
  const pattern = () => {
    const heads = data.pattern[state.layer];
    if (state.head < data.heads.length) return heads[state.head];
    return heads[0].map((row, q) => row.map((_, k) => heads.reduce((s, h) => s + h[q][k], 0) / heads.length));
  };
  const shade = (w) => "rgba(31, 119, 180, " + Math.max(0, Math.min(1, w)).toFixed(3) + ")";

  let grid = null, cells = [];
  if (n <= data.max_grid) {
    grid = el("table", "jattn-grid");
    const head = el("thead"), top = el("tr");
    top.appendChild(el("th", "", "query \\ key"));
    data.tokens.forEach((t) => top.appendChild(el("th", "", t)));
    head.appendChild(top);
    grid.appendChild(head);
    const body = el("tbody");
    cells = data.tokens.map((t, q) => {
      const row = el("tr");
      row.appendChild(el("th", "", t));
      const tds = data.tokens.map((_, k) => {
        const td = el("td");
        td.addEventListener("mouseenter", () => { state.query = q; draw(); });
        row.appendChild(td);
        return td;
      });
      body.appendChild(row);
      return tds;
    });
    grid.appendChild(body);
    root.appendChild(grid);
  } else {
    const note = "(" + n + " tokens: the heatmap is shown up to " + data.max_grid + ")";
    root.appendChild(el("div", "jattn-caption", note));
  }

  function draw() {
    const p = pattern(), row = p[state.query];
    const headName = state.head < data.heads.length ? "head " + data.heads[state.head] : "mean over heads";
    root.dataset.layer = data.layers[state.layer];
    root.dataset.head = state.head < data.heads.length ? data.heads[state.head] : "mean";
    root.dataset.query = state.query;
    spans.forEach((s, k) => {
      s.classList.toggle("jattn-query", k === state.query);
      s.dataset.weight = row[k].toFixed(4);
      s.style.background = shade(row[k]);
      s.title = "attention from position " + state.query + ": " + row[k].toFixed(4);
    });
    caption.textContent = "Layer " + data.layers[state.layer] + ", " + headName + ": attention from position "
      + state.query + " (\u201c" + data.tokens[state.query] + "\u201d) to each token. Hover a token to change it.";
    if (grid) {
      grid.querySelectorAll("tbody tr").forEach((r, q) => r.classList.toggle("jattn-query", q === state.query));
      cells.forEach((tds, q) => tds.forEach((td, k) => {
        td.style.background = shade(p[q][k]);
        td.title = "query " + q + ", key " + k + ": " + p[q][k].toFixed(4);
      }));
    }
  }
  draw();
})();
"""


def attention_html(tokens, pattern, *, layers=None, heads=None, start: tuple[int, int] | None = None,
                   element_id: str | None = None) -> str:
    """The viewer as an HTML fragment (a ``div`` with its own style and script), to embed in a page.

    Args:
        tokens: the prompt's tokens as strings (``tokenizer.to_str_tokens(ids)``), ``seq`` of them.
        pattern: attention ``[n_layers, n_heads, seq, seq]`` (query x key) for this prompt, e.g.
            ``cache.stack("attn.pattern")[:, 0]``; ``[n_heads, seq, seq]`` for a single layer.
        layers: the layer number of each row of ``pattern`` (default 0, 1, ...).
        heads: the head numbers (default 0, 1, ...).
        start: the (layer, head) shown first, by their numbers (default the first of each).
        element_id: the viewer's HTML id (default: derived from the data, so a page is reproducible).
    """
    pattern = np.asarray(pattern, np.float64)
    if pattern.ndim == 3:
        pattern = pattern[None]
    tokens = [str(t) for t in tokens]
    if pattern.ndim != 4 or pattern.shape[2:] != (len(tokens), len(tokens)):
        raise ValueError(f"pattern must be [n_layers, n_heads, seq, seq] with seq = {len(tokens)} tokens, got "
                         f"shape {pattern.shape}")
    if not np.isfinite(pattern).all():
        raise ValueError("pattern holds NaN or infinite values")
    layers = list(range(pattern.shape[0])) if layers is None else [int(layer) for layer in layers]
    heads = list(range(pattern.shape[1])) if heads is None else [int(head) for head in heads]
    if len(layers) != pattern.shape[0] or len(heads) != pattern.shape[1]:
        raise ValueError(f"{len(layers)} layer labels and {len(heads)} head labels for a pattern of shape "
                         f"{pattern.shape} (layers, heads, query, key)")
    start = (layers[0], heads[0]) if start is None else tuple(int(i) for i in start)
    if start[0] not in layers or start[1] not in heads:
        raise ValueError(f"start={start} is not a (layer, head) of this pattern: layers {layers}, heads {heads}")
    data = {"tokens": tokens, "layers": layers, "heads": heads, "max_grid": MAX_GRID,
            "start": [layers.index(start[0]), heads.index(start[1])],
            "pattern": np.round(pattern, 4).tolist()}
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    element_id = element_id or "jattn-" + hashlib.sha256(text.encode()).hexdigest()[:10]
    # JSON inside <script>: "<", ">" and "&" escaped, so no token can close the script element.
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    script = SCRIPT.replace("__VIEWER_ID__", json.dumps(element_id))
    return (f'<style>{STYLE}</style><div class="jattn" id="{html.escape(element_id)}"></div>'
            f'<script type="application/json" id="{html.escape(element_id)}-data">{text}</script>'
            f"<script>{script}</script>")


def attention_page(tokens, pattern, *, title: str = "Attention patterns", **options) -> str:
    """The viewer as a complete HTML page (same arguments as ``attention_html``)."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
            f"<body><h1 style=\"font: 1.4em system-ui, sans-serif\">{html.escape(title)}</h1>"
            f"{attention_html(tokens, pattern, **options)}</body></html>")


def save_attention_page(path, tokens, pattern, **options) -> Path:
    """Writes ``attention_page(...)`` to ``path`` (UTF-8); returns the path."""
    Path(path).write_text(attention_page(tokens, pattern, **options), encoding="utf-8")
    return Path(path)
