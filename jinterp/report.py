"""A self-contained HTML report: headings, text, tables and matplotlib figures (saved as PNGs
and embedded, so the one file opens from disk anywhere)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402

from jinterp.attention_view import attention_html  # noqa: E402
from jinterp.paths import inside  # noqa: E402

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


class Report:
    """Build with ``heading``, ``text``, ``figure``, ``table``, ``code``; then ``write(directory)``."""

    def __init__(self, title: str, plots: Path):
        self.title = title
        self.plots = Path(plots)
        self.parts = [f"<h1>{html.escape(title)}</h1>"]

    def run_section(self, config, info: dict, summary: str) -> None:
        """The closing "Run" section: each step's time (and whether it was restored), ``summary``,
        and the config and environment the run recorded."""
        from jinterp.runs import config_dict  # runs needs no report; the import stays one-way at load

        self.heading("Run")
        self.table(["step", "seconds", "restored from checkpoint"],
                   [[name, t["seconds"], t["restored"]] for name, t in info.get("steps", {}).items()], summary)
        self.code({"config": config_dict(config), "config_hash": info.get("config_hash"),
                   "environment": info.get("environment")})

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def figure(self, fig, name: str, caption: str = "") -> Path:
        """Saves ``fig`` as ``plots/NAME.png``, embeds it, closes it."""
        self.plots.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        path = inside(self.plots, f"{name}.png")
        path.write_bytes(buffer.getvalue())
        data = base64.b64encode(buffer.getvalue()).decode()
        self.parts.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return path

    def attention(self, tokens, pattern, caption: str = "", **options) -> None:
        """Embeds the interactive attention viewer (``jinterp.attention_view``) for one prompt:
        ``pattern [n_layers, n_heads, seq, seq]``, ``tokens`` its ``seq`` token strings."""
        self.parts.append(f"<figure>{attention_html(tokens, pattern, **options)}"
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def table(self, columns: list[str], rows: list[list], caption: str = "") -> None:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
        caption = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{caption}<tr>{head}</tr>{body}</table>")

    def code(self, value) -> None:
        text = value if isinstance(value, str) else json.dumps(value, indent=2)
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def write(self, path: Path) -> Path:
        page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
                f"<style>{STYLE}</style></head><body>{''.join(self.parts)}</body></html>")
        Path(path).write_text(page)
        return Path(path)


def write_json(path: Path, data) -> None:
    """``data`` as strict JSON: NaN and infinities (not JSON) become null."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return [clean(v) for v in value] if isinstance(value, (list, tuple)) else value

    Path(path).write_text(json.dumps(clean(data), indent=2, allow_nan=False))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.3f}"
    return str(value)
