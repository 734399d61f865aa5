"""libortho/kernels/triton_decode.py: each fused decode kernel against its plain-torch twin, and
StaticDecoder(fuse_elementwise=True) against the unfused decoder.

The kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, chosen when the kernels are defined,
so in a fresh process: `cases` below) and compiled on CUDA (the `gpu` tests). Each parity check has its control:
the same comparison against a wrong twin (the residual not added, eps wrong, gate and up swapped, sin negated,
the cache written one position late, attention reading one position too few or too many) must fail it.
"""
import functools
import importlib.util
import itertools
import os

import pytest
import torch

from libortho.kernels import triton_decode as td
from tests.interpreted import run_interpreted

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (pip install triton runs its interpreter on CPU)")
TOL = {"float32": 1e-5, "bfloat16": 8e-3}  # relative; bf16: a unit in the last place (2^-8) on some elements
# Triton's interpreter rounds fp32 -> bf16 toward zero (the GPU and torch: to nearest): up to an ulp on every
# element, one way, at each rounding the twins also make
INTERP_BF16_TOL = 2e-2
DTYPES = (torch.float32, torch.bfloat16)


def _rel(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _rope_tables(S: int, hd: int, dtype):
    """(cos, sin_signed) (S, hd) as StaticDecoder builds them (theta 10000)."""
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(S).float()[:, None] * inv[None]  # (S, hd/2)
    ang = torch.cat((ang, ang), -1)
    half = hd // 2
    sin = ang.sin()
    return ang.cos().to(dtype), torch.cat((-sin[:, :half], sin[:, half:]), -1).to(dtype)


def _cases(device: str) -> dict:
    """Relative errors of each kernel against its twin ("err") and against the wrong twins ("ctl_*"), per case.
    Runs the kernels: on CPU only under TRITON_INTERPRET=1."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device, dtype)

    out = {}
    for dt in DTYPES:
        name = str(dt).removeprefix("torch.")
        # add + RMSNorm: odd H, a batch of rows, (B, T, H), and the strided last position of a prefill
        for shape in ((1, 64), (3, 100), (2, 3, 257), "last"):
            xs = rnd(2, 5, 96, dtype=dt) if shape == "last" else rnd(*shape, dtype=dt)
            x = xs[:, -1:] if shape == "last" else xs  # (2, 1, 96) with row stride 5 * 96
            h = rnd(*x.shape, dtype=dt)
            w = (1 + 0.1 * rnd(x.shape[-1])).to(dt)
            s, y = td.add_rms_norm(x, h, w, 1e-6)
            rs, ry = td.add_rms_norm_ref(x, h, w, 1e-6)
            out[f"add_rms_norm-{name}-{shape}"] = dict(
                err=max(_rel(s, rs), _rel(y, ry)), shape_ok=s.shape == x.shape and y.shape == x.shape,
                ctl_no_residual=_rel(y, td.add_rms_norm_ref(x, 0 * h, w, 1e-6)[1]),
                ctl_eps=_rel(y, td.add_rms_norm_ref(x, h, w, 2.0)[1]))
        # SiLU * up on the two halves of one fused gate|up output: I odd and over one block, rows, (B, T, 2I)
        for shape in ((1, 2 * 75), (4, 2 * 1100), (2, 1, 2 * 33)):
            gu = rnd(*shape, dtype=dt)
            I = shape[-1] // 2
            gt, up = gu[..., :I], gu[..., I:]
            o = td.silu_mul(gt, up)
            out[f"silu_mul-{name}-{shape}"] = dict(err=_rel(o, td.silu_mul_ref(gt, up)), shape_ok=o.shape == gt.shape,
                                                  ctl_swapped=_rel(o, td.silu_mul_ref(up, gt)))
        # rotary + KV write: GQA heads, hd a power of 2 and not, a batch; caches full of other values
        for B, nh, nkv, hd in ((1, 4, 2, 16), (3, 4, 2, 24), (2, 8, 2, 128)):
            S, p = 11, 7
            qkv = rnd(B, (nh + 2 * nkv) * hd, dtype=dt)
            q, k, v = qkv[:, :nh * hd], qkv[:, nh * hd:(nh + nkv) * hd], qkv[:, (nh + nkv) * hd:]
            cos, sin = (t.to(device) for t in _rope_tables(S, hd, dt))
            pos = torch.tensor([p], device=device)
            kc, vc = rnd(B, nkv, S, hd, dtype=dt), rnd(B, nkv, S, hd, dtype=dt)
            caches = [(kc.clone(), vc.clone()) for _ in range(3)]
            qr = td.rope_kv_(q, k, v, cos, sin, pos, *caches[0])
            rq = td.rope_kv_ref_(q, k, v, cos, sin, pos, *caches[1])
            late = td.rope_kv_ref_(q, k, v, cos, sin, pos + 1, *caches[2])
            out[f"rope_kv-{name}-B{B}-nh{nh}-nkv{nkv}-hd{hd}"] = dict(
                err=max(_rel(qr, rq), _rel(caches[0][0], caches[1][0]), _rel(caches[0][1], caches[1][1])),
                shape_ok=qr.shape == (B, nh, 1, hd),
                others_untouched=all(bool(torch.equal(c[:, :, [j]], o[:, :, [j]])) for c, o in
                                     zip(caches[0], (kc, vc)) for j in range(S) if j != p),
                ctl_sin_negated=_rel(qr, td.rope_kv_ref_(q, k, v, cos, -sin, pos, kc.clone(), vc.clone())),
                ctl_late=min(_rel(caches[0][0], caches[2][0]), _rel(caches[0][1], caches[2][1])))
        # single-query attention: GQA, hd a power of 2 and not, a batch; pos at the first position, inside the
        # first block, and the last of two blocks. The values past pos are poisoned (1e3: never read), the newest
        # one large (what the step just wrote weighs): reading one position more or one less is told apart
        for B, nh, nkv, hd in ((1, 4, 2, 16), (3, 4, 2, 24), (2, 8, 2, 128)):
            S = 70
            q = rnd(B, nh, 1, hd, dtype=dt)
            kc, v0 = rnd(B, nkv, S, hd, dtype=dt), rnd(B, nkv, S, hd, dtype=dt)
            # split 256: one pass; split 16: five splits of the 70 positions (flash-decoding), pos 0 and 17
            # leaving whole splits past pos (they must weigh nothing), pos 68 ending inside the last split
            for p, split in itertools.product((0, 17, S - 2), (256, 16)):
                vc = v0.clone()
                vc[:, :, p] *= 10
                vc[:, :, p + 1:] = 1e3
                pos = torch.tensor([p], device=device)
                o = td.decode_attention(q, kc, vc, pos, split=split)
                ctl = dict(ctl_one_position_more=_rel(o, td.decode_attention_ref(q, kc, vc, pos + 1)))
                if p:
                    ctl["ctl_one_position_less"] = _rel(o, td.decode_attention_ref(q, kc, vc, pos - 1))
                out[f"attention-{name}-B{B}-nh{nh}-nkv{nkv}-hd{hd}-pos{p}-split{split}"] = dict(
                    err=_rel(o, td.decode_attention_ref(q, kc, vc, pos)), shape_ok=o.shape == q.shape, **ctl)
    return out


@functools.lru_cache(maxsize=None)
def _model(device: str, dtype):
    """A tiny Llama converted at density 0.1 (decoders never change it)."""
    from libortho import OrthoConfig, orthogonalize_
    from libortho.models import tiny_llama

    return orthogonalize_(tiny_llama(vocab_size=256).to(device, dtype),
                          OrthoConfig(score="magnitude", group_size=32, density=0.1), progress=False)


# (fuse_elementwise, fuse, fuse_attention); the first is the reference: the decoder's torch ops
ALL = ((False, True, False), (False, False, False), (True, True, False), (True, False, False), (False, True, True),
       (True, True, True))


def _decoder_runs(device: str, dtype, combos=ALL) -> dict:
    """Last logits and tokens of StaticDecoder for each (fuse_elementwise, fuse, fuse_attention) in `combos` (a
    batch of 3 with their own alphas; a prefill of 6 then 5 decode steps), keyed "fe<0|1>-fuse<0|1>-fa<0|1>"."""
    from libortho.decode import StaticDecoder

    model = _model(device, dtype)
    ids = torch.randint(0, 255, (3, 6), generator=torch.Generator().manual_seed(0))
    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is ~100x faster than OpenMP waits on a shared 2-core machine
    try:
        for fe, fuse, fa in combos:
            dec = StaticDecoder(model, max_seq=32, dtype=dtype, device=device, batch=3, fuse=fuse,
                                fuse_elementwise=fe, fuse_attention=fa)
            toks = dec.generate(ids.to(device), 5, alphas=torch.tensor([1.0, 0.0, 0.5]))
            runs[f"fe{int(fe)}-fuse{int(fuse)}-fa{int(fa)}"] = (toks.tolist(), dec.logits.float().cpu())
    finally:
        torch.set_num_threads(threads)
    return runs


def _host_rows_cases(device: str) -> dict:
    """`host_rows_` against the table's own rows ("equal"), the padding of a strided `out` untouched, and the
    control: the rows one index off ("ctl_equal", must be False). On CUDA the table is pinned (what the kernel reads)."""
    out = {}
    # one block of columns and two (BLOCK 512 and 1024), a bf16 table into bf16 and fp32 rows; an fp32 table cast
    # down to bf16 by the kernel itself
    for C, tdt, dts in ((300, torch.bfloat16, (torch.bfloat16, torch.float32)),
                        (1500, torch.bfloat16, (torch.bfloat16, torch.float32)), (300, torch.float32, (torch.bfloat16,))):
        table = torch.randn(97, C, generator=torch.Generator().manual_seed(C)).to(tdt)
        table = table.pin_memory() if device == "cuda" else table
        ids = torch.tensor([96, 0, 5, 5])  # the last row, the first, a repeat
        for dt in dts:
            big = torch.zeros(4, C + 8, dtype=dt, device=device)
            td.host_rows_(big[:, :C], table, ids.to(device))  # row stride C + 8
            got = big[:, :C].cpu()
            out[f"C{C}-{str(tdt).removeprefix('torch.')}-{str(dt).removeprefix('torch.')}"] = dict(
                equal=torch.equal(got, table[ids].to(dt)), pad_untouched=bool((big[:, C:] == 0).all()), cast=tdt != dt,
                ulp_close=torch.allclose(got.float(), table[ids].to(dt).float(), rtol=2 ** -7, atol=0),
                ctl_equal=torch.equal(got, table[(ids + 1) % 97].to(dt)))
    return out


def _interpreted() -> dict:
    """What the interpreter process reports: the kernel cases and the decoder runs on CPU (fp32)."""
    # every kernel, with fused q|k|v (its column views go to the rotary kernel); attention alone (the torch
    # rotary's q: strided across the batch); the unfused linears' path runs in the twin test
    runs = _decoder_runs("cpu", torch.float32, (ALL[0], ALL[4], ALL[5]))
    ref = runs["fe0-fuse1-fa0"][1]
    dec = {k: dict(toks=t, rel=_rel(lg, ref)) for k, (t, lg) in runs.items()}
    return dict(cases=_cases("cpu"), decoder=dec, applies=td.applies(torch.zeros(1)),
                host_rows=_host_rows_cases("cpu"))


@pytest.fixture(scope="module")
def interp() -> dict:
    """The numbers `_interpreted` reports, from one TRITON_INTERPRET=1 process (about 15 s)."""
    return run_interpreted("tests.test_triton_decode:t._interpreted()", "attention's positions 0..pos")


def _check(cases: dict, bf16_tol: float = TOL["bfloat16"]):
    assert len(cases) == 2 * (4 + 3 + 3 + 18)
    for k, c in cases.items():
        tol = bf16_tol if "bfloat16" in k else TOL["float32"]
        assert c["err"] < tol and c["shape_ok"], (k, c)
        assert c.get("others_untouched", True), k  # the cache changed only at pos
        ctl = {n: v for n, v in c.items() if n.startswith("ctl_")}
        assert ctl and min(ctl.values()) > 3 * tol, (k, ctl)  # each wrong twin is told apart


# -- the kernels under the interpreter (CPU) --------------------------------------------------------------------

@needs_triton
def test_kernels_match_their_twins_under_the_interpreter(interp):
    assert interp["applies"]  # the kernels ran, not the twins: CPU tensors take them only under the interpreter
    _check(interp["cases"], INTERP_BF16_TOL)


@needs_triton
def test_decoder_with_fused_elementwise_kernels_generates_as_without(interp):
    dec = interp["decoder"]
    ref = dec["fe0-fuse1-fa0"]["toks"]
    for k, r in dec.items():
        assert r["toks"] == ref, (k, r["toks"], ref)
        assert r["rel"] < 1e-5, (k, r["rel"])


def _check_host_rows(cases: dict, exact_casts: bool = True):
    """Rows equal bit for bit; a row the kernel casts down (fp32 -> bf16) within an ulp where `exact_casts` is off
    (Triton's interpreter rounds that cast toward zero, the GPU and torch to nearest)."""
    assert len(cases) == 5
    for k, c in cases.items():
        assert (c["equal"] or (c["cast"] and not exact_casts and c["ulp_close"])) and c["pad_untouched"], (k, c)
        assert not c["ctl_equal"], k  # the check can fail: a gather one row off is told apart


@needs_triton
def test_host_rows_gathers_the_exact_rows_under_the_interpreter(interp):
    _check_host_rows(interp["host_rows"], exact_casts=False)


def test_host_rows_checks_shapes_and_its_twin_gathers():
    table, ids = torch.arange(12.0).view(4, 3), torch.tensor([3, 1])
    out = torch.empty(2, 3)
    assert torch.equal(td.host_rows_ref_(out, table, ids), table[ids])
    for bad_out, bad_ids in ((torch.empty(2, 4), ids), (out, ids[None]), (torch.empty(3, 3), ids), (out, ids * 1.0)):
        with pytest.raises(ValueError, match="host_rows_"):
            td.host_rows_(bad_out, table, bad_ids)
    assert torch.equal(td.host_rows_(out, table, ids), table[ids])  # the control: good shapes pass
    if not td._interpret():  # strict: where the kernel cannot run, say why instead of the twin's host copy
        with pytest.raises(ValueError, match="cannot gather these rows itself: out is torch.float32 on cpu"):
            td.host_rows_(out, table, ids, strict=True)


# -- the twins inside the decoder (CPU, no Triton needed: what CI without Triton runs) ------------------------

def test_twins_run_off_cuda_and_decode_as_the_unfused_ops():
    assert not td.applies(torch.zeros(1)) or os.environ.get("TRITON_INTERPRET") == "1"
    runs = _decoder_runs("cpu", torch.float32)
    ref_t, ref = runs["fe0-fuse1-fa0"]
    for k, (t, lg) in runs.items():
        assert t == ref_t and _rel(lg, ref) < 1e-6, k


def test_control_a_wrong_fused_op_changes_what_the_decoder_generates(monkeypatch):
    """The decoder check above can fail: a fused norm with eps wrong, a rotary writing k one position late, or an
    attention leaving out the newest position moves the logits far from the unfused decoder's."""
    ref = _decoder_runs("cpu", torch.float32, ALL[:1])["fe0-fuse1-fa0"][1]
    for name, bad in (("add_rms_norm", lambda x, h, w, eps: td.add_rms_norm_ref(x, h, w, 0.5)),
                      ("rope_kv_", lambda q, k, v, c, s, pos, kc, vc: td.rope_kv_ref_(q, k, v, c, s, pos + 1, kc, vc)),
                      ("decode_attention", lambda q, kc, vc, pos: td.decode_attention_ref(q, kc, vc, pos - 1))):
        with monkeypatch.context() as mp:
            mp.setattr(td, name, bad)
            runs = _decoder_runs("cpu", torch.float32, (ALL[0], ALL[5]))
        assert _rel(runs["fe1-fuse1-fa1"][1], ref) > 1e-3, name
        assert _rel(runs["fe0-fuse1-fa0"][1], ref) < 1e-6, name  # the flag off never calls the fused ops


# -- compiled for the GPUs we target, on any machine ------------------------------------------------------------

# (kernel, argument types, constexprs): the decoder's bf16 launches at the Llama-3-8B head size
_I32 = "i32"
KERNEL_SIGNATURES = {
    "_add_rms_norm_kernel": (["*bf16"] * 5 + [_I32] * 3 + ["fp32"], {"BLOCK": 4096}),
    "_silu_mul_kernel": (["*bf16"] * 3 + [_I32] * 3, {"BLOCK": 1024}),
    "_rope_kv_kernel": (["*bf16"] * 5 + ["*i64"] + ["*bf16"] * 3 + [_I32] * 6, {"HD": 128, "BLOCK": 128}),
    "_decode_attention_kernel": (["*bf16"] * 3 + ["*i64", "*bf16", "*fp32", "*fp32"] + [_I32] * 7 + ["fp32"],
                                 {"HD": 128, "BLOCK": 128, "BLOCK_S": 64, "PARTIAL": False}),
    "_decode_attention_kernel-partial": (["*bf16"] * 3 + ["*i64"] + ["*fp32"] * 3 + [_I32] * 7 + ["fp32"],
                                         {"HD": 128, "BLOCK": 128, "BLOCK_S": 64, "PARTIAL": True}),
    "_decode_attention_combine_kernel": (["*fp32"] * 3 + ["*bf16"] + [_I32] * 2,
                                         {"HD": 128, "BLOCK": 128, "BLOCK_N": 32}),
    "_host_rows_kernel": (["*bf16", "*i64", "*bf16", _I32, _I32], {"BLOCK": 1024}),
}


def _compile(name: str, arch: int, module=td, signatures=None):
    """Triton's whole pipeline (TTIR -> PTX -> cubin, ptxas included) for one CUDA arch, without a GPU. `name` is a
    kernel of `module` (an autotuned one too) with its argument types in `signatures` (default: this file's)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(module, name.split("-")[0])
    while not isinstance(kernel, triton.runtime.jit.JITFunction):  # an Autotuner wraps the JIT function
        kernel = kernel.fn
    types, constexprs = (signatures or KERNEL_SIGNATURES)[name]
    names = [a for a in kernel.arg_names if a not in constexprs]
    assert len(names) == len(types), (name, names)
    sig = dict(zip(names, types)) | {k: "constexpr" for k in constexprs}
    return triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))


@needs_triton
@pytest.mark.parametrize("arch", [89, 90])  # sm_89: the gtx4050 profile's Ada laptop GPU; sm_90: H100 / H200
@pytest.mark.parametrize("name", sorted(KERNEL_SIGNATURES))
def test_kernel_compiles_for_the_gpu(name, arch):
    """The interpreter runs a kernel's Python: it takes code the compiler rejects (a name bound to fp32 in one
    branch and bf16 in another failed only on the H200). Compiling here catches that with no GPU."""
    assert "cubin" in _compile(name, arch).asm


@needs_triton
def test_control_compile_check_rejects_a_branch_type_mismatch():
    """The check above can fail: a kernel with the bug the H200 found (one name, two types across branches)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError

    @triton.jit
    def bad(x_ptr, j, BLOCK: tl.constexpr):
        d = tl.arange(0, BLOCK)
        if j < 1:
            x = tl.load(x_ptr + d).to(tl.float32)
        else:
            x = tl.load(x_ptr + d)
        tl.store(x_ptr + d, x.to(tl.bfloat16))

    src = ASTSource(bad, {"x_ptr": "*bf16", "j": "i32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 128})
    with pytest.raises(CompilationError, match="Mismatched type"):
        triton.compile(src, target=GPUTarget("cuda", 90, 32))


# -- compiled on CUDA ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_triton
def test_kernels_match_their_twins_on_cuda():
    _check(_cases("cuda"))


@pytest.mark.gpu
@needs_triton
def test_host_rows_on_cuda_read_the_pinned_table(monkeypatch):
    """The GPU reads pinned host memory through the mapped pointer (the twin made to raise: the kernel ran); a
    pageable table takes the twin (same rows), or with strict=True is refused."""
    with monkeypatch.context() as mp:
        mp.setattr(td, "host_rows_ref_", lambda *a: (_ for _ in ()).throw(AssertionError("the twin ran")))
        _check_host_rows(_host_rows_cases("cuda"))
    table = torch.randn(10, 64).to(torch.bfloat16)  # pageable: the kernel cannot read it, the twin runs
    out = torch.empty(2, 64, dtype=torch.bfloat16, device="cuda")
    ids = torch.tensor([9, 2], device="cuda")
    assert torch.equal(td.host_rows_(out, table, ids).cpu(), table[[9, 2]])
    with pytest.raises(ValueError, match="table pinned: False"):
        td.host_rows_(out, table, ids, strict=True)


@pytest.mark.gpu
@needs_triton
def test_decoder_fused_elementwise_in_cuda_graphs_and_fewer_kernels():
    """bf16 in CUDA graphs: flag on against off (tokens; logits within bf16 noise), and the eager step launches
    fewer kernels with the flag on (control: the count with it off)."""
    from torch.profiler import ProfilerActivity, profile

    from libortho.decode import StaticDecoder

    runs = _decoder_runs("cuda", torch.bfloat16)
    ref_t, ref = runs["fe0-fuse1-fa0"]
    for k, (t, lg) in runs.items():
        for b in range(len(t)):  # bf16 sums in another order: a near-tie may flip a late token, never an early one
            lead = next((j for j, (x, y) in enumerate(zip(t[b], ref_t[b])) if x != y), len(t[b]))
            assert lead >= 3, (k, b, t[b], ref_t[b])
            if lead == len(t[b]):
                assert _rel(lg[b], ref[b]) < 2e-2, (k, b, _rel(lg[b], ref[b]))
    model = _model("cuda", torch.bfloat16)
    ids = torch.randint(0, 255, (1, 6), device="cuda")
    n = {}
    for fe in (False, True):
        dec = StaticDecoder(model, max_seq=32, use_graph=False, fuse_elementwise=fe, fuse_attention=fe)
        dec.prepare()
        dec.prefill(ids)
        dec.decode(2)  # compiles
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec.decode(1)
            torch.cuda.synchronize()
        dec._clear_hints()
        n[fe] = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    # per layer at least: 2 adds folded into norms, silu and mul into one, rotary (3 ops) and 2 cache writes
    # into one, attention's 2 matmuls, mask add and softmax into one; per step the cos/sin gathers and the mask
    assert n[False] - n[True] >= 2 * (2 + 1 + 4 + 3), n


def test_ranges_still_label_every_part_with_the_flags_on():
    """bench/profile_decode.py attributes kernels to ranges: with both flags on, a decode step still labels every
    part it runs; the fused rotary holds the KV write, so "kv_copy" alone is missing (control: present off)."""
    from torch.profiler import ProfilerActivity, profile

    from libortho.decode import FUSED, RANGES, StaticDecoder

    seen = {}
    for on in (False, True):
        dec = StaticDecoder(_model("cpu", torch.float32), max_seq=32, dtype=torch.float32, device="cpu",
                            ranges=True, fuse_elementwise=on, fuse_attention=on)
        dec.prepare()
        dec.prefill(torch.arange(6)[None])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dec.decode(2)
        dec._clear_hints()
        seen[on] = {e.name[3:] for e in prof.events() if e.name.startswith("lo:")}
    expect = set(RANGES) - {n for names in FUSED.values() for n in names} - ({"embedding"} - (
        {"embedding"} if dec.embed_on_device else set()))
    assert seen[False] == expect
    assert seen[True] == expect - {"kv_copy"}


def test_decode_attention_checks_its_arguments_before_any_path():
    """On a CPU too (the twin runs there): a block that is not a power of 2 or a split of 0 is refused up front."""
    q, kc = torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 8, 16)
    pos = torch.tensor([3])
    for kw in ({"block_s": 48}, {"split": 0}):
        with pytest.raises(ValueError, match="power of 2"):
            td.decode_attention(q, kc, kc, pos, **kw)
    assert td.decode_attention(q, kc, kc, pos).shape == q.shape  # the control: defaults pass
