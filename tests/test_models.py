"""Model core: the reference SSD, the nested mixer, decoding, extraction, widths, mamba-ssm layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_matmamba import MatMambaConfig, MatMambaLM, MatMambaVision
from lit_matmamba.kernels.ssd import ssd_ref
from lit_matmamba.models import MatMambaMixer
from lit_matmamba.models.interop import load_mamba_ssm, mamba_ssm_config, save_mamba_ssm

F64 = torch.float64


def tiny_config(**kw) -> MatMambaConfig:
    base = dict(d_model=32, n_layer=2, vocab_size=61, d_state=8, headdim=8, chunk_size=8)
    return MatMambaConfig(**{**base, **kw})


# Plain, unnested Mamba2 written from the paper, in mamba-ssm's layout, step by step -----------
def ssd_recurrence(x, dt, A, B, C, D=None, initial_state=None):
    """x: (b, l, h, p), dt: (b, l, h) (already positive), B/C: (b, l, g, n)."""
    b, l, h, p = x.shape
    g = B.shape[2]
    state = x.new_zeros(b, h, p, B.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(l):
        Bh = B[:, t].repeat_interleave(h // g, dim=1)  # (b, h, n)
        Ch = C[:, t].repeat_interleave(h // g, dim=1)
        state = (
            state * torch.exp(dt[:, t] * A)[..., None, None]
            + (x[:, t] * dt[:, t, :, None])[..., None] * Bh[:, :, None]
        )
        y = (state * Ch[:, :, None]).sum(-1)
        if D is not None:
            y = y + x[:, t] * D[:, None]
        ys.append(y)
    return torch.stack(ys, 1), state


def plain_mamba2(u, sd, cfg: MatMambaConfig, nheads: int):
    """One Mamba2 mixer from a state dict in mamba-ssm's layout: u (B, L, d_model)."""
    P, G, N = cfg.headdim, cfg.ngroups, cfg.d_state
    hp = nheads * P
    zxbcdt = u @ sd["in_proj.weight"].T
    z, xbc, dt = zxbcdt.split([hp, hp + 2 * G * N, nheads], -1)
    xbc = F.conv1d(
        F.pad(xbc.transpose(1, 2), (cfg.d_conv - 1, 0)),
        sd["conv1d.weight"],
        sd["conv1d.bias"],
        groups=xbc.shape[-1],
    )
    xbc = F.silu(xbc).transpose(1, 2)
    x, Bm, Cm = xbc.split([hp, G * N, G * N], -1)
    dt = F.softplus(dt + sd["dt_bias"])
    bsz, L = u.shape[:2]
    y, _ = ssd_recurrence(
        x.view(bsz, L, nheads, P),
        dt,
        -torch.exp(sd["A_log"]),
        Bm.view(bsz, L, G, N),
        Cm.view(bsz, L, G, N),
        sd["D"],
    )
    y = y.reshape(bsz, L, hp) * F.silu(z)
    y = y.view(bsz, L, G, hp // G)
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).view(bsz, L, hp) * sd["norm.weight"]
    return y @ sd["out_proj.weight"].T


def random_mamba_state_dict(cfg: MatMambaConfig, nheads: int) -> dict[str, torch.Tensor]:
    P, G, N, D = cfg.headdim, cfg.ngroups, cfg.d_state, cfg.d_model
    hp, conv = nheads * P, nheads * P + 2 * G * N
    return {
        "in_proj.weight": torch.randn(2 * hp + 2 * G * N + nheads, D, dtype=F64) / math.sqrt(D),
        "conv1d.weight": torch.randn(conv, 1, cfg.d_conv, dtype=F64) * 0.5,
        "conv1d.bias": torch.randn(conv, dtype=F64) * 0.1,
        "dt_bias": torch.randn(nheads, dtype=F64) - 2,
        "A_log": torch.rand(nheads, dtype=F64) * 2,
        "D": torch.randn(nheads, dtype=F64),
        "norm.weight": 1 + 0.1 * torch.randn(hp, dtype=F64),
        "out_proj.weight": torch.randn(D, hp, dtype=F64) / math.sqrt(hp),
    }


def slice_mamba_state_dict(sd, cfg: MatMambaConfig, nheads: int, k: int) -> dict[str, torch.Tensor]:
    """The weights of the first k heads, sliced in mamba-ssm's layout (what MatMamba prescribes)."""
    P, GN2 = cfg.headdim, 2 * cfg.ngroups * cfg.d_state
    hp, kp = nheads * P, k * P
    w = sd["in_proj.weight"]
    rows = torch.cat(
        [torch.arange(kp), hp + torch.arange(kp), 2 * hp + torch.arange(GN2), 2 * hp + GN2 + torch.arange(k)]
    )
    conv = torch.cat([torch.arange(kp), hp + torch.arange(GN2)])
    return {
        "in_proj.weight": w[rows],
        "conv1d.weight": sd["conv1d.weight"][conv],
        "conv1d.bias": sd["conv1d.bias"][conv],
        "dt_bias": sd["dt_bias"][:k],
        "A_log": sd["A_log"][:k],
        "D": sd["D"][:k],
        "norm.weight": sd["norm.weight"][:kp],
        "out_proj.weight": sd["out_proj.weight"][:, :kp],
    }


# The reference SSD ------------------------------------------------------------------------------
@pytest.mark.parametrize("seqlen", [1, 7, 24, 45], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("ngroups", [1, 2], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("with_init", [False, True], ids=["zero-state", "initial-state"])
def test_reference_ssd_equals_recurrence(seqlen, ngroups, with_init):
    b, h, p, n = 2, 4, 3, 5
    leaves = dict(
        x=torch.randn(b, seqlen, h, p, dtype=F64),
        dt=torch.randn(b, seqlen, h, dtype=F64),
        A=-torch.rand(h, dtype=F64) * 2 - 0.1,
        B=torch.randn(b, seqlen, ngroups, n, dtype=F64),
        C=torch.randn(b, seqlen, ngroups, n, dtype=F64),
        D=torch.randn(h, dtype=F64),
        dt_bias=torch.randn(h, dtype=F64),
        init=torch.randn(b, h, p, n, dtype=F64) if with_init else None,
    )
    leaves = {k: v.requires_grad_() if v is not None else None for k, v in leaves.items()}
    v = leaves
    y, final = ssd_ref(
        v["x"],
        v["dt"],
        v["A"],
        v["B"],
        v["C"],
        chunk_size=8,
        D=v["D"],
        dt_bias=v["dt_bias"],
        initial_state=v["init"],
    )
    y2, final2 = ssd_recurrence(
        v["x"], F.softplus(v["dt"] + v["dt_bias"]), v["A"], v["B"], v["C"], v["D"], v["init"]
    )
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final2, rtol=1e-10, atol=1e-10)

    wy, wf = torch.randn_like(y), torch.randn_like(final)
    params = [t for t in leaves.values() if t is not None]
    g1 = torch.autograd.grad((y * wy).sum() + (final * wf).sum(), params)
    g2 = torch.autograd.grad((y2 * wy).sum() + (final2 * wf).sum(), params)
    for a, b_ in zip(g1, g2):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-9)


# The nested mixer ------------------------------------------------------------------------------
@pytest.mark.parametrize("ngroups", [1, 2], ids=lambda g: f"G{g}")
def test_full_width_mixer_equals_plain_mamba2(ngroups):
    cfg = tiny_config(ngroups=ngroups)
    mixer = MatMambaMixer(cfg).double()
    sd = random_mamba_state_dict(cfg, mixer.nheads)
    mixer.load_state_dict(sd)  # mamba-ssm layout in, converted to the internal one
    u = torch.randn(2, 19, cfg.d_model, dtype=F64)
    torch.testing.assert_close(mixer(u, cfg.d_model), plain_mamba2(u, sd, cfg, mixer.nheads))
    # and the state dict comes back in mamba-ssm's layout, unchanged
    for key, value in mixer.state_dict().items():
        torch.testing.assert_close(value, sd[key], rtol=0, atol=0)


@pytest.mark.parametrize("ngroups", [1, 2], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("width", [32, 16, 8], ids=lambda w: f"w{w}")
def test_sub_width_equals_standalone_mixer_from_sliced_weights(width, ngroups):
    cfg = tiny_config(ngroups=ngroups)
    assert cfg.resolve(width) == [width] * cfg.n_layer  # a whole number of heads per group
    full = MatMambaMixer(cfg).double()
    sd = random_mamba_state_dict(cfg, full.nheads)
    full.load_state_dict(sd)
    k = cfg.heads(width)
    standalone = MatMambaMixer(cfg, width).double()
    standalone.load_state_dict(slice_mamba_state_dict(sd, cfg, full.nheads, k))
    u = torch.randn(2, 13, cfg.d_model, dtype=F64)
    torch.testing.assert_close(full(u, width), standalone(u, width))
    torch.testing.assert_close(
        full(u, width), plain_mamba2(u, slice_mamba_state_dict(sd, cfg, full.nheads, k), cfg, k)
    )


@pytest.mark.parametrize("width", [16, 8], ids=lambda w: f"w{w}")
def test_gradients_at_a_width_reach_only_its_slice(width):
    cfg = tiny_config()
    mixer = MatMambaMixer(cfg).double()
    mixer(torch.randn(2, 11, cfg.d_model, dtype=F64), width).square().sum().backward()
    # Map every gradient into mamba-ssm's layout, where the slice is easy to name.
    grads = {n: p.grad for n, p in mixer.named_parameters()}
    from lit_matmamba.models.mixer import mamba_to_internal_index

    in_idx, conv_idx = mamba_to_internal_index(mixer)
    g_in = torch.empty_like(grads["in_proj.weight"]).index_copy_(0, in_idx, grads["in_proj.weight"])
    g_conv = torch.empty_like(grads["conv1d.weight"]).index_copy_(0, conv_idx, grads["conv1d.weight"])
    k, P, H, GN2 = cfg.heads(width), cfg.headdim, mixer.nheads, 2 * cfg.ngroups * cfg.d_state
    hp, kp = H * P, cfg.heads(width) * P
    used_rows = torch.zeros(g_in.shape[0], dtype=torch.bool)
    used_rows[:kp] = used_rows[hp : hp + kp] = used_rows[2 * hp : 2 * hp + GN2] = True
    used_rows[2 * hp + GN2 : 2 * hp + GN2 + k] = True
    assert g_in[~used_rows].abs().max() == 0 and g_in[used_rows].abs().sum(1).gt(0).all()
    used_conv = torch.zeros(g_conv.shape[0], dtype=torch.bool)
    used_conv[:kp] = used_conv[hp:] = True
    assert g_conv[~used_conv].abs().max() == 0 and g_conv[used_conv].abs().sum((1, 2)).gt(0).all()
    for name in ("dt_bias", "A_log", "D"):
        assert grads[name][k:].abs().max() == 0 and grads[name][:k].abs().gt(0).all(), name
    assert grads["norm.weight"][kp:].abs().max() == 0
    assert (
        grads["out_proj.weight"][:, kp:].abs().max() == 0
        and grads["out_proj.weight"][:, :kp].abs().gt(0).any()
    )


# The language model -----------------------------------------------------------------------------
@pytest.fixture
def lm():
    torch.manual_seed(0)
    return MatMambaLM(tiny_config(n_layer=3)).double()


WIDTHS = [None, 16, 8, 4, [32, 4, 16]]
WIDTH_IDS = ["full", "w16", "w8", "w4", "mixnmatch"]


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
def test_prefill_then_decode_equals_forward(lm, width):
    ids = torch.randint(0, 61, (2, 21))
    full = lm(ids, width)
    cache = lm.allocate_cache(2, width, dtype=F64)
    prefill = lm(ids[:, :9], width, cache)
    torch.testing.assert_close(prefill, full[:, :9])
    # the cache is sized to the width in use, not the full width
    for state, w in zip(cache.states, lm.config.resolve(width)):
        assert state.ssm.shape[1] == lm.config.heads(w)
    steps = [lm.step(ids[:, t], cache) for t in range(9, 21)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 9:])
    assert cache.seqlen_offset == 21


def test_prefill_in_pieces_equals_one_forward(lm):
    ids = torch.randint(0, 61, (2, 30))
    cache = lm.allocate_cache(2, 16, dtype=F64)
    pieces = torch.cat([lm(ids[:, :11], 16, cache), lm(ids[:, 11:], 16, cache)], 1)
    torch.testing.assert_close(pieces, lm(ids, 16))


def test_cache_width_mismatch_is_an_error(lm):
    cache = lm.allocate_cache(1, 16)
    with pytest.raises(ValueError, match="allocated for widths"):
        lm(torch.zeros(1, 3, dtype=torch.long), 8, cache)


@pytest.mark.parametrize("width", WIDTHS[1:], ids=WIDTH_IDS[1:])
def test_extract_is_smaller_and_equal(lm, width):
    sub = lm.extract(width)
    assert type(sub) is MatMambaLM
    n_sub = sum(p.numel() for p in sub.parameters())
    assert n_sub == lm.num_params(width) < sum(p.numel() for p in lm.parameters())
    ids = torch.randint(0, 61, (2, 17))
    torch.testing.assert_close(sub(ids), lm(ids, width))
    # extracted models decode too
    assert sub.generate(ids[:, :4], 3, temperature=0).shape == (2, 7)


def test_param_and_flop_counts_shrink_with_width(lm):
    counts = [lm.num_params(w) for w in (32, 16, 8)]
    flops = [lm.flops_per_token(w) for w in (32, 16, 8)]
    assert counts == sorted(counts, reverse=True) and flops == sorted(flops, reverse=True)
    assert lm.num_params() == sum(p.numel() for p in lm.parameters())
    assert lm.flops_per_token(16, training=True) > 2.9 * lm.flops_per_token(16, training=False)


@pytest.mark.parametrize(
    "width, message",
    [
        (0, "not valid"),
        (33, "multiples of 4"),
        (64, "not valid"),
        (-8, "not valid"),
        ([32, 16], "needs 3 entries"),
        (16.0, "must be None, an int"),
        ("16", "must be None, an int"),
        ([32, 16, 7], "layer 2"),
        (True, "must be None"),
    ],
)
def test_invalid_widths_raise_clear_errors(lm, width, message):
    with pytest.raises(ValueError, match=message) as err:
        lm(torch.zeros(1, 4, dtype=torch.long), width)
    assert "allowed" in str(err.value) or "entries" in str(err.value) or "must be" in str(err.value)


def test_config_checks_its_layer_widths_and_gives_the_papers_granularities():
    assert MatMambaConfig.from_name("lm-130m").default_granularities() == (768, 384, 192, 96)
    mixed = tiny_config(layer_widths=(32, 8))  # an extracted Mix'n'Match model: layer 1 is narrower
    assert mixed.resolve(None) == [32, 8] and mixed.default_granularities() == (8, 4)
    with pytest.raises(ValueError, match="layer_widths: width 6 is not valid for layer 1"):
        tiny_config(layer_widths=(32, 6))
    with pytest.raises(ValueError, match="layer_widths: a per-layer width needs 2 entries"):
        tiny_config(layer_widths=(32,))


def test_state_dict_uses_mamba_ssm_names_and_shapes():
    cfg = tiny_config(n_layer=2, vocab_size=61, pad_vocab_size_multiple=16)
    sd = MatMambaLM(cfg).state_dict()
    H, P, GN = cfg.heads(cfg.d_model), cfg.headdim, cfg.ngroups * cfg.d_state
    expected = {
        "backbone.embedding.weight": (64, 32),
        "backbone.norm_f.weight": (32,),
        "lm_head.weight": (64, 32),
    }
    for i in range(2):
        p = f"backbone.layers.{i}."
        expected |= {
            p + "norm.weight": (32,),
            p + "mixer.in_proj.weight": (2 * H * P + 2 * GN + H, 32),
            p + "mixer.conv1d.weight": (H * P + 2 * GN, 1, 4),
            p + "mixer.conv1d.bias": (H * P + 2 * GN,),
            p + "mixer.dt_bias": (H,),
            p + "mixer.A_log": (H,),
            p + "mixer.D": (H,),
            p + "mixer.norm.weight": (H * P,),
            p + "mixer.out_proj.weight": (32, H * P),
        }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_state_dict_round_trip(lm):
    other = MatMambaLM(lm.config).double()
    other.load_state_dict(lm.state_dict())
    ids = torch.randint(0, 61, (1, 10))
    for w in WIDTHS:
        torch.testing.assert_close(other(ids, w), lm(ids, w), rtol=0, atol=0)


@pytest.mark.parametrize("width", [None, 16, 8], ids=["full", "w16", "w8"])
def test_mamba_ssm_checkpoint_round_trip(lm, width, tmp_path):
    path = save_mamba_ssm(lm, tmp_path / "ckpt", width)
    loaded = load_mamba_ssm(path)
    ids = torch.randint(0, 61, (2, 12))
    torch.testing.assert_close(loaded.double()(ids), lm(ids, width))
    cfg = mamba_ssm_config(lm.config, width)
    assert cfg["ssm_cfg"]["layer"] == "Mamba2" and cfg["d_intermediate"] == 0
    with pytest.raises(FileExistsError):
        save_mamba_ssm(lm, path, width)


def test_mamba_ssm_export_rejects_mixnmatch(lm, tmp_path):
    with pytest.raises(ValueError, match="one inner width"):
        save_mamba_ssm(lm, tmp_path / "x", [32, 8, 16])
    assert not (tmp_path / "x").exists()


def test_generate_is_reproducible(lm):
    ids = torch.randint(0, 61, (2, 5))
    a = lm.generate(ids, 6, width=8, generator=torch.Generator().manual_seed(1))
    b = lm.generate(ids, 6, width=8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 11) and torch.equal(a[:, :5], ids)
    assert int(a.max()) < lm.config.vocab_size


def test_custom_head_is_injected():
    head = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    model = MatMambaLM(tiny_config(), head=head)
    assert model(torch.zeros(2, 3, dtype=torch.long), 8).shape == (2, 3, 5)


def test_presets_have_the_papers_sizes():
    with torch.device("meta"):
        sizes = {name: MatMambaLM(name).num_params() for name in ("lm-130m", "lm-370m", "lm-790m", "lm-1.4b")}
        sizes |= {name: MatMambaVision(name).num_params() for name in ("vision-35m", "vision-135m")}
    expected = {
        "lm-130m": 130e6,
        "lm-370m": 370e6,
        "lm-790m": 790e6,
        "lm-1.4b": 1.4e9,
        "vision-35m": 35e6,
        "vision-135m": 135e6,
    }
    for name, n in sizes.items():
        assert abs(n / expected[name] - 1) < 0.06, (name, n)
    c = MatMambaConfig.from_name("lm-130m")
    assert (c.d_state, c.d_conv, c.expand, c.ngroups, c.heads(c.d_model), c.chunk_size) == (
        128,
        4,
        2,
        1,
        64,
        128,
    )
    assert c.default_granularities() == (768, 384, 192, 96)
    with pytest.raises(ValueError, match="unknown preset"):
        MatMambaConfig.from_name("lm-7b")


# Vision ------------------------------------------------------------------------------------------
@pytest.fixture
def vision():
    torch.manual_seed(0)
    return MatMambaVision(MatMambaConfig.from_name("vision-tiny", num_classes=7)).eval()


@pytest.mark.parametrize("width", WIDTHS[:4] + [[32, 8]], ids=WIDTH_IDS)
def test_vision_widths_and_extract(vision, width):
    images = torch.randn(2, 3, 32, 32)
    logits = vision(images, width)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    if width is not None:
        torch.testing.assert_close(vision.extract(width)(images), logits)


def test_vision_other_resolutions_interpolate_positions(vision):
    pos = vision.position_embeddings(6, 5)
    assert pos.shape == (1, 31, 64)
    torch.testing.assert_close(pos[:, -1], vision.pos_embed[:, -1])  # class token position kept
    torch.testing.assert_close(vision.position_embeddings(4, 4), vision.pos_embed)  # training grid unchanged
    assert vision(torch.randn(2, 3, 48, 40)).shape == (2, 7)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vision(torch.randn(1, 3, 30, 32))


def test_vision_class_token_is_last(vision):
    """The class token sits at the end: changing any patch changes the token-pooled output."""
    images = torch.randn(1, 3, 32, 32)
    base = vision.forward_features(images)
    changed = images.clone()
    changed[..., :8, :8] += 1  # the first patch, the earliest in the causal scan
    assert not torch.allclose(vision.forward_features(changed), base)


def test_vision_reset_classifier(vision):
    vision.reset_classifier(3)
    assert vision(torch.randn(1, 3, 32, 32)).shape == (1, 3)
