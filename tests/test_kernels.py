"""The fused kernels (``head.kernel = "triton"``: margin cross-entropy, row normalisation, row SGD) against the plain
PyTorch reference.

On the CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` before
triton is imported), so sizes stay tiny: B = 6 rows, K = 37 columns (not a multiple of any tile), D = 8. With
``OFFLOADFR_TEST_DEVICE=cuda`` the same tests run the compiled kernels. Each test compares the loss and the gradients
w.r.t. the embeddings and the class centers with the reference to ~1e-5 relative in float32.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offloadfr.config import BankCfg, CacheCfg, HeadCfg, LossCfg, config_from_dict
from offloadfr.errors import ConfigError
from offloadfr.kernels import check_kernel, cosine_logits, margin_softmax_cross_entropy, update_rows_
from offloadfr.losses import build_margin

from .conftest import DEVICE

triton = pytest.importorskip("triton", reason="head.kernel = 'triton' needs the triton package")

from offloadfr.kernels.margin_ce import fused_margin_cross_entropy  # noqa: E402

B, K, D = 6, 37, 8
TARGET = [3, -1, 36, 0, 17, 20]
REPO = Path(__file__).resolve().parent.parent

MARGINS = {
    "arcface_analytic": LossCfg(kind="arcface", s=64.0, arcface_m=0.5),
    "arcface_straight_through": LossCfg(kind="arcface", s=64.0, arcface_m=0.5, arcface_grad="straight_through"),
    "cosface": LossCfg(kind="cosface", s=64.0, cosface_m=0.35),
    "combined": LossCfg(kind="combined", s=64.0, combined_m=(1.0, 0.3, 0.2)),
    "combined_m1": LossCfg(kind="combined", s=30.0, combined_m=(1.5, 0.2, 0.1)),
}
# (tile, columns per forward program): one partial tile; 3 tiles in 3 splits; 3 tiles in one split; the default.
LAUNCHES = [(64, 64), (16, 16), (16, 48), (None, None)]


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings and centers whose cosines cover the hard cases at s = 64: row 0's positive at cos ≈ 1, row 2's at
    cos ≈ -1 (ArcFace's θ + m > π branch), row 4's positive equal to a negative's, the rest random."""
    g = torch.Generator().manual_seed(seed)
    emb_BD = torch.randn(B, D, generator=g, dtype=torch.float64)
    w_KD = torch.randn(K, D, generator=g, dtype=torch.float64)
    w_KD[3] = emb_BD[0] * 2.0
    w_KD[36] = -emb_BD[2] * 0.5
    w_KD[17] = w_KD[5]
    emb_BD[5] = w_KD[9] + 0.01 * emb_BD[5]  # a confident wrong answer: a large logit on a negative
    target_B = torch.tensor(TARGET, dtype=torch.int64)
    return emb_BD.float().to(DEVICE), w_KD.float().to(DEVICE), target_B.to(DEVICE)


def _loss_and_grads(emb_BD: torch.Tensor, w_KD: torch.Tensor, target_B: torch.Tensor, cfg: LossCfg, kernel: str,
                    precision: str = "fp32", **launch: int | None) -> tuple[torch.Tensor, ...]:
    emb_BD = emb_BD.clone().requires_grad_(True)
    w_KD = w_KD.clone().requires_grad_(True)
    margin = build_margin(cfg)
    cos_BK = cosine_logits(emb_BD, w_KD, precision, kernel=kernel)
    if kernel == "triton" and launch:
        loss = fused_margin_cross_entropy(cos_BK, target_B, margin, **launch)
    else:
        loss = margin_softmax_cross_entropy(cos_BK, target_B, margin, kernel=kernel)
    loss.backward()
    return loss.detach(), emb_BD.grad, w_KD.grad


def _assert_close(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], rtol: float = 1e-5) -> None:
    for name, g, w in zip(("loss", "grad_emb", "grad_w"), got, want, strict=True):
        scale = w.abs().max().item()
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", list(MARGINS))
def test_fused_matches_plain_for_every_margin(name: str) -> None:
    """Catches a wrong positive logit, a wrong chain of the positive's gradient through ``target_cos`` (the analytic
    and straight-through ArcFace differ only there), a wrong softmax scale, or rows with target -1 that leak."""
    emb_BD, w_KD, target_B = _inputs()
    want = _loss_and_grads(emb_BD, w_KD, target_B, MARGINS[name], "torch")
    _assert_close(_loss_and_grads(emb_BD, w_KD, target_B, MARGINS[name], "triton"), want)


@pytest.mark.parametrize("block, cols_per_split", LAUNCHES)
def test_fused_matches_plain_for_every_tiling(block: int | None, cols_per_split: int | None) -> None:
    """Catches a tile or split boundary that drops, repeats or mis-combines columns (K = 37 is no multiple of 16)."""
    emb_BD, w_KD, target_B = _inputs(seed=1)
    cfg = MARGINS["arcface_analytic"]
    want = _loss_and_grads(emb_BD, w_KD, target_B, cfg, "torch")
    _assert_close(_loss_and_grads(emb_BD, w_KD, target_B, cfg, "triton", block=block, cols_per_split=cols_per_split),
                  want)


def test_columns_past_k_are_neither_read_nor_written() -> None:
    """Catches a wrong tile mask: the cosines are a (B, 37) view of a (B, 48) buffer whose last 11 columns hold
    cos = 1 (logit 64, larger than any real one). Reading them changes the loss by far more than the tolerance;
    writing them changes the sentinels. Row 1 has only negative cosines, so counting a masked column as a logit of 0
    (instead of leaving it out) changes its log-sum-exp as well."""
    emb_BD, w_KD, target_B = _inputs(seed=2)
    margin = build_margin(MARGINS["cosface"])
    cos_BK = cosine_logits(emb_BD, w_KD).detach()
    cos_BK[1] = -0.9 + 0.01 * cos_BK[1]
    target_B = target_B.clone()
    target_B[1] = 5
    want_loss = margin_softmax_cross_entropy(cos_BK, target_B, margin)
    wide_BW = torch.ones(B, 48, device=DEVICE)
    wide_BW[:, :K] = cos_BK
    leaf_BW = wide_BW.clone().requires_grad_(True)
    view_BK = leaf_BW * 1.0  # an intermediate: its buffer receives the gradient in place
    loss = fused_margin_cross_entropy(view_BK[:, :K], target_B, margin, block=16, cols_per_split=16)
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-6, atol=0)
    loss.backward()
    assert torch.equal(leaf_BW.grad[:, K:], torch.zeros(B, 48 - K, device=DEVICE))
    assert torch.equal(view_BK.detach()[:, K:], torch.ones(B, 48 - K, device=DEVICE))


def test_gradient_lands_in_the_cosine_buffer_and_leaves_are_kept() -> None:
    """Catches the in-place write going somewhere else, a caller's leaf tensor being overwritten, or a second backward
    through the same graph reading the overwritten buffer."""
    emb_BD, w_KD, target_B = _inputs(seed=3)
    margin = build_margin(MARGINS["arcface_analytic"])
    leaf_BK = cosine_logits(emb_BD, w_KD).detach().requires_grad_(True)
    kept = leaf_BK.detach().clone()
    fused_margin_cross_entropy(leaf_BK, target_B, margin).backward()
    assert torch.equal(leaf_BK.detach(), kept)
    ref_BK = kept.clone().requires_grad_(True)
    margin_softmax_cross_entropy(ref_BK, target_B, margin).backward()
    torch.testing.assert_close(leaf_BK.grad, ref_BK.grad, rtol=1e-5, atol=1e-5 * ref_BK.grad.abs().max().item())
    source = kept.clone().requires_grad_(True)
    inner_BK = source * 1.0
    loss = fused_margin_cross_entropy(inner_BK, target_B, margin)
    loss.backward(retain_graph=True)
    assert torch.equal(inner_BK.detach(), source.grad)  # the intermediate's buffer now holds its gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # a second backward would read the gradient as cosines: refused, not silently wrong


def test_cosines_outside_the_unit_interval_follow_clamp() -> None:
    """Catches a kernel that forgets the reference's clamp(-1, 1): cosines a rounding step past ±1 (as normalised
    float32 vectors give) must be clamped in the loss and get no gradient, on negatives and on the positive."""
    emb_BD, w_KD, target_B = _inputs(seed=4)
    cos_BK = cosine_logits(emb_BD, w_KD).detach()
    cos_BK[0, 3] = 1.0 + 2e-7   # row 0's positive
    cos_BK[3, 8] = 1.0 + 2e-7   # a negative of row 3 (whose positive is column 0), at the row's largest logit
    cos_BK[2, 11] = -1.0 - 2e-7
    cos_BK[4, 30] = 1.0  # exactly 1: inside, its gradient passes
    for name in ("arcface_analytic", "combined"):
        margin = build_margin(MARGINS[name])
        ref = cos_BK.clone().requires_grad_(True)
        want = margin_softmax_cross_entropy(ref, target_B, margin)
        want.backward()
        got_in = cos_BK.clone().requires_grad_(True)
        got = fused_margin_cross_entropy(got_in, target_B, margin, block=16, cols_per_split=32)
        got.backward()
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=0)
        assert got_in.grad[0, 3] == 0 and got_in.grad[3, 8] == 0 and got_in.grad[2, 11] == 0
        assert got_in.grad[4, 30] > 0.1
        torch.testing.assert_close(got_in.grad, ref.grad, rtol=1e-5, atol=1e-5 * ref.grad.abs().max().item())


def test_rows_without_a_positive() -> None:
    """Catches rows with target -1 that add to the loss or receive a gradient, and the NaN of an empty mean."""
    emb_BD, w_KD, _ = _inputs(seed=5)
    cfg = MARGINS["arcface_analytic"]
    none_B = torch.full((B,), -1, dtype=torch.int64, device=DEVICE)
    loss, grad_emb, grad_w = _loss_and_grads(emb_BD, w_KD, none_B, cfg, "triton")
    assert loss.item() == 0.0 and not grad_emb.any() and not grad_w.any()
    some_B = torch.tensor([-1, 4, -1, -1, 36, -1], device=DEVICE)
    _assert_close(_loss_and_grads(emb_BD, w_KD, some_B, cfg, "triton"),
                  _loss_and_grads(emb_BD, w_KD, some_B, cfg, "torch"))


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_gemm_precisions(precision: str) -> None:
    """tf32: on the CPU the GEMMs stay fp32, so the custom autograd of the TF32 matmul must give the fp32 gradients
    exactly (catches a wrong backward formula). bf16: the fused kernel reads and writes bfloat16 cosines and must
    agree with the plain path on the same bfloat16 GEMMs to bfloat16 tolerance."""
    emb_BD, w_KD, target_B = _inputs(seed=6)
    cfg = MARGINS["arcface_analytic"]
    if precision == "tf32" and DEVICE.type == "cpu":
        _assert_close(_loss_and_grads(emb_BD, w_KD, target_B, cfg, "torch", "tf32"),
                      _loss_and_grads(emb_BD, w_KD, target_B, cfg, "torch", "fp32"), rtol=1e-6)
    want = _loss_and_grads(emb_BD, w_KD, target_B, cfg, "torch", precision)
    # Rounded GEMM operands (bf16, or tf32 on CUDA) can round the two paths' normalised rows differently.
    rtol = 1e-5 if precision == "tf32" and DEVICE.type == "cpu" else 2e-2
    _assert_close(_loss_and_grads(emb_BD, w_KD, target_B, cfg, "triton", precision), want, rtol=rtol)
    if precision == "bf16":  # and the bf16 path is near the fp32 one, i.e. it is not computing something else
        _assert_close(want, _loss_and_grads(emb_BD, w_KD, target_B, cfg, "torch", "fp32"), rtol=5e-2)


@pytest.mark.parametrize("dim", [8, 13])
def test_row_normalisation_matches_f_normalize(dim: int) -> None:
    """The fused row normalisation of the triton path against ``F.normalize``, values and gradient: K = 37 rows (not a
    multiple of the rows per program), D = 13 (not a power of two: masked columns), a row with a norm below eps (the
    eps clamp, where only g / eps passes) and a huge one. Catches a wrong mask, a wrong backward formula or a wrong
    eps branch."""
    from offloadfr.kernels.normalize import normalize_rows

    g = torch.Generator().manual_seed(8)
    x_KD = torch.randn(K, dim, generator=g).to(DEVICE)
    x_KD[4] *= 1e-14  # norm below eps = 1e-12
    x_KD[9] *= 1e6
    grad_KD = torch.randn(K, dim, generator=g).to(DEVICE)
    ref = x_KD.clone().requires_grad_(True)
    want = torch.nn.functional.normalize(ref, dim=1)
    want.backward(grad_KD)
    got_in = x_KD.clone().requires_grad_(True)
    got = normalize_rows(got_in)
    got.backward(grad_KD)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)
    rest = torch.arange(K, device=DEVICE) != 4
    scale = ref.grad[rest].abs().max().item()
    torch.testing.assert_close(got_in.grad[rest], ref.grad[rest], rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(got_in.grad[4], ref.grad[4], rtol=1e-5, atol=0)
    torch.testing.assert_close(got_in.grad[4], grad_KD[4] * 1e12, rtol=1e-5, atol=0)
    half = normalize_rows(x_KD, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), want.detach(), rtol=1e-2, atol=1e-2)


# (K rows, A updated rows or None for all K in order, D, momentum, weight decay). With D = 8 and 13 a program holds 16
# rows, with D = 512 8 rows (A = 19, 37, 21, 7 are no multiple of either); D = 1100 takes two column tiles of 1024,
# the second one partial; D = 13 and 1100 also mask columns inside a tile.
ROW_SGD_CASES = [
    (37, 19, 8, 0.9, 1e-2),
    (37, 37, 512, 0.9, 1e-2),
    (40, 13, 13, 0.9, 0.0),
    (37, 21, 512, 0.0, 1e-2),
    (20, 7, 1100, 0.9, 1e-2),
    (37, None, 13, 0.9, 1e-2),
    (37, None, 512, 0.0, 0.0),
]


@pytest.mark.parametrize("num_rows, num_active, dim, momentum, weight_decay", ROW_SGD_CASES)
def test_row_sgd_matches_the_plain_update(num_rows: int, num_active: int | None, dim: int, momentum: float,
                                          weight_decay: float) -> None:
    """The fused row SGD against the plain ``index_select`` + ``sgd_rows_`` + ``index_copy_`` (to 1e-6 relative), from
    non-zero momentum buffers (so a kernel that ignores or mis-scales the old momentum fails), one of them zero (the
    first update of a row). Catches a wrong formula (weight decay, momentum, step), a row or column tile boundary that
    drops or repeats elements, a slot used for the gradient's row or the reverse, and a write to any row that is not
    updated: those must keep every bit."""
    g = torch.Generator().manual_seed(num_rows + dim)
    w_KD = torch.randn(num_rows, dim, generator=g).to(DEVICE)
    m_KD = torch.randn(num_rows, dim, generator=g).to(DEVICE)
    if num_active is None:
        slots_A, num_active = None, num_rows
    else:
        slots_A = torch.sort(torch.randperm(num_rows, generator=g)[:num_active]).values.to(DEVICE)
        m_KD[slots_A[0]] = 0.0
    grad_AD = torch.randn(num_active, dim, generator=g).to(DEVICE)
    step = {"lr": 0.1, "momentum": momentum, "weight_decay": weight_decay}
    want_w, want_m = w_KD.clone(), m_KD.clone()
    update_rows_(want_w, want_m, grad_AD, slots_A, **step)
    got_w, got_m = w_KD.clone(), m_KD.clone()
    update_rows_(got_w, got_m, grad_AD, slots_A, **step, kernel="triton")
    for name, got, want, before in (("w", got_w, want_w, w_KD), ("m", got_m, want_m, m_KD)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item(),
                                   msg=lambda msg, n=name: f"{n}: {msg}")
        untouched = torch.full((num_rows,), slots_A is not None, device=DEVICE)
        if slots_A is not None:
            untouched[slots_A] = False
        assert torch.equal(got[untouched], before[untouched]), f"{name}: a row outside slots_A changed"
        assert not torch.equal(got[~untouched], before[~untouched]), f"{name}: the rows did not move"


def test_row_sgd_refuses_bad_slots_and_layouts() -> None:
    """Catches a kernel that silently races on duplicate slots (two programs writing one row), runs on unsorted or
    out-of-range slots, or updates a strided view (writing into the wrong memory)."""
    from offloadfr.kernels.row_sgd import fused_row_sgd_

    w_KD, m_KD, grad_AD = (torch.zeros(10, 4, device=DEVICE), torch.zeros(10, 4, device=DEVICE),
                           torch.ones(3, 4, device=DEVICE))
    step = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    for bad in ([1, 4, 4], [4, 1, 6], [2, 5, 10], [-1, 2, 3]):
        with pytest.raises(RuntimeError, match="strictly increasing"):
            fused_row_sgd_(w_KD, m_KD, grad_AD, torch.tensor(bad, device=DEVICE), **step)
    with pytest.raises(ValueError, match="contiguous"):
        fused_row_sgd_(torch.zeros(4, 10, device=DEVICE).t(), m_KD, grad_AD, torch.tensor([0, 1, 2]), **step)
    with pytest.raises(ValueError, match="float32"):
        fused_row_sgd_(w_KD.double(), m_KD.double(), grad_AD.double(), torch.tensor([0, 1, 2]), **step)
    fused_row_sgd_(w_KD, m_KD, grad_AD, torch.tensor([0, 3, 9], device=DEVICE), **step)
    assert w_KD[[0, 3, 9]].eq(-0.1).all() and w_KD.ne(0).sum() == 12


def _head_deps(tmp_path: Path, margin_cfg: LossCfg):  # noqa: ANN202
    from offloadfr.heads import HeadDeps

    return HeadDeps(margin=build_margin(margin_cfg), num_classes=K, dim=D, device=DEVICE,
                    bank=BankCfg(chunk_rows=8), cache=CacheCfg(num_slots=64, lookahead=2), bank_path=tmp_path / "bank")


# fc; partial_fc with every id resident (every slot active: the rows are trained in place, no gather); partial_fc with
# sample_rate 0.5 (the active slots are a sorted subset: the fused update scatters by slot).
HEAD_RUNS = {"fc": HeadCfg(kind="fc"), "partial_fc": HeadCfg(kind="partial_fc"),
             "partial_fc_sampled": HeadCfg(kind="partial_fc", sample_rate=0.5)}


@pytest.mark.parametrize("run", list(HEAD_RUNS))
def test_heads_with_the_fused_kernel_follow_the_plain_heads(run: str, tmp_path: Path) -> None:
    """Three steps of fc / partial_fc with head.kernel = triton (fused loss, normalisation and row update) and torch:
    the same losses and the same rows and momentum buffers after each update (momentum 0.9, weight decay 5e-4, so the
    later steps depend on the momentum the earlier ones wrote). Catches a head that does not route its loss or its
    update through the kernel option correctly, or a fused update that moves other rows than the plain one."""
    from offloadfr.heads import build_head

    cfg = MARGINS["arcface_analytic"]
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(B, D, generator=g).to(DEVICE), torch.randint(0, K, (B,), generator=g).to(DEVICE))
               for _ in range(3)]
    results = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(3)  # sample_rate < 1 draws the sampled slots from the global generator
        head = build_head(dataclasses.replace(HEAD_RUNS[run], kernel=kernel), _head_deps(tmp_path / kernel, cfg))
        losses, moved = [], []
        for emb_BD, labels_B in batches:
            loss = head(emb_BD.clone().requires_grad_(True), labels_B)
            if not losses:  # partial_fc admits its rows in the first forward
                start = _rows(head)
            loss.backward()
            head.update(0.1)
            losses.append(loss.detach())
            moved.append(_rows(head) - start)
        head.close()
        results[kernel] = (torch.stack(losses), torch.stack(moved))
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=0)
    assert results["torch"][1].abs().max() > 0.01  # the rows did move
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-5,
                               atol=1e-5 * results["torch"][1].abs().max().item())
    if run == "partial_fc_sampled":  # some rows were never sampled in 3 steps: they must not have moved at all
        assert (results["torch"][1][-1] == 0).all(dim=1).any()
        assert torch.equal((results["triton"][1] == 0).all(dim=2), (results["torch"][1] == 0).all(dim=2))


def _rows(head: torch.nn.Module) -> torch.Tensor:
    """Rows and momentum buffers side by side."""
    if hasattr(head, "weight"):
        return torch.cat([head.weight, head.momentum_buf], dim=1).detach().clone()
    return torch.cat([head.dcc["centers"], head.dcc["momentum"]], dim=1).detach().clone()


def test_kernel_option_refused_where_it_cannot_run() -> None:
    """adasin (it changes hard negatives) and heads without the option are refused when the config loads, with the
    key and the fix; building a head with the AdaSin margin is refused too."""
    with pytest.raises(ConfigError, match="loss.kind = 'adasin'.*head.kernel = 'torch'"):
        config_from_dict({"head": {"kernel": "triton"}, "loss": {"kind": "adasin"}})
    with pytest.raises(ConfigError, match="head.kind = 'vfc'"):
        config_from_dict({"head": {"kind": "vfc", "gemm_precision": "bf16"}})
    with pytest.raises(ConfigError, match="AdaSin margin"):
        check_kernel("triton", build_margin(LossCfg(kind="adasin")), DEVICE)
    assert check_kernel("triton", build_margin(LossCfg()), DEVICE, world_size=2) == "torch"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the compiled path is what a GPU runs")
def test_triton_on_cpu_outside_the_interpreter_is_a_config_error() -> None:
    """Without TRITON_INTERPRET the kernels cannot run on CPU tensors: one ConfigError line, not a Triton crash."""
    code = ("import torch\nfrom offloadfr.kernels import check_kernel\nfrom offloadfr.losses import build_margin\n"
            "from offloadfr.config import LossCfg\n"
            "check_kernel('triton', build_margin(LossCfg()), torch.device('cpu'))\n")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "needs a CUDA device" in proc.stderr.strip().splitlines()[-1]


def test_kernels_compile_for_an_h100() -> None:
    """Every kernel, for fp32 and bf16 cosines (the row SGD indexed with weight decay, and unindexed without), through
    Triton's real compiler down to an sm_90 cubin, on the CPU (no GPU needed). Catches what the interpreter accepts but
    the compiler refuses (loop-carried types, unsupported ops)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO), "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_triton_compile_worker.py")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled ") == 10, proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_kernel_at_a_real_width(precision: str) -> None:
    """The compiled kernels (default tiles and splits) at B = 64, K = 100,003 against the plain path."""
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    emb_BD = torch.randn(64, 128, device=device, generator=g)
    w_KD = torch.randn(100_003, 128, device=device, generator=g)
    target_B = torch.randint(-1, 100_003, (64,), device=device, generator=g)
    cfg = MARGINS["arcface_analytic"]
    rtol = 1e-4 if precision == "fp32" else 2e-2
    _assert_close(_loss_and_grads(emb_BD, w_KD, target_B, cfg, "triton", precision),
                  _loss_and_grads(emb_BD, w_KD, target_B, cfg, "torch", precision), rtol=rtol)


@pytest.mark.gpu
def test_compiled_row_sgd_at_a_real_width() -> None:
    """The compiled row SGD at K = 262,144, D = 512 (the issue's size) on 100,003 sorted slots and unindexed, against
    the plain update; untouched rows keep every bit."""
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    w_KD = torch.randn(262_144, 512, device=device, generator=g)
    m_KD = torch.randn(262_144, 512, device=device, generator=g)
    slots_A = torch.sort(torch.randperm(262_144, device=device, generator=g)[:100_003]).values
    for slots, rows in ((slots_A, 100_003), (None, 262_144)):
        grad_AD = torch.randn(rows, 512, device=device, generator=g)
        step = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
        want = (w_KD.clone(), m_KD.clone())
        update_rows_(*want, grad_AD, slots, **step)
        got = (w_KD.clone(), m_KD.clone())
        update_rows_(*got, grad_AD, slots, **step, kernel="triton")
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
        if slots is not None:
            untouched = torch.ones(262_144, dtype=torch.bool, device=device)
            untouched[slots] = False
            assert torch.equal(got[0][untouched], w_KD[untouched]) and torch.equal(got[1][untouched], m_KD[untouched])
