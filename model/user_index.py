"""The user-indexed form of a batch (`model.features.USER_INDEX`): user-side inputs once
per user, [U] / [U, L], and `user_index` [B] saying which user row each candidate has.

`share_users` turns a per-example batch into that form (identical user rows merged, or
the rows of one request / user key), `expand_users` back; `check_user_indexed` refuses
one that does not hold together (`UserIndexError`, naming the input); `in_graph_form`
and `graph_feeds` are the one rule for every place a batch meets a graph;
`candidate_rows` cuts a user-indexed batch into chunks that are batches of their own;
`concat_batches` merges batches of either form into one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

from model.batch import Batch, concat
from model.features import INT64, USER_INDEX, USERS_AXIS


def _row_keys(arrays: list[np.ndarray], rows: int) -> np.ndarray:
    """[rows, W] uint8: every array's row bytes side by side (a row's identity)."""
    return np.concatenate([np.ascontiguousarray(a).reshape(rows, -1).view(np.uint8) for a in arrays], axis=1)


class UserIndexError(ValueError):
    """A user-indexed batch that does not hold together: an index out of range, no user
    rows for some candidates, or inputs whose rows disagree. `name` is the input named."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def _row_count(batch: dict[str, np.ndarray], name: str) -> int:
    array = batch[name]
    if np.ndim(array) == 0:
        raise UserIndexError(f"input {name!r} is a scalar; expected rows on axis 0", name)
    return len(array)


def check_user_indexed(batch: dict[str, np.ndarray], user_names: Iterable[str]) -> int:
    """Checks a user-indexed batch and returns U, its user rows: `user_index` int64 [B],
    every user input (those of `user_names` in the batch) U rows, every other input B
    rows, every index in [0, U). Vectorized; raises `UserIndexError` naming the input."""
    if USER_INDEX not in batch:
        raise UserIndexError(f"missing input {USER_INDEX!r}", USER_INDEX)
    index = batch[USER_INDEX]
    if np.asarray(index).dtype != INT64:
        raise UserIndexError(f"input {USER_INDEX!r}: expected int64, got {np.asarray(index).dtype.name}", USER_INDEX)
    if np.ndim(index) != 1:
        raise UserIndexError(
            f"input {USER_INDEX!r}: expected shape [candidates], got {list(np.shape(index))}", USER_INDEX
        )
    wanted = set(user_names)
    users = [n for n in batch if n in wanted]
    if not users:
        raise UserIndexError(f"{USER_INDEX!r} given without any user input ({', '.join(sorted(wanted))})", USER_INDEX)
    # B: the candidates' rows, as most of them (and `user_index`, on a tie) say.
    candidates = {n: _row_count(batch, n) for n in batch if n not in wanted}
    votes = Counter(candidates.values())
    rows = max(votes, key=lambda r: (votes[r], r == len(index)))
    for name, n in candidates.items():
        if n != rows:
            what = "input" if name == USER_INDEX else "candidate input"
            raise UserIndexError(
                f"{what} {name!r} has {n} rows but the other candidate inputs have {rows} (one per candidate)", name
            )
    # U: the user inputs' rows, as most of them (and the first, on a tie) say.
    user_rows = {n: _row_count(batch, n) for n in users}
    votes = Counter(user_rows.values())
    count = max(votes, key=lambda r: (votes[r], r == user_rows[users[0]]))
    first = next(n for n in users if user_rows[n] == count)
    for name, n in user_rows.items():
        if n != count:
            raise UserIndexError(
                f"user input {name!r} has {n} rows but user input {first!r} has {count}; every user input "
                "needs one row per user",
                name,
            )
    if rows and count == 0:
        raise UserIndexError(
            f"user input {first!r} has 0 rows (no users) but {USER_INDEX!r} has {rows} candidates", first
        )
    if rows:
        bad = (index < 0) | (index >= count)
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise UserIndexError(
                f"input {USER_INDEX!r}: {int(bad.sum())} value(s) outside [0, {count}) (the user rows), "
                f"first {int(index[at])} at candidate {at}",
                USER_INDEX,
            )
    return count


def _same_rows(arrays: list[np.ndarray], rows: int, representative: np.ndarray) -> bool:
    """Whether every row's bytes equal those of its representative row, in each array."""
    for array in arrays:
        keys = _row_keys([array], rows)
        if not np.array_equal(keys[representative], keys):
            return False
    return True


def share_users(
    batch: dict[str, np.ndarray], user_names: Iterable[str], dedup: bool = True, keys: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """A per-example batch ([B] rows everywhere) in the user-indexed form.

    With `dedup`, rows whose user-side inputs are byte-identical (the candidates of one
    user, as the shared form of the API sends them) become one user row; otherwise
    every row is its own user (U = B, identity index). Vectorized: a multiplicative
    hash of each row's bytes, `np.unique` over the hashes, and an exact comparison of
    every row with its representative (a collision falls back to U = B).

    `keys` ([B], e.g. a request or user id per row) finds the users by `np.unique` over
    the keys instead of hashing every user input; every row is then compared exactly
    with its key's first row, and if some key's rows differ (a user whose history
    changed between impressions) the content hash decides, as without keys: rows that
    differ are never merged. A batch that already has `user_index` is returned as it is.
    """
    if USER_INDEX in batch:
        return batch
    names = [n for n in user_names if n in batch]
    rows = len(next(iter(batch.values())))
    out = dict(batch)
    identity = np.arange(rows, dtype=np.int64)
    if not dedup or rows <= 1 or not names:
        out[USER_INDEX] = identity
        return out
    if keys is not None:
        keys = np.asarray(keys)
        if keys.shape != (rows,):
            raise ValueError(f"keys: expected shape [{rows}] (one per row), got {list(keys.shape)}")
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        if _same_rows([batch[n] for n in names], rows, first[inverse]):
            for n in names:
                out[n] = batch[n][first]
            out[USER_INDEX] = inverse.astype(np.int64)
            return out
    row_keys = _row_keys([batch[n] for n in names], rows)
    width = row_keys.shape[1]
    words = np.pad(row_keys, ((0, 0), (0, -width % 8))).view(np.uint64)
    mult = np.random.default_rng(0x9E3779B9).integers(1, 1 << 63, words.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        hashes = (words * mult).sum(axis=1, dtype=np.uint64)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not np.array_equal(row_keys[first[inverse]], row_keys):
        out[USER_INDEX] = identity
        return out
    for n in names:
        out[n] = batch[n][first]
    out[USER_INDEX] = inverse.astype(np.int64)
    return out


def indexed_user_names(batch: dict[str, np.ndarray], known: Iterable[str] | None = None) -> tuple[str, ...]:
    """The user inputs of a user-indexed batch: those of `known` in it when given (the
    schema's `user_input_names`), else the inputs whose rows are not the candidates'
    (len(user_index)). With as many users as candidates the rows cannot tell: an identity
    index needs no names, any other raises `UserIndexError`."""
    if known is not None:
        wanted = set(known)
        return tuple(n for n in batch if n in wanted)
    rows = len(np.atleast_1d(batch[USER_INDEX]))
    names = tuple(n for n in batch if n != USER_INDEX and np.ndim(batch[n]) and len(batch[n]) != rows)
    if names or np.array_equal(batch[USER_INDEX], np.arange(rows)):
        return names
    raise UserIndexError(
        f"input {USER_INDEX!r}: as many user rows as candidates ({rows}) and not the identity, so the user "
        "inputs cannot be told from the row counts; name them (the schema's user inputs)",
        USER_INDEX,
    )


def in_graph_form(
    batch: dict[str, np.ndarray], graph_users: Iterable[str] | None, user_names: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """`batch` in the form a graph takes; `graph_users` are the graph's user inputs when it
    takes the user-indexed form, None for a per-example graph. A per-example batch becomes
    user-indexed (identical user rows merged) for a user-indexed graph; a user-indexed
    batch is checked (`check_user_indexed`) and, for a per-example graph, expanded
    (`expand_users`; its user inputs are `user_names` when given, else told by their row
    counts). One rule for every place a batch meets a graph (ONNX Runtime, Triton)."""
    if graph_users is not None:
        if USER_INDEX in batch:
            check_user_indexed(batch, graph_users)
            return batch
        return share_users(batch, graph_users)
    if USER_INDEX in batch:
        users = indexed_user_names(batch, user_names)
        check_user_indexed(batch, users)
        return expand_users(batch, users)
    return batch


def graph_feeds(
    batch: dict[str, np.ndarray], graph_inputs: Iterable, user_names: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """The feeds of an FM graph from a batch (`in_graph_form`); `graph_inputs` as ONNX
    Runtime lists them (`session.get_inputs()`: `.name`, `.shape`). The graph's user
    inputs are those on its USERS_AXIS."""
    graph_inputs = list(graph_inputs)
    names = [i.name for i in graph_inputs]
    graph_users = None
    if USER_INDEX in names:
        graph_users = [i.name for i in graph_inputs if i.shape and i.shape[0] == USERS_AXIS]
    own = {n: batch[n] for n in dict.fromkeys((*names, USER_INDEX)) if n in batch}
    formed = in_graph_form(own, graph_users, user_names)
    return {n: np.ascontiguousarray(formed[n]) for n in names}


def candidate_rows(
    batch: dict[str, np.ndarray], user_names: Iterable[str], start: int, stop: int
) -> dict[str, np.ndarray]:
    """Candidates [start, stop) of a user-indexed batch with only the users they index
    (renumbered): a chunk that is a user-indexed batch of its own."""
    index = batch[USER_INDEX][start:stop]
    used, inverse = np.unique(index, return_inverse=True)
    users = set(user_names)
    out = {k: (v[used] if k in users else v[start:stop]) for k, v in batch.items() if k != USER_INDEX}
    out[USER_INDEX] = inverse.reshape(-1).astype(np.int64)
    return out


def expand_users(batch: dict[str, np.ndarray], user_names: Iterable[str]) -> dict[str, np.ndarray]:
    """The inverse of `share_users`: every user input gathered to [B] rows, no index."""
    if USER_INDEX not in batch:
        return batch
    index = batch[USER_INDEX]
    names = set(user_names)
    return {k: (v[index] if k in names else v) for k, v in batch.items() if k != USER_INDEX}


def concat_batches(batches: list[Batch], user_names: Iterable[str]) -> Batch:
    """Batches of either form as one (`model.batch.concat` when none is user-indexed).
    With any user-indexed batch, the result is user-indexed: per-example batches join
    through `share_users`, user rows are stacked and each batch's index is shifted by the
    user rows before it, so no user row is copied to its candidates on the way."""
    if all(USER_INDEX not in b for b in batches):
        return concat(batches)
    names = tuple(user_names)
    indexed = [share_users(b, names) for b in batches]
    users = set(names)
    parts = [{k: v for k, v in b.items() if k in users} for b in indexed]
    candidates = [{k: v for k, v in b.items() if k not in users and k != USER_INDEX} for b in indexed]
    offsets = np.cumsum([0] + [len(next(iter(p.values()))) for p in parts[:-1]])
    index = np.concatenate([b[USER_INDEX] + offset for b, offset in zip(indexed, offsets, strict=True)])
    return {**concat(candidates), **concat(parts), USER_INDEX: index.astype(np.int64)}
