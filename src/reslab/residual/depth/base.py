"""Connections across depth: what a residual scheme does not see from its one site.

A scheme connects a sublayer to the stream it sits on. A *connection* reaches further: the embedding re-injected
into every block (x0), a block's output carried to a later block (U-net and long skips), every earlier block output
averaged (DenseFormer), token-indexed embeddings mixed into attention's values. It is one `Connection` subclass in
one file of this folder plus one line in `reslab.registry.SCHEMES`; it composes with a scheme by name
(`pre+x0+long-skip`, or `x0` alone: on `pre`) and never edits a model.

How it meets the model: the composed site (`compose`) wraps every site of the base scheme, and the stream it passes
on is a `DepthStream`, the base scheme's stream plus what connections keep for later (the embedding, the token ids
and named activations such as `blocks.3:out`). It is immutable: each step returns a new one, so a stream captured
at one site (the lens, a probe) still reads as it was there. At each site, in registry order, every connection may

- `enter(stream)`: change the stream before the site's own update (at a block's first sublayer: the block start);
- `update(site, x, sublayer)`: replace the base scheme's update (only `pre`'s: residual scales);
- `leave(before, after)`: change it after (at a block's last sublayer: the block output, saved as `blocks.i:out`);

and before the head the model-level part of each connection (`head_part`, in the stream adapter) may change it
once more (backout, MUDD's last aggregation). A connection may install a hook in its sublayer at build
(`init_branch`, value embeddings), and report its learned coefficients (`coefficients`: logged as the model metric
`depth_coefficients`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.residual.base import RankReduce, ResidualSite, SiteSpec, StreamAdapter, on_single_stream


class DepthStream(NamedTuple):
    """The residual stream `x` with what connections across depth carry along it."""

    x: torch.Tensor
    x0: torch.Tensor  # the stream as the first block receives it (the embedding)
    tokens: torch.Tensor | None  # token ids (batch, seq); None when a site is called outside a model
    saved: Mapping[str, torch.Tensor]  # named activations kept for later blocks: "blocks.3:out", ...

    def save(self, key: str, value: torch.Tensor) -> DepthStream:
        return self._replace(saved={**self.saved, key: value})


def block_output(layer: int) -> str:
    """The name of block `layer`'s output (the stream after its last sublayer), as the audit spells it."""
    return f"blocks.{layer}:out"


def resolve_options(kind: str, name: str, defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` over `defaults`: an unknown key or a non-finite number is one line naming `kind` `name`."""
    unknown = set(given) - set(defaults)
    if unknown:
        valid = ", ".join(sorted(defaults)) or "none"
        raise ReslabError(f"{kind} {name!r} has no option {sorted(unknown)[0]!r}; its options: {valid}")
    for key, value in given.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ReslabError(f"{kind} {name!r}: {key} must be a finite number, got {value!r}")
    return {**defaults, **given}


class Connection(nn.Module):
    """Base of every connection across depth: one instance per residual site, like a scheme's site."""

    name: ClassVar[str]
    formula: ClassVar[str]
    paper: ClassVar[str]
    reference: ClassVar[str] = ""  # the reference implementation it follows (repository @commit, file:lines)
    kind: ClassVar[str]  # what the audit calls it: "long skip", "dense", "embedding re-injection", ...
    option_defaults: ClassVar[dict[str, Any]] = {}
    options_need_layers: ClassVar[int] = 1  # below this many blocks it connects nothing: refused
    replaces_update: ClassVar[bool] = False  # True: `update` replaces the base scheme's (which must be `pre`)
    additive: ClassVar[bool] = False  # True: the stream stays embedding + the sum of the writes (the lens)

    def __init__(self, spec: SiteSpec, options: Mapping[str, Any]):
        super().__init__()
        self.spec = spec
        self.options = options

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """Check this connection's options (`given` holds only its own keys); subclasses add range checks."""
        return resolve_options("connection", cls.name, cls.option_defaults, given)

    @classmethod
    def check_model(cls, num_layers: int, options: Mapping[str, Any]) -> None:
        """Refuse, in one line, a model this connection cannot connect anything in (too shallow, a block that does
        not exist)."""
        if num_layers < cls.options_need_layers:
            raise ReslabError(f"connection {cls.name!r} needs {cls.options_need_layers} or more blocks to connect "
                              f"anything; the model has {num_layers} (raise --layers)")

    @classmethod
    def head_part(cls, width: int, num_layers: int, options: Mapping[str, Any]) -> nn.Module | None:
        """A module applied once before the final norm, `DepthStream -> DepthStream` (backout), or None."""
        return None

    @property
    def static(self) -> bool:
        """Does it combine streams with coefficients that are parameters, not computed from the stream? Then the
        final stream is a fixed linear combination of the embedding and the writes, which the lens decomposes."""
        return False

    @property
    def block_start(self) -> bool:
        return self.spec.index == 0

    @property
    def block_end(self) -> bool:
        return self.spec.index == self.spec.sublayers_per_block - 1

    def enter(self, stream: DepthStream) -> DepthStream:
        return stream

    def update(self, site: ResidualSite, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def leave(self, before: DepthStream, after: DepthStream) -> DepthStream:
        return after

    def init_branch(self, sublayer: nn.Module) -> None:
        """Called once after the model's own init, with this site's sublayer."""

    def source(self, stream: DepthStream, j: int) -> torch.Tensor:
        """X_j of a dense connection: the embedding for j = 0, else block j-1's raw output as the composed site
        saved it; one line when the stream does not carry it (a site called alone, outside a model)."""
        if j == 0:
            return stream.x0
        key = block_output(j - 1)
        if key not in stream.saved:
            raise ReslabError(f"connection {self.name!r} after block {self.spec.layer} needs {key!r}, which the "
                              "stream does not carry; run its sites in a model, block by block")
        return stream.saved[key]

    def coefficients(self) -> dict[str, Any]:
        """The learned coefficients of this site's part, by name (plain numbers or nested lists)."""
        return {}

    def extra_repr(self) -> str:
        return f"{self.name}: {self.formula}"


class DepthAdapter(StreamAdapter):
    """The stream adapter of a composed scheme: the embedding and the token ids in, each connection's part before
    the head, the plain stream out."""

    def __init__(self, head_parts: list[nn.Module]):
        super().__init__()
        self.head_parts = nn.ModuleList(head_parts)

    def enter(self, x: torch.Tensor, tokens: torch.Tensor) -> DepthStream:
        return DepthStream(x, x, tokens, {})

    def widen(self, x: torch.Tensor) -> DepthStream:
        return DepthStream(x, x, None, {})

    def reduce(self, stream: DepthStream) -> torch.Tensor:
        for part in self.head_parts:
            stream = part(stream)
        return stream.x


class Recipe:
    """A named combination of connections on a base scheme (the speedrun's), listed like a scheme."""

    name: ClassVar[str]
    formula: ClassVar[str]
    paper: ClassVar[str]
    base: ClassVar[str] = "pre"
    parts: ClassVar[tuple[str, ...]]


def compose(name: str, base: type[ResidualSite], parts: tuple[type[Connection], ...]) -> type[ResidualSite]:
    """The scheme `base` with `parts` at each of its sites, registered under `name`."""
    replacing = [part for part in parts if part.replaces_update]
    if len(replacing) > 1:
        raise ReslabError(f"residual {name!r}: {replacing[0].name} and {replacing[1].name} both replace the "
                          "sublayer's update; choose one")
    if replacing and base.name != "pre":
        raise ReslabError(f"connection {replacing[0].name!r} replaces pre-LN's update and composes only with 'pre', "
                          f"not {base.name!r}; use --residual {'+'.join(p.name for p in parts)}")
    if type(base.stream_adapter(8, 2, {})) is not StreamAdapter:
        raise ReslabError(f"connections across depth compose with single-stream schemes; {base.name!r} carries its "
                          f"own stream (use pre, post, sandwich, ... as the base)")
    attributes = {
        "name": name,
        "formula": "; ".join([base.formula, *(part.formula for part in parts)]),
        "paper": "; ".join(dict.fromkeys([*(part.paper for part in parts)])),
        "additive_stream": base.additive_stream and all(part.additive for part in parts),
        "option_defaults": {key: value for cls in (base, *parts) for key, value in cls.option_defaults.items()},
        "base": base,
        "parts": parts,
        "__doc__": f"{base.__name__} with connections across depth: {', '.join(p.name for p in parts)}.",
    }
    return type(f"Composed_{base.__name__}", (ComposedSite, base), attributes)


class ComposedSite(ResidualSite):
    """Mixed in before a base scheme's class by `compose`: the base's site, with each connection's part around it."""

    base: ClassVar[type[ResidualSite]]
    parts: ClassVar[tuple[type[Connection], ...]]

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.connections = nn.ModuleDict({part.name.replace("-", "_"): part(spec, self.options)
                                          for part in self.parts})
        # by key, not as an attribute: a module set as an attribute would be registered (and saved) twice
        self.replacing_key = next((key for key, c in self.connections.items() if c.replaces_update), None)

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        known = {key for c in (cls.base, *cls.parts) for key in c.option_defaults}
        resolve_options("residual scheme", cls.name, dict.fromkeys(known), given)  # unknown keys, in one line
        options = cls.base.resolve_options({k: v for k, v in given.items() if k in cls.base.option_defaults})
        for part in cls.parts:
            options.update(part.resolve_options({k: v for k, v in given.items() if k in part.option_defaults}))
        return options

    @classmethod
    def check_model(cls, num_layers: int, given: Mapping[str, Any]) -> None:
        cls.base.check_model(num_layers, {k: v for k, v in given.items() if k in cls.base.option_defaults})
        options = cls.resolve_options(given)
        for part in cls.parts:
            part.check_model(num_layers, options)

    @classmethod
    def stream_adapter(cls, width: int, num_layers: int, options: Mapping[str, Any]) -> StreamAdapter:
        options = cls.resolve_options(options)
        heads = [part.head_part(width, num_layers, options) for part in cls.parts]
        return DepthAdapter([head for head in heads if head is not None])

    def init_branch(self, sublayer: nn.Module) -> None:
        super().init_branch(sublayer)
        for connection in self.connections.values():
            connection.init_branch(sublayer)

    def forward(self, stream: DepthStream, sublayer: nn.Module) -> DepthStream:
        if isinstance(stream, torch.Tensor):  # one plain stream: called outside a model
            return on_single_stream(self, stream, sublayer)
        for connection in self.connections.values():
            stream = connection.enter(stream)
        if self.replacing_key is not None:
            x = self.connections[self.replacing_key].update(self, stream.x, sublayer)
        else:
            x = super().forward(stream.x, sublayer)
        after = stream._replace(x=x)
        if self.spec.index == self.spec.sublayers_per_block - 1:
            after = after.save(block_output(self.spec.layer), x)
        for connection in self.connections.values():
            after = connection.leave(stream, after)
        return after

    @classmethod
    def scheme_metrics(cls, sites: list[ResidualSite], ranks: RankReduce | None = None) -> dict[str, Any]:
        """The base scheme's diagnostics, and every connection's learned coefficients (`depth_coefficients`:
        connection -> coefficient -> one value per site that has it)."""
        found = cls.base.scheme_metrics(sites, ranks)
        coefficients: dict[str, dict[str, list[Any]]] = {}
        for site in sites:
            for connection in site.connections.values():
                for key, value in connection.coefficients().items():
                    coefficients.setdefault(connection.name, {}).setdefault(key, []).append(value)
        if coefficients:
            found["depth_coefficients"] = coefficients
        return found

    def extra_repr(self) -> str:
        return f"{self.name}: {self.base.formula}"
