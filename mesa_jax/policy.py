"""Which layers are compressed, and how: Mesa's policy, with glob overrides by module path.

A ``Policy`` is a static (hashable) value given to ``compress`` or a mesa layer; each
compressed site resolves it with its kind and its module path. Unknown kinds raise
at construction; override globs that match no site raise in ``check_paths``, which
``compress`` calls at the end of ``init``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable, Mapping, Union

from mesa_jax.quant import QuantConfig

# "attention": flax's attention core as one op (packed Q, K, V); "matmul" and "softmax":
# the same core op by op (its einsums and softmax), for comparison.
KINDS = ("dense", "conv", "layer_norm", "gelu", "softmax", "matmul", "attention")


@dataclasses.dataclass(frozen=True)
class Policy:
    """``config`` for every layer of ``kinds``; ``by_kind`` (kind -> config or None) sets a
    kind's own; ``overrides`` (glob on the module path -> config or None) win over both, last first.

    >>> Policy(QuantConfig(bits=8), kinds=("dense", "gelu"), overrides={"head": None})
    >>> Policy(QuantConfig(bits=4), by_kind={"softmax": QuantConfig(bits=8)})
    """

    config: QuantConfig = QuantConfig()
    kinds: tuple[str, ...] = KINDS
    overrides: tuple[tuple[str, QuantConfig | None], ...] = ()
    by_kind: tuple[tuple[str, QuantConfig | None], ...] = ()

    def __post_init__(self):
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown layer kind(s) {unknown} in Policy; valid kinds: {list(KINDS)}")
        overrides, by_kind = (tuple(v.items()) if isinstance(v, Mapping) else tuple(v)
                              for v in (self.overrides, self.by_kind))
        for glob, config in overrides + by_kind:
            if config is not None and not isinstance(config, QuantConfig):
                raise TypeError(f"Policy entry {glob!r} must map to a QuantConfig or None, got {config!r}")
        unknown = sorted({kind for kind, _ in by_kind} - set(KINDS))
        if unknown:
            raise ValueError(f"unknown layer kind(s) {unknown} in Policy.by_kind; valid kinds: {list(KINDS)}")
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "overrides", overrides)
        object.__setattr__(self, "by_kind", by_kind)

    def resolve(self, kind: str, path: str) -> QuantConfig | None:
        """The config of the ``kind`` layer at ``path`` ("block_0/mlp/fc1"), or None (exact)."""
        if kind not in KINDS:
            raise ValueError(f"unknown layer kind {kind!r}; valid kinds: {list(KINDS)}")
        for glob, config in reversed(self.overrides):
            if fnmatch.fnmatchcase(path, glob):
                return config
        for name, config in self.by_kind:
            if name == kind:
                return config
        return self.config if kind in self.kinds else None

    def check_paths(self, paths: Iterable[str]) -> None:
        """Raise if an override glob matches none of the given layer paths (a typo, usually)."""
        paths = list(paths)
        dead = [glob for glob, _ in self.overrides if not fnmatch.filter(paths, glob)]
        if dead:
            raise ValueError(
                f"Policy override(s) {dead} match no layer; layer paths are e.g. {paths[:6]}"
            )

    def map_configs(self, fn) -> "Policy":
        """The same policy with ``fn`` applied to every config it holds."""
        mapped = lambda pairs: tuple((k, None if c is None else fn(c)) for k, c in pairs)
        return Policy(fn(self.config), self.kinds, mapped(self.overrides), mapped(self.by_kind))


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
    which the 4/8 mix above keeps at 8 bits for 0.70x (README, fidelity)."""
    return QuantConfig(bits=4, num_groups=num_groups, ranges="row")


Quant = Union[QuantConfig, Policy, None]


def resolve(quant: Quant, kind: str, path: str) -> QuantConfig | None:
    """A layer's config from whatever it was given: a QuantConfig, a Policy, or None."""
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, Policy):
        return quant.resolve(kind, path)
    raise TypeError(f"quant must be a QuantConfig, a Policy or None, got {type(quant).__name__}")
