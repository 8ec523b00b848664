"""What an optimized XLA program is made of, read from its HLO text and XLA's cost analysis.

``count(compiled.as_text())`` counts the instructions that launch work -- those outside
fusion bodies: fusions (one kernel each, by kind), custom calls by target (cuBLAS
``__cublas$gemm`` / ``__cublas$lt$matmul``, cuDNN ``__cudnn$...``, Triton/Pallas
``__gpu$xla.gpu.triton``), conditionals and while loops. Each instruction counts once,
however often its computation runs.
"""

from __future__ import annotations

import collections
import math
import re
from typing import NamedTuple

import jax

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")  # "%fused_add (p: f32[2]) -> f32[2] {"
_CALLS = re.compile(r"\bcalls=%?([^\s,}]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_FUSION_KIND = re.compile(r"\bkind=(k\w+)")
_BACKEND_KIND = re.compile(r'"kind":"([^"]+)"')  # a kCustom fusion's backend: __triton_gemm, __cudnn$fusion


class Counts(NamedTuple):
    fusions: dict[str, int]  # by kind: kLoop, kInput, kOutput, or a kCustom fusion's backend (__triton_gemm)
    custom_calls: dict[str, int]  # by target
    conditionals: int
    while_loops: int


def count(text: str) -> Counts:
    """The launching instructions of an optimized HLO module's text (``compiled.as_text()``)."""
    computations = _computations(text)
    fused = {m.group(1) for body in computations.values() for line in body
             if _opcode(line) == "fusion" and (m := _CALLS.search(line))}
    fusions, calls, ops = collections.Counter(), collections.Counter(), collections.Counter()
    for name, body in computations.items():
        if name in fused:
            continue
        for line in body:
            op = _opcode(line)
            ops[op] += 1
            if op == "fusion":
                kind = _FUSION_KIND.search(line)
                backend = _BACKEND_KIND.search(line)
                kind = kind.group(1) if kind else "?"
                fusions[backend.group(1) if kind == "kCustom" and backend else kind] += 1
            elif op == "custom-call" and (target := _TARGET.search(line)):
                calls[target.group(1)] += 1
    return Counts(dict(fusions), dict(calls), ops["conditional"], ops["while"])


def library(target: str) -> str:
    """Which library a custom call or kCustom fusion runs: cublas, cudnn, triton or xla."""
    for prefix, name in (("__cublas", "cublas"), ("__cudnn", "cudnn")):
        if target.startswith(prefix):
            return name
    return "triton" if "triton" in target else "xla"


def _computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines."""
    computations, current = {}, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and "=" in line:
            current.append(line)
    return computations


def _opcode(line: str) -> str:
    """The opcode of ``[ROOT] %name = SHAPE opcode(operands), ...``; SHAPE may be a nested tuple."""
    return _parts(line)[1]


def _parts(line: str) -> tuple[str, str, list[str]]:
    """(SHAPE, opcode, operand names) of ``[ROOT] %name = SHAPE opcode(operands), ...``."""
    rest = line.split("=", 1)[1].lstrip()
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
        depth = 0
        for i, c in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                shape, rest = rest[: i + 1], rest[i + 1:].lstrip()
                break
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, operands = rest.partition("(")
    names = re.findall(r"%([^\s,()]+)", operands.split(")", 1)[0])
    return shape, opcode.strip(), names


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
          "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def array_bytes(shape: str) -> int:
    """Bytes of the arrays in an HLO shape (a tuple's elements summed)."""
    return sum(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in _ARRAY.findall(shape))


def traffic(text: str) -> dict[str, tuple[int, int]]:
    """The launching instructions of an optimized module's text by what they do with mesa's codes:
    write them (u8: pack), read them (unpack), library calls, Triton fusions, other fusions ->
    (count, operand + output bytes): an upper bound of XLA's bytes accessed (which counts what a
    fusion reads of an operand)."""
    computations = _computations(text)
    fused = {m.group(1) for body in computations.values() for line in body
             if _opcode(line) == "fusion" and (m := _CALLS.search(line))}
    kinds = {}
    for name, body in computations.items():
        if name in fused:
            continue
        shapes = {}
        for line in body:
            shape, opcode, operands = _parts(line)
            shapes[line.split("=", 1)[0].split("%")[-1].strip()] = shape
            if opcode not in ("fusion", "custom-call"):
                continue
            ins = [shapes.get(o, "") for o in operands]
            kind = ("library call" if opcode == "custom-call" else "Triton fusion" if "kind=kCustom" in line
                    else "packs (writes u8)" if "u8[" in shape
                    else "unpacks (reads u8)" if any("u8[" in s for s in ins) else "other fusion")
            count, moved = kinds.get(kind, (0, 0))
            kinds[kind] = count + 1, moved + array_bytes(shape) + sum(map(array_bytes, ins))
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1][1]))


class Cost(NamedTuple):
    """XLA's cost analysis of a compiled program."""

    bytes_accessed: float  # read and written
    flops: float  # arithmetic XLA itself emits: a cuBLAS or cuDNN call counts 0 (on a GPU: the non-GEMM work)


def cost(compiled) -> Cost | None:
    """XLA's cost analysis: the backend's own where it gives one (XLA:CPU), else XLA's generic
    analysis of the optimized modules run through the CPU client (a compile-only GPU program
    gives none of its own); None where neither is available."""
    found = compiled.cost_analysis()
    if not found:
        from jax._src.lib import _jax  # the generic analysis jax itself uses for lowered programs

        try:
            client = jax.devices("cpu")[0].client
            found = {}
            for module in compiled.runtime_executable().hlo_modules():
                for key, value in _jax.hlo_module_cost_analysis(client, module).items():
                    found[key] = found.get(key, 0.0) + value
        except (AttributeError, jax.errors.JaxRuntimeError):
            return None
    return Cost(float(found.get("bytes accessed", 0.0)), float(found.get("flops", 0.0)))
