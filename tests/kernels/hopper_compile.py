"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

Triton's interpreter runs kernels on the CPU but checks no types: a kernel can pass every CPU test
and still fail to compile on the GPU (seen: a loop bound that was int32 on one branch and int64 on
the other). Triton's own compiler and ptxas run anywhere, so the tests compile each kernel for the
GPU the benchmarks use, with the argument types the real call sites pass. The compile runs in a
fresh process: this one has the interpreter switched on (tests/kernels/conftest.py), and Triton's
modules take the mode they were imported in.

    python tests/kernels/hopper_compile.py < jobs.json   # what compile_for_hopper runs; prints {label: error}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field


@dataclass
class Job:
    """One kernel specialisation: module and name of the @triton.jit function, Triton type names of
    its runtime arguments ('*bf16', '*i64', 'fp32'; arguments not named are i32), its constexprs."""

    module: str
    kernel: str
    types: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    label: str = field(default="")


def compile_for_hopper(jobs: list[Job], timeout: float = 300) -> dict[str, str]:
    """Compile every job to an sm_90 cubin; returns {label: error} for those that fail (empty: all ok)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], input=json.dumps([asdict(j) for j in jobs]),
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the compile process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main() -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    errors = {}
    for i, job in enumerate(json.loads(sys.stdin.read())):
        label = job["label"] or f"{job['kernel']}#{i}"
        fn = getattr(importlib.import_module(job["module"]), job["kernel"])
        names = fn.arg_names
        consts = job["constexprs"]
        unknown = (set(job["types"]) | set(consts)) - set(names)
        if unknown:
            errors[label] = f"not arguments of {job['kernel']}: {sorted(unknown)}"
            continue
        signature = {n: ("constexpr" if n in consts else job["types"].get(n, "i32")) for n in names}
        src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in consts.items()})
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
        except Exception as exc:  # noqa: BLE001 -- reported per job
            errors[label] = f"{type(exc).__name__}: {exc}"[-3000:]
    print(json.dumps(errors))


if __name__ == "__main__":
    _main()


TRITON_TYPES = {
    "torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float8_e4m3fn": "fp8e4nv",
    "torch.int8": "i8", "torch.uint8": "u8", "torch.int16": "i16", "torch.int32": "i32", "torch.int64": "i64",
    "torch.bool": "i1",
}


class LaunchRecorder:
    """Records, while active, every kernel launch the Triton interpreter runs, as a Job with the
    launch's argument types and constexprs (INTERPRET constexprs set False: the compiled build's).

        with LaunchRecorder() as rec:
            some_wrapper(...)          # under TRITON_INTERPRET=1
        compile_for_hopper(rec.jobs())
    """

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._patched = None

    def __enter__(self) -> "LaunchRecorder":
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            recorder._record(fn_self, args, kwargs)
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        self._patched = (InterpretedFunction, original)
        return self

    def __exit__(self, *exc) -> None:
        cls, original = self._patched
        cls.run = original

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def _record(self, fn_self, args, kwargs) -> None:
        import inspect

        kwargs = dict(kwargs)
        warps, stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 2)
        kwargs.pop("launch_pdl", None)  # a launch option; the kernel's PDL constexpr is compiled as on Hopper
        params = inspect.signature(fn_self.fn).parameters
        values = dict(zip(fn_self.arg_names, args)) | kwargs
        types, consts = {}, {}
        for name, value in values.items():
            if "constexpr" in str(params[name].annotation) or value is None:
                # as a Hopper GPU launches it: not interpreting, with programmatic dependent launch
                consts[name] = {"INTERPRET": False, "PDL": True}.get(name, value)
            elif hasattr(value, "dtype") and hasattr(value, "data_ptr"):
                types[name] = "*" + TRITON_TYPES[str(value.dtype)]
            elif type(value).__name__ == "TensorDescriptor":  # e.g. 'tensordesc<bf16[32, 128]>'
                from triton.runtime.jit import mangle_type
                types[name] = mangle_type(value)
            elif isinstance(value, bool):
                types[name] = "i1"
            elif isinstance(value, int):
                types[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            elif isinstance(value, float):
                types[name] = "fp32"
            else:
                raise TypeError(f"cannot type argument {name}={value!r} of {fn_self.fn.__name__}")
        module = fn_self.fn.__module__
        key = json.dumps([module, fn_self.fn.__name__, types, {k: repr(v) for k, v in consts.items()},
                          warps, stages], sort_keys=True)
        if key not in self._jobs:
            self._jobs[key] = Job(module, fn_self.fn.__name__, types, consts, warps, stages,
                                  label=f"{fn_self.fn.__name__} {types} {consts}")
