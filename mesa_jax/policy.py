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
    """``config`` for every layer of ``kinds``; ``overrides`` (glob -> config or None) win, last first.

    >>> Policy(QuantConfig(bits=8), kinds=("dense", "gelu"), overrides={"head": None})
    """

    config: QuantConfig = QuantConfig()
    kinds: tuple[str, ...] = KINDS
    overrides: tuple[tuple[str, QuantConfig | None], ...] = ()

    def __post_init__(self):
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown layer kind(s) {unknown} in Policy; valid kinds: {list(KINDS)}")
        overrides = self.overrides
        if isinstance(overrides, Mapping):
            overrides = tuple(overrides.items())
        for glob, config in overrides:
            if config is not None and not isinstance(config, QuantConfig):
                raise TypeError(f"Policy override {glob!r} must map to a QuantConfig or None, got {config!r}")
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "overrides", tuple(overrides))

    def resolve(self, kind: str, path: str) -> QuantConfig | None:
        """The config of the ``kind`` layer at ``path`` ("block_0/mlp/fc1"), or None (exact)."""
        if kind not in KINDS:
            raise ValueError(f"unknown layer kind {kind!r}; valid kinds: {list(KINDS)}")
        for glob, config in reversed(self.overrides):
            if fnmatch.fnmatchcase(path, glob):
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
        return Policy(
            fn(self.config), self.kinds, tuple((g, None if c is None else fn(c)) for g, c in self.overrides)
        )


Quant = Union[QuantConfig, Policy, None]


def resolve(quant: Quant, kind: str, path: str) -> QuantConfig | None:
    """A layer's config from whatever it was given: a QuantConfig, a Policy, or None."""
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, Policy):
        return quant.resolve(kind, path)
    raise TypeError(f"quant must be a QuantConfig, a Policy or None, got {type(quant).__name__}")
