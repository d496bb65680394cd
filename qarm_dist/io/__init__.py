"""Tables: schemas declared once (`schemas`), validated Delta writes and streamed reads (`delta`)."""

from qarm_dist.io.delta import CommitResult, Snapshot, StagedFile, TableError, Tables, new_run_id, stage
from qarm_dist.io.schemas import TABLES, TableSpec, spec

__all__ = [
    "TABLES",
    "CommitResult",
    "Snapshot",
    "StagedFile",
    "TableError",
    "TableSpec",
    "Tables",
    "new_run_id",
    "spec",
    "stage",
]
