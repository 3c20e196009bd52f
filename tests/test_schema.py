from pathlib import Path

import pytest
import yaml

from model.schema import DEFAULT_SCHEMA_PATH, SchemaError, load_schema, parse_schema, schema_from_yaml


def test_default_schema_looks_like_an_ads_problem(schema):
    assert len(schema.sparse) == 12
    assert {f.side for f in schema.sparse} == {"user", "ad", "context"}
    assert 2 <= len(schema.dense) <= 6
    (seq,) = schema.sequences
    assert [f.name for f in seq.fields] == ["hist_item_id", "hist_category_id", "hist_action_type"]
    assert seq.max_length >= 128
    assert len(schema.surfaces) == 3
    assert schema.task_names == ("click", "conversion")
    assert schema.tasks[1].after == "click"


def test_yaml_round_trip(schema):
    assert schema_from_yaml(schema.to_yaml()) == schema


def _raw() -> dict:
    return yaml.safe_load(DEFAULT_SCHEMA_PATH.read_text())


def _broken(edit) -> dict:
    raw = _raw()
    edit(raw)
    return raw


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["sparse"][3].update(buckets=-5), "sparse[3].buckets: must be a positive integer, got -5"),
        (lambda r: r["sparse"][0].update(buckets=True), "sparse[0].buckets: must be a positive integer, got True"),
        (lambda r: r["sparse"][1].pop("dim"), "sparse[1].dim: is required"),
        (lambda r: r["sparse"][2].update(side="advertiser"), "sparse[2].side: must be one of user, ad, context"),
        (lambda r: r["sparse"][0].update(bucket=10), "sparse[0]: unknown key 'bucket'"),
        (
            lambda r: r["sparse"][5].update(name="user_id"),
            "sparse[5].name: name 'user_id' is already used by sparse[0].name",
        ),
        (lambda r: r["dense"][0].update(name="Bad-Name"), "dense[0].name: must be a lower_snake_case name"),
        (lambda r: r["dense"][0].update(name="surface"), "dense[0].name: 'surface' is reserved"),
        (lambda r: r["dense"][1].update(transform="log"), "dense[1].transform: must be one of log1p, got 'log'"),
        (lambda r: r["sequences"][0].update(max_length=0), "sequences[0].max_length: must be a positive integer"),
        (lambda r: r["sequences"][0].update(fields=[]), "sequences[0].fields: must not be empty"),
        (lambda r: r.update(surfaces=["feed", "feed"]), "surfaces: surface 'feed' is listed twice"),
        (lambda r: r["tasks"][1].update(after="purchase"), "tasks[1].after: must name an earlier task, got 'purchase'"),
        (lambda r: r.pop("tasks"), "tasks: is required"),
        (lambda r: r.update(sparse="user_id"), "sparse: must be a list, got str"),
    ],
)
def test_bad_schema_names_the_field(edit, message):
    with pytest.raises(SchemaError) as e:
        parse_schema(_broken(edit), source="s.yaml")
    assert message in str(e.value)
    assert str(e.value).startswith("schema s.yaml: ")


def test_unreadable_and_invalid_yaml(tmp_path: Path):
    with pytest.raises(SchemaError, match="cannot read"):
        load_schema(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparse: [unclosed")
    with pytest.raises(SchemaError, match="not valid YAML"):
        load_schema(bad)


def test_dense_transform_and_task_parents(schema):
    raw = _raw()
    raw["dense"][0]["transform"] = "log1p"
    s = parse_schema(raw)
    assert s.dense[0].transform == "log1p" and s.dense[1].transform is None
    assert schema_from_yaml(s.to_yaml()) == s
    assert schema.task_parents == (None, 0)
    raw["tasks"] = [{"name": "a"}, {"name": "b", "after": "a"}, {"name": "c", "after": "b"}, {"name": "d"}]
    assert parse_schema(raw).task_parents == (None, 0, 1, None)
