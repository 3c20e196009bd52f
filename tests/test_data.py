"""Synthetic data statistics and the Parquet reader."""

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from model.batch import concat
from model.data.reader import DataError, pad_lists, read_batch, resolve_paths, surface_index, table_to_batch
from model.data.synth import SynthConfig, write_shards


@pytest.fixture(scope="module")
def data(synth_dir, schema):
    return [read_batch(p, schema) for p in resolve_paths(synth_dir)]


def test_shards_are_time_ordered_and_columns_typed(synth_dir, schema):
    paths = resolve_paths(synth_dir)
    assert [p.name for p in paths] == [f"part-{i:05d}.parquet" for i in range(4)]
    tables = [pq.read_table(p) for p in paths]
    assert sum(t.num_rows for t in tables) == 40_000
    for a, b in itertools.pairwise(tables):
        assert a.column("event_ts").to_numpy().max() <= b.column("event_ts").to_numpy().min()
    t = tables[0]
    assert t.schema.field("hist_item_id").type == pa.list_(pa.int64())
    for f in schema.sparse:
        assert t.schema.field(f.name).type == pa.int64()
    assert set(t.column("surface").to_pylist()) == set(schema.surfaces)
    ids = np.concatenate([x.column("example_id").to_numpy() for x in tables])
    assert len(np.unique(ids)) == len(ids)


def test_label_statistics(data):
    b = concat(data)
    click, conv = b["label_click"], b["label_conversion"]
    assert 0.05 < click.mean() < 0.35
    assert 0 < conv.mean() < click.mean() / 2  # rarer
    assert not ((conv == 1) & (click == 0)).any()  # only after a click


def test_sequences_vary_in_length_including_empty(data, schema):
    b = concat(data)
    lengths = b["user_history_length"]
    assert (lengths == 0).mean() > 0.02
    assert lengths.max() <= schema.sequences[0].max_length
    assert np.median(lengths) > 5
    assert b["hist_item_id"].shape[1] == lengths.max()


def test_signal_is_planted(data):
    """Recent events matter: clicks are likelier when the newest event's category is the ad's."""
    b = concat(data)
    has = b["user_history_length"] > 0
    match = has & (b["hist_category_id"][:, 0] == b["ad_category"])
    assert b["label_click"][match].mean() > 1.5 * b["label_click"][has & ~match].mean()
    by_surface = [b["label_click"][b["surface"] == s].mean() for s in range(3)]
    assert max(by_surface) - min(by_surface) > 0.01


def test_same_seed_same_data_and_drift_moves_it(tmp_path, schema):
    cfg = SynthConfig(rows=6_000, shards=2, seed=3, users=500, ads=300)
    a = write_shards(cfg, schema, tmp_path / "a")
    b = write_shards(cfg, schema, tmp_path / "b")
    for x, y in zip(a, b, strict=True):
        assert pq.read_table(x).equals(pq.read_table(y))
    c = write_shards(SynthConfig(rows=6_000, shards=2, seed=4, users=500, ads=300), schema, tmp_path / "c")
    assert not pq.read_table(a[0]).equals(pq.read_table(c[0]))

    def click_by_creative(path):
        t = read_batch(path, schema)
        return np.array([t["label_click"][t["ad_creative_type"] == k].mean() for k in range(5)])

    big = dict(rows=60_000, shards=2, seed=5, users=2_000, ads=500)
    still = write_shards(SynthConfig(**big), schema, tmp_path / "still")
    drift = write_shards(SynthConfig(**big, drift=1.0), schema, tmp_path / "drift")
    moved_still = np.abs(click_by_creative(still[1]) - click_by_creative(still[0])).max()
    moved_drift = np.abs(click_by_creative(drift[1]) - click_by_creative(drift[0])).max()
    assert moved_drift > 2 * moved_still


def test_pad_lists_keeps_the_newest_events():
    col = pa.array([[5, 4, 3], [], [9], [1, 2, 3, 4, 5]], type=pa.list_(pa.int64()))
    padded, lengths = pad_lists(col.slice(1), max_len=3)  # a sliced array keeps its offsets
    assert lengths.tolist() == [0, 1, 3]
    assert padded.tolist() == [[0, 0, 0], [9, 0, 0], [1, 2, 3]]


def test_reader_errors_name_the_column(synth_dir, schema, tmp_path):
    table = pq.read_table(resolve_paths(synth_dir)[0]).slice(0, 100)
    with pytest.raises(DataError, match="missing column 'ad_id'"):
        table_to_batch(table.drop_columns(["ad_id"]), schema)
    wrong = table.set_column(table.schema.get_field_index("hist_item_id"), "hist_item_id", pa.array(["x"] * 100))
    with pytest.raises(DataError, match=r"column 'hist_item_id': expected list<int64>, got string"):
        table_to_batch(wrong, schema)
    bad_surface = table.set_column(table.schema.get_field_index("surface"), "surface", pa.array(["tv"] * 100))
    with pytest.raises(DataError, match="column 'surface': unknown surface 'tv'"):
        table_to_batch(bad_surface, schema)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
        read_batch(tmp_path / "junk.parquet", schema)
    with pytest.raises(DataError, match="no Parquet files"):
        resolve_paths(tmp_path / "nothing-here")


def _wide(table: pa.Table, schema) -> pa.Table:
    """The same rows as other writers store them: large_string / dictionary surfaces,
    large_list / fixed_size_list sequences, narrow and unsigned ids, float64 dense."""
    cols = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        cols[name] = col
    cols["surface"] = cols["surface"].cast(pa.large_string())
    for i, f in enumerate(schema.sparse):
        narrow = [pa.int32(), pa.uint32(), pa.int16(), pa.uint64()][i % 4]
        if narrow == pa.int16() and pc.max(cols[f.name]).as_py() >= 2**15:
            narrow = pa.int64()
        if pa.types.is_unsigned_integer(narrow) and pc.min(cols[f.name]).as_py() < 0:
            narrow = pa.int64()
        if narrow == pa.uint32() and pc.max(cols[f.name]).as_py() >= 2**32:
            narrow = pa.int64()
        if narrow == pa.int32() and pc.max(cols[f.name]).as_py() >= 2**31:
            narrow = pa.int64()
        cols[f.name] = cols[f.name].cast(narrow)
    cols["ad_category"] = cols["ad_category"].dictionary_encode()
    for f in schema.dense:
        cols[f.name] = cols[f.name].cast(pa.float64())
    seq = schema.sequences[0]
    cols[seq.fields[0].name] = cols[seq.fields[0].name].cast(pa.large_list(pa.int64()))
    cols[seq.fields[1].name] = cols[seq.fields[1].name].cast(pa.list_(pa.int32()))
    cols[seq.fields[2].name] = cols[seq.fields[2].name].cast(pa.large_list(pa.uint8()))
    for t in schema.tasks:
        cols[t.label_column] = cols[t.label_column].cast(pa.bool_())
    return pa.table(cols)


def test_wide_and_dictionary_types_read_identical_to_narrow(synth_dir, schema, tmp_path):
    table = pq.read_table(resolve_paths(synth_dir)[0]).slice(0, 2_000)
    narrow = table_to_batch(table, schema)
    wide = _wide(table, schema)
    assert pa.types.is_large_string(wide.schema.field("surface").type)
    assert pa.types.is_large_list(wide.schema.field("hist_item_id").type)
    assert wide.schema.field("ad_creative_type").type != pa.int64()
    # Through a Parquet file too (what pandas 3 and polars write), and dictionary surfaces.
    pq.write_table(wide, tmp_path / "wide.parquet")
    dictionary = wide.set_column(
        wide.schema.get_field_index("surface"), "surface", wide.column("surface").combine_chunks().dictionary_encode()
    )
    for got in (table_to_batch(wide, schema), read_batch(tmp_path / "wide.parquet", schema),
                table_to_batch(dictionary, schema)):  # fmt: skip
        assert got.keys() == narrow.keys()
        for k in narrow:
            assert got[k].dtype == narrow[k].dtype, k
            np.testing.assert_array_equal(got[k], narrow[k], err_msg=k)


def test_fixed_size_lists_and_integer_surfaces(schema):
    col = pa.array([[5, 4], [3, 2]], type=pa.list_(pa.int16(), 2))
    padded, lengths = pad_lists(pa.chunked_array([col]), max_len=None)
    assert padded.tolist() == [[5, 4], [3, 2]] and lengths.tolist() == [2, 2]
    assert surface_index(pa.chunked_array([pa.array([2, 0], pa.uint8())]), schema).tolist() == [2, 0]
    names = pa.array(["reels", "feed"], pa.large_string()).dictionary_encode()
    assert surface_index(pa.chunked_array([names]), schema).tolist() == [2, 0]


def test_uncastable_types_keep_the_clear_message(synth_dir, schema):
    table = pq.read_table(resolve_paths(synth_dir)[0]).slice(0, 10)
    strings = pa.array([["a"]] * 10, pa.large_list(pa.large_string()))
    wrong = table.set_column(table.schema.get_field_index("hist_item_id"), "hist_item_id", strings)
    with pytest.raises(DataError, match=r"column 'hist_item_id': expected list<int64>, got large_list<"):
        table_to_batch(wrong, schema)
    floats = table.set_column(table.schema.get_field_index("ad_id"), "ad_id", pa.array([1.5] * 10))
    with pytest.raises(DataError, match=r"column 'ad_id': expected an integer type, got double"):
        table_to_batch(floats, schema)


def test_training_data_with_non_finite_dense_values_is_refused(synth_dir, schema, tmp_path):
    table = pq.read_table(resolve_paths(synth_dir)[0]).slice(0, 100)
    values = table.column("ad_bid_log").to_numpy().astype(np.float64)
    values[7] = np.nan
    bad = table.set_column(table.schema.get_field_index("ad_bid_log"), "ad_bid_log", pa.array(values))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: column 'ad_bid_log': 1 non-finite value.*row 7"):
        read_batch(tmp_path / "bad.parquet", schema)
    # Scoring paths (gem embed, the front end) decide per row themselves.
    assert np.isnan(read_batch(tmp_path / "bad.parquet", schema, finite=False)["ad_bid_log"][7])
    # float64 beyond float32's range is not finite either once cast.
    values[7] = 1e300
    huge = table.set_column(table.schema.get_field_index("ad_bid_log"), "ad_bid_log", pa.array(values))
    pq.write_table(huge, tmp_path / "huge.parquet")
    with pytest.raises(DataError, match="column 'ad_bid_log'"):
        read_batch(tmp_path / "huge.parquet", schema)
