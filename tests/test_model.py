"""GEM forward: shapes, masking, hashing, determinism, gradients, and the adapter."""

import numpy as np
import pytest
import torch

from model.adapter import StudentAdapter
from model.baselines import build_models
from model.config import PRESETS, GEMConfig
from model.embedding import DenseNormalizer, dense_stats, set_dense_stats
from model.examples import random_batch
from model.features import input_names
from model.gem import GEM
from model.layers import chain_logits
from model.outputs import EMBEDDING, LOGITS, USER_EMBEDDING
from model.schema import DenseFeature
from trainer.train import to_tensors


def _outputs(model, batch, schema):
    model.eval()
    with torch.no_grad():
        return model(to_tensors(batch, input_names(schema)))


@pytest.mark.parametrize("name", list(PRESETS))
def test_shapes_and_dtypes_for_every_preset(name, schema):
    cfg = PRESETS[name]
    torch.manual_seed(0)
    model = GEM(schema, cfg)
    out = _outputs(model, random_batch(schema, 3, 5), schema)
    assert out[LOGITS].shape == (3, len(schema.tasks))
    assert out[EMBEDDING].shape == (3, cfg.embedding_dim)
    assert out[USER_EMBEDDING].shape == (3, cfg.user_embedding_dim)
    for t in out.values():
        assert t.dtype == torch.float32
        assert torch.isfinite(t).all()


def test_presets_scale_without_code_changes(schema):
    sizes = [sum(p.numel() for p in GEM(schema, PRESETS[n]).parameters()) for n in ("tiny", "small", "medium")]
    assert sizes[0] < sizes[1] < sizes[2]
    assert PRESETS["large"].d_model > PRESETS["medium"].d_model > PRESETS["small"].d_model


def test_empty_and_full_sequences_give_finite_outputs_and_gradients(schema, tiny):
    torch.manual_seed(0)
    model = GEM(schema, tiny)
    batch = random_batch(schema, 4, tiny.seq_len)
    batch["user_history_length"] = np.array([0, 0, tiny.seq_len, 1])
    tensors = to_tensors(batch, input_names(schema))
    out = model(tensors)
    assert all(torch.isfinite(t).all() for t in out.values())
    (out[LOGITS].sum() + out[EMBEDDING].sum() + out[USER_EMBEDDING].sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    # The all-empty batch (every key masked) too.
    batch["user_history_length"][:] = 0
    assert all(torch.isfinite(t).all() for t in _outputs(model, batch, schema).values())


def test_gradients_reach_every_parameter_of_every_model(schema, tiny):
    torch.manual_seed(0)
    batch = to_tensors(random_batch(schema, 16, 12), input_names(schema))
    for name, model in build_models(schema, tiny, baselines=True).items():
        model(batch)[LOGITS].sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"{name}: no gradient reaches {missing}"


def test_each_model_starts_from_the_seed_alone(schema, tiny):
    """A row of `gem train --baselines` must not depend on which models came before it:
    the baselines of an interformer GEM and of a shared-user GEM start identical."""
    per_example = build_models(schema, tiny.with_(sequence_arch="interformer"), baselines=True, seed=3)
    shared = build_models(schema, tiny.with_(sequence_arch="shared_user"), baselines=True, seed=3)
    for name in ("gem_mean_pool", "pooled_mlp", "logistic"):
        a, b = per_example[name].state_dict(), shared[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # The same seed, the same first model; another seed, another one.
    again = build_models(schema, tiny.with_(sequence_arch="interformer"), baselines=False, seed=3)["gem"]
    other = build_models(schema, tiny.with_(sequence_arch="interformer"), baselines=False, seed=4)["gem"]
    a, b, c = (m.state_dict() for m in (per_example["gem"], again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_padding_beyond_the_length_is_ignored(schema, tiny):
    torch.manual_seed(0)
    model = GEM(schema, tiny)
    batch = random_batch(schema, 8, 10, seed=1)
    batch["user_history_length"] = np.minimum(batch["user_history_length"], 6)
    wider = dict(batch)
    for f in schema.sequences[0].fields:
        noise = np.random.default_rng(2).integers(0, 1 << 40, (8, 10))
        wider[f.name] = np.concatenate([batch[f.name][:, :6], noise], axis=1)
    a, b = _outputs(model, batch, schema), _outputs(model, wider, schema)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_events_beyond_seq_len_are_ignored(schema, tiny):
    """Newest first: the model reads the first `seq_len` events of a longer sequence."""
    torch.manual_seed(0)
    model = GEM(schema, tiny)
    batch = random_batch(schema, 4, tiny.seq_len + 20, seed=3)
    batch["user_history_length"][:] = tiny.seq_len + 20
    cut = dict(batch)
    for f in schema.sequences[0].fields:
        cut[f.name] = batch[f.name][:, : tiny.seq_len]
    cut["user_history_length"] = np.full(4, tiny.seq_len)
    a, b = _outputs(model, batch, schema), _outputs(model, cut, schema)
    torch.testing.assert_close(a[LOGITS], b[LOGITS], rtol=0, atol=1e-5)


def test_order_of_events_matters(schema, tiny):
    torch.manual_seed(0)
    model = GEM(schema, tiny)
    batch = random_batch(schema, 4, 8, seed=4)
    batch["user_history_length"][:] = 8
    rev = dict(batch)
    for f in schema.sequences[0].fields:
        rev[f.name] = batch[f.name][:, ::-1].copy()
    assert not torch.allclose(_outputs(model, batch, schema)[LOGITS], _outputs(model, rev, schema)[LOGITS])


def test_unseen_huge_and_negative_ids_hash_safely(schema, tiny):
    torch.manual_seed(0)
    model = GEM(schema, tiny)
    batch = random_batch(schema, 6, 4)
    for f in schema.sparse:
        batch[f.name] = np.array([0, -1, np.iinfo(np.int64).min, np.iinfo(np.int64).max, f.buckets, 10**18])
    out = _outputs(model, batch, schema)
    assert all(torch.isfinite(t).all() for t in out.values())
    # id and id + buckets share a row: hashing is a remainder.
    same = dict(batch)
    same["user_id"] = batch["user_id"] + schema.sparse[0].buckets * 3
    same["user_id"][2:4] = batch["user_id"][2:4]  # the int64 extremes would overflow
    torch.testing.assert_close(_outputs(model, same, schema)[LOGITS], out[LOGITS])


def test_same_seed_same_model(schema, tiny):
    batch = random_batch(schema, 5, 6)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(_outputs(GEM(schema, tiny), batch, schema))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k])


def test_user_embedding_depends_on_user_features_only(schema, tiny):
    torch.manual_seed(0)
    model = GEM(schema, tiny)
    batch = random_batch(schema, 4, 6, seed=5)
    other_ads = dict(batch)
    for f in [*schema.sparse_on("ad"), *schema.sparse_on("context")]:
        other_ads[f.name] = batch[f.name] + 17
    other_ads["surface"] = (batch["surface"] + 1) % len(schema.surfaces)
    a, b = _outputs(model, batch, schema), _outputs(model, other_ads, schema)
    torch.testing.assert_close(a[USER_EMBEDDING], b[USER_EMBEDDING])
    assert not torch.allclose(a[LOGITS], b[LOGITS])


def test_surface_picks_its_own_tower(schema, tiny):
    torch.manual_seed(0)
    model = GEM(schema, tiny)
    batch = random_batch(schema, 4, 6, seed=6)
    outs = []
    for s in range(len(schema.surfaces)):
        batch["surface"] = np.full(4, s)
        outs.append(_outputs(model, batch, schema)[LOGITS])
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_adapter_starts_as_identity_and_is_surface_aware():
    adapter = StudentAdapter(n_tasks=2, n_surfaces=3)
    logits = torch.randn(5, 2)
    surface = torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(adapter(logits, surface), logits)
    torch.nn.init.normal_(adapter.last.weight)
    a = adapter(logits, torch.zeros(5, dtype=torch.long))
    b = adapter(logits, torch.ones(5, dtype=torch.long))
    assert not torch.allclose(a, b)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by heads"):
        GEMConfig(d_model=30, heads=4)
    with pytest.raises(ValueError, match="seq_len must be positive"):
        GEMConfig(seq_len=0)
    with pytest.raises(ValueError, match="unknown model config key 'width'"):
        GEMConfig.from_dict({"width": 3})


def test_dense_values_are_standardized_inside_the_model(schema, tiny):
    feats = [DenseFeature("year", "ad"), DenseFeature("spend", "ad", transform="log1p")]
    rng = np.random.default_rng(0)
    cols = [{"year": rng.normal(1990, 15, 500), "spend": rng.lognormal(8, 2, 500)} for _ in range(2)]
    stats = dense_stats(feats, cols)
    norm = DenseNormalizer(feats)
    batch = {k: torch.from_numpy(np.concatenate([c[k] for c in cols]).astype(np.float32)) for k in ("year", "spend")}
    raw = norm(batch)
    torch.testing.assert_close(raw[:, 0], batch["year"])  # identity until there are statistics
    norm.set_stats(stats)
    z = norm(batch)
    assert abs(float(z[:, 0].mean())) < 1e-3 and abs(float(z[:, 0].std()) - 1) < 1e-2
    assert abs(float(z[:, 1].mean())) < 1e-3 and abs(float(z[:, 1].std()) - 1) < 1e-2  # of log1p(spend)
    assert float(z.abs().max()) <= 8.0
    wild = norm({"year": torch.tensor([1e9, -1e9]), "spend": torch.tensor([-5.0, 1e30])})
    assert torch.isfinite(wild).all() and float(wild.abs().max()) == 8.0
    # Every model gets the same statistics, and they travel in the state_dict.
    for name, model in build_models(schema, tiny, baselines=True).items():
        ones = dense_stats(schema.dense, [{f.name: np.array([1.0, 3.0]) for f in schema.dense}])
        assert set_dense_stats(model, ones) >= 1, name
        keys = [k for k in model.state_dict() if k.endswith("normalize.mean")]
        assert keys and all(model.state_dict()[k].tolist() == [2.0] * len(schema.dense) for k in keys), name


def test_a_state_dict_without_statistics_loads_as_identity(schema, tiny):
    model = GEM(schema, tiny)
    set_dense_stats(model, dense_stats(schema.dense, [{f.name: np.array([5.0, 9.0]) for f in schema.dense}]))
    old = {k: v for k, v in model.state_dict().items() if ".normalize." not in k}
    fresh = GEM(schema, tiny)
    fresh.load_state_dict(old)
    assert fresh.embed.normalize.mean.abs().sum() == 0 and float(fresh.embed.normalize.std.min()) == 1.0


def test_chained_logits_are_a_product_of_probabilities_and_never_exceed_the_parent():
    a = torch.tensor([-200.0, -30.0, -1.0, 0.0, 2.0, 30.0, 200.0]).repeat_interleave(7)
    b = torch.tensor([-200.0, -30.0, -1.0, 0.0, 2.0, 30.0, 200.0]).repeat(7)
    out = chain_logits(torch.stack([a, b], dim=1), (None, 0))
    assert torch.isfinite(out).all()
    assert (out[:, 1] <= out[:, 0]).all() and (torch.sigmoid(out[:, 1]) <= torch.sigmoid(out[:, 0])).all()
    want = torch.sigmoid(a.double()) * torch.sigmoid(b.double())
    torch.testing.assert_close(torch.sigmoid(out[:, 1].double()), want, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out[:, 0], a)
    # Gradients are finite everywhere too.
    x = torch.stack([a, b], dim=1).requires_grad_()
    chain_logits(x, (None, 0)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gem_orders_after_tasks_and_can_use_independent_heads(schema, tiny):
    batch = random_batch(schema, 256, 8, seed=3)
    for f in schema.dense:
        batch[f.name] = batch[f.name] * 1e4  # far outside anything seen: still ordered
    torch.manual_seed(0)
    model = GEM(schema, tiny)
    for p in model.towers.parameters():
        torch.nn.init.normal_(p, std=3.0)
    logits = _outputs(model, batch, schema)[LOGITS]
    assert (logits[:, 1] <= logits[:, 0]).all()
    independent = GEM(schema, tiny.with_(esmm=False))
    independent.load_state_dict(model.state_dict())
    raw = _outputs(independent, batch, schema)[LOGITS]
    assert (raw[:, 1] > raw[:, 0]).any()  # what ESMM prevents
    torch.testing.assert_close(raw[:, 0], logits[:, 0])


def test_adapter_keeps_after_tasks_below_their_parent(schema):
    torch.manual_seed(0)
    adapter = StudentAdapter(len(schema.tasks), len(schema.surfaces), parents=schema.task_parents).eval()
    torch.nn.init.normal_(adapter.last.weight, std=3.0)
    torch.nn.init.normal_(adapter.last.bias, std=3.0)
    logits = torch.randn(500, 2) * 3
    logits[:, 1] = torch.minimum(logits[:, 1], logits[:, 0])
    surface = torch.arange(500) % 3
    with torch.no_grad():
        out = adapter(logits, surface)
        free = StudentAdapter(len(schema.tasks), len(schema.surfaces))
        free.load_state_dict({**adapter.state_dict(), "parent": torch.arange(2)})
        unordered = free(logits, surface)
    assert (out[:, 1] <= out[:, 0]).all()
    assert (unordered[:, 1] > unordered[:, 0]).any()
    assert adapter.parents == (None, 0)
    # A chain a -> b -> c is ordered end to end.
    chain = StudentAdapter(3, 1, parents=(None, 0, 1))
    torch.nn.init.normal_(chain.last.bias, std=5.0)
    with torch.no_grad():
        out = chain(torch.randn(100, 3) * 5, torch.zeros(100, dtype=torch.long))
    assert (out[:, 1] <= out[:, 0]).all() and (out[:, 2] <= out[:, 1]).all()
    with pytest.raises(ValueError, match="earlier task"):
        StudentAdapter(2, 1, parents=(1, None))
