"""Fused scaled-dot-product attention (non-causal), forward and backward, FlashAttention-2 style.

    out = softmax(q @ k^T * scale) @ v        q: (B, H, Nq, D), k, v: (B, H, Nk, D)

Forward (Dao, "FlashAttention-2", 2023, Algorithm 1): one program per (BLOCK_M query rows, batch *
head) walks over the keys in BLOCK_N blocks and keeps an online softmax (running max m, running
sum l) in float32, with exp2 and the scale folded into log2(e). It writes `out` and the
log-sum-exp of every query row (natural log, float32, (B, H, Nq)) for the backward.

Backward (Algorithm 2, split in two so that nothing is accumulated with atomics, which makes it
deterministic): delta = rowsum(dO * O); then one kernel with a program per BLOCK_N keys that loops
over the queries and writes dK, dV, and one kernel with a program per BLOCK_M queries that loops
over the keys and writes dQ. Each gradient row is written by exactly one program, so repeated
runs give bit-identical gradients (for a given block config: block sizes are autotuned per GPU,
dtype, head dim and sequence-length bucket (tune_bucket), once per process).

Only the ragged last block of a loop is masked: every loop runs an unmasked bulk over the full
blocks and then, when N is not a multiple of the block, one masked tail (a constexpr flag).

Layouts. Inputs may be any strided views with unit stride on D (e.g. q, k, v straight from the
qkv projection's (B, N, 3*H*D) output); other inputs are made unit-stride on D first. `attention`
returns a (B, H, Nq, D) view of a contiguous (B, Nq, H, D) buffer, so that
`out.transpose(1, 2).reshape(B, Nq, H * D)` is free. `attention_qkv_packed` takes the packed
projection output and returns (B, N, H*D); its backward writes dq, dk, dv into one
(B, N, 3*H*D) gradient buffer.

dtypes: bfloat16 and float16 run the matrix products on their own type with float32
accumulation and float32 softmax statistics. float32 inputs run the matrix products in TF32 on
the GPU (10-bit mantissa, like torch.backends.cuda.matmul.allow_tf32=True); under the Triton
interpreter (CPU tests) the products are exact float32. Head dims 32, 64 and 128 are supported;
any other head dim raises ValueError.

Dispatch (kernels.utils.use_triton): CUDA tensors run the compiled kernels; CPU tensors run them
through the Triton interpreter when TRITON_INTERPRET=1 and otherwise run `attention_reference`
(the same math in plain PyTorch, float32 softmax), with autograd through PyTorch ops.

The forward and backward are registered as torch.library custom ops (namespace "setr_kernels")
with fake implementations, and wrapped in autograd Functions, so torch.compile traces the model
through them without graph breaks.
"""
import math

import torch
import triton
import triton.language as tl

from kernels.utils import check_float, check_triton_op, device_guard, jit, launch_mode, use_triton

SUPPORTED_HEAD_DIMS = (32, 64, 128)
LOG2E = tl.constexpr(1.4426950408889634)


# --- autotuning configs ----------------------------------------------------------------------

def _configs(shapes):
    """triton.Config list from (BLOCK_M, BLOCK_N, num_warps, num_stages, max_row_bytes) tuples, and
    the autotuner's pruning rule: a launch tries only the configs whose max_row_bytes is at least
    its q row size, HEAD_DIM * element size (float32 rows are twice bf16's: the same registers)."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s, _ in shapes]
    max_row_bytes = {id(c): shape[-1] for c, shape in zip(configs, shapes)}

    def prune(configs, named_args, **kwargs):
        row_bytes = kwargs["HEAD_DIM"] * named_args["Q"].element_size()
        return [c for c in configs if row_bytes <= max_row_bytes[id(c)]]

    return configs, {"early_config_prune": prune}


ANY = 512  # any row: D=128 in float32
# Candidates for Hopper (H100/H200), also fine on Ampere. Compiled offline for sm_90a and sm_80
# (python -m bench.compile_gate --all; table in bench/results/compile/): every one uses wgmma
# on sm_90a and mma on sm_80, and none the autotuner tries spills registers for bf16/fp16 at
# D=32/64/128 on sm_90a or at D=64 on sm_80. max_row_bytes is the largest q row a config runs
# without spilling: 128 (D=64 in bf16/fp16) for those that spill at D=128, 64 (D=32) for dK/dV
# 32x128 on 4 warps (spills at D=64 on both archs) and dQ 128x128 (spills at D=64 on sm_80).
# Configs that do not fit in shared memory for a head dim / dtype are skipped by the autotuner.
_FWD_CONFIGS, _FWD_PRUNE = _configs([
    (128, 64, 4, 3, 128), (128, 64, 8, 3, ANY), (128, 128, 8, 3, ANY), (128, 128, 8, 2, ANY),
    (128, 64, 4, 4, 128), (128, 32, 4, 4, ANY), (64, 64, 4, 3, ANY), (64, 128, 4, 3, 128),
    (64, 32, 4, 2, ANY),
])
# dK/dV: BLOCK_N keys per program, loop over BLOCK_M queries.
_BWD_DKDV_CONFIGS, _BWD_DKDV_PRUNE = _configs([
    (32, 128, 4, 3, 64), (32, 128, 8, 3, ANY), (32, 128, 8, 4, ANY), (64, 128, 8, 3, 128),
    (64, 128, 8, 2, 128), (32, 64, 4, 3, ANY), (64, 64, 4, 3, 128),
])
# dQ: BLOCK_M queries per program, loop over BLOCK_N keys.
_BWD_DQ_CONFIGS, _BWD_DQ_PRUNE = _configs([
    (128, 32, 4, 3, 128), (128, 32, 8, 4, ANY), (128, 64, 8, 3, ANY), (128, 64, 8, 2, ANY),
    (64, 64, 4, 3, ANY), (64, 32, 4, 3, ANY), (128, 128, 8, 2, 64),
])
# Under the interpreter the kernels run one fixed small config: autotuning there only
# costs time. Unequal blocks so that the tests exercise the index arithmetic of both loops.
INTERPRETER_CONFIGS = {"fwd": dict(BLOCK_M=64, BLOCK_N=32), "dkdv": dict(BLOCK_M=32, BLOCK_N=64),
                       "dq": dict(BLOCK_M=64, BLOCK_N=32)}


def tune_bucket(n):
    """Autotune key of a sequence length n: the next power of two >= n, times 2, plus 1 when n is a
    multiple of 16 (Triton compiles those as a separate variant). The kernels mask by the real n,
    so any n in a bucket is correct with any config; evaluation's many token counts (slide windows
    smaller than the crop, whole images, multi-scale) then share a few tuned configs."""
    return 2 * triton.next_power_of_2(n) + (n % 16 == 0)


# --- kernels ---------------------------------------------------------------------------------

@jit
def _dot(a, b, INTERP_BF16: tl.constexpr):
    """a @ b with float32 accumulation (TF32 for float32 operands on the GPU).

    INTERP_BF16 is set only under the Triton interpreter with bfloat16 inputs: its numpy emulation
    stores bfloat16 as raw uint16 and cannot multiply it. The float32 product of bfloat16 values
    is exact, so the result equals the GPU's bfloat16 tensor-core product with float32 accumulation.
    """
    if INTERP_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="tf32")


@jit
def _cast(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """float32 x -> dtype, rounding to nearest even.

    On the GPU that is what `.to` does. The interpreter truncates float32 -> bfloat16 instead, so
    under INTERP_BF16 x is first rounded to nearest even on its bits (exact in bfloat16 after).
    """
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, start, end, Nk, qk_scale,
                    offs_n, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, INTERP_BF16: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over the key blocks [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        # load the key and value block (BLOCK_N, D); only the ragged tail block is masked
        if MASK_N:
            kv_mask = (start_n + offs_n)[:, None] < Nk
            k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
            v = tl.load(v_ptrs + start_n * stride_vn)
        # scores in log2 units: s = q k^T * scale * log2(e)   (BLOCK_M, BLOCK_N), float32
        s = _dot(q, tl.trans(k), INTERP_BF16) * qk_scale
        if MASK_N:
            s = tl.where((start_n + offs_n)[None, :] < Nk, s, float("-inf"))
        # new running max, rescale factor of the old statistics, probabilities of this block
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # acc = acc * alpha + p @ v, with p rounded to the input dtype like the GPU kernels do
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, INTERP_BF16), v, INTERP_BF16)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["Q_BUCKET", "K_BUCKET", "HEAD_DIM"],
                 prune_configs_by=_FWD_PRUNE)
@jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D), unit stride on D
    O,  # (B, H, Nq, D) output, unit stride on D
    LSE,  # (B, H, Nq) float32, contiguous: log-sum-exp of each score row (natural log)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, Nq, Nk, qk_scale,  # qk_scale = scale * log2(e)
    Q_BUCKET, K_BUCKET,  # tune_bucket(Nq), tune_bucket(Nk): the autotune key only
    HEAD_DIM: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    # move the base pointers to this (batch, head); int64 so large batches cannot overflow
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh
    LSE += pid_bh.to(tl.int64) * Nq

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < Nq

    # load the query block (BLOCK_M, D) once; it stays in registers for the whole loop
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :]

    # running statistics in float32: max m_i and sum l_i (log2 units), unnormalized output acc
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # unmasked bulk over the full key blocks, then the masked ragged tail
    n_full = (Nk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, 0, n_full, Nk,
                                    qk_scale, offs_n, BLOCK_N, False, INTERP_BF16)
    if n_full < Nk:
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, n_full, Nk, Nk,
                                        qk_scale, offs_n, BLOCK_N, True, INTERP_BF16)

    # normalize, write the output and the log-sum-exp (converted to natural log)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) / LOG2E
    tl.store(LSE + offs_m, lse, mask=row_mask)
    o = _cast(acc, O.dtype.element_ty, INTERP_BF16)
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :], o, mask=row_mask[:, None])


@jit
def _attn_bwd_preprocess_kernel(
    O, DO,  # (B, H, Nq, D) each, unit stride on D
    DELTA,  # (B, H, Nq) float32, contiguous
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, Nq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < Nq
    # load O and dO rows in float32
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    # delta_i = sum_d dO_id * O_id  (= rowsum(P * dP), the softmax backward's correction term)
    delta = tl.sum(o * do, axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Nq + offs_m, delta, mask=offs_m < Nq)


@jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qn, stride_don,
                         start, end, Nq, qk_scale, offs_m,
                         BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, INTERP_BF16: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [start, end)."""
    for start_m in range(start, end, BLOCK_M):
        # load the query block, its output gradient (BLOCK_M, D) and row statistics (BLOCK_M,)
        if MASK_M:
            row_mask = (start_m + offs_m) < Nq
            q = tl.load(q_ptrs + start_m * stride_qn, mask=row_mask[:, None], other=0.0)
            do = tl.load(do_ptrs + start_m * stride_don, mask=row_mask[:, None], other=0.0)
            lse = tl.load(lse_ptrs + start_m, mask=row_mask, other=0.0)
            delta = tl.load(delta_ptrs + start_m, mask=row_mask, other=0.0)
        else:
            q = tl.load(q_ptrs + start_m * stride_qn)
            do = tl.load(do_ptrs + start_m * stride_don)
            lse = tl.load(lse_ptrs + start_m)
            delta = tl.load(delta_ptrs + start_m)
        # recompute the probabilities, transposed: P^T = exp2(k q^T * scale*log2e - lse*log2e)
        s_t = _dot(k, tl.trans(q), INTERP_BF16) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :] * LOG2E)
        if MASK_M:
            p_t = tl.where((start_m + offs_m)[None, :] < Nq, p_t, 0.0)
        # dV += P^T dO
        dv += _dot(_cast(p_t, do.dtype, INTERP_BF16), do, INTERP_BF16)
        # dP^T = v dO^T; dS^T = P^T * (dP^T - delta)
        dp_t = _dot(v, tl.trans(do), INTERP_BF16)
        ds_t = p_t * (dp_t - delta[None, :])
        # dK += dS^T q  (the softmax scale is applied once at the end)
        dk += _dot(_cast(ds_t, q.dtype, INTERP_BF16), q, INTERP_BF16)
    return dk, dv


@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=["Q_BUCKET", "K_BUCKET", "HEAD_DIM"],
                 prune_configs_by=_BWD_DKDV_PRUNE)
@jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D), unit stride on D
    DO,  # (B, H, Nq, D) output gradient, unit stride on D
    LSE, DELTA,  # (B, H, Nq) float32 each, contiguous
    DK, DV,  # (B, H, Nk, D) gradients, unit stride on D
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, Nq, Nk, qk_scale, scale,
    Q_BUCKET, K_BUCKET,  # tune_bucket(Nq), tune_bucket(Nk): the autotune key only
    HEAD_DIM: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh
    LSE += pid_bh.to(tl.int64) * Nq
    DELTA += pid_bh.to(tl.int64) * Nq

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_mask = offs_n[:, None] < Nk

    # this program's key and value block (BLOCK_N, D) stays in registers; rows past Nk are zero
    # and their gradients are never stored, so the loop needs no key mask
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=key_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=key_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    q_ptrs = Q + offs_m[:, None] * stride_qn + offs_d[None, :]
    do_ptrs = DO + offs_m[:, None] * stride_don + offs_d[None, :]
    lse_ptrs = LSE + offs_m
    delta_ptrs = DELTA + offs_m

    # unmasked bulk over the full query blocks, then the masked ragged tail
    m_full = (Nq // BLOCK_M) * BLOCK_M
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qn, stride_don,
                                  0, m_full, Nq, qk_scale, offs_m, BLOCK_M, False, INTERP_BF16)
    if m_full < Nq:
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qn, stride_don,
                                      m_full, Nq, Nq, qk_scale, offs_m, BLOCK_M, True, INTERP_BF16)

    # write dK (times the softmax scale) and dV, each row by this program only
    dk = _cast(dk * scale, DK.dtype.element_ty, INTERP_BF16)
    dv = _cast(dv, DV.dtype.element_ty, INTERP_BF16)
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :], dk, mask=key_mask)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :], dv, mask=key_mask)


@jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, start, end, Nk, qk_scale,
                       offs_n, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, INTERP_BF16: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        # load the key and value block (BLOCK_N, D)
        if MASK_N:
            kv_mask = (start_n + offs_n)[:, None] < Nk
            k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
            v = tl.load(v_ptrs + start_n * stride_vn)
        # recompute the probabilities P = exp2(q k^T * scale*log2e - lse*log2e)   (BLOCK_M, BLOCK_N)
        s = _dot(q, tl.trans(k), INTERP_BF16) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASK_N:
            p = tl.where((start_n + offs_n)[None, :] < Nk, p, 0.0)
        # dP = dO v^T; dS = P * (dP - delta); dQ += dS k
        dp = _dot(do, tl.trans(v), INTERP_BF16)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, k.dtype, INTERP_BF16), k, INTERP_BF16)
    return dq


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=["Q_BUCKET", "K_BUCKET", "HEAD_DIM"],
                 prune_configs_by=_BWD_DQ_PRUNE)
@jit
def _attn_bwd_dq_kernel(
    Q, K, V,  # (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D), unit stride on D
    DO,  # (B, H, Nq, D) output gradient, unit stride on D
    LSE, DELTA,  # (B, H, Nq) float32 each, contiguous
    DQ,  # (B, H, Nq, D) gradient, unit stride on D
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, Nq, Nk, qk_scale, scale,
    Q_BUCKET, K_BUCKET,  # tune_bucket(Nq), tune_bucket(Nk): the autotune key only
    HEAD_DIM: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DQ += off_b * stride_dqb + off_h * stride_dqh
    LSE += pid_bh.to(tl.int64) * Nq
    DELTA += pid_bh.to(tl.int64) * Nq

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < Nq

    # this program's query rows, output gradient and statistics stay in registers; rows past
    # Nq are zero (finite probabilities) and never stored, so the loop needs no query mask
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_don + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    lse2 = tl.load(LSE + offs_m, mask=row_mask, other=0.0) * LOG2E
    delta = tl.load(DELTA + offs_m, mask=row_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :]

    # unmasked bulk over the full key blocks, then the masked ragged tail
    n_full = (Nk // BLOCK_N) * BLOCK_N
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, 0, n_full, Nk,
                            qk_scale, offs_n, BLOCK_N, False, INTERP_BF16)
    if n_full < Nk:
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, n_full, Nk, Nk,
                                qk_scale, offs_n, BLOCK_N, True, INTERP_BF16)

    # write dQ (times the softmax scale)
    dq = _cast(dq * scale, DQ.dtype.element_ty, INTERP_BF16)
    tl.store(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :], dq, mask=row_mask[:, None])


# --- launchers -------------------------------------------------------------------------------

def _strides(t):
    """(batch, head, row) strides of a (B, H, N, D) tensor with unit stride on D."""
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_stride_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _interp_bf16(t):
    return launch_mode(t) == "interpreted" and t.dtype == torch.bfloat16


def _tuned(kernel, t, name):
    """(kernel, launch kwargs): the autotuned kernel for a compiled launch; under the interpreter
    the kernel itself with INTERPRETER_CONFIGS[name]."""
    return (kernel, {}) if launch_mode(t) == "compiled" else (kernel.fn, INTERPRETER_CONFIGS[name])


def attention_fwd(q, k, v, scale):
    """Launch the forward kernel.

    q: (B, H, Nq, D), k, v: (B, H, Nk, D), any strides (unit stride on D avoids a copy).
    Returns (out, lse): out (B, H, Nq, D), a view of a new contiguous (B, Nq, H, D) buffer, and
    lse (B, H, Nq) float32, the natural-log log-sum-exp of each row of scores.
    """
    q, k, v = _unit_stride_last(q), _unit_stride_last(k), _unit_stride_last(v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = torch.empty(B, Nq, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, H, Nq, device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)
    kernel, config = _tuned(_attn_fwd_kernel, q, "fwd")
    with device_guard(q):
        kernel[grid](
            q, k, v, out, lse,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            H, Nq, Nk, scale * LOG2E.value, tune_bucket(Nq), tune_bucket(Nk),
            HEAD_DIM=D, INTERP_BF16=_interp_bf16(q), **config,
        )
    return out, lse


def attention_bwd(do, q, k, v, out, lse, scale, dq, dk, dv):
    """Launch the backward kernels, writing into the given dq (like q), dk, dv (like k, v) views.

    do, out: (B, H, Nq, D); lse: (B, H, Nq) float32 from attention_fwd. dq, dk, dv: unit stride on D.
    """
    do, q, k, v, out = (_unit_stride_last(t) for t in (do, q, k, v, out))
    lse = lse.contiguous()
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    delta = torch.empty(B, H, Nq, device=q.device, dtype=torch.float32)
    interp_bf16 = _interp_bf16(q)
    with device_guard(q):
        # delta = rowsum(dO * O)
        pre_block = 64
        _attn_bwd_preprocess_kernel[(triton.cdiv(Nq, pre_block), B * H)](
            out, do, delta, *_strides(out), *_strides(do), H, Nq,
            HEAD_DIM=D, BLOCK_M=pre_block, num_warps=4,
        )
        # dK, dV: programs over key blocks
        grid_kv = lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B * H)
        kernel, config = _tuned(_attn_bwd_dkdv_kernel, q, "dkdv")
        kernel[grid_kv](
            q, k, v, do, lse, delta, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            H, Nq, Nk, scale * LOG2E.value, scale, tune_bucket(Nq), tune_bucket(Nk),
            HEAD_DIM=D, INTERP_BF16=interp_bf16, **config,
        )
        # dQ: programs over query blocks
        grid_q = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)
        kernel, config = _tuned(_attn_bwd_dq_kernel, q, "dq")
        kernel[grid_q](
            q, k, v, do, lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            H, Nq, Nk, scale * LOG2E.value, scale, tune_bucket(Nq), tune_bucket(Nk),
            HEAD_DIM=D, INTERP_BF16=interp_bf16, **config,
        )
    return dq, dk, dv


def split_heads(qkv, num_heads):
    """(B, N, 3*H*D) packed [q; k; v] -> q, k, v views (B, H, N, D), no copies."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    q, k, v = qkv.view(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def merge_heads(out):
    """(B, H, N, D) -> (B, N, H*D), the out-projection's input layout."""
    B, H, N, D = out.shape
    return out.transpose(1, 2).reshape(B, N, H * D)


# --- torch.library custom ops ----------------------------------------------------------------

@torch.library.custom_op("setr_kernels::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_op("attention_fwd", "kernels.attention.attention", q, k, v)
    return attention_fwd(q, k, v, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, scale):
    B, H, Nq, D = q.shape
    out = q.new_empty(B, Nq, H, D).transpose(1, 2)
    return out, q.new_empty(B, H, Nq, dtype=torch.float32)


@torch.library.custom_op("setr_kernels::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_triton_op("attention_bwd", "kernels.attention.attention", do, q, k, v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dq = torch.empty(B, Nq, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    dk = torch.empty(B, Nk, H, D, device=k.device, dtype=k.dtype).transpose(1, 2)
    dv = torch.empty(B, Nk, H, D, device=v.device, dtype=v.dtype).transpose(1, 2)
    return attention_bwd(do, q, k, v, out, lse, scale, dq, dk, dv)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, scale):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    return (q.new_empty(B, Nq, H, D).transpose(1, 2), k.new_empty(B, Nk, H, D).transpose(1, 2),
            v.new_empty(B, Nk, H, D).transpose(1, 2))


def attention_packed_fwd(qkv, num_heads, scale):
    """qkv: (B, N, 3*H*D) -> (out (B, N, H*D), lse (B, H, N) float32): the forward launch on the packed layout."""
    q, k, v = split_heads(_unit_stride_last(qkv), num_heads)
    out, lse = attention_fwd(q, k, v, scale)  # out: (B, H, N, D) view of a (B, N, H, D) buffer
    return merge_heads(out), lse


def attention_packed_bwd(dout, qkv, out, lse, num_heads, scale):
    """dout, out: (B, N, H*D); qkv: (B, N, 3*H*D); lse: (B, H, N) -> dqkv (B, N, 3*H*D)."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    q, k, v = split_heads(_unit_stride_last(qkv), num_heads)
    # one (B, N, 3*H*D) gradient buffer; the kernels write dq, dk, dv straight into its thirds
    dqkv = torch.empty(B, N, C3, device=qkv.device, dtype=qkv.dtype)
    dq, dk, dv = split_heads(dqkv, num_heads)
    # (B, N, H*D) with unit last stride -> (B, H, N, D) view
    as_heads = lambda t: _unit_stride_last(t).view(B, N, num_heads, D).transpose(1, 2)
    attention_bwd(as_heads(dout), q, k, v, as_heads(out), lse, scale, dq, dk, dv)
    return dqkv


@torch.library.custom_op("setr_kernels::attention_qkv_packed_fwd", mutates_args=())
def _attention_packed_fwd_op(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_op("attention_qkv_packed_fwd", "kernels.attention.attention_qkv_packed", qkv)
    return attention_packed_fwd(qkv, num_heads, scale)


@_attention_packed_fwd_op.register_fake
def _(qkv, num_heads, scale):
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


@torch.library.custom_op("setr_kernels::attention_qkv_packed_bwd", mutates_args=())
def _attention_packed_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             num_heads: int, scale: float) -> torch.Tensor:
    check_triton_op("attention_qkv_packed_bwd", "kernels.attention.attention_qkv_packed", dout, qkv)
    return attention_packed_bwd(dout, qkv, out, lse, num_heads, scale)


@_attention_packed_bwd_op.register_fake
def _(dout, qkv, out, lse, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


# --- autograd --------------------------------------------------------------------------------

class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = torch.ops.setr_kernels.attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.setr_kernels.attention_bwd(dout, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None


class AttentionQKVPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, num_heads, scale):
        out, lse = torch.ops.setr_kernels.attention_qkv_packed_fwd(qkv, num_heads, scale)
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads = num_heads
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse = ctx.saved_tensors
        dqkv = torch.ops.setr_kernels.attention_qkv_packed_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.scale)
        return dqkv, None, None


# --- public API ------------------------------------------------------------------------------

def _check_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} has shape {tuple(t.shape)}; expected 4 dims (B, H, N, D)")
        check_float(f"attention: {name}", t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: dtypes differ (q {q.dtype}, k {k.dtype}, v {v.dtype}); expected one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: devices differ (q {q.device}, k {k.device}, v {v.device}); expected one device")
    (B, H, Nq, D), (Bk, Hk, Nk, Dk), (Bv, Hv, Nv, Dv) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"attention: batch sizes differ (q {B}, k {Bk}, v {Bv}); expected equal")
    if not (H == Hk == Hv):
        raise ValueError(f"attention: head counts differ (q {H}, k {Hk}, v {Hv}); expected equal")
    if not (D == Dk == Dv):
        raise ValueError(f"attention: head dims differ (q {D}, k {Dk}, v {Dv}); expected equal")
    if Nk != Nv:
        raise ValueError(f"attention: k has {Nk} tokens and v has {Nv}; expected equal")
    if Nq < 1 or Nk < 1 or B < 1 or H < 1:
        raise ValueError(f"attention: B={B}, H={H}, Nq={Nq}, Nk={Nk}; expected at least 1 of each")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head dim {D} is not supported; expected one of {SUPPORTED_HEAD_DIMS}")


def attention(q, k, v, scale=None):
    """softmax(q @ k^T * scale) @ v, non-causal, with our Triton kernels (see the module docstring).

    q: (B, H, Nq, D), k, v: (B, H, Nk, D): any strides with unit stride on D (others are copied to
    unit stride first), float32 / bfloat16 / float16, D in (32, 64, 128), Nq and Nk >= 1 and free.
    scale: defaults to 1 / sqrt(D).
    Returns (B, H, Nq, D) in q's dtype; on the Triton path a `.transpose(1, 2)` view of a contiguous
    (B, Nq, H, D) buffer. float32 runs TF32 matrix products on the GPU. CPU tensors without TRITON_INTERPRET=1
    run `attention_reference`.
    """
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not use_triton(q, k, v):
        return attention_reference(q, k, v, scale)
    q, k, v = _unit_stride_last(q), _unit_stride_last(k), _unit_stride_last(v)
    return AttentionFunction.apply(q, k, v, scale)


def attention_qkv_packed(qkv, num_heads, scale=None):
    """Self-attention on the packed in-projection output, as the ViT calls it.

    qkv: (B, N, 3*H*D) with [q; k; v] along the last dim, each (H, D) (the layout of
    nn.MultiheadAttention's in_proj and timm's `qkv.reshape(B, N, 3, H, D)`), unit stride on the
    last dim. num_heads: H. scale: defaults to 1 / sqrt(D).
    Returns (B, N, H*D), contiguous, ready for the out-projection. The backward writes dq, dk, dv
    into one (B, N, 3*H*D) gradient buffer. Same dtypes, head dims and dispatch as `attention`.
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"attention_qkv_packed: qkv must be a tensor (B, N, 3*H*D), got {type(qkv).__name__}")
    if qkv.dim() != 3:
        raise ValueError(f"attention_qkv_packed: qkv has shape {tuple(qkv.shape)}; expected (B, N, 3*H*D)")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"attention_qkv_packed: num_heads={num_heads!r}; expected a positive int")
    B, N, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"attention_qkv_packed: last dim {C3} is not divisible by 3 * num_heads = {3 * num_heads}")
    qkv = _unit_stride_last(qkv)
    q, k, v = split_heads(qkv, num_heads)
    _check_inputs(q, k, v)
    D = C3 // (3 * num_heads)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not use_triton(qkv):
        return merge_heads(attention_reference(q, k, v, scale))
    return AttentionQKVPackedFunction.apply(qkv, num_heads, scale)


def attention_reference(q, k, v, scale=None):
    """Plain PyTorch: softmax(q @ k^T * scale) @ v in float32 (float64 for float64 inputs).

    q: (B, H, Nq, D), k, v: (B, H, Nk, D). Returns (B, H, Nq, D) in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.to(compute)).to(q.dtype)
