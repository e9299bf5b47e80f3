"""Feature dashboards: one self-contained HTML page (no script, nothing fetched) showing, per chosen
latent of an SAE, transcoder or crosscoder, what it does on a set of token sequences.

    dashboard(sae, model, tokens, "features.html", latents="density", n_latents=20, token_strings=tokenizer)

Per latent: its density (the fraction of tokens it fires on) and the histogram of its nonzero
activations (log10), the top-activating contexts and contexts sampled across quantiles of the
activation range (each token shaded by the latent's activation there, the value in its tooltip),
the tokens whose logits its decoder direction raises and lowers most through ``W_U`` (the direct
logit effect, the final norm left out), and for a crosscoder each model's decoder norm.

The activations are streamed: the model runs a chunk of sequences at a time (as many as fit
``memory_budget``, see ``ModelActivations``), and only the chosen latents' activations are kept
(``n_latents x tokens`` floats). Choosing latents by density or by a query takes one pass more.
Every text shown (tokens, names) is escaped: a token ``<script>`` is displayed, never run.
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from jinterp.sae.autoencoder import SAE
from jinterp.sae.crosscoder import Crosscoder, check_same_inputs
from jinterp.sae.sources import ModelActivations, _compiled_activations

CHOICES = ("index", "density", "query")


@dataclasses.dataclass(frozen=True)
class Context:
    """A window of one sequence: ``sequence`` (its row in ``tokens``), ``start`` (its first position),
    ``tokens [w]`` ids, ``activations [w]`` the latent's there, ``peak`` the window's maximum."""

    sequence: int
    start: int
    tokens: np.ndarray
    activations: np.ndarray
    peak: float


@dataclasses.dataclass(frozen=True)
class LatentCard:
    """What the dashboard shows of one latent."""

    latent: int
    density: float
    max_activation: float
    histogram: tuple[np.ndarray, np.ndarray]  # counts, edges of log10 nonzero activations
    top: list[Context]
    quantiles: list[tuple[float, float, list[Context]]]  # (low, high, contexts) per activation interval
    top_logits: list[tuple[int, float]]
    bottom_logits: list[tuple[int, float]]
    decoder_norms: list[tuple[str, float]] | None  # a crosscoder's, per model


def _models_and_dictionary(sae, model):
    if isinstance(sae, Crosscoder):
        models = tuple(model) if isinstance(model, tuple | list) else None
        if models is None or len(models) != sae.n_models:
            raise ValueError(f"A crosscoder's dashboard runs its {sae.n_models} models {sae.models}: pass them as a "
                             f"tuple, got {type(model).__name__}")
        return models, sae.sae
    if not isinstance(sae, SAE):
        raise ValueError(f"dashboard takes an SAE, a transcoder or a Crosscoder, got {type(sae).__name__}")
    return (model,), sae


@eqx.filter_jit
def _encode(sae: SAE, x, chosen, query_mask):
    latents = sae.encode(x)
    return (latents > 0).sum(axis=0), jnp.where(query_mask[:, None], latents, 0).sum(axis=0), latents[:, chosen]


def _stream(sae: SAE, sources, tokens: np.ndarray, chosen: np.ndarray, query: np.ndarray | None):
    """One pass over ``tokens``: per-latent firing counts and summed activation on query tokens, and the
    chosen latents' activations ``[n_seq, seq, len(chosen)]``."""
    n_seq, seq = tokens.shape
    chunk = min(source.sequences_per_forward(n_seq) for source in sources)
    counts = np.zeros(sae.d_sae, np.int64)
    on_query = np.zeros(sae.d_sae)
    values = np.zeros((n_seq, seq, len(chosen)), np.float32)
    cuts = [source._cut() for source in sources]  # each model cut after the site once, not per chunk
    for i in range(0, n_seq, chunk):
        part = jnp.asarray(tokens[i:i + chunk])
        x = jnp.concatenate([_compiled_activations(cut, part) for cut in cuts], axis=-1)
        mask = np.zeros(part.size, bool) if query is None else np.isin(np.asarray(part).reshape(-1), query)
        c, q, v = _encode(sae, x, jnp.asarray(chosen, jnp.int32), jnp.asarray(mask))
        counts += np.asarray(c)
        on_query += np.asarray(q, np.float64)
        values[i:i + chunk] = np.asarray(v).reshape(len(part), seq, len(chosen))
    return counts, on_query, values


def _window(values: np.ndarray, tokens: np.ndarray, sequence: int, window: int) -> Context:
    row = values[sequence]
    peak = int(np.argmax(row))
    start = max(0, peak - window)
    stop = min(len(row), peak + window + 1)
    return Context(sequence, start, tokens[sequence, start:stop], row[start:stop], float(row[peak]))


def latent_cards(sae, model, tokens, latents=None, *, n_latents: int = 10, query=None, n_contexts: int = 5,
                 quantiles: int = 4, per_quantile: int = 2, window: int = 8, bins: int = 30, n_logits: int = 8,
                 logit_model: int | str = -1, memory_budget: float | None = None) -> list[LatentCard]:
    """The data of ``dashboard`` (same arguments) without the HTML."""
    models, dictionary = _models_and_dictionary(sae, model)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_seq, seq], got shape {tokens.shape}")
    if dictionary.site is None:
        raise ValueError("The SAE records no site (sae.site is None): set it, e.g. "
                         "dataclasses.replace(sae, site='blocks.3.resid_post')")
    names = sae.models if isinstance(sae, Crosscoder) else ("model",)
    if len(models) > 1:
        check_same_inputs(models, dictionary.site, names)
    n_seq = tokens.shape[0]
    if not isinstance(n_contexts, int) or not 1 <= n_contexts <= n_seq:
        raise ValueError(f"n_contexts={n_contexts!r} top contexts asked for, but {n_seq} sequences are streamed "
                         f"(one context per sequence): valid range [1, {n_seq}]")
    sources = [ModelActivations(m, jnp.asarray(tokens), dictionary.site, 1, memory_budget=memory_budget)
               for m in models]
    d_sae = dictionary.d_sae
    choice = latents.lower() if isinstance(latents, str) else None  # else indices (a list or an array)
    if latents is None or choice == "index":
        chosen = np.arange(min(n_latents, d_sae))
    elif choice in ("density", "query"):
        if choice == "query" and query is None:
            raise ValueError("latents='query' needs query= (token ids whose positions rank the latents)")
        q = None if query is None else np.asarray(query).reshape(-1)
        counts, on_query, _ = _stream(dictionary, sources, tokens, np.zeros(0, np.int64), q)
        score = counts if choice == "density" else on_query
        chosen = np.argsort(-score, kind="stable")[:n_latents]
    elif isinstance(latents, str):
        raise ValueError(f"latents={latents!r}: give latent indices or one of {', '.join(CHOICES)}")
    else:
        chosen = np.asarray(latents).reshape(-1)
        if not np.issubdtype(chosen.dtype, np.integer):
            raise ValueError(f"latents must be integer indices, got {chosen.dtype}")
        bad = chosen[(chosen < 0) | (chosen >= d_sae)]
        if bad.size:
            raise ValueError(f"latent {int(bad[0])} is out of range: this dictionary has {d_sae} latents, "
                             f"valid indices [0, {d_sae - 1}]")
    counts, _, values = _stream(dictionary, sources, tokens, chosen, None)

    # The logit effects: each latent's decoder direction (in the chosen model) through that model's W_U.
    m = sae.model_index(logit_model if logit_model != -1 else sae.n_models - 1) if isinstance(sae, Crosscoder) else 0
    W_dec = np.asarray(sae.W_dec[:, m] if isinstance(sae, Crosscoder) else dictionary.W_dec, np.float64)
    W_U = getattr(models[m], "W_unembed", None)
    fits = W_U is not None and W_U.shape[0] == W_dec.shape[1]
    effects = W_dec[chosen] @ np.asarray(W_U, np.float64) if fits else None
    norms = np.asarray(sae.decoder_norms()) if isinstance(sae, Crosscoder) else None

    cards = []
    for j, latent in enumerate(chosen):
        v = values[..., j]
        nonzero = v[v > 0]
        peaks = v.max(axis=1)
        order = np.argsort(-peaks, kind="stable")
        top = [_window(v, tokens, int(s), window) for s in order[:n_contexts] if peaks[s] > 0]
        top_value = float(peaks.max()) if peaks.size else 0.0
        intervals = []
        if top_value > 0:
            edges = np.linspace(0, top_value, quantiles + 1)
            for low, high in zip(edges[:-1], edges[1:]):
                inside = np.flatnonzero((peaks > low) & (peaks <= high))
                picks = inside[np.linspace(0, len(inside) - 1, min(per_quantile, len(inside))).astype(int)] \
                    if len(inside) else []
                intervals.append((float(low), float(high), [_window(v, tokens, int(s), window) for s in picks]))
        histogram = np.histogram(np.log10(nonzero), bins=bins) if nonzero.size else (np.zeros(0), np.zeros(0))
        top_logits = bottom_logits = []
        if effects is not None:
            e = effects[j]
            up, down = np.argsort(-e, kind="stable")[:n_logits], np.argsort(e, kind="stable")[:n_logits]
            top_logits, bottom_logits = [(int(t), float(e[t])) for t in up], [(int(t), float(e[t])) for t in down]
        cards.append(LatentCard(int(latent), float(counts[latent] / tokens.size), top_value, histogram, top,
                                intervals, top_logits, bottom_logits,
                                None if norms is None else list(zip(sae.models, norms[latent].tolist()))))
    return cards


# HTML --------------------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
.jdash-card { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em 1em; margin: 1em 0; }
.jdash-card h2 { margin: 0 0 0.4em 0; font-size: 1.15em; }
.jdash-row { display: flex; flex-wrap: wrap; gap: 2em; }
.jdash-ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 0.15em 0; }
.jdash-tok { white-space: pre; border-radius: 2px; }
.jdash-meta { color: #666; font-size: 0.85em; }
table.jdash-logits { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 0.9em; }
table.jdash-logits td { padding: 0 0.6em; }
.jdash-pos { color: #1a7f37; } .jdash-neg { color: #b42318; }
"""


def _token_text(token_strings, ids) -> list[str]:
    ids = [int(i) for i in ids]
    if token_strings is None:
        return [f"[{i}]" for i in ids]
    if callable(getattr(token_strings, "to_str_tokens", None)):
        return [str(t) for t in token_strings.to_str_tokens(ids)]
    if callable(token_strings):
        return [str(t) for t in token_strings(ids)]
    return [str(token_strings[i]) for i in ids]


def _context_html(context: Context, scale: float, token_strings) -> str:
    spans = []
    for text, a in zip(_token_text(token_strings, context.tokens), context.activations):
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, float(a) / scale))
        spans.append(f'<span class="jdash-tok" data-activation="{float(a):.4g}" title="{float(a):.4g}" '
                     f'style="background: rgba(255, 140, 0, {alpha:.3f})">{html.escape(text)}</span>')
    meta = f'<span class="jdash-meta">seq {context.sequence}, max {context.peak:.3g}: </span>'
    return f'<div class="jdash-ctx">{meta}{"".join(spans)}</div>'


def _histogram_svg(counts: np.ndarray, edges: np.ndarray) -> str:
    if counts.size == 0:
        return '<p class="jdash-meta">never fires on these tokens</p>'
    width, height = 300, 80
    peak = max(int(counts.max()), 1)
    bar = width / len(counts)
    rects = "".join(f'<rect x="{i * bar:.1f}" y="{height - height * c / peak:.1f}" width="{bar * 0.9:.1f}" '
                    f'height="{height * c / peak:.1f}" fill="#ff8c00"/>' for i, c in enumerate(counts))
    return (f'<svg class="jdash-hist" width="{width}" height="{height + 16}">'
            f'{rects}<text x="0" y="{height + 13}" font-size="10">10^{edges[0]:.2f}</text>'
            f'<text x="{width}" y="{height + 13}" font-size="10" text-anchor="end">10^{edges[-1]:.2f}</text></svg>')


def _card_html(card: LatentCard, token_strings) -> str:
    parts = [f'<div class="jdash-card" id="latent-{card.latent}" data-latent="{card.latent}">',
             f"<h2>Latent {card.latent}</h2>",
             f'<p class="jdash-meta">density {card.density:.4%} of tokens; '
             f"max activation {card.max_activation:.4g}</p>",
             '<div class="jdash-row"><div><b>Activation histogram</b> (log10 of nonzero activations)<br>',
             _histogram_svg(*card.histogram), "</div>"]
    if card.top_logits:
        rows = "".join(f'<tr><td class="jdash-pos">{html.escape(a)}</td><td>{x:+.3f}</td>'
                       f'<td class="jdash-neg">{html.escape(b)}</td><td>{y:+.3f}</td></tr>'
                       for a, x, b, y in zip(_token_text(token_strings, [t for t, _ in card.top_logits]),
                                             [v for _, v in card.top_logits],
                                             _token_text(token_strings, [t for t, _ in card.bottom_logits]),
                                             [v for _, v in card.bottom_logits]))
        parts.append(f'<div><b>Logit effects</b> (top +/-)<table class="jdash-logits">{rows}</table></div>')
    if card.decoder_norms:
        total = sum(n for _, n in card.decoder_norms) or 1.0
        bars = "".join(f'<div>{html.escape(name)} <span style="display:inline-block;background:#1f77b4;'
                       f'height:0.8em;width:{100 * n / total:.1f}px"></span> {n:.3g}</div>'
                       for name, n in card.decoder_norms)
        parts.append(f'<div class="jdash-norms"><b>Decoder norm per model</b>{bars}</div>')
    parts.append("</div><h3>Top activations</h3>")
    parts += [_context_html(c, card.max_activation, token_strings) for c in card.top]
    for low, high, contexts in card.quantiles[::-1]:
        if contexts:
            parts.append(f"<h3>Interval ({low:.3g}, {high:.3g}]</h3>")
            parts += [_context_html(c, card.max_activation, token_strings) for c in contexts]
    parts.append("</div>")
    return "".join(parts)


def dashboard(sae, model, tokens, path=None, latents=None, *, n_latents: int = 10, query=None,
              token_strings=None, title: str | None = None, n_contexts: int = 5, quantiles: int = 4,
              per_quantile: int = 2, window: int = 8, bins: int = 30, n_logits: int = 8,
              logit_model: int | str = -1, memory_budget: float | None = None) -> str:
    """Feature dashboards of ``sae`` on ``tokens`` as one self-contained HTML page; written to
    ``path`` if given; returns the HTML.

    Args:
        sae: an ``SAE`` (or transcoder: it reads ``sae.site``) or a ``Crosscoder``.
        model: the model the SAE reads (a crosscoder: the tuple of its models, in its order).
        tokens: ``[n_seq, seq]`` token ids, streamed a chunk of sequences at a time.
        latents: which latents: indices, ``"index"`` (the first ``n_latents``, the default),
            ``"density"`` (the ``n_latents`` that fire most often) or ``"query"`` (the ``n_latents``
            with the largest summed activation on the tokens whose id is in ``query``).
        token_strings: how ids are shown: a tokenizer (``to_str_tokens``), a function of a list of
            ids, or a list of strings indexed by id; default ``[id]``.
        n_contexts: top-activating contexts per latent (one per sequence: at most ``n_seq``).
        quantiles, per_quantile: the activation range split into this many intervals, and the
            contexts sampled from each (by the sequence's maximum).
        window: tokens shown either side of a context's maximum.
        bins: of the activation histogram.
        n_logits: tokens listed whose logits the latent raises / lowers most.
        logit_model: a crosscoder's model whose decoder block and ``W_U`` give the logit effects
            (default the last, e.g. the fine-tune).
        memory_budget: bytes for one forward's activations (``ModelActivations``); a crosscoder's
            models each get it (their forwards' activations and cut weights are not summed).
    """
    cards = latent_cards(sae, model, tokens, latents, n_latents=n_latents, query=query, n_contexts=n_contexts,
                         quantiles=quantiles, per_quantile=per_quantile, window=window, bins=bins,
                         n_logits=n_logits, logit_model=logit_model, memory_budget=memory_budget)
    title = title or f"Feature dashboard: {sae.site}"
    kind = "crosscoder" if isinstance(sae, Crosscoder) else "transcoder" if sae.is_transcoder else "SAE"
    header = (f"<h1>{html.escape(title)}</h1><p class=\"jdash-meta\">{kind}, {sae.d_sae} latents, "
              f"{np.asarray(tokens).size} tokens ({len(tokens)} sequences)</p>")
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{header}"
            f"{''.join(_card_html(card, token_strings) for card in cards)}</body></html>")
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page
