"""Which sites are compressed, and how: an ordered list of rules, the first match wins.

A site is one tensor-keeping call in a model: a layer (path ``"block_0/mlp/fc1"``, kind
``"dense"``; an embedding's ``attend``, a tied head, is a "dense" too) or a function called
inside a module (``"block_0/mlp/gelu_0"``, kind ``"gelu"``). The kinds: "dense", "conv",
"layer_norm", "rms_norm", "batch_norm" (with the batch's statistics), "gelu", "silu", "relu"
(one bit per element, exact), "gated" (a GLU's ``act(g) * u``: ``mesa_jax.nn.gated``, or
written by hand with a GELU, SiLU or ReLU the module called),
"softmax", "matmul" (a product of two activations: ``mnn.MatMul``, attention op by op,
``jnp.einsum``/``jnp.matmul`` written in a module: ``"block_0/attn/einsum_0"``) and
"attention".
A ``Rule(path glob, kinds, config)`` matches a site whose path fits the glob and whose kind it
lists; the first rule that matches gives the site's config (None: exact). A site no rule
matches runs exactly. A rule whose glob matches no site of the model is a typo: ``compress``
raises after it has seen the sites (Linen: at the end of ``init``; NNX: at ``compress``).

How attention's core is compressed is its own setting: ``attention="fused"`` (one op keeping
Q, K, V packed per head and no N x N map; its config is the "attention" kind's) or
``"per_op"`` (flax.linen's core op by op: the "matmul" and "softmax" kinds' configs, the
probabilities kept; Linen only, NNX's core then runs exactly).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable, Mapping, Union

from mesa_jax.quant import QuantConfig

KINDS = ("dense", "conv", "layer_norm", "rms_norm", "batch_norm", "gelu", "silu", "relu", "gated", "softmax", "matmul",
         "attention")
ATTENTION = ("fused", "per_op")


@dataclasses.dataclass(frozen=True)
class Rule:
    """``config`` (None: exact) for the sites of ``kinds`` whose path matches the glob ``path``."""

    path: str = "*"
    kinds: tuple[str, ...] = KINDS
    config: QuantConfig | None = QuantConfig()

    def __post_init__(self):
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        _check_kinds(kinds, "Rule.kinds")
        if self.config is not None and not isinstance(self.config, QuantConfig):
            raise TypeError(f"Policy entry {self.path!r} must map to a QuantConfig or None, got {self.config!r}")
        object.__setattr__(self, "kinds", kinds)

    def matches(self, kind: str, path: str) -> bool:
        return kind in self.kinds and fnmatch.fnmatchcase(path, self.path)


@dataclasses.dataclass(frozen=True, init=False)
class Policy:
    """``rules`` in order, the first match wins. Shorthands, placed after ``rules``:
    ``overrides`` (path glob -> config, the last given first), ``by_kind`` (kind -> config),
    then ``config`` for every site of ``kinds``.

    >>> Policy(rules=[Rule("head", config=None), Rule("*", ("dense", "gelu"), QuantConfig(bits=4))])
    >>> Policy(QuantConfig(bits=8), kinds=("dense", "gelu"), overrides={"head": None})
    >>> Policy(QuantConfig(bits=4), by_kind={"softmax": QuantConfig(bits=8)}, attention="per_op")
    """

    rules: tuple[Rule, ...]
    attention: str = "fused"

    def __init__(self, config: QuantConfig | None = QuantConfig(), kinds=KINDS,
                 overrides: Mapping | Iterable = (), by_kind: Mapping | Iterable = (), *,
                 rules: Iterable[Rule] = (), attention: str = "fused"):
        items = lambda v: tuple(v.items()) if isinstance(v, Mapping) else tuple(v)
        _check_kinds([kind for kind, _ in items(by_kind)], "Policy.by_kind")
        if attention not in ATTENTION:
            raise ValueError(f"Policy.attention must be one of {list(ATTENTION)}, got {attention!r}")
        ordered = (*rules, *(Rule(glob, KINDS, c) for glob, c in reversed(items(overrides))),
                   *(Rule("*", (kind,), c) for kind, c in items(by_kind)), Rule("*", kinds, config))
        object.__setattr__(self, "rules", ordered)
        object.__setattr__(self, "attention", attention)

    def resolve(self, kind: str, path: str) -> QuantConfig | None:
        """The config of the ``kind`` site at ``path`` ("block_0/mlp/fc1"), or None (exact)."""
        _check_kinds([kind], "a site")
        return next((rule.config for rule in self.rules if rule.matches(kind, path)), None)

    def check_paths(self, paths: Iterable[str]) -> None:
        """Raise if a rule's glob (other than "*") matches none of the site paths (a typo, usually)."""
        paths = sorted(set(paths))
        dead = [rule.path for rule in self.rules if rule.path != "*" and not fnmatch.filter(paths, rule.path)]
        if dead:
            raise ValueError(f"Policy rule(s) {dead} match no layer; site paths are e.g. {paths[:6]}")

    def map_configs(self, fn) -> "Policy":
        """The same policy with ``fn`` applied to every config it holds."""
        rules = [dataclasses.replace(r, config=None if r.config is None else fn(r.config)) for r in self.rules]
        return Policy(None, rules=rules, attention=self.attention)


def _check_kinds(kinds, where: str) -> None:
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown layer kind(s) {unknown} in {where}; valid kinds: {list(KINDS)}")


def int4_with_int8_attention(num_groups: int = 1) -> Policy:
    """Row ranges everywhere; 4 bits for dense, conv, LayerNorm and GELU inputs, 8 for the
    attention tensors (the fused core's Q, K, V; op by op: softmax and matmul operands),
    which the prototype measurement found the most sensitive to low bits (issue 14)."""
    low, high = (QuantConfig(bits=b, num_groups=num_groups, ranges="row") for b in (4, 8))
    return Policy(low, by_kind={kind: high for kind in ("attention", "softmax", "matmul")})


def int4_row_ranges(num_groups: int = 1) -> QuantConfig:
    """4 bits with row ranges for every kind (give ``num_groups`` = the heads): the setting
    whose residuals are at most 0.6x int8's (DeiT-S: 0.56x). Its added gradient variance is
    about 2% of the minibatch's at trained parameters, the attention tensors most of it,
    which the 4/8 mix above keeps at 8 bits for 0.70x (docs/results.md, fidelity)."""
    return QuantConfig(bits=4, num_groups=num_groups, ranges="row")


Quant = Union[QuantConfig, Policy, None]


def as_policy(quant: Quant) -> Policy:
    """Any ``quant`` a model or layer takes, as a Policy: a QuantConfig for every kind, None for none."""
    if isinstance(quant, Policy):
        return quant
    if quant is None or isinstance(quant, QuantConfig):
        return Policy(quant)
    raise TypeError(f"quant must be a QuantConfig, a Policy or None, got {type(quant).__name__}")
