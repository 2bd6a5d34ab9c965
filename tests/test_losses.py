"""InfoNCE against sentence-transformers, hard and false negatives, GradCache against the plain loss."""

import pytest
import torch
import torch.nn.functional as F

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.losses.contrastive import GradCache, InfoNCE


def _embeddings(B=6, N=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in ((B, D), (B, D), (B, N, D))]


def _st_loss(q, p, n, **kwargs):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    st = MultipleNegativesRankingLoss(model=None, scale=1 / 0.05, **kwargs)
    cols = [q, p] + ([n[:, k] for k in range(n.shape[1])] if n is not None else [])
    return st.compute_loss_from_embeddings(cols, None)


@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_equals_sentence_transformers_value_and_gradients(with_negatives, symmetric):
    q, p, n = _embeddings()
    n = n if with_negatives else None
    ours = InfoNCE(temperature=0.05, symmetric=symmetric).compute_loss(q, p, n)
    ours_grads = torch.autograd.grad(ours, [t for t in (q, p, n) if t is not None])
    st_kwargs = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"} if symmetric else {}
    theirs = _st_loss(q, p, n, **st_kwargs)
    theirs_grads = torch.autograd.grad(theirs, [t for t in (q, p, n) if t is not None])
    assert torch.allclose(ours, theirs, atol=1e-10)
    for a, b in zip(ours_grads, theirs_grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_hard_negatives_enter_the_denominator():
    q, p, n = _embeddings(B=3, N=1)
    t = 0.05
    loss = InfoNCE(temperature=t).compute_loss(q, p, n)
    qn, pn, nn_ = (F.normalize(x, dim=-1) for x in (q, p, n[:, 0]))
    expected = 0.0
    for i in range(3):
        logits = torch.cat([pn @ qn[i], nn_ @ qn[i]]) / t  # all positives and all hard negatives
        expected = expected - (logits[i] - torch.logsumexp(logits, 0))
    assert torch.allclose(loss, expected / 3)
    # a hard negative identical to the positive raises the loss by exactly log-sum-exp terms
    harder = InfoNCE(temperature=t).compute_loss(q, p, p[:, None].detach().clone())
    assert harder > InfoNCE(temperature=t).compute_loss(q, p)


def test_false_negative_masking_removes_exactly_the_negatives_over_the_margin():
    torch.manual_seed(0)
    B, D, margin, t = 5, 8, 0.1, 0.05
    q, p, n = torch.randn(B, D), torch.randn(B, D), torch.randn(B, 3, D)
    n[0, 1] = q[0] * 3.0          # cos = 1: above the positive by far more than the margin
    n[2, 0] = q[2] + 1e-3 * torch.randn(D)
    loss_fn = InfoNCE(temperature=t, false_negative_margin=margin)
    loss, details = loss_fn.compute_loss(q, p, n, return_details=True)
    qn = F.normalize(q, dim=-1)
    docs = torch.cat([F.normalize(p, dim=-1), F.normalize(n.transpose(0, 1).reshape(-1, D), dim=-1)])
    sim = qn @ docs.T
    expected, n_dropped = 0.0, 0
    for i in range(B):
        keep = sim[i] <= sim[i, i] + margin
        keep[i] = True
        n_dropped += int((~keep).sum())
        logits = sim[i][keep] / t
        pos = int(keep[:i].sum())
        expected = expected - (logits[pos] - torch.logsumexp(logits, 0))
    assert n_dropped >= 2 and int(details["masked_negatives"]) == n_dropped
    assert torch.allclose(loss, expected / B, atol=1e-6)
    # without masking the same batch has a larger loss
    assert InfoNCE(temperature=t).compute_loss(q, p, n) > loss


@pytest.mark.parametrize("value", [0.0, -0.1])
def test_temperature_must_be_positive(value):
    with pytest.raises(BidirLMError, match=f"temperature {value}"):
        InfoNCE(temperature=value)


def test_shape_mismatch_names_the_shapes():
    with pytest.raises(BidirLMError, match=r"hard negatives \(3, 2, 5\)"):
        InfoNCE().compute_loss(torch.randn(4, 5), torch.randn(4, 5), torch.randn(3, 2, 5))


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcache_equals_plain_loss_and_gradients(symmetric):
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Dropout(0.3), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 16)).double()
    B, N = 7, 2
    q_in, p_in, n_in = torch.randn(B, 12).double(), torch.randn(B, 12).double(), torch.randn(B * N, 12).double()
    loss_fn = InfoNCE(temperature=0.05, symmetric=symmetric, false_negative_margin=0.3)
    embed = lambda b: encoder(b["x"])

    torch.manual_seed(1)
    plain = loss_fn.compute_loss(embed({"x": q_in}), embed({"x": p_in}), embed({"x": n_in}).view(B, N, -1))
    plain.backward()
    plain_grads = [w.grad.clone() for w in encoder.parameters()]
    encoder.zero_grad()

    torch.manual_seed(1)  # same dropout draws: chunks run in the same order, replay restores each chunk's RNG
    cached = GradCache(loss_fn, chunk_size=3)(embed, {"x": q_in}, {"x": p_in}, {"x": n_in}, n_negatives=N)
    (cached * 2).backward()  # a scaled loss (as gradient accumulation does) scales the replayed gradients
    assert torch.allclose(cached, plain, atol=1e-12)
    for a, b in zip(plain_grads, encoder.parameters()):
        assert torch.allclose(2 * a, b.grad, atol=1e-10)
