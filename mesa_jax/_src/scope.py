"""The interception scope: how mesa reaches layers and functions it did not write.

A ``Scope`` is opened around a compressed model's call (or a mesa layer's) and handed to
every handler. While it is open, in this thread:

- every flax.linen module method call passes through ``_intercept`` (flax's
  ``nn.intercept_methods``, a thread-local stack): a handler from the scope's table for the
  module's class and method (``__call__``; ``attend`` of an embedding) runs the call with
  mesa's ops; NNX modules, whose classes compress swapped,
  enter ``frame`` themselves;
- registered functions (``jax.nn.gelu``, ``jax.nn.silu``, ``jax.nn.relu``, ``jax.nn.softmax``,
  ``jax.nn.dot_product_attention``, ``jnp.einsum``, ``jnp.matmul``, ``jnp.multiply``,
  ``nn.scan``) are reached through dispatchers that stand in for them in every imported module
  that holds them (so ``nn.gelu``, ``jax.nn.gelu`` and ``from jax.nn import gelu`` alike; ``@``
  and ``*`` through the modules JAX's operators call) and in the attributes of the module being
  called (mesa's own
  ``gated`` is its dispatcher); in other threads, outside a scope, and inside
  mesa's own computations (``suspended``, residuals.own) a dispatcher calls the original;
- each activation is kept once (residuals.sharing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
from typing import Any, Callable

import flax.linen as nn
from flax import nnx
from jax.extend import source_info_util

from mesa_jax._src import residuals
from mesa_jax._src.stores import LinenStore, Store
from mesa_jax.policy import Policy

# JAX attributes an operation to the innermost frame outside its exclusions: a dispatcher is not
# the model's code, so what it runs keeps the model's line (in residual reports, HLO metadata)
source_info_util.register_exclusion(__file__)

_OWN = ("mesa_jax", "pallas_kernels", "jax._src", "jaxlib")  # modules whose names are never rebound
# ... but for those JAX's operators call their functions through (array_methods: ``x @ y`` is
# ``tensor_contractions.matmul(x, y)``, ``x * y`` ``ufuncs.multiply(x, y)``, looked up at each call)
_OPERATORS = ("jax._src.numpy.tensor_contractions", "jax._src.numpy.ufuncs")


@dataclasses.dataclass
class Scope:
    """What the sites reached inside are compressed with. ``strict``: a setting mesa does not
    compress raises (a mesa layer asked for it) or runs exactly (compress reached it)."""

    policy: Policy
    modules: dict  # (flax.linen class, method name) -> handler(scope, store, module, next_fun, args, kwargs)
    functions: dict  # original function -> dispatcher (see ``dispatchers``)
    strict: bool = False
    owner: Any = None  # the mesa layer that opened it
    sites: set = dataclasses.field(default_factory=set)  # the outermost scope's: every site path seen
    activations: dict = dataclasses.field(default_factory=dict)  # the outermost's: id(y) -> (y, x, act)

    def config(self, kind: str, path: str):
        """The QuantConfig (or None: exact) of the ``kind`` site at ``path``."""
        self.sites.add(path)
        return self.policy.resolve(kind, path)

    def record_activation(self, y, x, act) -> None:
        """``y`` is ``act(x)``, an activation's output (a GLU's gate, if a product takes it)."""
        self.activations[id(y)] = (y, x, act)  # y held: its id stays its own

    def activation_of(self, y):
        """``(x, act)`` where ``y`` is a recorded ``act(x)``, else None."""
        found = self.activations.get(id(y))
        return None if found is None or found[0] is not y else found[1:]

    def unsupported(self, store: Store, module, what: str, call: Callable):
        """A layer setting flax supports and mesa does not compress: an error in a strict scope,
        ``call()`` (flax's exact computation, float residuals) otherwise."""
        if self.strict:
            name = type(module).__name__
            raise NotImplementedError(f"{name} at {store.path or '<root>'}: {what} is not supported with quant "
                                      f"(compressed); use quant=None or {store.framework}.{name}")
        return call()


@dataclasses.dataclass
class _Frame:
    store: Store
    calls: dict = dataclasses.field(default_factory=dict)  # function name -> calls so far
    heads: dict = dataclasses.field(default_factory=dict)  # a product's output shape -> its heads axis

    def next_name(self, function: str) -> str:
        """``"gelu_0"``, ``"gelu_1"``, ...: the n-th call of ``function`` in this module call."""
        self.calls[function] = self.calls.get(function, -1) + 1
        return f"{function}_{self.calls[function]}"


class _State(threading.local):
    def __init__(self):
        self.scopes: list[Scope] = []
        self.frames: list[_Frame] = []
        self.suspended = 0


_state = _State()


def current() -> Scope | None:
    """The innermost open scope of this thread, unless mesa's own code is running."""
    if not _state.scopes or _state.suspended or residuals.running():
        return None
    return _state.scopes[-1]


def innermost_frame() -> _Frame | None:
    return _state.frames[-1] if _state.frames else None


@contextlib.contextmanager
def suspended():
    """Nothing is intercepted inside (mesa's own ops call the functions they stand in for)."""
    _state.suspended += 1
    try:
        yield
    finally:
        _state.suspended -= 1


@contextlib.contextmanager
def opened(scope: Scope, check: bool = False):
    """Compress what the code inside calls in this thread with ``scope``; ``check`` (the
    first pass over a model): a Policy rule that matched no site raises at the end."""
    outermost = not _state.scopes
    if not outermost:
        scope.sites, scope.activations = _state.scopes[0].sites, _state.scopes[0].activations
    _state.scopes.append(scope)
    try:
        with contextlib.ExitStack() as stack:
            if outermost:
                stack.enter_context(_functions_rebound(scope.functions))
                stack.enter_context(nn.intercept_methods(_intercept))
                stack.enter_context(residuals.sharing())
            yield scope
    finally:
        _state.scopes.pop()
    if outermost and check:
        scope.policy.check_paths(scope.sites)


@contextlib.contextmanager
def frame(store: Store, module):
    """A module call: the functions called inside are its sites, and its attributes that hold
    a registered function (a field, one a Linen ``setup`` assigned, an NNX attribute) hold its
    dispatcher meanwhile."""
    _state.frames.append(_Frame(store))
    try:
        with _functions_held(module, _state.scopes[0].functions):
            yield
    finally:
        _state.frames.pop()


def _intercept(next_fun, args, kwargs, context):
    scope = current()
    if scope is None:
        return next_fun(*args, **kwargs)
    module = context.module
    store = LinenStore(module)
    with frame(store, module):
        handler = _handler(scope, module, context.method_name)
        if handler is None:
            return next_fun(*args, **kwargs)
        return handler(scope, store, module, next_fun, args, kwargs)


def _handler(scope: Scope, module, method: str):
    """The handler of the first class in the module's MRO whose ``method`` the table names."""
    if getattr(module, "_mesa_layer", False) and scope.owner is not module:
        return None  # a mesa layer applies its own quant, in its own scope
    return next((scope.modules[cls, method] for cls in type(module).__mro__ if (cls, method) in scope.modules), None)


# ------------------------------------------------------------- functions

def dispatchers(handlers: dict) -> dict:
    """{original: dispatcher}: calls of the original inside a scope (and a module call) run
    ``handler(scope, original, *args, **kwargs)``."""
    return {original: _dispatcher(original, handler) for original, handler in handlers.items()}


def _dispatcher(original, handler):
    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        scope = current()
        if scope is None or not _state.frames:
            return original(*args, **kwargs)
        with suspended():
            return handler(scope, original, *args, **kwargs)

    dispatch.__mesa_original__ = original
    for name in dir(original):  # a ufunc's reduce, outer, at: the dispatcher answers with the original's
        if not name.startswith("_") and not hasattr(dispatch, name):
            setattr(dispatch, name, getattr(original, name))
    return dispatch


_lock = threading.Lock()
_open: list[int] = [0]  # scopes open in the process: the names stay rebound while any is
_rebound: list[tuple[Any, str, Callable]] = []


@contextlib.contextmanager
def _functions_rebound(table: dict):
    """While any scope is open in the process, every imported module's name for a registered
    function refers to its dispatcher (which calls the original outside scopes)."""
    with _lock:
        _open[0] += 1
        if _open[0] == 1:
            for module in list(sys.modules.values()):
                _rebind(module, table)
    try:
        yield
    finally:
        with _lock:
            _open[0] -= 1
            if _open[0] == 0:
                for module, name, original in reversed(_rebound):
                    setattr(module, name, original)
                _rebound.clear()


def _rebind(module, table: dict) -> None:
    name = getattr(module, "__name__", "")
    if module is None or (name.startswith(_OWN) and name not in _OPERATORS):
        return
    try:
        names = list(vars(module).items())
    except TypeError:
        return
    for name, value in names:
        try:
            dispatcher = table.get(value)
        except TypeError:  # unhashable
            continue
        if dispatcher is not None:
            setattr(module, name, dispatcher)
            _rebound.append((module, name, value))


def _functions_held(module, table: dict):
    """A module's attributes that hold a registered function (``act: Callable = nn.gelu``, a
    ``functools.partial`` of one, a tuple of layers, the items of an nnx.List such as
    nnx.Sequential's) hold its dispatcher during the call."""
    values = dict(vars(module))
    lists = [(value, i) for value in values.values() if isinstance(value, nnx.List) for i in range(len(value))]
    return fields_set(module, **{n: _dispatching(v, table) for n, v in values.items()
                                 if not isinstance(v, nnx.List) and _dispatching(v, table) is not v},
                      _items={(id(seq), i): (seq, i, _dispatching(seq[i], table)) for seq, i in lists
                              if _dispatching(seq[i], table) is not seq[i]})


def _dispatching(value, table: dict):
    """``value`` with the registered functions in it replaced by their dispatchers."""
    try:
        if value in table:
            return table[value]
    except TypeError:
        return value
    if isinstance(value, functools.partial) and value.func in table:
        return functools.partial(table[value.func], *value.args, **value.keywords)
    if isinstance(value, (list, tuple)) and any(_dispatching(v, table) is not v for v in value):
        return type(value)(_dispatching(v, table) for v in value)
    return value


@contextlib.contextmanager
def fields_set(module, _items=None, **values):
    """Set attributes of a module (and ``_items``: {key: (sequence, index, value)}) for the
    duration of a call: flax's injection points (``dot_general``, ``conv_general_dilated``,
    ``einsum_op``, ``attention_fn``), functions held."""
    old = {name: getattr(module, name) for name in values}
    old_items = [(seq, i, seq[i]) for seq, i, _ in (_items or {}).values()]
    for name, value in values.items():
        object.__setattr__(module, name, value)
    for seq, i, value in (_items or {}).values():
        seq[i] = value
    try:
        yield
    finally:
        for seq, i, value in old_items:
            seq[i] = value
        for name, value in old.items():
            object.__setattr__(module, name, value)
