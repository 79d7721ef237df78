"""The MoE kernels (routing, sort, grouped GEMM) compiled for a Hopper GPU (sm_90) on this machine, no GPU
needed: Triton's compiler runs on the CPU down to the cubin, and refuses what the interpreter (the CPU tests' path)
lets through, such as a tensor-core dot over a tile too small or of mixed dtypes. Each variant the engine
launches is compiled once, bfloat16 and FP8 ones too, which the CPU tests (float32 and float16) do not launch and
so tests/triton_sm90.py's recording at the end of `make test` does not see."""

from triton_sm90 import compile_specs

from tokenmill.layers import fused_moe_triton as m


def spec(kernel, types: dict, constexprs: dict, num_warps: int = 4) -> dict:
    signature = {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in kernel.arg_names}
    return {"module": m.__name__, "kernel": kernel.fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": {"num_warps": num_warps, "num_stages": 3}}


def moe_specs() -> list[dict]:
    align = {name: "*i32" for name in m._plan_blocks_kernel.arg_names if name.endswith("_ptr")}
    specs = [spec(m._plan_blocks_kernel, {**align, "ids_ptr": "*i64"},
                  dict(NUM_EXPERTS=128, E_PAD=256, BLOCK_M=16, FILL_CHUNK=1024, ALONE=alone)) for alone in (0, 1024)]
    specs.append(spec(m._count_pairs_kernel, {"ids_ptr": "*i64", "counts_ptr": "*i32"}, dict(CHUNK=1024)))
    specs.append(spec(m._scatter_pairs_kernel, {"ids_ptr": "*i64", "cursors_ptr": "*i32",
                                                "sorted_pair_ids_ptr": "*i32"}, dict(CHUNK=1024)))
    specs.append(spec(m._softmax_topk_kernel, {"logits_ptr": "*bf16", "weights_ptr": "*fp32", "ids_ptr": "*i64",
                                               "scale": "fp32"}, dict(TOP_K=6, K_PAD=8, E_PAD=128, RENORMALIZE=True)))
    variants = {  # SCALES: (A, B, B's scales, BLOCK_K)
        m.NO_SCALES: ("*bf16", "*bf16", "*fp32", 64),
        m.CHANNEL_SCALES: ("*fp8e4nv", "*fp8e4nv", "*fp32", 64),
        m.BLOCK_SCALES: ("*fp8e4nv", "*fp8e4nv", "*fp32", 128),
        m.MXFP4_SCALES: ("*bf16", "*u8", "*u8", 64),
    }
    for scales, (a, b, b_scale, block_k) in variants.items():
        for first in (True, False):  # gate/up (rows of x, k per row), down (router weights, biases)
            types = {"a_ptr": a, "b_ptr": b, "c_ptr": "*bf16", "weights_ptr": "*fp32", "bias_ptr": "*bf16",
                     "a_scale_ptr": "*fp32", "b_scale_ptr": b_scale, "sorted_pair_ids_ptr": "*i32",
                     "block_expert_ids_ptr": "*i32", "num_rows_padded_ptr": "*i32"}
            for config in (m.gemm_config(1, 128), m.gemm_config(4096, 128, 8)):  # decode, long prompt
                specs.append(spec(m._grouped_gemm_kernel, types,
                                  dict(PAIRS_PER_A_ROW=8 if first else 1, MUL_WEIGHT=not first, HAS_BIAS=not first,
                                       SCALES=scales, SCALE_BLOCK_N=128, BLOCK_M=config.block_m,
                                       BLOCK_N=config.block_n, BLOCK_K=block_k, DOT_PRECISION="tf32"),
                                  config.num_warps))
    return specs


def test_moe_kernels_compile_for_sm90():
    assert compile_specs(moe_specs()) == []
