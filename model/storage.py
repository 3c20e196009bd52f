"""A place that is a local path or an `s3://bucket/key` URL, over pyarrow's filesystems.

`gem embed`, `gem train` and the side trainer's stream and knowledge output take either.
S3 is reached with the standard AWS settings: credentials from `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` (or the AWS config files), the region from `AWS_REGION` (or
`AWS_DEFAULT_REGION`; default us-east-1), and a non-AWS endpoint (MinIO, moto, a local
gateway) from `AWS_ENDPOINT_URL` (`AWS_ENDPOINT_URL_S3` first), read here and passed to
pyarrow explicitly: pyarrow 17.0 and 23.0 (checked) do not read it themselves.

A rename is atomic on a local disk and does not exist on S3 (a "move" is a copy per
object). `publish` commits a folder the way each allows: one rename locally; on S3 the
old marker (a manifest) removed first, each part copied under its final name, and the
new marker written LAST, so a folder counts as committed only when its marker is there.
The marker names the parts it stands for (jobs/embed/manifest.py), so a reader that
checks it never takes what an interrupted commit left.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

S3 = "s3://"
# Short: an unreachable endpoint should fail in seconds, not after the SDK's minutes.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0


class StorageError(OSError):
    """A place cannot be reached or used; one line that names it (never a secret)."""


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(S3)


def endpoint() -> str | None:
    """The S3 endpoint override from the environment (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3(endpoint_url: str | None, region: str) -> pafs.S3FileSystem:
    scheme, host = None, None
    if endpoint_url:
        # pyarrow takes the scheme apart from the host: `http://127.0.0.1:9000`.
        scheme, _, host = endpoint_url.rpartition("://")
        scheme = scheme or "https"
    return pafs.S3FileSystem(
        region=region, endpoint_override=host, scheme=scheme, connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
    )  # fmt: skip


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem of the current environment (made per `place` call: the AWS
    settings are read when it is made)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _s3(endpoint(), region)


@dataclass(frozen=True)
class Place:
    """A file or folder: `uri` as the user wrote it (local: an absolute path), `path` the
    filesystem's own path (S3: `bucket/key`). Equal, and hashed, by `uri` alone."""

    uri: str
    path: str
    fs: pafs.FileSystem = field(compare=False, repr=False)

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def bucket(self) -> str:
        """S3: the bucket (the path's first part)."""
        return self.path.split("/", 1)[0]

    @property
    def parent(self) -> Place:
        return Place(self.uri.rstrip("/").rsplit("/", 1)[0], self.path.rstrip("/").rsplit("/", 1)[0], self.fs)

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> Place:
        return Place(f"{self.uri.rstrip('/')}/{name}", f"{self.path.rstrip('/')}/{name}", self.fs)

    def is_relative_to(self, other: Place) -> bool:
        inside = self.path == other.path or self.path.startswith(other.path.rstrip("/") + "/")
        return self.remote == other.remote and inside


def place(location: str | Path | Place) -> Place:
    """A local path (made absolute) or an `s3://bucket/key` URL."""
    if isinstance(location, Place):
        return location
    text = str(location)
    if is_remote(text):
        path = text[len(S3) :].strip("/")
        if not path:
            raise StorageError(f"{text}: no bucket named")
        return Place(f"{S3}{path}", path, s3_filesystem())
    path = str(Path(text).expanduser().absolute())
    return Place(path, path, pafs.LocalFileSystem())


# Words of pyarrow's (the AWS SDK's) error text, per cause.
_UNREACHABLE = ("network_connection", "curlcode", "could not connect", "couldn't connect", "timeout", "timed out")
_NO_BUCKET = ("nosuchbucket", "no_such_bucket", "bucket does not exist")
_NO_CREDENTIALS = "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
_REFUSED = (
    "access_denied",
    "accessdenied",
    "access denied",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "credentials",
)


def _credentials_visible() -> bool:
    """Whether the environment or the AWS files name credentials (an EC2 or container
    role shows none of these, so this only words an error, never refuses a request)."""
    named = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")  # fmt: skip
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))  # fmt: skip
    return any(os.environ.get(n) for n in named) or any(Path(f).expanduser().is_file() for f in files)


def _cause(text: str, where: Place) -> str | None:
    """The store's fault named in an error's text (unreachable endpoint, missing bucket,
    credentials), or None (the file's own, or unknown)."""
    lowered, at = text.lower(), endpoint() or "AWS S3"
    if any(w in lowered for w in _UNREACHABLE):
        return f"cannot reach the S3 endpoint {at} (AWS_ENDPOINT_URL)"
    if any(w in lowered for w in _NO_BUCKET):
        return f"no bucket {where.bucket!r} at {at}"
    if any(w in lowered for w in _REFUSED):
        return _NO_CREDENTIALS if not _credentials_visible() else f"{at} refused the credentials (AWS_ACCESS_KEY_ID)"
    return None


def _explained(e: OSError, where: Place) -> StorageError:
    """pyarrow's S3 errors -> one line on what is wrong; the SDK's own text is long and
    names the request, not the cause (an anonymous request's refusal may say nothing)."""
    text = str(e).strip()
    cause = _cause(text, where)
    if cause is None and where.remote and not _credentials_visible():
        cause = _NO_CREDENTIALS
    return StorageError(f"{where}: {cause or (text.splitlines()[0] if text else type(e).__name__)}")


def unavailable(e: Exception, where: Place) -> StorageError | None:
    """The error as the store's fault (S3 unreachable, no bucket, credentials), or None
    when it is the file's: readers refuse (or quarantine) a bad file, never a good one
    they could not reach."""
    cause = _cause(str(e), where) if where.remote else None
    return StorageError(f"{where}: {cause}") if cause else None


def info(where: Place) -> pafs.FileInfo:
    try:
        return where.fs.get_file_info(where.path)
    except OSError as e:
        raise _explained(e, where) from None


def exists(where: Place) -> bool:
    return info(where).type != pafs.FileType.NotFound


def listing(folder: Place, recursive: bool = False) -> list[pafs.FileInfo]:
    """What a folder holds (nothing when it is absent)."""
    try:
        return folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise _explained(e, folder) from None


def child(folder: Place, info_path: str) -> Place:
    """The Place of a listing's entry under `folder`."""
    return folder / info_path[len(folder.path.rstrip("/")) + 1 :]


def check_bucket(where: Place) -> None:
    """Refuses an S3 place whose bucket does not exist (else a missing bucket reads as an
    empty folder: a job with nothing to do, a trainer idle forever)."""
    if not where.remote:
        return
    try:
        found = where.fs.get_file_info(where.bucket)
    except OSError as e:
        raise _explained(e, where) from None
    if found.type == pafs.FileType.NotFound:
        raise StorageError(f"{where}: no bucket {where.bucket!r} at {endpoint() or 'AWS S3'}")


def parquet_files(source: str | Path | Place) -> list[Place]:
    """A file, a folder (its *.parquet files) or a glob (in the last part of the path) ->
    sorted files (none when nothing matches)."""
    where = place(source)
    check_bucket(where)
    found = info(where)
    if found.type == pafs.FileType.File:
        return [where]
    if found.type == pafs.FileType.Directory:
        entries = listing(where)
        return sorted((child(where, e.path) for e in entries if e.is_file and e.path.endswith(".parquet")), key=str)
    # A glob, in the last part only (S3 lists one prefix; local globs are resolve_paths').
    folder, pattern = where.parent, where.name
    if not any(c in pattern for c in "*?["):
        return []
    matches = (e for e in listing(folder) if e.is_file and fnmatch.fnmatch(e.base_name, pattern))
    return sorted((child(folder, e.path) for e in matches), key=str)


def read_bytes(where: Place) -> bytes:
    try:
        with where.fs.open_input_stream(where.path) as f:
            return f.read()
    except OSError as e:
        raise _explained(e, where) from None


def write_bytes(where: Place, data: bytes) -> None:
    """Whole or not at all: a local file by rename of a temporary one, an S3 object by
    one PUT (never visible half written)."""
    try:
        if where.remote:
            with where.fs.open_output_stream(where.path) as f:
                f.write(data)
            return
        path = Path(where.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        raise _explained(e, where) from None


def make_dirs(folder: Place) -> None:
    """A local folder and its parents (S3 has no folders: nothing to do)."""
    if not folder.remote:
        Path(folder.path).mkdir(parents=True, exist_ok=True)


def remove(where: Place) -> None:
    """A file or a folder and everything under it; nothing when absent."""
    try:
        found = where.fs.get_file_info(where.path)
        if found.type == pafs.FileType.Directory:
            where.fs.delete_dir(where.path)
        elif found.type == pafs.FileType.File:
            where.fs.delete_file(where.path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _explained(e, where) from None


def publish(folder: Place, names: list[str], target: Place, marker: tuple[str, bytes] | None = None) -> None:
    """Puts the files `names` (relative to `folder`) in place as the folder `target`,
    replacing what it held, with the commit `marker` (name, content) written LAST.
    Locally: gathered into a folder beside them with the marker, then one rename. On S3
    (no rename): the old marker goes first (the old output stops counting), then the rest
    of the old output, then each file is copied under its final name, the marker last."""
    try:
        if not folder.remote:
            kept = Path(folder.path) / ".kept"
            kept.mkdir(parents=True, exist_ok=True)
            for name in names:
                os.rename(Path(folder.path) / name, kept / PurePosixPath(name).name)
            if marker is not None:
                (kept / marker[0]).write_bytes(marker[1])
            if Path(target.path).exists():
                shutil.rmtree(target.path)
            Path(target.path).parent.mkdir(parents=True, exist_ok=True)
            os.rename(kept, target.path)
            return
        if marker is not None:
            remove(target / marker[0])
        remove(target)
        for name in names:
            folder.fs.copy_file((folder / name).path, (target / PurePosixPath(name).name).path)
        if marker is not None:
            write_bytes(target / marker[0], marker[1])
    except OSError as e:
        raise _explained(e, target) from None


def move(source: Place, target: Place) -> None:
    """One file to another name on the same store: a rename locally, a copy then a delete
    on S3 (the target is whole before the source goes)."""
    try:
        if source.remote:
            source.fs.copy_file(source.path, target.path)
            source.fs.delete_file(source.path)
        else:
            os.replace(source.path, target.path)
    except OSError as e:
        raise _explained(e, source) from None


def sha256(where: Place) -> str:
    """The file's content digest, read in chunks."""
    digest = hashlib.sha256()
    try:
        with where.fs.open_input_stream(where.path) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise _explained(e, where) from None
    return digest.hexdigest()
