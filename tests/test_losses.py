"""Every loss against its naive reference, on random and edge-case batches."""

from __future__ import annotations

import math

import pytest
import torch

from stream_pml.losses import LOSSES, get_loss
from stream_pml.losses.common import sample_unknown
from stream_pml.losses.pml import PAPER_OPTIONS, pml_loss, pml_loss_sparse

from . import reference_losses as ref

KINDS = ("random", "no_negatives", "edge_rows", "extreme")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPOCH, NUM_EPOCHS, K_EXP = 3, 5, 1.7


def make_batch(kind: str, seed: int, B: int = 5, C: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=g) * 3
    targets = (torch.rand(B, C, generator=g) < 0.35).float()
    targets[:, 0] = 1.0  # every image has a positive
    known = torch.rand(B, C, generator=g) < 0.5
    if kind == "no_negatives":  # PPL / SPL: only positives observed
        known = known & (targets == 1)
        known[:, 0] = True
    elif kind == "edge_rows":
        known[0] = False  # an image with no known label
        known[1] = True  # an image with every class known
    elif kind == "extreme":
        logits = torch.where(torch.rand(B, C, generator=g) < 0.5, -50.0, 50.0)
        logits[2] = -50.0  # every prediction < 0.1: p = 2
    pseudo = torch.rand(B, C, generator=g)
    estimates = torch.randn(B, C, generator=g)
    return logits, targets, known, pseudo, estimates


def reference(name: str, logits, targets, known, pseudo, estimates, sampled):
    L, T, K = logits.double().tolist(), targets.tolist(), known.tolist()
    if name in ("bce", "iun"):
        return ref.bce(L, T, K)
    if name == "bce_ls":
        return ref.bce(L, T, K, label_smoothing=0.1)
    if name == "an":
        return ref.an(L, T, K)
    if name == "an_ls":
        return ref.an(L, T, K, label_smoothing=0.1)
    if name == "wan":
        return ref.wan(L, T, K)
    if name == "focal":
        return ref.focal(L, T, K)
    if name == "asl":
        return ref.asl(L, T, K)
    if name == "epr":
        return ref.epr(L, T, K, K_EXP)
    if name == "role":
        return ref.role(L, T, K, estimates.double().tolist(), K_EXP)
    if name == "hill":
        return ref.hill(L, T, K)
    if name == "splc":
        return ref.splc(L, T, K, EPOCH)
    if name == "ll_r":
        return ref.large_loss(L, T, K, EPOCH, 0.002, "reject")
    if name == "ll_ct":
        return ref.large_loss(L, T, K, EPOCH, 0.001, "correct")
    if name == "pml":
        return ref.pml(L, T, K, pseudo.tolist(), sampled.tolist(), epoch=EPOCH, num_epochs=NUM_EPOCHS)
    raise AssertionError(f"no reference for {name}")


def call(name: str, logits, targets, known, pseudo, estimates, sampled):
    hp = {"expected_positives": K_EXP} if LOSSES[name].uses_prior else {}
    fn = get_loss(name, **hp)
    extra = {"estimates_BC": estimates} if name == "role" else {}
    if name == "pml":
        extra["sampled_BC"] = sampled
    return fn(logits, targets, known, pseudo=pseudo, epoch=EPOCH, num_epochs=NUM_EPOCHS, **extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_matches_naive_reference(name, kind, dtype):
    logits, targets, known, pseudo, estimates = make_batch(kind, seed=hash((name, kind)) % 1000)
    # ll_* need a batch large enough for k >= 1 rejected entries at epoch 3.
    if name.startswith("ll_"):
        logits, targets, known, pseudo, estimates = make_batch(kind, 11, B=40, C=13)
    sampled = sample_unknown(~known, 0.5, torch.Generator().manual_seed(1))
    logits = logits.to(dtype).requires_grad_(True)
    loss = call(name, logits, targets, known, pseudo, estimates, sampled)
    expected = reference(name, logits.detach().float(), targets, known, pseudo, estimates, sampled)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all()


def test_large_loss_really_modifies_entries():
    logits, targets, known, *_ = make_batch("random", 11, B=40, C=13)
    base = get_loss("an")(logits, targets, known)
    assert get_loss("ll_r")(logits, targets, known, epoch=1) == pytest.approx(float(base))
    assert get_loss("ll_r")(logits, targets, known, epoch=3) < base


@pytest.mark.parametrize("q", [0.1, 0.3, 0.5, 0.77, 1.0])
def test_pml_samples_exactly_ceil_q_unknown_per_image(q):
    g = torch.Generator().manual_seed(0)
    known = torch.rand(64, 50, generator=g) < torch.rand(64, 1, generator=g)
    sampled = sample_unknown(~known, q, torch.Generator().manual_seed(5))
    num_unknown = (~known).sum(1)
    expected = torch.tensor([math.ceil(round(q * int(n), 9)) for n in num_unknown])
    assert torch.equal(sampled.sum(1), expected)
    assert not (sampled & known).any()
    again = sample_unknown(~known, q, torch.Generator().manual_seed(5))
    assert torch.equal(sampled, again)
    if q < 1:
        other = sample_unknown(~known, q, torch.Generator().manual_seed(6))
        assert not torch.equal(sampled, other)


def test_pml_sampling_is_uniform():
    known = torch.zeros(4000, 10, dtype=torch.bool)
    known[:, :2] = True
    sampled = sample_unknown(~known, 0.25, torch.Generator().manual_seed(0))  # 2 of 8 each
    freq = sampled[:, 2:].float().mean(0)
    assert torch.allclose(freq, torch.full((8,), 0.25), atol=0.03)


@pytest.mark.parametrize("kind", KINDS)
def test_pml_sparse_equals_dense(kind):
    from stream_pml.labels import _padded_ids

    logits, targets, known, pseudo, _ = make_batch(kind, 3, B=9, C=11)
    pos = _padded_ids(known & (targets == 1))
    neg = _padded_ids(known & (targets == 0))
    for hp in ({}, PAPER_OPTIONS, {**PAPER_OPTIONS, "ab_scope": "all", "beta_counts_pseudo": True},
               {**PAPER_OPTIONS, "q": 1.0, "p": False}, {**UNKNOWN_OPTIONS, "q": 0.5}):
        s_dense, s_sparse = {}, {}
        dense = pml_loss(logits, targets, known, pseudo_BC=pseudo, epoch=2, num_epochs=4,
                         generator=torch.Generator().manual_seed(9), stats=s_dense, **hp)
        sparse = pml_loss_sparse(logits, pos, neg, pseudo_BC=pseudo, epoch=2, num_epochs=4,
                                 generator=torch.Generator().manual_seed(9), stats=s_sparse, **hp)
        torch.testing.assert_close(sparse, dense)
        assert s_dense == pytest.approx(s_sparse)


def test_pml_beta_keeps_positive_term_without_observed_negatives():
    logits, targets, known, pseudo, _ = make_batch("no_negatives", 4, B=16, C=20)
    stats: dict = {}
    pml_loss(logits, targets, known, pseudo_BC=pseudo, generator=torch.Generator().manual_seed(0), stats=stats,
             **PAPER_OPTIONS)
    assert stats["beta"] < 0.5 and stats["alpha"] > 0.5


def test_pml_ablation_switches_reduce_to_simpler_losses():
    logits, targets, known, pseudo, _ = make_batch("random", 8, B=6, C=9)
    logits = logits - 6  # most rows have every prediction < 0.1, so p matters
    everything = ~known
    kw = dict(pseudo_BC=pseudo, sampled_BC=everything, epoch=2, num_epochs=10)
    paper = {**PAPER_OPTIONS, "q": 1.0}
    # All switches off and q = 1: plain per-image BCE on known entries + BCE to the pseudo labels.
    off = pml_loss(logits, targets, known, **{**paper, "alpha_beta": False, "d": False, "p": False}, **kw)
    x = logits.double()
    lp, ln = torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
    k = known.double()
    known_part = (targets * lp + (1 - targets) * ln) * k
    pseudo_part = (pseudo * lp + (1 - pseudo) * ln) * (1 - k)
    simple = -(known_part.sum(1) / k.sum(1).clamp(min=1) + pseudo_part.sum(1) / (1 - k).sum(1).clamp(min=1)).mean()
    torch.testing.assert_close(off.double(), simple, rtol=1e-5, atol=1e-6)
    # Each switch alone changes the value (so it is wired), and matches the reference.
    L, T, K = logits.double().tolist(), targets.tolist(), known.tolist()
    for switch in ("alpha_beta", "d", "p"):
        one_off = pml_loss(logits, targets, known, **{**paper, switch: False}, **kw)
        expected = ref.pml(L, T, K, pseudo.tolist(), everything.tolist(), epoch=2, num_epochs=10,
                           **{**paper, switch: False})
        assert one_off.item() == pytest.approx(expected, rel=1e-5)
        assert one_off.item() != pytest.approx(pml_loss(logits, targets, known, **paper, **kw).item(), rel=1e-4)


UNKNOWN_OPTIONS = {"pseudo_scale": 0.3, "unknown_gamma_pos": 1.0, "unknown_gamma_neg": 2.0,
                   "unknown_clip": 0.05, "reject": 0.1, "reduction": "entries"}


@pytest.mark.parametrize("options", [{"pseudo_scale": 0.0}, {"pseudo_scale": 0.4},
                                     {"unknown_gamma_neg": 4.0, "unknown_clip": 0.05},
                                     {"unknown_gamma_pos": 1.0}, {"reject": 0.05, "pseudo_scale": 0.2}, {"reduction": "entries"},
                                     {"pseudo_scale": "auto"}, {"unknown_weight": 0.2},
                                     {"unknown_weight": "auto", "pseudo_scale": "auto"}, {"normalize": "ab"}, {"normalize": "weights"},
                                     UNKNOWN_OPTIONS],
                         ids=lambda o: ",".join(o))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pml_unknown_part_options_match_the_reference(options, dtype):
    """Each option on top of the paper's form changes the loss, and as the reference says."""
    logits, targets, known, pseudo, _ = make_batch("random", 5, B=12, C=10)
    logits = (logits * 3).to(dtype).requires_grad_(True)  # spread: clipping and focusing matter
    sampled = sample_unknown(~known, 0.7, torch.Generator().manual_seed(2))
    hp = {**PAPER_OPTIONS, **options}
    got = get_loss("pml", **hp)(logits, targets, known, pseudo=pseudo, epoch=3, num_epochs=6, sampled_BC=sampled)
    expected = ref.pml(logits.detach().double().tolist(), targets.tolist(), known.tolist(), pseudo.tolist(),
                       sampled.tolist(), epoch=3, num_epochs=6, **hp)
    assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    paper = get_loss("pml", **PAPER_OPTIONS)(logits, targets, known, pseudo=pseudo, epoch=3, num_epochs=6,
                                             sampled_BC=sampled)
    assert got.item() != pytest.approx(paper.item(), rel=1e-4)
    got.backward()
    assert torch.isfinite(logits.grad.float()).all()


def test_pml_options_are_validated_by_name_and_range():
    with pytest.raises(ValueError, match="loss.params.pseudo_scal"):
        get_loss("pml", pseudo_scal=0.5)
    with pytest.raises(ValueError, match="pseudo_scale must be in"):
        get_loss("pml", pseudo_scale=1.5)


def test_pml_printed_forms_are_available():
    logits, targets, known, pseudo, _ = make_batch("random", 2)
    sampled = ~known
    for hp in ({**PAPER_OPTIONS, "d_schedule": "printed"}, {**PAPER_OPTIONS, "ab_scope": "all"}):
        got = get_loss("pml", **hp)(logits, targets, known, pseudo=pseudo, epoch=1, num_epochs=4,
                                    sampled_BC=sampled)
        expected = ref.pml(logits.double().tolist(), targets.tolist(), known.tolist(), pseudo.tolist(),
                           sampled.tolist(), epoch=1, num_epochs=4, **hp)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_pml_pseudo_labels_get_no_gradient():
    logits, targets, known, pseudo, _ = make_batch("random", 1)
    pseudo = pseudo.clone().requires_grad_(True)
    get_loss("pml")(logits.requires_grad_(True), targets, known, pseudo=pseudo).backward()
    assert pseudo.grad is None


def test_d_schedule_is_one_at_e_t_minus_m():
    from stream_pml.losses.pml import d_weight

    assert d_weight(7, 10, m=3) == pytest.approx(1.0)
    assert d_weight(1, 10, m=3) < 1.0 < d_weight(10, 10, m=3)
    assert d_weight(7, 10, m=3, schedule="printed") == pytest.approx(math.exp(1.0))


def test_unknown_hyperparameter_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"loss\.params\.gama.*gamma"):
        get_loss("pml", gama=0.1)
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("nope")


def test_role_estimator_refuses_what_does_not_fit():
    import numpy as np

    from stream_pml.losses.role_estimator import LabelEstimator

    # A broadcast view: the size check must refuse before anything is allocated.
    with pytest.raises(MemoryError, match="5600000 x 600"):
        LabelEstimator(np.broadcast_to(np.int8(-1), (5_600_000, 600)))
    small = LabelEstimator(np.array([[1, 0, -1]], dtype=np.int8))
    probs = torch.sigmoid(small(torch.tensor([0])))[0]
    assert probs[0] > 0.99 and probs[1] < 0.01 and 0.4 <= probs[2] <= 0.6


def test_pml_entries_reduction_with_everything_off_is_an():
    """reduction="entries", unknown targets 0, no alpha/beta, d, p, all of U: exactly AN."""
    logits, targets, known, pseudo, _ = make_batch("random", 6, B=10, C=12)
    off = dict(reduction="entries", pseudo_scale=0.0, alpha_beta=False, d=False, p=False, q=1.0,
               unknown_weight=1.0)
    got = get_loss("pml", **off)(logits, targets, known, pseudo=pseudo)
    torch.testing.assert_close(got, get_loss("an")(logits, targets, known), rtol=1e-5, atol=1e-6)


def test_pml_default_with_only_positives_observed_is_wan_balanced_by_weighted_counts():
    """PPL / SPL: the default's unknown part is WAN's weak negatives, nothing is rejected, and
    beta counts an unknown entry as the 1/(C-1) of an entry it weighs."""
    logits, targets, known, pseudo, _ = make_batch("random", 6, B=10, C=12)
    only_pos = known & (targets == 1)
    kw = {"pseudo": pseudo, "epoch": 15, "num_epochs": 20}
    got = get_loss("pml", alpha_beta=False)(logits, targets, only_pos, **kw)
    wan = get_loss("wan")(logits, targets, only_pos)
    torch.testing.assert_close(got, wan, rtol=1e-5, atol=1e-6)
    # normalize="weights": WAN divided by its mean total weight per image, (k_i + (C - k_i)/(C - 1)) / C.
    k_B = only_pos.sum(1).float()
    got = get_loss("pml", alpha_beta=False, normalize="weights")(logits, targets, only_pos, **kw)
    torch.testing.assert_close(got, wan / ((k_B + (12 - k_B) / 11) / 12).mean(), rtol=1e-5, atol=1e-6)
    stats: dict = {}
    get_loss("pml")(logits, targets, only_pos, stats=stats, **kw)
    num_pos, num_unknown = float(only_pos.sum()), float((~only_pos).sum())
    assert stats["beta"] == pytest.approx(max(num_pos / (num_pos + num_unknown / 11), 0.05))


def test_pml_auto_pseudo_scale_is_the_observed_positive_share():
    logits, targets, known, pseudo, _ = make_batch("random", 7, B=8, C=10)
    stats: dict = {}
    get_loss("pml", pseudo_scale="auto")(logits, targets, known, pseudo=pseudo, stats=stats)
    assert stats["pseudo_scale"] == pytest.approx(float((targets * known).sum() / known.sum()))
    only_pos = known & (targets == 1)  # PPL / SPL: no observed negative, pseudo labels used whole
    get_loss("pml", pseudo_scale="auto")(logits, targets, only_pos, pseudo=pseudo, stats=stats)
    assert stats["pseudo_scale"] == 1.0
    with pytest.raises(ValueError, match="neither a number nor 'auto'"):
        get_loss("pml", pseudo_scale="half")


def test_pml_auto_unknown_weight_is_one_with_observed_negatives_and_wan_without():
    logits, targets, known, pseudo, _ = make_batch("random", 7, B=8, C=10)
    stats: dict = {}
    get_loss("pml", unknown_weight="auto")(logits, targets, known, pseudo=pseudo, stats=stats)
    share = float((targets * known).sum() / known.sum())
    assert stats["unknown_weight"] == pytest.approx(1 - share + share / 9)
    only_pos = known & (targets == 1)
    get_loss("pml", unknown_weight="auto")(logits, targets, only_pos, pseudo=pseudo, stats=stats)
    assert stats["unknown_weight"] == pytest.approx(1 / 9)
    with pytest.raises(ValueError, match="unknown_weight must be in"):
        get_loss("pml", unknown_weight=1.5)


@pytest.mark.parametrize("num_classes", [12, 983])
@pytest.mark.parametrize("setting", ["fal", "pal", "ppl", "spl"])
def test_pml_total_weight_is_set_by_the_evidence_not_by_alpha_beta(num_classes, setting):
    """At logits 0 every entry's cross-entropy is log 2, so the loss is log 2 x its total
    weight. Default ("ab"): alpha/beta move no weight in or out, the total is that of the
    unknown-weighted entries (AN's under FAL/PAL, WAN's under PPL/SPL) whatever C; "weights":
    log 2 always; unnormalised: alpha/beta shrink it (docs/decisions.md#held-out-data-983-labels)."""
    gen = torch.Generator().manual_seed(num_classes)
    B = 16
    targets = (torch.rand(B, num_classes, generator=gen) < 3 / num_classes + 0.02).float()
    targets[:, 0] = 1.0  # every image has a positive (SPL keeps one)
    if setting == "fal":
        known = torch.ones_like(targets, dtype=torch.bool)
    elif setting == "pal":
        known = torch.rand(B, num_classes, generator=gen) < 0.3
    elif setting == "ppl":
        known = (targets == 1) & (torch.rand(B, num_classes, generator=gen) < 0.6)
    else:
        known = torch.zeros_like(targets, dtype=torch.bool)
        known[:, 0] = True
    logits = torch.zeros(B, num_classes, requires_grad=True)
    # epoch 1: LL-R rejects nothing yet (a rejected entry leaves the loss, its weight with it)
    kw = {"pseudo": torch.full((B, num_classes), 0.5), "epoch": 1, "num_epochs": 10}

    def loss(**options):
        return get_loss("pml", **options)(logits, targets, known, **kw).item()

    r = float((targets * known).sum() / known.sum())
    w = (1 - r) + r / (num_classes - 1)
    evidence = float((known.sum(1) + w * (~known).sum(1)).float().mean()) / num_classes
    assert loss() == pytest.approx(math.log(2) * evidence, rel=1e-5)
    assert loss() == pytest.approx(loss(alpha_beta=False), rel=1e-5)
    assert loss(normalize="weights") == pytest.approx(math.log(2), rel=1e-5)
    assert loss(normalize="none") <= 0.5 * loss() * (1 + 1e-5)  # SPL: alpha = beta = 1/2


def test_role_at_a_size_that_does_not_fit_is_refused_at_start_in_one_line(digits_shards, tmp_path, capsys,
                                                                         monkeypatch):
    from stream_pml.losses import role_estimator
    from stream_pml.train import main

    from .conftest import tiny_overrides

    monkeypatch.setattr(role_estimator, "DEFAULT_MAX_BYTES", 1000)  # the digits split: 96 x 10 x 12 bytes
    assert main(tiny_overrides(digits_shards, tmp_path / "run", **{"loss.name": "role"})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loss error: loss.name=role keeps a 96 x 10") and "pml" in err[0]
