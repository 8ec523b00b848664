"""Scoped, thread-local interception of flax modules and plain functions: how mesa reaches
layers it did not write.

Inside ``scope(quant)`` (entered around a compressed model's methods, and by every
``mesa_jax.nn`` layer around its flax namesake's call):

- every flax module method call of this thread passes through ``_intercept`` (flax's
  ``nn.intercept_methods``, a thread-local stack); a handler registered for the
  module's class (``register_module``) runs the call with mesa's ops injected;
- the functions registered with ``register_function`` (``jax.nn.gelu``,
  ``jax.nn.softmax``, ``nn.scan``) are reached through dispatchers that stand in for them, while
  any scope is open in the process, in every imported module that holds them (so
  ``nn.gelu``, ``jax.nn.gelu`` and ``from jax.nn import gelu`` alike) and in the
  fields of the module being called; in other threads, and outside a scope, a
  dispatcher calls the original;
- mesa's own computations run ``suspended()`` (and op forwards, traced whenever JAX
  traces them, ``ops.own``): nothing inside them is intercepted again;
- each activation is kept once (``ops.sharing``): a tensor several ops keep is packed
  once, and an op's output that the next op keeps is kept by the first op's residual.

Handlers find the configuration of a site with ``config(kind, path)`` and the module
a function was called from with ``current_module()``; ``function_site`` hands a function
call to the runner registered for that module's framework (Linen's, NNX's), which
keeps its statistics in the module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
from typing import Any, Callable

import flax.linen as nn

from mesa_jax import ops
from mesa_jax.policy import Policy, Quant, resolve

ModuleHandler = Callable  # (module, kind, next_fun, args, kwargs) -> output
FunctionHandler = Callable  # (original, *args, **kwargs) -> output

_module_handlers: dict[type, tuple[str, ModuleHandler]] = {}  # flax class -> (kind, handler)
_site_runners: dict[type, Callable] = {}  # module base class -> (module, name, kind, tensors, op, exact) -> y
_dispatchers: dict[Callable, Callable] = {}  # original function -> dispatcher
_OWN = ("mesa_jax", "pallas_kernels", "jax._src", "jaxlib")  # modules whose names are never rebound


@dataclasses.dataclass
class Scope:
    quant: Quant
    owner: Any = None  # the mesa_jax.nn layer that opened the scope, or None for compress
    sites: set = dataclasses.field(default_factory=set)  # outermost scope: paths of the sites seen


@dataclasses.dataclass
class _Frame:
    module: nn.Module
    calls: dict = dataclasses.field(default_factory=dict)  # function name -> calls so far


class _State(threading.local):
    def __init__(self):
        self.scopes: list[Scope] = []
        self.frames: list[_Frame] = []
        self.suspended = 0


_state = _State()


def register_module(cls: type, kind: str, handler: ModuleHandler) -> None:
    _module_handlers[cls] = (kind, handler)


def register_site_runner(base: type, runner: Callable) -> None:
    """How a function called inside a module of class ``base`` (flax.linen.Module,
    flax.nnx.Module) finds its statistics: see ``function_site``."""
    _site_runners[base] = runner


def function_site(name: str, kind: str, tensors, op, exact):
    """A registered function called inside a module: its statistics live in that module, named
    after the call (``gelu_0``; ``dot_product_attention_0_q`` where it keeps several tensors,
    given as [(suffix or None, tensor, layout)]). ``exact()``: the original call."""
    module = current_module()
    for cls in type(module).__mro__:
        if cls in _site_runners:
            return _site_runners[cls](module, name, kind, tensors, op, exact)
    return exact()


def register_function(original: Callable, handler: FunctionHandler) -> Callable:
    """Make calls of ``original`` inside a scope run ``handler(original, *args, **kwargs)``."""

    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        if not active() or not _state.frames:
            return original(*args, **kwargs)
        with suspended():
            return handler(original, *args, **kwargs)

    dispatch.__mesa_original__ = original
    _dispatchers[original] = dispatch
    return dispatch


def active() -> bool:
    return bool(_state.scopes) and not _state.suspended and not ops.running()


@contextlib.contextmanager
def suspended():
    """Nothing is intercepted inside (mesa's own ops call the functions they stand in for)."""
    _state.suspended += 1
    try:
        yield
    finally:
        _state.suspended -= 1


def innermost() -> Scope:
    return _state.scopes[-1]


def config(kind: str, path: str):
    """The QuantConfig (or None: exact) of the ``kind`` site at ``path``, in the innermost scope."""
    _state.scopes[0].sites.add(path)  # the outermost scope checks the Policy
    return resolve(innermost().quant, kind, path)


def current_module():
    return _state.frames[-1].module


@contextlib.contextmanager
def called(module):
    """A module call that is not Linen's (NNX): the functions called inside it are its sites."""
    _state.frames.append(_Frame(module))
    try:
        yield
    finally:
        _state.frames.pop()


def next_call_name(function: str) -> str:
    """``"gelu_0"``, ``"gelu_1"``, ...: the n-th call of ``function`` in the current module call."""
    calls = _state.frames[-1].calls
    calls[function] = calls.get(function, -1) + 1
    return f"{function}_{calls[function]}"


def strict() -> bool:
    """Whether an unsupported argument raises (a mesa layer asked for it) or runs exactly (compress)."""
    return innermost().owner is not None


@contextlib.contextmanager
def scope(quant: Quant, owner=None, check_policy: bool = False):
    """Compress, with ``quant``, what the code inside calls in this thread. ``check_policy``
    (at init): a Policy override that matched no site raises at the end."""
    outermost = not _state.scopes
    here = Scope(quant, owner)
    _state.scopes.append(here)
    try:
        with contextlib.ExitStack() as stack:
            if outermost:
                stack.enter_context(_functions_rebound())
                stack.enter_context(nn.intercept_methods(_intercept))
                stack.enter_context(ops.sharing())
            yield here
    finally:
        _state.scopes.pop()
    if outermost and check_policy and isinstance(quant, Policy) and quant.overrides:
        quant.check_paths(sorted(here.sites))


def _intercept(next_fun, args, kwargs, context):
    if _state.suspended or ops.running():
        return next_fun(*args, **kwargs)
    module = context.module
    _state.frames.append(_Frame(module))
    try:
        with rebound(module, [f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name")]):
            found = _handler(module) if context.method_name == "__call__" else None
            if found is None:
                return next_fun(*args, **kwargs)
            kind, handler = found
            return handler(module, kind, next_fun, args, kwargs)
    finally:
        _state.frames.pop()


def _handler(module):
    owner = innermost().owner
    if getattr(module, "_mesa_layer", False) and owner is not module:
        return None  # a mesa layer applies its own quant, in its own scope
    for cls in type(module).__mro__:
        if cls in _module_handlers:
            return _module_handlers[cls]
    return None


# ------------------------------------------------------------- rebinding names

_lock = threading.Lock()
_open_scopes = 0
_rebound: list[tuple[Any, str, Callable]] = []


@contextlib.contextmanager
def _functions_rebound():
    """While any scope is open in the process, every imported module's name for a registered
    function refers to its dispatcher (which calls the original outside scopes)."""
    global _open_scopes
    with _lock:
        _open_scopes += 1
        if _open_scopes == 1:
            for module in list(sys.modules.values()):
                _rebind(module)
    try:
        yield
    finally:
        with _lock:
            _open_scopes -= 1
            if _open_scopes == 0:
                for module, name, original in reversed(_rebound):
                    setattr(module, name, original)
                _rebound.clear()


def _rebind(module) -> None:
    if module is None or getattr(module, "__name__", "").startswith(_OWN):
        return
    try:
        names = list(vars(module).items())
    except TypeError:
        return
    for name, value in names:
        try:
            dispatcher = _dispatchers.get(value)
        except TypeError:  # unhashable
            continue
        if dispatcher is not None:
            setattr(module, name, dispatcher)
            _rebound.append((module, name, value))


@contextlib.contextmanager
def rebound(module, names):
    """A module's attributes ``names`` that hold a registered function (``act: Callable =
    nn.gelu``, a ``functools.partial`` of one, a list of layers) hold its dispatcher during
    the call."""
    changed = {}
    for name in names:
        value = getattr(module, name, None)
        new = dispatching(value)
        if new is not value:
            changed[name] = value
            object.__setattr__(module, name, new)
    try:
        yield
    finally:
        for name, value in changed.items():
            object.__setattr__(module, name, value)


def dispatching(value):
    """``value`` with the registered functions in it replaced by their dispatchers."""
    try:
        if value in _dispatchers:
            return _dispatchers[value]
    except TypeError:
        return value
    if isinstance(value, functools.partial) and value.func in _dispatchers:
        return functools.partial(_dispatchers[value.func], *value.args, **value.keywords)
    if isinstance(value, (list, tuple)) and any(dispatching(v) is not v for v in value):
        return type(value)(dispatching(v) for v in value)
    return value


@contextlib.contextmanager
def fields_set(module, **values):
    """Set fields of a bound module for the duration of a call (flax's injection points:
    ``dot_general``, ``conv_general_dilated``, ``attention_fn``)."""
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        object.__setattr__(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            object.__setattr__(module, name, value)
