"""What a `gem embed` run found and did, per input file and in all."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.storage import Place


@dataclass
class FileResult:
    # The input file (local or s3://); its stem names the output folder.
    path: Place
    rows_in: int = 0
    rows_out: int = 0
    error_rows: int = 0
    skipped: bool = False
    error: str = ""
    # User-side encodings computed for the rows out (= rows out for a per-example FM).
    users: int = 0
    fm_versions: list[int] = field(default_factory=list)
    adapter_versions: list[int] = field(default_factory=list)
    # The staged parts the receipts named (`<kind>/<file>`): what the commit takes.
    parts: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.rows_out + self.error_rows == self.rows_in

    def describe(self) -> str:
        """One line on the file: skipped, failed (why), or what was written."""
        if self.skipped:
            return f"{self.path.name}: skipped (committed before: {self.rows_out:,} rows)"
        if self.error:
            return f"{self.path.name}: {self.error}"
        fm = ",".join(map(str, self.fm_versions)) or "-"
        adapter = ",".join(map(str, self.adapter_versions)) or "-"
        return (
            f"{self.path.name}: {self.rows_out:,} rows out, {self.error_rows:,} refused, {self.users:,} users "
            f"encoded, fm v{fm}, adapter v{adapter}"
        )


@dataclass
class Summary:
    files: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows_in(self) -> int:
        return sum(f.rows_in for f in self.files)

    @property
    def rows_out(self) -> int:
        return sum(f.rows_out for f in self.files)

    @property
    def error_rows(self) -> int:
        return sum(f.error_rows for f in self.files)

    @property
    def failed_files(self) -> list[FileResult]:
        return [f for f in self.files if f.error]

    @property
    def users_encoded(self) -> int:
        """Users encoded by this run (per batch: a user whose rows span batches counts in each)."""
        return sum(f.users for f in self.files if not f.skipped and not f.error)

    @property
    def rows_stamped(self) -> int:
        """Rows stamped by this run (skipped files not counted)."""
        return sum(f.rows_out for f in self.files if not f.skipped and not f.error)

    @property
    def rows_done_now(self) -> int:
        """Rows stamped by this run (skipped files not counted): what rows/s is about."""
        return sum(f.rows_in for f in self.files if not f.skipped and not f.error)
