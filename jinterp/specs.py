"""Site specs: what a model declares about each of its sites, and how names are matched against them.

Every model (jinterp's ``Transformer``, a wrapped Equinox / Flax model) declares its sites as
``SiteSpec``s, in forward order, for given inputs; names given by a user (any accepted spelling,
globs, ``"all"``) are matched here, once, for every model.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from jinterp import names as S


class SiteSpec(NamedTuple):
    """One site: its full ``name``, its ``kind`` and ``layer`` (``names.site_key``), its value's
    ``shape`` and ``dtype``, and the names of its ``axes`` (``batch``, ``pos``, ``head``, ...).
    ``held``: the share of the value the plain forward holds at once (0: computed only when an
    intervention asks for it, like ``attn.result``; a long sequence's attention scores: one chunk of
    queries; a mixture's ``moe.expert_out``: one expert's working set), for the memory estimate."""

    name: str
    kind: str
    layer: int | None
    shape: tuple
    dtype: Any
    axes: tuple[str, ...]
    held: float = 1.0


class Specs(Mapping):
    """A model's site specs by name, in forward order: immutable and hashable, so that what is
    computed from them (which sites a name matches, a run's capture plan) can be memoised."""

    def __init__(self, specs: Iterable[SiteSpec]):
        self._specs = {spec.name: spec for spec in specs}
        self._hash = hash(tuple(self._specs.values()))

    def __getitem__(self, name: str) -> SiteSpec:
        return self._specs[name]

    def __iter__(self):
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, Specs) and self._hash == other._hash and self._specs == other._specs)

    def __repr__(self) -> str:
        return f"Specs({len(self)} sites: {', '.join(list(self)[:4])}{', ...' if len(self) > 4 else ''})"


def canonical(name) -> str:
    """A name in jinterp's spelling (TransformerLens names and short forms resolved); another model's
    site names as given."""
    site = S.parse(name)
    if site.kind in S.SITE_AXES:
        return site.name
    if not isinstance(name, str):
        raise TypeError(f"A site name is a string, got {name!r}")
    return name


def patterns_of(sites) -> list:
    """A site name, a glob, ``"all"`` / True, a get_act_name tuple, or a list of them -> a list."""
    if sites is None or sites is False:
        return []
    if sites is True or sites == "all":
        return ["*"]
    if isinstance(sites, str) or (isinstance(sites, tuple) and any(isinstance(c, int) for c in sites)):
        return [sites]
    return list(sites)


def match(specs: Specs, sites) -> tuple[str, ...]:
    """The names of the sites that ``sites`` (names in any spelling, globs such as ``blocks.*.attn.*``,
    ``"all"``, or a list of them) name, in the order given, each once. Unknown names raise an error
    listing the closest valid ones."""
    patterns = patterns_of(sites)
    try:
        return _memoised_match(specs, tuple(patterns))
    except TypeError:  # an unhashable spelling (a list as a short form): match without the memo
        return _match(specs, patterns)


@functools.lru_cache(maxsize=256)
def _memoised_match(specs: Specs, patterns: tuple) -> tuple[str, ...]:
    return _match(specs, patterns)


def _match(specs: Specs, patterns) -> tuple[str, ...]:
    found = []
    for pattern in patterns:
        name = canonical(pattern)
        if any(ch in name for ch in "*?["):
            matched = [n for n in specs if fnmatch.fnmatchcase(n, name)]
            if not matched:
                raise ValueError(f"Site pattern {pattern!r} matches no site; jinterp.sites(model) lists them")
            found += matched
        else:
            found.append(lookup(specs, pattern).name)
    return tuple(dict.fromkeys(found))


def lookup(specs: Specs, name) -> SiteSpec:
    """The spec of one site, by any spelling of its name."""
    spec = specs.get(name) if isinstance(name, str) else None
    spec = spec or specs.get(canonical(name))
    if spec is None:
        raise unknown_site(name, specs)
    return spec


def of_kind(specs: Specs, kind: str) -> list[SiteSpec]:
    return [spec for spec in specs.values() if spec.kind == kind]


def layers_of(specs: Specs, kind: str) -> tuple[int, ...]:
    return tuple(spec.layer for spec in of_kind(specs, kind) if spec.layer is not None)


def unknown_site(name, specs: Specs, kinds: Iterable[str] = ()) -> ValueError:
    """The error for a site a model lacks: why (no such kind here, a layer out of range, a block site
    without a layer), the closest valid names, and where to look them up."""
    site = S.site_key(name) if isinstance(name, (str, tuple)) else S.Site(str(name), None)
    by_kind: dict[str, list[int | None]] = {}
    for spec in specs.values():
        by_kind.setdefault(spec.kind, []).append(spec.layer)
    layers = [layer for layer in by_kind.get(site.kind, ()) if layer is not None]
    if site.kind in by_kind and isinstance(site.layer, int) and site.layer not in layers:
        return ValueError(f"Site {name!r}: layer {site.layer} is out of range; this model has {len(layers)} layers "
                          f"of {site.kind!r} ({_ranges(layers)})")
    if site.kind in by_kind and layers and site.layer is None:
        example = S.site_name(site.kind, layers[0])
        where = f"blocks.{{layer}}.{site.kind}" if site.kind in S.SITE_AXES else site.kind.replace("*", "{layer}")
        return ValueError(f"Site {name!r} is inside the layers ({where}): name a layer ({example}), every layer "
                          f"({S.site_name(site.kind, '*')}), or pass layers=[...]")
    layer = site.layer if isinstance(site.layer, int) else 0
    shown = S.site_name(site.kind, layer) if site.layer is not None else site.kind
    close = difflib.get_close_matches(shown, [n for n, s in specs.items() if s.layer in (None, layer)], n=5, cutoff=0.5)
    close = close or difflib.get_close_matches(site.kind, list(by_kind), n=5, cutoff=0.5)
    why = (f"this model has no site {site.kind!r}" if site.kind in S.SITE_AXES or site.kind in kinds
           else f"{site.kind!r} is not a site of this model")
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    listed = ", ".join(list(by_kind)[:40]) + (f", ... ({len(by_kind)} in all)" if len(by_kind) > 40 else "")
    return ValueError(f"Unknown site {name!r}: {why}.{hint} Its site kinds: {listed or 'none'}. "
                      f"jinterp.sites(model) lists every name with its shape.")


def _ranges(layers) -> str:
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))
