"""What a program is compiled for: the CPU, this machine's GPU, or a GPU described to XLA.

A *description* target ("h100", "h200", or the path of a ``GpuTargetConfigProto`` in text
format) compiles with XLA:GPU's own passes -- fusion, scheduling, buffer assignment for that
GPU -- on any machine, with no GPU and no driver: jax's compile-only CUDA topology
(``jax.experimental.topologies``), arguments placed on its one device. It needs the CUDA
plugin at jaxlib's exact version (``pip install -e ".[gpu-plan]"``: the plugin and its PJRT
library, no nvidia-* wheels). Without a GPU nothing can autotune, and XLA:GPU cannot tile
Triton GEMM fusions untuned, so description targets compile GEMMs to cuBLAS calls
(``xla_gpu_enable_triton_gemm=False``, a per-compile option, not a global flag).

    target = plan.resolve("h100")
    compiled, seconds, tracing = plan.compile(jax.jit(step, donate_argnums=0), state, images, labels,
                                              target=target)

``"gpu"`` is this machine's first GPU (real autotuning), ``"cpu"`` XLA:CPU, ``None`` jax's
default device, as ``jax.jit`` would compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DESCRIPTIONS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}  # in mesa_jax/targets/, from openxla/xla
# Fields of newer descriptions that the installed plugin's proto lacks: reading them fails
# ("Failed to parse GpuTargetConfigProto"); a one-device plan reads none of them.
UNPARSED_FIELDS = ("collective_memory_granularity",)
DESCRIPTION_OPTIONS = (("xla_gpu_enable_triton_gemm", False),)  # untuned Triton GEMMs do not tile: cuBLAS
# XLA:GPU rematerializes (recomputes values, trading time for memory) a program whose plan exceeds
# about 95% (this factor, in percent) of 80% of the device memory less its arguments and outputs.
NO_REMAT = (("xla_gpu_memory_limit_slop_factor", 10_000),)
PLUGINS = ("xla_cuda13", "xla_cuda12")  # jax_plugins.* modules, newest first
INSTALL = 'pip install -e ".[gpu-plan]" (jax-cuda12-plugin and jax-cuda12-pjrt at jaxlib\'s version, {version})'


@dataclasses.dataclass(frozen=True)
class Target:
    """A place to compile for; ``name`` labels tables ("cpu", "gpu", "h100", "h200", a path)."""

    name: str
    device: Any  # arguments are placed here: a compile-only device for a description
    compiler_options: tuple[tuple[str, Any], ...] = ()
    memory_bytes: int | None = None  # the device's memory, where known

    @property
    def sharding(self) -> NamedSharding:
        return NamedSharding(Mesh(np.array([self.device]), ("x",)), PartitionSpec())


def resolve(target: str | os.PathLike | Target | None) -> Target | None:
    """The Target a name stands for (``None`` stays None: jax's default device)."""
    if target is None or isinstance(target, Target):
        return target
    name = os.fspath(target)
    if name == "cpu":
        return Target("cpu", jax.devices("cpu")[0])
    if name == "gpu":
        device = jax.devices("gpu")[0]  # raises where there is none
        return Target("gpu", device, memory_bytes=(device.memory_stats() or {}).get("bytes_limit"))
    return _description_target(name)


@functools.cache
def _description_target(name: str) -> Target:
    path = description_path(name)
    text = read_description(path)
    device = _cuda_topology(text, path).devices[0]
    memory = re.search(r"^\s*device_memory_size:\s*(\d+)", text, re.M)
    return Target(name, device, DESCRIPTION_OPTIONS, int(memory.group(1)) if memory else None)


def without_rematerialization(target: Target) -> Target:
    """``target`` compiling programs as written: its memory limit lifted 100-fold, so XLA:GPU never
    recomputes to fit (below the limit nothing changes: DeiT-S's batch-128 plans are identical).
    A largest-batch search needs it: past the limit the plan stops growing with the batch."""
    return dataclasses.replace(target, compiler_options=target.compiler_options + NO_REMAT)


def description_path(name: str) -> pathlib.Path:
    """The file of a shipped description ("h100", "h200") or a path given as is."""
    if name in DESCRIPTIONS:
        return pathlib.Path(__file__).with_name("targets") / DESCRIPTIONS[name]
    path = pathlib.Path(name)
    if path.suffix not in (".txtpb", ".textproto", ".pbtxt") or not path.is_file():
        raise ValueError(f"unknown target {name!r}: use 'cpu', 'gpu', {', '.join(map(repr, DESCRIPTIONS))}, "
                         "or the path of a GpuTargetConfigProto text file (.txtpb)")
    return path


def read_description(path: str | os.PathLike) -> str:
    """A description's text without the fields the installed plugin cannot parse."""
    text = pathlib.Path(path).read_text()
    fields = "|".join(map(re.escape, UNPARSED_FIELDS))
    return re.sub(rf"^\s*(?:{fields})\s*:.*\n", "", text, flags=re.M)


def plugin_module() -> str:
    """The installed CUDA plugin's module, checked against jaxlib's version; a one-line error if absent."""
    import jaxlib

    version = jaxlib.__version__
    for name in PLUGINS:
        if _installed(f"jax_plugins.{name}"):
            package = f"jax-cuda{name[-2:]}-pjrt"
            try:
                found = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:  # installed otherwise (a source build): trust it
                found = version
            if found != version:
                raise RuntimeError(f"{package} {found} does not match jaxlib {version}: {INSTALL.format(version=version)}")
            return f"jax_plugins.{name}"
    raise RuntimeError(f"planning for a GPU description compiles with XLA:GPU, which needs the CUDA plugin: "
                       f"{INSTALL.format(version=version)}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


def _cuda_topology(text: str, path) -> topologies.TopologyDescription:
    module = plugin_module()
    describe = lambda: topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
    try:
        try:
            return describe()
        except NotImplementedError:  # the plugin did not register: no CUDA runtime to check its versions against
            _register_without_cuda_check(module)
            return describe()
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(f"the CUDA plugin cannot read {path}: {e}") from None


def _register_without_cuda_check(module: str) -> None:
    """Register the plugin as jax would, minus its CUDA runtime version check, which fails on a
    machine without CUDA libraries when JAX_PLATFORMS does not exclude CUDA: compiling for a
    description loads none of them."""
    skip, before = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK", os.environ.get("JAX_SKIP_CUDA_CONSTRAINTS_CHECK")
    os.environ[skip] = "1"
    try:
        importlib.import_module(module).initialize()
    finally:
        if before is None:
            del os.environ[skip]
        else:
            os.environ[skip] = before


def place(tree, target: Target | None):
    """Arrays and ShapeDtypeStructs of ``tree`` as ShapeDtypeStructs on ``target``'s device."""
    if target is None:
        return tree
    sharding = target.sharding
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding,
                                                       weak_type=getattr(x, "weak_type", False)), tree)


def compile(fn: Callable, *args, target: str | Target | None = None, dump_to: str | None = None,
            compiler_options: dict | None = None):
    """``(compiled, seconds, tracing_seconds)``: ``fn`` (jitted here unless it already is)
    lowered for ``args`` placed on ``target`` and compiled there; nothing runs. ``seconds``
    counts jax's tracing and lowering (``tracing_seconds``) and XLA's compile. ``dump_to``
    writes XLA's dumps (optimized HLO, buffer assignment, memory-usage report) to that
    folder; ``compiler_options`` (XLA debug options by name) override the target's."""
    target = resolve(target)
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    options = dict(target.compiler_options if target else ()) | (compiler_options or {})
    if dump_to:
        options |= {"xla_dump_to": os.fspath(dump_to), "xla_dump_hlo_as_text": True}
    began = time.perf_counter()
    with _no_cache_writes() if target and target.compiler_options else contextlib.nullcontext():
        lowered = jitted.lower(*place(args, target))
        traced = time.perf_counter()
        compiled = lowered.compile(compiler_options=options or None)
    return compiled, time.perf_counter() - began, traced - began


def _no_cache_writes():
    """jax's persistent cache cannot read a compile-only executable back (that needs a client):
    keep description targets' programs out of it."""
    from jax._src import config  # the flag's context manager; jax.config only sets it process-wide

    return config.persistent_cache_min_compile_time_secs(float("inf"))
