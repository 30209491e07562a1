"""Compiles every Triton kernel of offloadfr/kernels ahead of time for an H100 (sm_90), with no GPU: Triton's front
end, its NVIDIA passes and the bundled ptxas run on the CPU. Run by tests/test_kernels.py in a subprocess without
TRITON_INTERPRET (the interpreter skips the compiler, so it accepts kernels the compiler would refuse). Prints one
line per compiled kernel."""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

from offloadfr.kernels.margin_ce import _backward_kernel, _forward_kernel  # noqa: E402
from offloadfr.kernels.normalize import _normalize_backward_kernel, _normalize_forward_kernel  # noqa: E402
from offloadfr.kernels.row_sgd import _row_sgd_kernel  # noqa: E402


def _jobs(dt: str) -> list:
    ce = {"BLOCK": 2048}
    norm = {"ROWS": 8, "BLOCK_D": 512}
    return [
        (_forward_kernel, {"cos_ptr": f"*{dt}", "stride_row": "i64", "target_ptr": "*i64", "tcos_ptr": "*fp32",
                           "max_ptr": "*fp32", "sumexp_ptr": "*fp32", "num_cols": "i32", "cols_per_split": "i32",
                           "num_splits": "i32", "scale": "fp32"}, ce),
        (_backward_kernel, {"cos_ptr": f"*{dt}", "stride_row": "i64", "grad_ptr": f"*{dt}", "stride_grad": "i64",
                            "target_ptr": "*i64", "lse_ptr": "*fp32", "coef_ptr": "*fp32", "grad_pos_ptr": "*fp32",
                            "num_cols": "i32", "scale": "fp32"}, ce),
        (_normalize_forward_kernel, {"x_ptr": "*fp32", "out_ptr": f"*{dt}", "inv_ptr": "*fp32", "num_rows": "i32",
                                     "dim": "i32", "eps": "fp32"}, norm),
        (_normalize_backward_kernel, {"grad_out_ptr": f"*{dt}", "x_ptr": "*fp32", "inv_ptr": "*fp32",
                                      "grad_x_ptr": "*fp32", "num_rows": "i32", "dim": "i32", "eps": "fp32"}, norm),
    ]


def _row_sgd_jobs() -> list:
    """The row SGD at D = 512 (8 rows per program): indexed by slots with weight decay (partial_fc), and unindexed
    without (fc, or every slot active; the slots pointer is then the gradient's, unused)."""
    signature = {"w_ptr": "*fp32", "m_ptr": "*fp32", "g_ptr": "*fp32", "num_rows": "i32", "dim": "i32",
                 "lr": "fp32", "momentum": "fp32", "weight_decay": "fp32"}
    return [
        (_row_sgd_kernel, {**signature, "slots_ptr": "*i64"},
         {"INDEXED": True, "DECAY": True, "ROWS": 8, "BLOCK_D": 512}, "indexed"),
        (_row_sgd_kernel, {**signature, "slots_ptr": "*fp32"},
         {"INDEXED": False, "DECAY": False, "ROWS": 8, "BLOCK_D": 512}, "unindexed"),
    ]


def _compile(fn, signature: dict, constexprs: dict, label: str) -> None:  # noqa: ANN001
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    signature = {name: signature[name] for name in fn.arg_names}  # in argument order
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = compile(src, target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"], fn.__name__
    print(f"compiled {fn.__name__} {label} sm_90")


if __name__ == "__main__":
    for dt in ("fp32", "bf16"):
        for fn, signature, constexprs in _jobs(dt):
            _compile(fn, signature, constexprs, dt)
    for fn, signature, constexprs, label in _row_sgd_jobs():
        _compile(fn, signature, constexprs, label)
