"""Masking and the cross-modal reconstruction branch."""

from __future__ import annotations

import pytest
import torch

from cmrcnet.models import CrossModalReconstructor, random_mask


@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_element_mask_keeps_the_configured_fraction(keep: float) -> None:
    torch.manual_seed(0)
    x = torch.ones(16, 50, 64)
    masked = random_mask(x, keep_prob=keep, mode="element")
    assert set(masked.unique().tolist()) <= {0.0, 1.0}  # kept values are not rescaled
    assert masked.mean().item() == pytest.approx(keep, abs=0.01)
    # elements, not whole tokens: tokens are partly kept
    per_token = masked.mean(dim=-1)
    assert ((per_token > 0) & (per_token < 1)).float().mean() > 0.9


def test_token_mask_zeroes_whole_tokens() -> None:
    torch.manual_seed(0)
    x = torch.ones(64, 50, 16)
    masked = random_mask(x, keep_prob=0.5, mode="token")
    per_token = masked.mean(dim=-1)
    assert set(per_token.unique().tolist()) == {0.0, 1.0}
    assert per_token.mean().item() == pytest.approx(0.5, abs=0.03)


def test_keep_all_and_bad_mode() -> None:
    x = torch.randn(2, 3, 4)
    assert random_mask(x, keep_prob=1.0) is x
    with pytest.raises(ValueError, match="mode must be"):
        random_mask(x, keep_prob=0.5, mode="patch")


def _reconstructor(**kwargs) -> CrossModalReconstructor:
    torch.manual_seed(0)
    return CrossModalReconstructor(n_genes=12, width=32, **kwargs)


def test_output_shape() -> None:
    out = _reconstructor()(torch.randn(4, 17, 32), torch.rand(4, 12))
    assert out.shape == (4, 256)
    assert torch.isfinite(out).all()


def test_shared_fusion_weights_have_fewer_parameters() -> None:
    shared = _reconstructor(share_fusion_weights=True)
    unshared = _reconstructor(share_fusion_weights=False)
    n_shared = sum(p.numel() for p in shared.parameters())
    n_unshared = sum(p.numel() for p in unshared.parameters())
    block = sum(p.numel() for p in unshared.fusion[0].parameters())
    assert n_unshared == n_shared + block
    assert len(shared.fusion) == 1 and len(unshared.fusion) == 2
    # stored once: no aliased state_dict entries (an EMA over state_dict would update them twice)
    pointers = [t.data_ptr() for t in shared.state_dict().values()]
    assert len(pointers) == len(set(pointers))


def test_shared_block_is_applied_n_times() -> None:
    tokens, expr = torch.randn(2, 17, 32), torch.rand(2, 12)
    model = _reconstructor(share_fusion_weights=True, mask_in_eval=False).eval()
    with torch.no_grad():
        context = model.expr_tokens(expr)
        x = model.cross(model.image_tokens(tokens), context)
        expected = model.fusion[0](model.fusion[0](x, context), context).mean(dim=1)
        torch.testing.assert_close(model(tokens, expr), expected)


def test_masking_in_eval_mode_follows_the_option() -> None:
    tokens, expr = torch.randn(2, 17, 32), torch.rand(2, 12)
    always = _reconstructor(mask_in_eval=True).eval()
    assert not torch.equal(always(tokens, expr), always(tokens, expr))  # the reference masks in eval too
    train_only = _reconstructor(mask_in_eval=False).eval()
    torch.testing.assert_close(train_only(tokens, expr), train_only(tokens, expr))


def test_cross_attention_input_projections_are_one_xavier_matrix() -> None:
    """As the reference's MultiheadAttention: q, k and v projections drawn xavier-uniform as one (3 d, d) matrix,
    so each part has bound sqrt(6 / (4 d)), not the sqrt(6 / (2 d)) of separate (d, d) draws."""
    cross = _reconstructor().cross
    d = cross.q.in_features
    joint = torch.cat([cross.q.weight, cross.kv.weight]).detach()  # (3 d, d)
    bound = (6.0 / (4 * d)) ** 0.5
    assert joint.abs().max().item() <= bound
    for part in (cross.q.weight, cross.kv.weight):
        assert part.abs().max().item() > 0.99 * bound  # uniform up to the joint bound
        assert part.std().item() == pytest.approx(bound / 3**0.5, rel=0.03)
    assert all(torch.all(layer.bias == 0) for layer in (cross.q, cross.kv, cross.proj))


def test_reconstruction_branch_other_layers_keep_torch_defaults() -> None:
    """The reference builds the rest of the branch with torch's default Linear initialisation
    (kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
    rec = _reconstructor()
    layer = rec.image_tokens  # Linear(width 32 -> 256)
    bound = 1.0 / layer.in_features**0.5
    assert layer.weight.abs().max().item() <= bound
    assert layer.weight.abs().max().item() > 0.95 * bound
    assert layer.bias.abs().max().item() > 0  # default biases are not zeroed
