"""The ledger's tables (SQLAlchemy Core) and its versioned schema, migrated by the library.

Every database starts with a ``schema_version`` table: one row per applied migration. On
open, :func:`migrate` applies the migrations this library knows and the database lacks, each
in its own transaction, and refuses a database written by a newer library. A migration is a
function of a connection appended to :data:`MIGRATIONS`; never edit a released one.

Sample sets (which samples reached a model version) are stored as half-open index ranges
(``version_samples``: version, relation, start, stop): one row for a whole training set, one
per gap otherwise, and still answerable by a plain query ("did version V ever see sample i").
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection

SCHEMA_VERSION = 1
REQUEST_STATUSES = ("received", "running", "done", "failed")
FINISHED = ("done", "failed")
JOB_STATUSES = ("running", "done", "failed", "abandoned")
RELATIONS = ("trained", "unlearned")  # samples a version was trained on / samples its job unlearned

metadata = MetaData()

schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True),
    Column("description", String(200), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

data_sources = Table(
    "data_sources", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("num_samples", Integer, nullable=False),
    Column("content_sha256", String(64), nullable=False),  # over the per-sample hashes, in index order
    Column("created_at", DateTime(timezone=True), nullable=False),
)

samples = Table(
    "samples", metadata,
    Column("source_id", Integer, ForeignKey("data_sources.id"), primary_key=True),
    Column("sample_index", Integer, primary_key=True),
    Column("content_sha256", String(64), nullable=False),
    Column("subject_id", String(200), nullable=True),
    Column("client_id", Integer, nullable=True),
    Index("ix_samples_subject", "source_id", "subject_id"),
    Index("ix_samples_client", "source_id", "client_id"),
)

training_runs = Table(
    "training_runs", metadata,
    Column("id", Integer, primary_key=True),
    Column("source_id", Integer, ForeignKey("data_sources.id"), nullable=False),
    Column("kind", String(20), nullable=False),  # fit | fedavg | unlearn
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("details", JSON, nullable=False, default=dict),
)

model_versions = Table(
    "model_versions", metadata,
    Column("id", Integer, primary_key=True),
    Column("source_id", Integer, ForeignKey("data_sources.id"), nullable=False),
    Column("run_id", Integer, ForeignKey("training_runs.id"), nullable=True),
    Column("parent_id", Integer, ForeignKey("model_versions.id"), nullable=True),
    Column("weights_sha256", String(64), nullable=False),
    Column("checkpoint_path", Text, nullable=True),
    Column("num_trained", Integer, nullable=False),
    Column("samples_sha256", String(64), nullable=False),  # over the sorted trained sample ids
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_versions_source", "source_id", "id"),
    Index("ix_versions_weights", "weights_sha256"),
)

version_samples = Table(
    "version_samples", metadata,
    Column("version_id", Integer, ForeignKey("model_versions.id"), nullable=False),
    Column("relation", String(10), nullable=False),
    Column("start", Integer, nullable=False),
    Column("stop", Integer, nullable=False),  # exclusive
    Index("ix_version_samples", "version_id", "relation", "start"),
)

version_clients = Table(
    "version_clients", metadata,
    Column("version_id", Integer, ForeignKey("model_versions.id"), primary_key=True),
    Column("client_id", Integer, primary_key=True),
    Column("rounds", Integer, nullable=False),  # rounds this client's update went into the version
)

jobs = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("source_id", Integer, ForeignKey("data_sources.id"), nullable=False),
    Column("version_id", Integer, ForeignKey("model_versions.id"), nullable=False),  # the model it starts from
    Column("status", String(10), nullable=False),
    Column("output_dir", Text, nullable=False),
    Column("host", String(200), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("result_version_id", Integer, ForeignKey("model_versions.id"), nullable=True),
    Column("error", Text, nullable=True),
)

requests = Table(
    "requests", metadata,
    Column("id", Integer, primary_key=True),
    Column("source_id", Integer, ForeignKey("data_sources.id"), nullable=False),
    Column("kind", String(10), nullable=False),  # subject | sample | client
    Column("targets", JSON, nullable=False),  # what was asked: subject ids, sample ids or client ids
    Column("sample_ids", JSON, nullable=False),  # what it resolved to, when it was received
    Column("requester", String(200), nullable=False),
    Column("note", Text, nullable=True),
    Column("status", String(10), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("job_id", String(32), ForeignKey("jobs.id"), nullable=True),
    Column("version_before_id", Integer, ForeignKey("model_versions.id"), nullable=True),
    Column("version_after_id", Integer, ForeignKey("model_versions.id"), nullable=True),
    Column("error", Text, nullable=True),
    Index("ix_requests_status", "source_id", "status"),
    Index("ix_requests_received", "received_at"),
)

evidence = Table(
    "evidence", metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", String(32), ForeignKey("jobs.id"), nullable=False, unique=True),
    Column("version_id", Integer, ForeignKey("model_versions.id"), nullable=False),
    Column("method", String(50), nullable=False),
    Column("weights_path", Text, nullable=False),
    Column("weights_sha256", String(64), nullable=False),
    Column("report_path", Text, nullable=False),
    Column("report_sha256", String(64), nullable=False),  # of the report file's bytes
    Column("report_json", Text, nullable=False),
    Column("mask_path", Text, nullable=True),
    Column("mask_sha256", String(64), nullable=True),  # ParameterMask.sha256 (content, not file bytes)
    Column("metrics", JSON, nullable=False),
    Column("attacks", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

deployments = Table(
    "deployments", metadata,
    Column("id", Integer, primary_key=True),
    Column("version_id", Integer, ForeignKey("model_versions.id"), nullable=False),
    Column("deployed_by", String(200), nullable=False),
    Column("deployed_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("version_id", name="uq_deployments_version"),
)

APPEND_ONLY = ("model_versions", "version_samples", "version_clients", "evidence", "deployments", "samples")

_SQLITE_TRIGGERS = [
    *(f"""CREATE TRIGGER IF NOT EXISTS {t}_append_only_{op.lower()} BEFORE {op} ON {t}
          BEGIN SELECT RAISE(ABORT, 'ledger: {t} rows are append-only'); END""" for t in APPEND_ONLY
      for op in ("UPDATE", "DELETE")),
    *(f"""CREATE TRIGGER IF NOT EXISTS requests_finished_{op.lower()} BEFORE {op} ON requests
          WHEN OLD.status IN ('done', 'failed')
          BEGIN SELECT RAISE(ABORT, 'ledger: finished requests are append-only'); END""" for op in ("UPDATE", "DELETE")),
]

_POSTGRES_TRIGGERS = [
    """CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger AS $$
       BEGIN RAISE EXCEPTION USING MESSAGE = 'ledger: ' || TG_TABLE_NAME || ' rows are append-only'; END
       $$ LANGUAGE plpgsql""",
    *(f"""CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t}
          FOR EACH ROW EXECUTE FUNCTION ledger_append_only()""" for t in APPEND_ONLY),
    """CREATE TRIGGER requests_finished BEFORE UPDATE OR DELETE ON requests
       FOR EACH ROW WHEN (OLD.status IN ('done', 'failed')) EXECUTE FUNCTION ledger_append_only()""",
]


def _initial(conn: Connection) -> None:
    """Version 1: every table, plus triggers that keep finished rows from being changed in SQL."""
    metadata.create_all(conn, tables=[t for t in metadata.sorted_tables if t is not schema_version])
    statements = {"sqlite": _SQLITE_TRIGGERS, "postgresql": _POSTGRES_TRIGGERS}.get(conn.dialect.name, [])
    for statement in statements:
        conn.exec_driver_sql(statement)


MIGRATIONS: list[tuple[str, Callable[[Connection], None]]] = [
    ("tables for sources, samples, runs, versions, lineage, jobs, requests, evidence, deployments", _initial),
]
assert len(MIGRATIONS) == SCHEMA_VERSION


def current_version(conn: Connection) -> int:
    """The newest migration applied to the database (0 for an empty one)."""
    if not conn.dialect.has_table(conn, "schema_version"):
        return 0
    return int(conn.execute(select(schema_version.c.version).order_by(schema_version.c.version.desc())).scalar() or 0)


def migrate(conn: Connection) -> int:
    """Apply the missing migrations inside the caller's (exclusive) transaction; returns the schema version."""
    if conn.dialect.name == "postgresql":  # two processes opening a fresh database: one migrates, one waits
        conn.execute(text("SELECT pg_advisory_xact_lock(7411)"))
    schema_version.create(conn, checkfirst=True)
    found = current_version(conn)
    if found > SCHEMA_VERSION:
        raise ValueError(f"the ledger database is at schema version {found}; this library reads versions up to "
                         f"{SCHEMA_VERSION}: upgrade lightning-unlearn")
    for number in range(found + 1, SCHEMA_VERSION + 1):
        description, step = MIGRATIONS[number - 1]
        step(conn)
        conn.execute(insert(schema_version).values(version=number, description=description, applied_at=utcnow()))
    return SCHEMA_VERSION


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
