"""The attention viewer, rendered by headless Chromium: the tokens shown are the prompt's (as text,
even when a token is markup), the shading is the chosen head's attention row, changing the head
or the query changes it, and the page logs nothing to the console."""

import html.parser
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from jinterp.attention_view import MAX_GRID, attention_html, save_attention_page

CHROMIUM = Path("/usr/bin/chromium")
TOKENS = ["<bos>", "<img src=x onerror=\"console.error('injected')\">", " Mary", " &amp;", ' "quoted"', "</script>",
          " end"]


def causal_softmax(shape, seed=0):
    logits = np.random.default_rng(seed).normal(size=shape) * 2
    n = shape[-1]
    logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


class Viewer(html.parser.HTMLParser):
    """The rendered viewer's state from a DOM dump: its data attributes, each token span's text and
    weight, the heatmap cells' titles, the script elements."""

    def __init__(self, text: str):
        super().__init__()
        self.root, self.tokens, self.weights, self.cells, self.scripts = {}, [], [], [], 0
        self._in_token = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        self.scripts += tag == "script"
        if "jattn" in classes:
            self.root = attrs
        if tag == "span" and "jattn-token" in classes:
            self.tokens.append("")
            self.weights.append(float(attrs["data-weight"]))
            self._in_token = True
        if tag == "td":
            self.cells.append(attrs["title"])

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_token = False

    def handle_data(self, data):
        if self._in_token:
            self.tokens[-1] += data


def render(page: Path, fragment: str, tmp_path: Path) -> tuple[Viewer, list[str]]:
    """The DOM after the page's scripts ran, and the console messages Chromium logged."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent (Debian: apt-get install chromium; .ci/run installs it where "
                    "apt is usable)")
    profile = tmp_path / f"profile-{abs(hash(fragment))}"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom",
               f"{page.as_uri()}#{fragment}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return Viewer(done.stdout), console


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    pattern = causal_softmax((2, 3, len(TOKENS), len(TOKENS)))
    path = save_attention_page(tmp_path_factory.mktemp("view") / "attention.html", TOKENS, pattern, layers=[3, 5])
    return path, pattern


def test_viewer_shows_the_tokens_and_the_chosen_heads_attention(page, tmp_path):
    path, pattern = page
    shown = {}
    for fragment, (layer, head) in {"layer=5&head=2&query=4": (1, 2), "layer=3&head=0&query=4": (0, 0)}.items():
        viewer, console = render(path, fragment, tmp_path)
        assert console == [], console  # no errors, and the <script> token did not run
        assert viewer.tokens == TOKENS  # shown as text, character for character
        assert viewer.scripts == 2  # the viewer's data and code: no token became a script element
        assert viewer.root["data-layer"] == str([3, 5][layer]) and viewer.root["data-head"] == str(head)
        # Formula, not measured (no chromium here): the page holds 4 decimals, half a unit 5e-5, plus float32.
        np.testing.assert_allclose(viewer.weights, pattern[layer, head, 4], atol=6e-5, rtol=0)
        assert len(viewer.cells) == len(TOKENS) ** 2
        assert viewer.cells[4 * len(TOKENS) + 2] == f"query 4, key 2: {pattern[layer, head, 4, 2]:.4f}"
        shown[fragment] = viewer.weights
    assert shown["layer=5&head=2&query=4"] != shown["layer=3&head=0&query=4"]  # the head changes the view

    viewer, console = render(path, "layer=5&head=mean&query=6", tmp_path)
    assert console == [] and viewer.root["data-head"] == "mean"
    # The mean of 4-decimal data, shown to 4 decimals: two roundings of 5e-5, plus float32 (formula).
    np.testing.assert_allclose(viewer.weights, pattern[1, :, 6].mean(0), atol=1.1e-4, rtol=0)


def test_menus_and_hovering_change_the_view(page, tmp_path):
    path, pattern = page
    # What a user does, as events: pick layer 5 (the second), head 1, then hover the third token.
    interact = """<script>
      const pick = (cls, value) => { const s = document.querySelector(cls); s.value = value;
                                     s.dispatchEvent(new Event("change")); };
      pick(".jattn-layer", "1"); pick(".jattn-head", "1");
      document.querySelectorAll(".jattn-token")[2].dispatchEvent(new MouseEvent("mouseenter"));
    </script>"""
    scripted = tmp_path / "scripted.html"
    scripted.write_text(path.read_text().replace("</body>", interact + "</body>"))
    viewer, console = render(scripted, "", tmp_path)
    assert console == [], console
    assert (viewer.root["data-layer"], viewer.root["data-head"], viewer.root["data-query"]) == ("5", "1", "2")
    np.testing.assert_allclose(viewer.weights, pattern[1, 1, 2], atol=6e-5, rtol=0)  # 4 decimals, as above


def test_page_is_self_contained(page):
    text = page[0].read_text()
    data_start = text.index('<script type="application/json"')
    data_end = text.index("</script>", data_start)
    assert "<img" not in text[data_start:data_end]  # the token is in the JSON data, escaped
    code = text[:data_start] + text[data_end:]  # the markup, style and script, without the prompt's tokens
    for fetch in ("http://", "https://", "src=", "href=", "@import", "url("):
        assert fetch not in code


def test_long_prompts_show_tokens_without_the_heatmap_table():
    n = MAX_GRID + 1
    fragment = attention_html([f"t{i}" for i in range(n)], causal_softmax((1, 1, n, n)))
    assert '"max_grid":160' in fragment


def test_bad_patterns_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"seq = 3 tokens, got shape \(2, 2, 4, 4\)"):
        attention_html(["a", "b", "c"], np.ones((2, 2, 4, 4)))
    with pytest.raises(ValueError, match="1 layer labels and 2 head labels"):
        attention_html(["a", "b"], np.ones((2, 2, 2, 2)), layers=[7])
    with pytest.raises(ValueError, match="NaN or infinite"):
        attention_html(["a"], np.full((1, 1, 1, 1), np.nan))
