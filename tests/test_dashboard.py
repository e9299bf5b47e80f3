"""Feature dashboards: what the page shows of a latent is what a direct computation gives (density,
top contexts, logit effects, a crosscoder's decoder norms), the same under a small memory budget;
bad requests name the valid range; text is escaped, and headless Chromium renders the page with
the markup-like token shown as text and nothing run."""

import dataclasses
import html.parser
import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOY, random_tokens

import jinterp
from jinterp.sae import SAE, Crosscoder
from jinterp.sae.dashboard import dashboard, latent_cards

SITE = "blocks.1.resid_post"
CHROMIUM = Path("/usr/bin/chromium")
TOKENS = random_tokens(TOY.d_vocab, (12, 10), seed=4)
# Token 5 is markup: shown as text, never run.
VOCAB = [f"t{i}" for i in range(TOY.d_vocab)]
VOCAB[5] = "<script>console.error('injected')</script>"
VOCAB[6] = '<img src=x onerror="console.error(1)">'


@pytest.fixture(scope="module")
def sae():
    return SAE.init(TOY.d_model, 24, "relu", key=jax.random.key(3), site=SITE)


def direct_latents(model, sae, tokens=TOKENS):
    _, cache = jinterp.run(model, tokens, capture=[SITE])
    return np.asarray(sae.encode(cache[SITE]))  # [n_seq, seq, d_sae]


def test_the_cards_show_what_a_direct_computation_gives(toy, sae):
    latents = direct_latents(toy, sae)
    cards = latent_cards(sae, toy, TOKENS, np.array([3, 0, 7]), n_contexts=4, window=2)  # or a list
    assert [c.latent for c in cards] == [3, 0, 7]
    for card in cards:
        v = latents[..., card.latent]
        assert card.density == pytest.approx((v > 0).mean(), abs=0)  # counts of the same comparisons
        np.testing.assert_allclose(card.max_activation, v.max(), rtol=1e-5)  # measured 0 (other batching)
        peaks = v.max(axis=1)
        assert [c.sequence for c in card.top] == list(np.argsort(-peaks, kind="stable")[:4])
        top = card.top[0]
        np.testing.assert_allclose(top.activations, v[top.sequence, top.start:top.start + len(top.tokens)],
                                   rtol=1e-5, atol=1e-6)  # measured 0
        assert list(top.tokens) == list(TOKENS[top.sequence, top.start:top.start + len(top.tokens)])
        assert card.histogram[0].sum() == (v > 0).sum()
        effect = np.asarray(sae.W_dec[card.latent] @ toy.W_unembed)
        assert card.top_logits[0][0] == int(effect.argmax()) and card.bottom_logits[0][0] == int(effect.argmin())
        for low, high, contexts in card.quantiles:
            assert all(low < c.peak <= high for c in contexts)
    # Chosen by density: the latents firing on most tokens, most first.
    density = (latents > 0).mean(axis=(0, 1))
    by_density = latent_cards(sae, toy, TOKENS, "density", n_latents=3)
    assert [c.latent for c in by_density] == list(np.argsort(-density, kind="stable")[:3])
    # By a query: the largest summed activation on the query's tokens.
    on_query = np.where(np.isin(TOKENS, [5, 6])[..., None], latents, 0).sum(axis=(0, 1))
    by_query = latent_cards(sae, toy, TOKENS, "query", query=[5, 6], n_latents=2)
    assert [c.latent for c in by_query] == list(np.argsort(-on_query, kind="stable")[:2])


def test_a_small_memory_budget_streams_the_same_cards(toy, sae):
    whole = latent_cards(sae, toy, TOKENS, [1, 2])
    budget = 160_000  # the cut model's weights (71 kB) and two sequences' activations (36 kB each)
    from jinterp.sae import ModelActivations
    assert ModelActivations(toy, jnp.asarray(TOKENS), SITE, 1, memory_budget=budget).sequences_per_forward(12) == 2
    parts = latent_cards(sae, toy, TOKENS, [1, 2], memory_budget=budget)
    for a, b in zip(whole, parts):
        assert a.density == b.density and [c.sequence for c in a.top] == [c.sequence for c in b.top]
        np.testing.assert_allclose(a.max_activation, b.max_activation, rtol=1e-6)  # measured 0


def test_bad_requests_name_the_valid_range(toy, sae):
    with pytest.raises(ValueError, match=r"latent 24 is out of range.*\[0, 23\]"):
        latent_cards(sae, toy, TOKENS, [2, 24])
    with pytest.raises(ValueError, match=r"12 sequences are streamed.*valid range \[1, 12\]"):
        latent_cards(sae, toy, TOKENS, [2], n_contexts=13)
    with pytest.raises(ValueError, match="needs query"):
        latent_cards(sae, toy, TOKENS, "query")


def test_a_crosscoder_dashboard_shows_each_models_decoder_norm(toy):
    import equinox as eqx
    other = eqx.tree_at(lambda m: m.W_E, toy, toy.W_E * 1.1)
    inner = SAE.init(2 * TOY.d_model, 16, "relu", key=jax.random.key(5), site=SITE)
    inner = dataclasses.replace(inner, W_dec=inner.W_dec.at[:, TOY.d_model:].multiply(0.25))
    cc = Crosscoder(inner, ("base", "chat"))
    cards = latent_cards(cc, (toy, other), TOKENS, [0, 3], logit_model="base")
    norms = np.asarray(cc.decoder_norms())
    assert cards[1].decoder_norms == [("base", pytest.approx(norms[3, 0])), ("chat", pytest.approx(norms[3, 1]))]
    _, c1 = jinterp.run(toy, TOKENS, capture=[SITE])
    _, c2 = jinterp.run(other, TOKENS, capture=[SITE])
    v = np.asarray(cc.encode(jnp.stack([c1[SITE], c2[SITE]], axis=-2)))[..., 3]
    np.testing.assert_allclose(cards[1].max_activation, v.max(), rtol=1e-5)  # measured 0
    effect = np.asarray(cc.W_dec[3, 0] @ toy.W_unembed)
    assert cards[1].top_logits[0][0] == int(effect.argmax())
    with pytest.raises(ValueError, match="tuple"):
        latent_cards(cc, toy, TOKENS, [0])
    page = dashboard(cc, (toy, other), TOKENS, latents=[3])
    assert "Decoder norm per model" in page and "chat" in page


class Page(html.parser.HTMLParser):
    """Token spans' text and the number of script elements in a rendered DOM."""

    def __init__(self, text):
        super().__init__()
        self.tokens, self.scripts, self.cards, self._in = [], 0, [], False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.scripts += tag == "script"
        if "jdash-card" in (attrs.get("class") or ""):
            self.cards.append(attrs["data-latent"])
        if tag == "span" and attrs.get("class") == "jdash-tok":
            self.tokens.append("")
            self._in = True

    def handle_endtag(self, tag):
        if tag == "span":
            self._in = False

    def handle_data(self, data):
        if self._in:
            self.tokens[-1] += data


def test_the_page_is_self_contained_escaped_and_renders(toy, sae, tmp_path):
    tokens = TOKENS.copy()
    tokens[0, :4] = [5, 6, 5, 6]
    path = tmp_path / "dashboard.html"
    page = dashboard(sae, toy, tokens, path, latents="query", query=[5], n_latents=3, token_strings=VOCAB)
    assert "<script" not in page and "<img" not in page  # the markup-like tokens are escaped
    assert "&lt;script&gt;" in page
    for fetch in ("http://", "https://", "src=", "href=", "@import", "url("):
        assert fetch not in page.replace("&lt;img src=x", "")
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent (Debian: apt-get install chromium)")
    profile = tmp_path / "profile"
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run(flags + ["--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if ":CONSOLE" in line] == []  # nothing ran
    rendered = Page(done.stdout)
    assert rendered.scripts == 0 and len(rendered.cards) == 3
    assert VOCAB[5] in rendered.tokens and VOCAB[6] in rendered.tokens  # shown as text
    shot = tmp_path / "dashboard.png"
    done = subprocess.run(flags + ["--hide-scrollbars", "--window-size=1100,900", f"--screenshot={shot}",
                                   path.as_uri()], capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]
    keep = os.environ.get("JINTERP_SCREENSHOTS")  # the README's docs/dashboard.png: JINTERP_SCREENSHOTS=docs
    if keep:
        shutil.copy(shot, Path(keep) / "dashboard.png")
