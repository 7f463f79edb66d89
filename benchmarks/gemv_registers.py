"""Registers, spills and occupancy of the expert GEMVs (kernels/moe_gemv.py) as a GPU table runs them.

For every one-token entry of a table that takes the GEMV path, compiles the gate/up and the down
GEMV for Hopper (sm_90) with the constexprs the wrappers pass, reads each cubin's resource usage
(cuobjdump, shipped with Triton) and prints registers per thread, local-memory (spill) bytes and
how many warps of the kernel one multiprocessor can hold (65536 registers, at most 64 warps and
32 blocks). Runs on a machine without a GPU: Triton's compiler and tools run anywhere.

    python benchmarks/gemv_registers.py                      # kernels/configs/NVIDIA_H200.json
    python benchmarks/gemv_registers.py --table kernels/configs/NVIDIA_H100_80GB_HBM3.json --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from moeserve.kernels import moe_gemv
from moeserve.kernels.configs import CONFIG_DIR, MoeConfig
from moeserve.kernels.weights import ExpertWeights, scale_shapes

REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
WEIGHT_TYPES = {"bf16": "*bf16", "fp8": "*fp8e4nv", "int8": "*i8"}


def specialise(fn, types: dict[str, str], values: dict[str, int], constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of fn as Triton's JIT would compile it for a launch with these
    integer arguments: an integer equal to 1 becomes a constant and one divisible by 16 is marked so
    (unless the kernel says do_not_specialize), and every pointer is taken 16-byte aligned, as torch
    allocates. Without this, compiled code assumes nothing about strides or alignment: no vector loads,
    and several times the registers a real launch uses."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, p in enumerate(fn.params):
        name = p.name
        if name in consts:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            kind, spec = native_specialize_impl(BaseBackend, values[name], False, not p.do_not_specialize, True)
            if kind == "constexpr":
                signature[name], consts[name] = "constexpr", spec
            else:
                signature[name] = kind
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def resources(fn, types: dict[str, str], values: dict[str, int], constexprs: dict, num_warps: int) -> dict:
    """{'REG': .., 'LOCAL': .., 'SHARED': ..} of fn compiled for sm_90 as a launch with these pointer
    types and integer arguments would compile it (specialise)."""
    names = fn.arg_names
    signature, consts, attrs = specialise(fn, types, values, constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in consts.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=2))
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"gemv_registers_{os.getpid()}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    try:
        out = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    finally:
        cubin.unlink(missing_ok=True)
    return {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", out)}


def resident_warps(registers: int, num_warps: int) -> int:
    """Warps of one kernel a multiprocessor holds at once, bounded by registers, warps and blocks."""
    per_block = max(1, registers) * 32 * num_warps
    blocks = min(REGISTERS_PER_SM // per_block, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM)
    return blocks * num_warps


def meta_experts(e: int, h: int, i: int, quant: str) -> ExpertWeights:
    """Experts of these sizes on the meta device: their layouts and strides, no memory."""
    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[quant]

    def meta(shape, dt):
        return None if shape is None else torch.empty(shape, dtype=dt, device="meta")

    s13, s2 = scale_shapes(e, h, i, quant)
    return ExpertWeights(meta((e, 2 * i, h), dtype), meta((e, h, i), dtype), meta(s13, torch.float32),
                         meta(s2, torch.float32), quant)


def entry_kernels(key: str, cfg: MoeConfig) -> list[tuple[str, object, dict, dict, dict, int]]:
    """(label, kernel, pointer types, integer arguments, constexprs, warps) of the two GEMVs of one
    table entry, as a one-token call launches them."""
    fields = dict(part.split("=") for part in key.split(",")[:4])
    quant = key.split(",")[4]
    e, h, inter, top_k = int(fields["E"]), int(fields["H"]), int(fields["I"]), int(fields["k"])
    g = cfg.gemv
    up_consts = moe_gemv.up_constexprs(h, top_k, quant, g)
    down_consts = moe_gemv.down_constexprs(inter, top_k, quant, g)
    act = "*fp8e4nv" if up_consts["PREQUANT"] else "*bf16"
    up_types = {"x_ptr": act, "xs_ptr": "*fp32" if up_consts["PREQUANT"] else act, "w_ptr": WEIGHT_TYPES[quant],
                "s_ptr": "*fp32", "ids_ptr": "*i64", "act_ptr": "*bf16"}
    w = meta_experts(e, h, inter, quant)
    se, sn, sk = moe_gemv._scale_strides(w.w13_scale)
    up_values = dict(I=inter, K=h, E=e,
                     gate_scale_rows=-(-inter // 128), stride_x=h,
                     stride_xs=-(-h // 128) if up_consts["PREQUANT"] else h, stride_we=w.w13.stride(0),
                     stride_wn=w.w13.stride(1), stride_se=se, stride_sn=sn, stride_sk=sk, stride_act=inter)
    a = "*fp8e4nv" if down_consts["PREQUANT"] else "*bf16"
    down_types = {"act_ptr": a, "as_ptr": "*fp32" if down_consts["PREQUANT"] else a, "w_ptr": WEIGHT_TYPES[quant],
                  "s_ptr": "*fp32", "ids_ptr": "*i64", "tw_ptr": "*fp32", "out_ptr": "*bf16"}
    se, sn, sk = moe_gemv._scale_strides(w.w2_scale)
    down_values = dict(H=h, K=inter, E=e, stride_act=inter,
                       stride_as=-(-inter // 128) if down_consts["PREQUANT"] else inter, stride_we=w.w2.stride(0),
                       stride_wn=w.w2.stride(1), stride_se=se, stride_sn=sn, stride_sk=sk, stride_out=h)
    up_consts.update(INTERPRET=False, PDL=True)
    down_consts.update(INTERPRET=False, PDL=True)
    return [(f"{key} gate/up rows={g.up_rows}", moe_gemv._gemv_up_kernel, up_types, up_values, up_consts, g.up_warps),
            (f"{key} down rows={g.down_rows}" + (" combine" if g.combine else "")
             + (f" pieces={g.down_pieces}" if g.down_pieces > 1 else ""), moe_gemv._gemv_down_kernel,
             down_types, down_values, down_consts, g.down_warps)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, default=CONFIG_DIR / "NVIDIA_H200.json")
    ap.add_argument("--bucket", default="1", help="token bucket of the table (default 1)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    table = json.loads(args.table.read_text())
    rows = []
    for key, buckets in sorted(table.items()):
        entry = buckets.get(args.bucket)
        cfg = MoeConfig.from_dict(entry) if entry else None
        if cfg is None or cfg.gemv is None:
            continue
        for label, fn, types, values, consts, warps in entry_kernels(key, cfg):
            use = resources(fn, types, values, consts, warps)
            row = {"kernel": label, "warps": warps, "registers": use.get("REG", 0), "spill_bytes": use.get("LOCAL", 0),
                   "resident_warps": resident_warps(use.get("REG", 0), warps)}
            rows.append(row)
            print(f"{label:52s} warps {warps}: {row['registers']:3d} registers, {row['spill_bytes']:4d} B spilled, "
                  f"{row['resident_warps']:2d} of {MAX_WARPS_PER_SM} warps resident per SM", flush=True)
    if not rows:
        print(f"{args.table} has no GEMV entry in bucket {args.bucket}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps({"table": str(args.table), "bucket": args.bucket, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
