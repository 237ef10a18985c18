"""Connectors (mlp, qformer, stc) and token reducers (pool2d, tome, diff_prune) on tiny random features."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from vlm.connectors import (
    CONNECTORS,
    REDUCERS,
    Connector,
    DiffPrune,
    Instruction,
    Pool2d,
    TokenMerge,
    build_connector,
    register_connector,
    register_reducer,
)
from vlm.towers.base import VisualFeatures

B, T, H, W, D, OUT = 2, 4, 4, 4, 16, 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: threads only add contention on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


QF = dict(num_queries=4, hidden_size=32, num_layers=2, num_heads=4, temporal_layers=1, max_frames=8)

CONNECTOR_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {}),
    "mlp3x": ("mlp", {"projector": "mlp3x_gelu"}),
    "mlp_linear_pool2": ("mlp", {"projector": "linear", "pool": 2}),
    "qformer_video": ("qformer", QF),
    "qformer_per_frame": ("qformer", {**QF, "per_frame": True, "frame_queries": 3}),
    "qformer_instruct": ("qformer", {**QF, "instruction_aware": True}),
    "stc": ("stc", {"depth": 1, "hidden_size": 16, "group_size": 4}),
}
REDUCER_CASES: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "pool2d_avg": [{"name": "pool2d"}],
    "pool2d_bilinear": [{"name": "pool2d", "mode": "bilinear"}],
    "tome": [{"name": "tome", "tokens_per_frame": 5}],
    "diff_prune": [{"name": "diff_prune", "metric": "l1", "threshold": 0.5}],
    "diff_prune+tome": [
        {"name": "diff_prune", "metric": "l1", "threshold": 0.5},
        {"name": "tome", "tokens_per_frame": 5},
    ],
}
# combinations rejected at build time: spatial pooling/convolution needs a grid that tome has destroyed
UNSUPPORTED = {(c, r) for c in ("mlp_linear_pool2", "stc") for r in ("tome", "diff_prune+tome")}


def make_feats(b: int = B, t: int = T, h: int = H, w: int = W, d: int = D, seed: int = 0) -> VisualFeatures:
    """Random features whose first half of patches is static over time and second half moves."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, t, h * w, d, generator=g)
    tokens[:, :, : h * w // 2] = tokens[:, :1, : h * w // 2]
    return VisualFeatures(tokens=tokens, grid=(t, h, w), timestamps=torch.arange(t, dtype=torch.float).expand(b, t))


def make_instruction(seed: int = 1, s: int = 5) -> Instruction:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, s, dtype=torch.bool)
    mask[1, 3:] = False  # right padding in the second sample
    return Instruction(embeds=torch.randn(B, s, OUT, generator=g), mask=mask)


def build(case: str, reduce: list[dict[str, Any]] | None = None, **over: Any) -> Connector:
    name, kwargs = CONNECTOR_CASES[case]
    torch.manual_seed(0)
    return build_connector(name, in_dim=D, out_dim=OUT, reduce=reduce or [], **{**kwargs, **over}).eval()


@pytest.mark.parametrize("reducer_case", list(REDUCER_CASES))
@pytest.mark.parametrize("connector_case", list(CONNECTOR_CASES))
def test_connector_with_reducers(connector_case: str, reducer_case: str) -> None:
    spec = REDUCER_CASES[reducer_case]
    json.dumps({"kwargs": CONNECTOR_CASES[connector_case][1], "reduce": spec})  # config.json must hold them
    if (connector_case, reducer_case) in UNSUPPORTED:
        with pytest.raises(ValueError, match="after 'tome' is not supported"):
            build(connector_case, spec)
        return
    conn = build(connector_case, spec)
    feats = make_feats()
    out = conn(feats, make_instruction())
    groups, per_group = conn.output_grid(feats.grid)
    assert out.embeds.shape == (B, conn.num_tokens(feats.grid), OUT) == (B, groups * per_group, OUT)
    assert out.groups == groups and out.embeds.shape[1] % out.groups == 0
    assert torch.isfinite(out.embeds).all()
    if out.mask is not None:
        assert out.mask.shape == (B, out.embeds.shape[1]) and out.mask.dtype == torch.bool
    if out.timestamps is not None:
        assert out.timestamps.shape == (B, out.groups)
    if "diff_prune" in reducer_case and connector_case in ("mlp", "mlp3x", "stc", "qformer_per_frame"):
        assert out.mask is not None
    out.embeds.sum().backward()
    missing = [n for n, p in conn.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("connector_case", list(CONNECTOR_CASES))
def test_single_frame_image_input(connector_case: str) -> None:
    """MVBench-style image questions: one frame, grid (1, h, w)."""
    conn = build(connector_case, [{"name": "diff_prune"}])
    feats = make_feats(t=1)
    out = conn(feats, make_instruction())
    assert out.embeds.shape == (B, conn.num_tokens((1, H, W)), OUT)
    assert out.groups == conn.output_grid((1, H, W))[0] == 1
    assert out.mask is None or out.mask.all()  # a single frame is never pruned
    assert torch.isfinite(out.embeds).all()


@pytest.mark.parametrize("connector_case", ["mlp", "mlp_linear_pool2", "qformer_video", "qformer_per_frame", "stc"])
def test_pruned_token_content_never_reaches_kept_tokens(connector_case: str) -> None:
    conn = build(connector_case)
    feats = make_feats()
    mask = torch.rand(B, T, H * W, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, 0] = True
    mask[1, 2] = False  # a fully pruned temporal position
    changed = feats.tokens + 100.0 * (~mask)[..., None]
    a = conn(feats.with_(mask=mask))
    b = conn(feats.with_(tokens=changed, mask=mask))
    keep = torch.ones(B, a.embeds.shape[1], dtype=torch.bool) if a.mask is None else a.mask
    assert torch.allclose(a.embeds[keep], b.embeds[keep], atol=1e-5)
    assert torch.isfinite(a.embeds).all()
    if connector_case == "qformer_per_frame":
        assert not a.mask.reshape(B, T, -1)[1, 2].any() and a.mask.reshape(B, T, -1)[0].all()


def test_stc_is_chronological_and_pads_odd_sizes() -> None:
    conn = build("stc", downsample=[2, 2, 2])  # a JSON list works as well as a tuple
    feats = make_feats(t=6, h=5, w=3)
    assert conn.output_grid(feats.grid) == (3, 3 * 2)
    base = conn(feats).embeds.reshape(B, 3, 6, OUT)
    for k in range(6):
        tokens = feats.tokens.clone()
        tokens[:, k] += 1.0
        out = conn(feats.with_(tokens=tokens)).embeds.reshape(B, 3, 6, OUT)
        changed = (out - base).abs().amax(dim=(0, 2, 3)) > 1e-6  # [groups]
        assert changed.tolist() == [g == k // 2 for g in range(3)], k
    odd = make_feats(t=5, h=5, w=3)
    out = conn(odd)
    assert out.embeds.shape == (B, conn.num_tokens(odd.grid), OUT) and out.groups == 3
    assert out.timestamps.tolist()[0] == [0.0, 2.0, 4.0]


def test_stc_mask_is_any_of_window() -> None:
    conn = build("stc")
    feats = make_feats()
    mask = torch.zeros(B, T, H * W, dtype=torch.bool)
    mask[:, 0, 0] = True  # only (t=0, y=0, x=0) kept -> only output (group 0, y=0, x=0) kept
    out = conn(feats.with_(mask=mask))
    expected = torch.zeros(B, 2, 4, dtype=torch.bool)
    expected[:, 0, 0] = True
    assert torch.equal(out.mask, expected.reshape(B, 8))


def test_pool2d_values_by_hand() -> None:
    tokens = torch.arange(9.0).reshape(1, 1, 9, 1)  # 3x3 grid holding 0..8
    feats = VisualFeatures(tokens=tokens, grid=(1, 3, 3))
    avg = Pool2d(stride=2, mode="avg")
    assert avg.output_grid((1, 3, 3)) == (1, 2, 2)
    # ceil at odd edges: edge windows average the positions that exist
    assert avg(feats).tokens.flatten().tolist() == [2.0, 3.5, 6.5, 8.0]
    # bilinear (align_corners=False): sample points 0.25 and 1.75 along each axis of the linear ramp 3*y + x
    bil = Pool2d(mode="bilinear")(feats).tokens.flatten()
    assert torch.allclose(bil, torch.tensor([1.0, 2.5, 5.5, 7.0]))
    # even sizes: bilinear at stride 2 equals 2x2 average
    even = VisualFeatures(tokens=torch.randn(2, 3, 16, 4), grid=(3, 4, 4))
    assert torch.allclose(Pool2d(mode="bilinear")(even).tokens, Pool2d()(even).tokens, atol=1e-6)
    # masked average over kept tokens only; a window with nothing kept is masked out
    mask = torch.tensor([[[False, True, True, False, True, True, True, True, False]]])
    out = avg(feats.with_(mask=mask))
    assert out.tokens.flatten()[:3].tolist() == [(1 + 4) / 2, (2 + 5) / 2, (6 + 7) / 2]
    assert out.mask.flatten().tolist() == [True, True, True, False]


def test_tome_reaches_budget_and_merges_means() -> None:
    g = torch.Generator().manual_seed(0)
    for n_side, budget in [(4, 5), (4, 1), (4, 16), (4, 40), (3, 4), (5, 7)]:
        n = n_side * n_side
        feats = VisualFeatures(tokens=torch.randn(2, 3, n, 8, generator=g), grid=(3, n_side, n_side))
        tome = TokenMerge(tokens_per_frame=budget)
        out = tome(feats)
        k = min(n, budget)
        assert out.grid == tome.output_grid(feats.grid) == (3, 1, k)
        assert out.tokens.shape == (2, 3, k, 8)
        assign = tome.last_assignment  # [B, T', N] output slot of every input token
        for bi in range(2):
            for ti in range(3):
                for j in range(k):
                    src = feats.tokens[bi, ti][assign[bi, ti] == j]
                    assert len(src) > 0
                    assert torch.allclose(out.tokens[bi, ti, j], src.mean(0), atol=1e-5)
        assert torch.equal(tome(feats).tokens, out.tokens)  # deterministic


def test_tome_merges_identical_tokens_first_and_keeps_order() -> None:
    x = torch.randn(1, 1, 8, 16, generator=torch.Generator().manual_seed(1))
    x[0, 0, 5] = x[0, 0, 2]  # A token 2 (even) duplicates B token 5 (odd)
    out = TokenMerge(tokens_per_frame=7)(VisualFeatures(tokens=x, grid=(1, 1, 8)))
    expected = x[0, 0, [0, 1, 3, 4, 5, 6, 7]]  # token 2 merged into 5; the rest unchanged, in spatial order
    assert torch.allclose(out.tokens[0, 0], expected, atol=1e-6)


def test_tome_ignores_pruned_tokens() -> None:
    feats = make_feats()
    mask = torch.rand(B, T, H * W, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[0, 1] = False
    tome = TokenMerge(tokens_per_frame=6)
    a = tome(feats.with_(mask=mask))
    b = tome(feats.with_(tokens=feats.tokens + 50.0 * (~mask)[..., None], mask=mask))
    assert a.mask.shape == (B, T, 6) and not a.mask[0, 1].any()
    assert torch.allclose(a.tokens[a.mask], b.tokens[b.mask], atol=1e-5)


def test_diff_prune_static_vs_moving() -> None:
    feats = make_feats()  # patches 0..7 static, 8..15 moving
    prune = DiffPrune(metric="l1", threshold=0.1)
    out = prune(feats)
    assert out.grid == feats.grid and out.mask.shape == (B, T, H * W) and torch.equal(out.tokens, feats.tokens)
    assert out.mask[:, 0].all()  # first frame kept whole
    assert not out.mask[:, 1:, :8].any() and out.mask[:, 1:, 8:].all()
    assert prune.last_kept_fraction == pytest.approx((16 + 3 * 8) / 64)
    # threshold is configurable: a huge one prunes everything after the first frame
    assert not DiffPrune(metric="l1", threshold=1e3)(feats).mask[:, 1:].any()
    # frame_threshold drops a whole temporal position that barely changed
    tokens = feats.tokens.clone()
    tokens[:, 2] = tokens[:, 1] + 1e-4
    mask = DiffPrune(metric="l1", threshold=0.0, frame_threshold=1e-2)(feats.with_(tokens=tokens)).mask
    assert mask[:, [0, 1, 3]].all() and not mask[:, 2].any()
    # cosine ignores scale changes, l1 does not
    scaled = feats.tokens.clone()
    scaled[:, 1:] *= 3.0
    scaled[:, 1:, :8] = scaled[:, :1, :8].clone() * torch.arange(2.0, 5.0).reshape(1, 3, 1, 1)
    scaled_feats = feats.with_(tokens=scaled)
    assert not DiffPrune(metric="cosine", threshold=0.01)(scaled_feats).mask[:, 1:, :8].any()
    assert DiffPrune(metric="l1", threshold=0.01)(scaled_feats).mask[:, 1:, :8].all()
    # an incoming mask is respected
    prior = torch.ones(B, T, H * W, dtype=torch.bool)
    prior[:, 0, 3] = False
    assert not prune(feats.with_(mask=prior)).mask[:, 0, 3].any()


def test_qformer_instruction_awareness() -> None:
    feats = make_feats()
    aware = build("qformer_instruct")
    assert aware.uses_instruction and not build("qformer_video").uses_instruction
    i1, i2 = make_instruction(seed=1), make_instruction(seed=2)
    a1, a2, a0 = aware(feats, i1).embeds, aware(feats, i2).embeds, aware(feats).embeds
    assert not torch.allclose(a1, a2, atol=1e-4) and not torch.allclose(a1, a0, atol=1e-4)
    # padded instruction positions are ignored
    padded = Instruction(embeds=i1.embeds.clone(), mask=i1.mask)
    padded.embeds[1, 3:] += 10.0
    assert torch.allclose(aware(feats, padded).embeds, a1, atol=1e-5)
    # a per-frame, instruction-aware Q-Former conditions every frame
    per_frame = build("qformer_per_frame", instruction_aware=True)
    assert not torch.allclose(per_frame(feats, i1).embeds, per_frame(feats, i2).embeds, atol=1e-4)
    plain = build("qformer_video")
    assert torch.equal(plain(feats, i1).embeds, plain(feats).embeds)


@pytest.mark.parametrize("connector_case", ["qformer_video", "qformer_per_frame"])
def test_qformer_temporal_position_embeddings_make_it_order_sensitive(connector_case: str) -> None:
    conn = build(connector_case)
    with torch.no_grad():  # BLIP-2's 0.02 init makes attention nearly uniform, i.e. order-blind: look "trained"
        for module in conn.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.3)
        conn.frame_position.weight.normal_(0.0, 1.0)
    feats = make_feats()
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = feats.with_(tokens=feats.tokens[:, perm])

    def run(f: VisualFeatures) -> torch.Tensor:
        out = conn(f).embeds
        if out.shape[1] == T * 3:  # per-frame tokens: compare frame by frame in the original order
            out = out.reshape(B, T, 3, OUT)[:, torch.argsort(perm)] if f is shuffled else out.reshape(B, T, 3, OUT)
        return out

    assert not torch.allclose(run(feats), run(shuffled), atol=1e-4)
    with torch.no_grad():
        conn.frame_position.weight.zero_()  # without temporal PE the Q-Former is order-blind
    assert torch.allclose(run(feats), run(shuffled), atol=1e-5)


def test_qformer_beyond_max_frames() -> None:
    feats = make_feats(t=10)
    out = build("qformer_video")(feats)  # max_frames=8: interpolated
    assert out.embeds.shape == (B, 4, OUT)
    with pytest.raises(ValueError, match="exceed max_frames=8"):
        build("qformer_video", pe_overflow="error")(feats)


def test_unsupported_reducer_orders_raise_at_build() -> None:
    with pytest.raises(ValueError, match="'pool2d' .* needs a spatial"):
        build("mlp", [{"name": "tome"}, {"name": "pool2d"}])
    with pytest.raises(ValueError, match="'diff_prune' .* needs a spatial"):
        build("qformer_video", [{"name": "tome"}, {"name": "diff_prune"}])
    with pytest.raises(ValueError, match="projector"):
        build("mlp", projector="mlp2x_relu")


def test_connector_in_bfloat16_accepts_float_features() -> None:
    for case in ("mlp", "qformer_per_frame", "stc"):
        conn = build(case).to(torch.bfloat16)
        out = conn(make_feats())
        assert out.embeds.dtype == torch.bfloat16 and torch.isfinite(out.embeds.float()).all()


def test_registries_reject_duplicates_and_wrong_bases() -> None:
    assert {"mlp", "qformer", "stc"} <= set(CONNECTORS.names())
    assert {"pool2d", "tome", "diff_prune"} <= set(REDUCERS.names())
    with pytest.raises(KeyError, match="already registered"):

        @register_connector("mlp")
        class Again(Connector):
            pass

    with pytest.raises(KeyError, match="already registered"):

        @register_reducer("tome")
        class AgainReducer(Pool2d):
            pass

    with pytest.raises(TypeError):
        register_connector("not_a_connector")(Pool2d)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="unknown connector 'nope'"):
        build_connector("nope", in_dim=D, out_dim=OUT)
