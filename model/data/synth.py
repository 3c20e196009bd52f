"""Synthetic logged examples from a planted model, so that learning is measurable.

The planted world (fixed by the seed) has users with long-term category interests
and a per-example short-term intent, ads with categories, advertisers and creatives,
and a click/conversion process built so that each part of GEM has something to find:

- interests show up both in the behavior sequence and in which ads get clicked;
- order matters: the newest few events reveal the short-term intent, which a bag of
  events dilutes;
- feature crosses (country x creative, hour x category, age x category) that no
  additive model captures;
- surface-specific behavior (base rates, surface x creative);
- conversions only after a click, rarer, driven by purchases in the history;
- variable sequence lengths, some empty;
- `drift`: the crosses, interests and base rates move over the time range, so a
  model trained on old shards goes stale.

Optionally (`planted_dir`) each shard gets a sidecar file with the planted
probabilities of its rows (`planted_<task>`, by `example_id`), in its own folder so that
no model reads it as data: the NE floor and an oracle teacher (bench/students_stream).

Everything is vectorized numpy over chunks of rows; lists are written as Arrow
list<int64> from flat values and offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.files import atomic_path
from model.progress import SILENT, Progress
from model.schema import FeatureSchema

N_CATEGORIES = 32
N_CREATIVES = 5
N_COUNTRIES = 20
N_AGES = 8
ITEMS_PER_CATEGORY = 400
RECENT_INTENT_EVENTS = 3.0  # mean number of newest events that show the intent
ACTIONS = np.array([0.70, 0.20, 0.07, 0.03])  # view, click, like, purchase
PURCHASE = 3

# The features the planted model is written in terms of.
PLANTED_SPARSE = (
    "user_id", "user_age_bucket", "user_gender", "user_country", "user_device_os", "ad_id",
    "advertiser_id", "campaign_id", "ad_category", "ad_creative_type", "hour_of_day", "placement_position",
)  # fmt: skip
PLANTED_DENSE = ("user_account_age_log", "user_ctr_7d", "ad_historical_ctr", "ad_bid_log")
PLANTED_SEQUENCE_FIELDS = ("hist_item_id", "hist_category_id", "hist_action_type")


@dataclass(frozen=True)
class SynthConfig:
    rows: int = 200_000
    shards: int = 4
    seed: int = 0
    users: int = 20_000
    ads: int = 5_000
    # 0: stationary. 1: the planted preferences move fully from one set of tables
    # to another between the first and the last timestamp.
    drift: float = 0.0
    start_ts: int = 1_767_225_600  # 2026-01-01T00:00:00Z
    days: float = 7.0
    mean_log_length: float = 3.3  # sequence length ~ lognormal, median ~27
    empty_fraction: float = 0.05
    chunk_rows: int = 50_000

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.shards <= 0 or self.users <= 0 or self.ads <= 0:
            raise ValueError("rows, shards, users and ads must be positive")
        if self.shards > self.rows:
            raise ValueError(f"shards ({self.shards}) cannot exceed rows ({self.rows})")
        if not 0.0 <= self.drift <= 1.0:
            raise ValueError(f"drift must be in [0, 1], got {self.drift}")


def _mix64(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 finalizer: dense indices -> realistic, scattered 63-bit raw ids."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


class World:
    """The planted users, ads and preference tables, fixed by the seed."""

    def __init__(self, cfg: SynthConfig, n_surfaces: int):
        rng = np.random.default_rng([cfg.seed, 0])
        u, a = cfg.users, cfg.ads
        self.n_surfaces = n_surfaces
        # Users: three favourite categories with Dirichlet weights.
        self.user_fav = rng.integers(0, N_CATEGORIES, size=(u, 3))
        self.user_fav_w = rng.dirichlet([1.0, 1.0, 1.0], size=u)
        self.user_bias = rng.normal(0.0, 0.5, size=u)
        self.user_age = rng.integers(0, N_AGES, size=u)
        self.user_gender = rng.integers(0, 3, size=u)
        self.user_country = rng.integers(0, N_COUNTRIES, size=u)
        self.user_os = rng.integers(0, 4, size=u)
        self.user_account_age = rng.exponential(600.0, size=u)
        self.user_popularity = rng.zipf(1.3, size=u).astype(np.float64)
        self.user_popularity /= self.user_popularity.sum()
        # Ads.
        self.ad_category = rng.integers(0, N_CATEGORIES, size=a)
        self.ad_advertiser = rng.integers(0, max(1, a // 5), size=a)
        self.ad_campaign = self.ad_advertiser * 3 + rng.integers(0, 3, size=a)
        self.ad_creative = rng.integers(0, N_CREATIVES, size=a)
        self.ad_bias = rng.normal(0.0, 0.5, size=a)
        self.ad_bid = rng.lognormal(0.0, 0.7, size=a)
        self.advertiser_conv = rng.normal(0.0, 0.7, size=max(1, a // 5))
        self.ads_by_category = [np.flatnonzero(self.ad_category == c) for c in range(N_CATEGORIES)]
        # Preference tables at the start (0) and the end (1) of time; drift blends them.
        self.tables = [self._tables(rng) for _ in range(2)]
        self.surface_mix = np.array([0.5, 0.25, 0.25][:n_surfaces] + [0.1] * max(0, n_surfaces - 3))
        self.surface_mix /= self.surface_mix.sum()

    def _tables(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            "country_creative": rng.normal(0.0, 0.7, size=(N_COUNTRIES, N_CREATIVES)),
            "hour_category": rng.normal(0.0, 0.5, size=(24, N_CATEGORIES)),
            "age_category": rng.normal(0.0, 0.6, size=(N_AGES, N_CATEGORIES)),
            "surface_creative": rng.normal(0.0, 0.8, size=(self.n_surfaces, N_CREATIVES)),
            "surface_base": rng.normal(-2.3, 0.3, size=self.n_surfaces),
            "category_shift": rng.permutation(N_CATEGORIES),
        }

    def table(self, name: str, w: np.ndarray, *index: np.ndarray) -> np.ndarray:
        """Per-row value of table `name`, blended between its start and end values."""
        return (1.0 - w) * self.tables[0][name][index] + w * self.tables[1][name][index]


def _sample_categories(rng: np.random.Generator, fav: np.ndarray, fav_w: np.ndarray, width: int) -> np.ndarray:
    """Per position: one of the row's three favourites (by weight), or, one time in
    five, a random category."""
    n = len(fav)
    cdf = np.cumsum(fav_w, axis=1)
    pick = (rng.random((n, width))[..., None] > cdf[:, None, :2]).sum(-1)  # [n, L] in {0, 1, 2}
    cats = np.take_along_axis(fav, pick, axis=1)
    return np.where(rng.random((n, width)) < 0.2, rng.integers(0, N_CATEGORIES, (n, width)), cats)


def generate_chunk(
    world: World, cfg: SynthConfig, schema: FeatureSchema, rng: np.random.Generator, t: np.ndarray
) -> pa.Table:
    """`len(t)` examples at normalized times t in [0, 1] (sorted)."""
    return generate_planted_chunk(world, cfg, schema, rng, t)[0]


def generate_planted_chunk(
    world: World, cfg: SynthConfig, schema: FeatureSchema, rng: np.random.Generator, t: np.ndarray
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """generate_chunk's rows and the planted probability of each task for them (the
    same draws: a sidecar changes no row)."""
    n = len(t)
    w = cfg.drift * t  # how far the planted tables have drifted, per row
    seq = schema.sequences[0]
    max_len = seq.max_length

    user = rng.choice(cfg.users, size=n, p=world.user_popularity)
    fav, fav_w = world.user_fav[user], world.user_fav_w[user]
    # Drift rotates which categories users like.
    shift = np.where(rng.random(n) < w, 1, 0)
    fav = np.where(shift[:, None] == 1, world.tables[1]["category_shift"][fav], fav)

    # Short-term intent: a category this example's newest events reveal.
    intent = np.where(rng.random(n) < 0.5, fav[np.arange(n), rng.integers(0, 3, n)], rng.integers(0, N_CATEGORIES, n))

    # Behavior sequence, newest event first.
    length = np.minimum(max_len, np.ceil(rng.lognormal(cfg.mean_log_length, 0.8, n))).astype(np.int64)
    length[rng.random(n) < cfg.empty_fraction] = 0
    width = int(length.max()) if n else 0
    cats = _sample_categories(rng, fav, fav_w, width)
    recent = 1 + rng.poisson(RECENT_INTENT_EVENTS - 1, n)
    shows_intent = (np.arange(width)[None, :] < recent[:, None]) & (rng.random((n, width)) < 0.85)
    cats = np.where(shows_intent, intent[:, None], cats)
    actions = np.searchsorted(np.cumsum(ACTIONS), rng.random((n, width)))
    items = cats * ITEMS_PER_CATEGORY + rng.integers(0, ITEMS_PER_CATEGORY, (n, width))
    valid = np.arange(width)[None, :] < length[:, None]
    purchased_cat = np.zeros((n, N_CATEGORIES), dtype=bool)
    rows = np.broadcast_to(np.arange(n)[:, None], (n, width))
    purchase = valid & (actions == PURCHASE)
    purchased_cat[rows[purchase], cats[purchase]] = True

    # Candidate ad: half targeted at the user's interests, half from anywhere.
    targeted = rng.random(n) < 0.5
    target_cat = np.where(rng.random(n) < 0.5, intent, fav[np.arange(n), rng.integers(0, 3, n)])
    ad = rng.integers(0, cfg.ads, n)
    for c in np.unique(target_cat[targeted]):
        pool = world.ads_by_category[c]
        if len(pool):
            sel = targeted & (target_cat == c)
            ad[sel] = pool[rng.integers(0, len(pool), sel.sum())]
    cat = world.ad_category[ad]
    creative = world.ad_creative[ad]
    surface = rng.choice(world.n_surfaces, size=n, p=world.surface_mix)
    hour = rng.integers(0, 24, n)
    position = np.minimum(rng.geometric(0.3, n) - 1, 15)
    age, country = world.user_age[user], world.user_country[user]

    long_term = (fav_w * (fav == cat[:, None])).sum(1)
    click_logit = (
        world.table("surface_base", w, surface)
        + world.user_bias[user]
        + world.ad_bias[ad]
        + 1.8 * (cat == intent)
        + 1.5 * long_term
        + world.table("country_creative", w, country, creative)
        + world.table("hour_category", w, hour, cat)
        + world.table("age_category", w, age, cat)
        + world.table("surface_creative", w, surface, creative)
        - 0.12 * position
    )
    p_click = 1.0 / (1.0 + np.exp(-click_logit))
    click = rng.random(n) < p_click
    conv_logit = (
        -1.6
        + world.advertiser_conv[world.ad_advertiser[ad]]
        + 1.5 * purchased_cat[np.arange(n), cat]
        + 0.6 * (cat == intent)
        + 0.3 * np.log(world.ad_bid[ad])
    )
    p_conv_given_click = 1.0 / (1.0 + np.exp(-conv_logit))
    conversion = click & (rng.random(n) < p_conv_given_click)
    # The label `conversion` is unconditional (a click and then a conversion).
    planted = {"click": p_click, "conversion": p_click * p_conv_given_click}

    # Dense features: noisy observations of the planted quantities.
    user_ctr = 1.0 / (1.0 + np.exp(-(world.user_bias[user] - 2.3 + rng.normal(0, 0.3, n))))
    ad_ctr = 1.0 / (1.0 + np.exp(-(world.ad_bias[ad] - 2.3 + rng.normal(0, 0.3, n))))

    columns: dict[str, pa.Array] = {
        "user_id": _mix64(user, 1),
        "user_age_bucket": age,
        "user_gender": world.user_gender[user],
        "user_country": country,
        "user_device_os": world.user_os[user],
        "ad_id": _mix64(ad, 2),
        "advertiser_id": _mix64(world.ad_advertiser[ad], 3),
        "campaign_id": _mix64(world.ad_campaign[ad], 4),
        "ad_category": cat,
        "ad_creative_type": creative,
        "hour_of_day": hour,
        "placement_position": position,
        "user_account_age_log": np.log1p(world.user_account_age[user]).astype(np.float32),
        "user_ctr_7d": user_ctr.astype(np.float32),
        "ad_historical_ctr": ad_ctr.astype(np.float32),
        "ad_bid_log": np.log(world.ad_bid[ad]).astype(np.float32),
    }
    offsets = pa.array(np.concatenate([[0], np.cumsum(length)]).astype(np.int32))
    for name, values in zip(PLANTED_SEQUENCE_FIELDS, (_mix64(items, 5), cats, actions), strict=True):
        columns[name] = pa.ListArray.from_arrays(offsets, pa.array(values[valid].astype(np.int64)))
    # Features of the schema the planted model does not use: uninformative noise.
    for sparse in schema.sparse:
        columns.setdefault(sparse.name, rng.integers(0, sparse.buckets, n))
    for dense in schema.dense:
        columns.setdefault(dense.name, rng.normal(0, 1, n).astype(np.float32))
    for s in schema.sequences[1:]:
        for field in s.fields:
            events = rng.integers(0, field.buckets, int(length.sum()))
            columns[field.name] = pa.ListArray.from_arrays(offsets, pa.array(events))

    span = cfg.days * 86_400
    table = {
        "event_ts": pa.array((cfg.start_ts + t * span).astype("datetime64[s]")),
        "surface": pa.array(np.asarray(schema.surfaces)[surface]).dictionary_encode(),
    }
    for sparse in schema.sparse:
        table[sparse.name] = pa.array(np.asarray(columns[sparse.name], dtype=np.int64))
    for dense in schema.dense:
        table[dense.name] = pa.array(np.asarray(columns[dense.name], dtype=np.float32))
    for s in schema.sequences:
        for field in s.fields:
            table[field.name] = columns[field.name]
    labels = {"click": click, "conversion": conversion}
    for task in schema.tasks:
        table[task.label_column] = pa.array(labels[task.name].astype(np.int8))
    return pa.table(table), {task.name: planted[task.name] for task in schema.tasks}


def check_schema_supported(schema: FeatureSchema) -> None:
    names = {f.name for f in schema.sparse} | {f.name for f in schema.dense}
    seq_fields = {f.name for f in schema.sequences[0].fields} if schema.sequences else set()
    missing = [n for n in (*PLANTED_SPARSE, *PLANTED_DENSE) if n not in names]
    missing += [n for n in PLANTED_SEQUENCE_FIELDS if n not in seq_fields]
    missing += [n for n in ("click", "conversion") if n not in schema.task_names]
    if missing:
        raise ValueError(
            f"the synthetic generator plants its signal in the ads schema's features; "
            f"schema {schema.name!r} lacks: {', '.join(missing)}"
        )


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"part-{index:05d}.parquet"


def planted_path(planted_dir: Path, index: int) -> Path:
    return planted_dir / f"planted-{index:05d}.parquet"


def write_shards(
    cfg: SynthConfig,
    schema: FeatureSchema,
    out_dir: Path,
    *,
    progress: Progress = SILENT,
    planted_dir: Path | None = None,
) -> list[Path]:
    """Writes `cfg.shards` Parquet files covering consecutive time slices.

    Shard i holds the rows of the i-th slice of [start_ts, start_ts + days), sorted
    by time, so file order is time order and the last file is the freshest. Each file
    is written to a temporary name and renamed: a reader never sees half a shard.
    `progress` hears one unit, its total `cfg.rows`, advanced as rows are written.
    `planted_dir`: also write each shard's planted probabilities there (planted_path).
    """
    check_schema_supported(schema)
    world = World(cfg, len(schema.surfaces))
    progress.start("synthesizing rows", total=cfg.rows)
    return [
        write_shard(cfg, schema, world, out_dir, shard, progress=progress, planted_dir=planted_dir)
        for shard in range(cfg.shards)
    ]


def write_shard(
    cfg: SynthConfig,
    schema: FeatureSchema,
    world: World,
    out_dir: Path,
    shard: int,
    *,
    progress: Progress = SILENT,
    planted_dir: Path | None = None,
) -> Path:
    """Writes shard `shard` of `cfg.shards` (see write_shards); the stream player
    (trainer/stream.py) calls it one shard at a time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, cfg.rows, cfg.shards + 1).astype(np.int64)
    rows = int(bounds[shard + 1] - bounds[shard])
    rng = np.random.default_rng([cfg.seed, 1, shard])
    t = (shard + np.sort(rng.random(rows))) / cfg.shards
    path = shard_path(out_dir, shard)
    writer = None
    sidecar: list[pa.Table] = []
    with atomic_path(path) as tmp:
        for lo in range(0, rows, cfg.chunk_rows):
            chunk, planted = generate_planted_chunk(world, cfg, schema, rng, t[lo : lo + cfg.chunk_rows])
            ids = np.arange(bounds[shard] + lo, bounds[shard] + lo + chunk.num_rows, dtype=np.int64)
            chunk = chunk.add_column(0, "example_id", pa.array(ids))
            if writer is None:
                writer = pq.ParquetWriter(tmp, chunk.schema, compression="zstd")
            writer.write_table(chunk)
            sidecar.append(pa.table({"example_id": ids, **{f"planted_{k}": v for k, v in planted.items()}}))
            progress.advance(chunk.num_rows)
        if writer is not None:
            writer.close()
    if planted_dir is not None and sidecar:
        planted_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(planted_path(planted_dir, shard)) as tmp:
            pq.write_table(pa.concat_tables(sidecar), tmp)
    return path
