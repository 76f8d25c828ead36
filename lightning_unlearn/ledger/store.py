"""The request ledger: data sources, lineage, model versions, requests, jobs and evidence in one database.

A SQLite file by default (embedded, nothing to start; WAL mode, a busy timeout and exclusive
write transactions, so concurrent processes queue instead of failing), or any SQLAlchemy URL
(``postgresql+psycopg://...``) for a shared server. Finished requests, model versions and
evidence are append-only: the API refuses to change them, and database triggers refuse raw SQL.

A deletion reported done stays done: a job never starts from a model version that still holds
samples of a done request, and a job's new version is committed only if it holds none of them
(compare-and-swap on the version chain: a job that ran on a version superseded by another
deletion goes back to the queue instead of becoming the newest version).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from sqlalchemy import Table, bindparam, create_engine, event, func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from lightning_unlearn.ledger import schema as s
from lightning_unlearn.ledger.schema import FINISHED, REQUEST_STATUSES, utcnow
from lightning_unlearn.request import ForgetRequest

log = logging.getLogger(__name__)

LEDGER_KINDS = ("subject", "sample", "client")
EDITABLE_FIELDS = ("requester", "note")
_CHUNK = 500  # ids per IN (...) clause: far below every database's bound-parameter limit
_INT64 = (-(2 ** 63), 2 ** 63)  # what a database integer column holds


@dataclass(frozen=True)
class Source:
    """A registered training dataset: ``num_samples`` identities with content hashes."""

    id: int
    name: str
    num_samples: int
    content_sha256: str


@dataclass(frozen=True)
class Job:
    """An unlearning job claimed by :meth:`Ledger.start_job`: the requests it serves and their union."""

    id: str
    source: Source
    version_id: int
    output_dir: Path
    request_ids: tuple[int, ...]
    forget_ids: np.ndarray  # sorted union of the requests' sample ids


def database_url(url_or_path: str | os.PathLike) -> str:
    """A SQLAlchemy URL: URLs pass through, a file path becomes ``sqlite:///<absolute path>``."""
    text = str(url_or_path)
    if "://" in text:
        return text
    if not text:
        raise ValueError("the ledger needs a database: a SQLite file path or a SQLAlchemy URL, got ''")
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def make_engine(url: str, create: bool = True) -> Engine:
    """An engine whose SQLite connections use WAL, a 30 s busy timeout and ``BEGIN IMMEDIATE`` for writes.

    ``create=False``: the SQLite file must already be a ledger (nothing is created, not even its folder).
    """
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    if url in ("sqlite://", "sqlite:///:memory:"):
        raise ValueError("an in-memory SQLite ledger would vanish with its connection; give a file path")
    path = Path(url.split(":///", 1)[1])
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        _check_sqlite_ledger(path)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (SQLAlchemy's pysqlite recipe)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # writers take the lock up front: a deferred transaction that later writes can fail with
        # SQLITE_BUSY without waiting, an immediate one waits for the busy timeout
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("ledger_write") else "BEGIN")

    return engine


class Ledger:
    """Deletion requests, data lineage, model versions and evidence, kept in a database.

    ``Ledger("ledger.db")`` opens (and creates or migrates) a SQLite file;
    ``Ledger("postgresql+psycopg://user@host/db")`` a PostgreSQL database.
    ``create=False`` opens only an existing ledger (what the ``requests`` commands do, so a
    mistyped path fails instead of auditing a new, empty ledger).
    """

    def __init__(self, url: str | os.PathLike, create: bool = True) -> None:
        self.url = database_url(url)
        self.engine = make_engine(self.url, create=create)
        if not create:
            with self._read() as conn:
                found = s.current_version(conn)
            if found == 0:
                self.engine.dispose()
                where = self.engine.url.render_as_string(hide_password=True)
                raise ValueError(f"{where} is not a ledger (the database has no ledger tables; check --db)")
        with self._write() as conn:
            s.migrate(conn)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction (exclusive on SQLite): everything in it lands, or nothing."""
        with self.engine.connect() as conn:
            conn.execution_options(ledger_write=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            with conn.begin():
                yield conn

    # -- data sources -------------------------------------------------------------------
    def register_source(
        self,
        name: str,
        sample_hashes: Sequence[str],
        subjects: Sequence[str | None] | None = None,
        clients: Sequence[int | None] | None = None,
    ) -> Source:
        """Record a training dataset's sample identities once; later calls check they did not change.

        ``sample_hashes[i]`` is the content hash of sample ``i``; ``subjects`` and ``clients``
        (same length, ``None`` where unknown) name its data subject and federated client.
        """
        if not name or not str(name).strip():
            raise ValueError(f"a data source needs a non-empty name, got {name!r}")
        n = len(sample_hashes)
        if n == 0:
            raise ValueError(f"data source {name!r} is empty: there is nothing to record")
        for label, values in (("subjects", subjects), ("clients", clients)):
            if values is not None and len(values) != n:
                raise ValueError(f"{label} has {len(values)} entries for {n} samples of source {name!r}")
        content = hashlib.sha256("".join(sample_hashes).encode()).hexdigest()
        with self._write() as conn:
            row = conn.execute(select(s.data_sources).where(s.data_sources.c.name == name)).mappings().first()
            if row is not None:
                if row["content_sha256"] != content:
                    raise ValueError(
                        f"data source {name!r} is in the ledger with content hash {row['content_sha256'][:12]}..., "
                        f"this dataset hashes to {content[:12]}... ({n} samples): its data changed; "
                        "record it under another source name")
                self._check_assignments(conn, row["id"], name, subjects, clients)
                return Source(row["id"], name, row["num_samples"], content)
            source_id = conn.execute(insert(s.data_sources).values(
                name=name, num_samples=n, content_sha256=content, created_at=utcnow())).inserted_primary_key[0]
            conn.execute(insert(s.samples), [
                {"source_id": source_id, "sample_index": i, "content_sha256": h,
                 "subject_id": None if subjects is None or subjects[i] is None else str(subjects[i]),
                 "client_id": None if clients is None or clients[i] is None else int(clients[i])}
                for i, h in enumerate(sample_hashes)
            ])
        log.info("ledger: registered data source %r (%d samples)", name, n)
        return Source(source_id, name, n, content)

    @staticmethod
    def _check_assignments(conn: Connection, source_id: int, name: str, subjects, clients) -> None:
        """Subject and client assignments are part of a source's identity: they cannot change later."""
        for column, values in (("subject_id", subjects), ("client_id", clients)):
            if values is None:
                continue
            stored = conn.execute(select(s.samples.c[column]).where(s.samples.c.source_id == source_id)
                                  .order_by(s.samples.c.sample_index)).scalars().all()
            given = [None if v is None else (str(v) if column == "subject_id" else int(v)) for v in values]
            if stored != given:
                first = next(i for i, (a, b) in enumerate(zip(stored, given)) if a != b)
                raise ValueError(f"data source {name!r} is recorded with {column} {stored[first]!r} for sample "
                                 f"{first}, got {given[first]!r}: assignments cannot change; use another source name")

    def source(self, name: str) -> Source:
        with self._read() as conn:
            row = conn.execute(select(s.data_sources).where(s.data_sources.c.name == name)).mappings().first()
            if row is None:
                known = conn.execute(select(s.data_sources.c.name).order_by(s.data_sources.c.name)).scalars().all()
                raise ValueError(f"unknown data source {name!r}; the ledger knows {known or 'none (train with RecordLineage first)'}")
        return Source(row["id"], row["name"], row["num_samples"], row["content_sha256"])

    def sources(self) -> list[Source]:
        with self._read() as conn:
            rows = conn.execute(select(s.data_sources).order_by(s.data_sources.c.id)).mappings().all()
        return [Source(r["id"], r["name"], r["num_samples"], r["content_sha256"]) for r in rows]

    def sample_hashes(self, source: Source | str) -> list[str]:
        source = self._source(source)
        with self._read() as conn:
            return list(conn.execute(select(s.samples.c.content_sha256).where(s.samples.c.source_id == source.id)
                                     .order_by(s.samples.c.sample_index)).scalars())

    def _source(self, source: Source | str) -> Source:
        return source if isinstance(source, Source) else self.source(source)

    # -- model versions and lineage -----------------------------------------------------
    def record_version(
        self,
        source: Source | str,
        weights_sha256: str,
        trained_ids: np.ndarray | Sequence[int],
        *,
        checkpoint_path: str | os.PathLike | None = None,
        parent_id: int | None = None,
        unlearned_ids: np.ndarray | Sequence[int] = (),
        clients: Mapping[int, int] | None = None,
        kind: str = "fit",
        details: Mapping[str, Any] | None = None,
        started_at: datetime | None = None,
    ) -> int:
        """Record a model version and the samples (and clients) that reached it; returns its id."""
        source = self._source(source)
        with self._write() as conn:
            return self._insert_version(conn, source, weights_sha256, trained_ids, checkpoint_path, parent_id,
                                        unlearned_ids, clients, kind, details, started_at)

    def _insert_version(self, conn, source, weights_sha256, trained_ids, checkpoint_path, parent_id, unlearned_ids,
                        clients, kind, details, started_at) -> int:
        trained = _check_ids(trained_ids, source, "trained sample")
        unlearned = _check_ids(unlearned_ids, source, "unlearned sample")
        if parent_id is not None and conn.execute(select(s.model_versions.c.source_id)
                                                  .where(s.model_versions.c.id == parent_id)).scalar() != source.id:
            raise ValueError(f"parent version {parent_id} does not exist for data source {source.name!r}")
        now = utcnow()
        run_id = conn.execute(insert(s.training_runs).values(
            source_id=source.id, kind=kind, started_at=started_at or now, finished_at=now,
            details=dict(details or {}))).inserted_primary_key[0]
        version_id = conn.execute(insert(s.model_versions).values(
            source_id=source.id, run_id=run_id, parent_id=parent_id, weights_sha256=weights_sha256,
            checkpoint_path=str(checkpoint_path) if checkpoint_path is not None else None,
            num_trained=int(len(trained)), samples_sha256=ids_sha256(trained), created_at=now)).inserted_primary_key[0]
        rows = [{"version_id": version_id, "relation": rel, "start": a, "stop": b}
                for rel, ids in (("trained", trained), ("unlearned", unlearned)) for a, b in to_ranges(ids)]
        if rows:
            conn.execute(insert(s.version_samples), rows)
        if clients:
            conn.execute(insert(s.version_clients), [{"version_id": version_id, "client_id": int(c), "rounds": int(r)}
                                                      for c, r in sorted(clients.items())])
        return int(version_id)

    def version(self, version_id: int) -> dict:
        with self._read() as conn:
            out = _plain(_row_by_id(conn, s.model_versions, version_id, "model version"))
            out["clients"] = dict(conn.execute(select(s.version_clients.c.client_id, s.version_clients.c.rounds)
                                               .where(s.version_clients.c.version_id == version_id)).all())
            out["source"] = conn.execute(select(s.data_sources.c.name)
                                         .where(s.data_sources.c.id == out["source_id"])).scalar()
        return out

    def versions(self, source: Source | str | None = None) -> list[dict]:
        query = select(s.model_versions).order_by(s.model_versions.c.id)
        if source is not None:
            query = query.where(s.model_versions.c.source_id == self._source(source).id)
        with self._read() as conn:
            return [_plain(r) for r in conn.execute(query).mappings()]

    def head(self, source: Source | str) -> dict:
        """The model version new requests apply to: the newest one of ``source`` with a checkpoint."""
        source = self._source(source)
        with self._read() as conn:
            row = conn.execute(select(s.model_versions).where(s.model_versions.c.source_id == source.id,
                                                              s.model_versions.c.checkpoint_path.is_not(None))
                               .order_by(s.model_versions.c.id.desc()).limit(1)).mappings().first()
        if row is None:
            raise ValueError(f"data source {source.name!r} has no model version with a checkpoint; "
                             "train with RecordLineage (and a ModelCheckpoint or weights_path) first")
        return _plain(row)

    def find_version(self, weights_sha256: str) -> dict | None:
        """The newest version whose weights have this hash (e.g. the model a fine-tuning run starts from)."""
        with self._read() as conn:
            row = conn.execute(select(s.model_versions).where(s.model_versions.c.weights_sha256 == weights_sha256)
                               .order_by(s.model_versions.c.id.desc()).limit(1)).mappings().first()
        return _plain(row) if row is not None else None

    def _chain_events(self, conn: Connection, version_id: int) -> list[tuple[int, str, int, int]]:
        """(version, relation, start, stop) of ``version_id`` and all its ancestors (a recursive query)."""
        mv = s.model_versions
        chain = select(mv.c.id, mv.c.parent_id).where(mv.c.id == version_id).cte("chain", recursive=True)
        chain = chain.union_all(select(mv.c.id, mv.c.parent_id).join(chain, mv.c.id == chain.c.parent_id))
        vs = s.version_samples
        query = (select(vs.c.version_id, vs.c.relation, vs.c.start, vs.c.stop)
                 .join(chain, vs.c.version_id == chain.c.id).order_by(vs.c.version_id))
        return [tuple(r) for r in conn.execute(query)]

    def lineage(self, version_id: int, sample_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Per sample: 0 = never reached this version's weights, 1 = trained into them, 2 = trained then unlearned.

        Follows the parent chain: a sample trained into an ancestor reached this version too,
        unless an unlearning job since removed it. Without ``sample_ids``: every sample of the source.
        """
        version = self.version(version_id)
        n = self.source(version["source"]).num_samples
        ids = np.arange(n) if sample_ids is None else _id_array(sample_ids, n, "sample id(s) {bad} out of range")
        with self._read() as conn:
            state = self._state(conn, version_id, n)
        return state[ids]

    def _state(self, conn: Connection, version_id: int, n: int) -> np.ndarray:
        """:meth:`lineage` of every sample, inside the caller's transaction."""
        state = np.zeros(n, dtype=np.int8)
        for _, relation, start, stop in self._chain_events(conn, version_id):  # ancestors first
            state[start:stop] = 1 if relation == "trained" else np.where(state[start:stop] > 0, 2, state[start:stop])
        return state

    def _held_deletions(self, conn: Connection, source: Source, state: np.ndarray) -> dict[int, list[int]]:
        """Done requests of ``source`` with samples a version of lineage ``state`` still holds: id -> those samples."""
        rows = conn.execute(select(s.requests.c.id, s.requests.c.sample_ids).where(
            s.requests.c.source_id == source.id, s.requests.c.status == "done").order_by(s.requests.c.id)).all()
        held = {}
        for request_id, ids in rows:
            ids = np.asarray(ids, dtype=np.int64)
            back = ids[state[ids] == 1] if len(ids) else ids
            if len(back):
                held[int(request_id)] = back.tolist()
        return held

    def _check_keeps_deletions(self, conn: Connection, source: Source, version_id: int) -> None:
        """Refuse to start from a model version that still holds samples of a done request."""
        held = self._held_deletions(conn, source, self._state(conn, version_id, source.num_samples))
        if not held:
            return
        samples = sorted(set().union(*held.values()))
        safe = None
        for row in conn.execute(select(s.model_versions.c.id).where(
                s.model_versions.c.source_id == source.id, s.model_versions.c.checkpoint_path.is_not(None))
                .order_by(s.model_versions.c.id.desc())).scalars():
            if not self._held_deletions(conn, source, self._state(conn, row, source.num_samples)):
                safe = row
                break
        hint = (f"start from model version {safe} (--version {safe})" if safe is not None
                else "no version with a checkpoint is free of them: retrain without them first")
        raise ValueError(f"model version {version_id} still holds {len(samples)} sample(s) of done request(s) "
                         f"{sorted(held)[:10]}: serving requests on it would bring deleted data back; {hint}")

    def held(self, version_id: int) -> np.ndarray:
        """Sorted ids of the samples whose influence this version's weights still hold."""
        return np.flatnonzero(self.lineage(version_id) == 1)

    # -- requests -----------------------------------------------------------------------
    def resolve(self, request: ForgetRequest, source: Source | str) -> ForgetRequest:
        """``ForgetRequest(sample_ids=...)`` for a subject, client or sample request on ``source``.

        Unknown subjects, clients or out-of-range sample ids raise one ValueError listing them.
        """
        return ForgetRequest(sample_ids=self._resolve_ids(request, self._source(source)).tolist())

    def _resolve_ids(self, request: ForgetRequest, source: Source) -> np.ndarray:
        if request.kind not in LEDGER_KINDS:
            raise ValueError(f"the ledger serves deletion requests of kind {list(LEDGER_KINDS)}, got {request.kind!r} "
                             "(forget a class with lightning-unlearn unlearn)")
        if request.kind == "sample":
            return _id_array(request.sample_ids, source.num_samples,
                             f"unknown sample id(s) {{bad}} for data source {source.name!r}")
        column = s.samples.c.subject_id if request.kind == "subject" else s.samples.c.client_id
        wanted = list(request.subjects if request.kind == "subject" else request.clients)
        found_ids, found_keys = [], set()
        storable = [w for w in wanted if request.kind == "subject" or _INT64[0] <= w < _INT64[1]]
        with self._read() as conn:
            for chunk in _chunks(storable):
                rows = conn.execute(select(s.samples.c.sample_index, column).where(
                    s.samples.c.source_id == source.id, column.in_(chunk))).all()
                found_ids += [r[0] for r in rows]
                found_keys |= {r[1] for r in rows}
        unknown = [w for w in wanted if w not in found_keys]
        if unknown:
            what = "subject(s)" if request.kind == "subject" else "client(s)"
            raise ValueError(f"unknown {what} {unknown[:20]} for data source {source.name!r}: no recorded sample has "
                             f"{'that subject id' if request.kind == 'subject' else 'that client id'}")
        return np.unique(np.asarray(found_ids, dtype=np.int64))

    def add_request(self, source: Source | str, request: ForgetRequest, requester: str, note: str | None = None) -> int:
        """Record a deletion request (validated and resolved now, before any work); returns its id."""
        if not requester or not str(requester).strip():
            raise ValueError(f"a request needs a requester (who asked), got {requester!r}")
        source = self._source(source)
        ids = self._resolve_ids(request, source)
        targets = {"subject": request.subjects, "sample": request.sample_ids, "client": request.clients}[request.kind]
        with self._write() as conn:
            request_id = conn.execute(insert(s.requests).values(
                source_id=source.id, kind=request.kind, targets=list(targets), sample_ids=ids.tolist(),
                requester=str(requester), note=note, status="received", received_at=utcnow())).inserted_primary_key[0]
        return int(request_id)

    def request(self, request_id: int) -> dict:
        with self._read() as conn:
            return _plain(_row_by_id(conn, s.requests, request_id, "request id"))

    def requests(
        self,
        status: str | None = None,
        source: Source | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        ids: Sequence[int] | None = None,
    ) -> list[dict]:
        """Requests in id order, filtered by status, source, receipt time (``since <= t < until``) or ids."""
        query = select(s.requests).order_by(s.requests.c.id)
        if status is not None:
            if status not in REQUEST_STATUSES:
                raise ValueError(f"unknown status {status!r}; allowed values are {list(REQUEST_STATUSES)}")
            query = query.where(s.requests.c.status == status)
        if source is not None:
            query = query.where(s.requests.c.source_id == self._source(source).id)
        if since is not None:
            query = query.where(s.requests.c.received_at >= _aware(since))
        if until is not None:
            query = query.where(s.requests.c.received_at < _aware(until))
        if ids is not None:
            query = query.where(s.requests.c.id.in_(bindparam("ids", expanding=True)))
        storable = [i for i in ids if _INT64[0] <= i < _INT64[1]] if ids is not None else None
        with self._read() as conn:
            rows = conn.execute(query, {"ids": storable} if ids is not None else {}).mappings().all()
        found = [_plain(r) for r in rows]
        if ids is not None and len(found) != len(set(ids)):
            missing = sorted(set(ids) - {r["id"] for r in found})
            raise ValueError(f"unknown request id(s) {missing}")
        return found

    def update_request(self, request_id: int, **fields: Any) -> None:
        """Change who asked or the note of a request that is not finished; finished requests are append-only."""
        bad = sorted(set(fields) - set(EDITABLE_FIELDS))
        if bad:
            raise ValueError(f"cannot edit request field(s) {bad}; editable fields are {list(EDITABLE_FIELDS)}")
        with self._write() as conn:
            status = conn.execute(select(s.requests.c.status).where(s.requests.c.id == request_id)).scalar()
            if status is None:
                raise ValueError(f"unknown request id {request_id!r}")
            if status in FINISHED:
                raise PermissionError(f"request {request_id} is {status}: finished requests are append-only")
            conn.execute(update(s.requests).where(s.requests.c.id == request_id).values(**fields))

    def counts(self, source: Source | str | None = None) -> dict[str, int]:
        query = select(s.requests.c.status, func.count()).group_by(s.requests.c.status)
        if source is not None:
            query = query.where(s.requests.c.source_id == self._source(source).id)
        with self._read() as conn:
            found = dict(conn.execute(query).all())
        return {status: int(found.get(status, 0)) for status in REQUEST_STATUSES}

    # -- jobs ---------------------------------------------------------------------------
    def start_job(self, source: Source | str, output_root: str | os.PathLike, version_id: int | None = None) -> Job | None:
        """Claim every received request of ``source`` for one job on ``version_id`` (default: the head).

        In one transaction: a job row (with this host and pid), the requests marked ``running``.
        Returns None when nothing is pending.
        """
        source = self._source(source)
        version = self.head(source) if version_id is None else self.version(version_id)
        if version["source_id"] != source.id:
            raise ValueError(f"model version {version['id']} belongs to another data source than {source.name!r}")
        job_id = uuid.uuid4().hex
        output_dir = Path(output_root).expanduser().resolve() / f"job-{job_id[:12]}"
        now = utcnow()
        with self._write() as conn:
            rows = conn.execute(select(s.requests.c.id, s.requests.c.sample_ids)
                                .where(s.requests.c.source_id == source.id, s.requests.c.status == "received")
                                .order_by(s.requests.c.id).with_for_update()).all()
            if not rows:
                return None
            self._check_keeps_deletions(conn, source, int(version["id"]))
            conn.execute(insert(s.jobs).values(
                id=job_id, source_id=source.id, version_id=version["id"], status="running",
                output_dir=str(output_dir), host=socket.gethostname(), pid=os.getpid(), started_at=now))
            ids = [r[0] for r in rows]
            for chunk in _chunks(ids):
                conn.execute(update(s.requests).where(s.requests.c.id.in_(chunk)).values(
                    status="running", job_id=job_id, started_at=now, version_before_id=version["id"]))
        union = np.unique(np.concatenate([np.asarray(r[1], dtype=np.int64) for r in rows]))
        return Job(job_id, source, int(version["id"]), output_dir, tuple(ids), union)

    def job(self, job_id: str) -> Job:
        with self._read() as conn:
            row = _row_by_id(conn, s.jobs, job_id, "job")
            reqs = conn.execute(select(s.requests.c.id, s.requests.c.sample_ids)
                                .where(s.requests.c.job_id == job_id).order_by(s.requests.c.id)).all()
            name = conn.execute(select(s.data_sources.c.name).where(s.data_sources.c.id == row["source_id"])).scalar()
        union = np.unique(np.concatenate([np.asarray(r[1], dtype=np.int64) for r in reqs])) if reqs else np.zeros(0, np.int64)
        return Job(job_id, self.source(name), row["version_id"], Path(row["output_dir"]), tuple(r[0] for r in reqs), union)

    def jobs(self, status: str | None = None, source: Source | str | None = None) -> list[dict]:
        query = select(s.jobs).order_by(s.jobs.c.started_at)
        if status is not None:
            query = query.where(s.jobs.c.status == status)
        if source is not None:
            query = query.where(s.jobs.c.source_id == self._source(source).id)
        with self._read() as conn:
            return [_plain(r) for r in conn.execute(query).mappings()]

    def finish_job(
        self,
        job: Job,
        *,
        weights_sha256: str,
        weights_path: str | os.PathLike,
        report_path: str | os.PathLike,
        report_text: str,
        method: str,
        metrics: Mapping[str, Any],
        attacks: Mapping[str, Any],
        mask_path: str | os.PathLike | None = None,
        mask_sha256: str | None = None,
        trained_ids: np.ndarray | None = None,
    ) -> int:
        """One transaction: the new model version with its lineage, the evidence, the job and its requests done.

        ``trained_ids`` are the samples the job trained on (the retain set); the job's union is
        recorded as unlearned. Returns the new version id.
        """
        now = utcnow()
        try:
            with self._write() as conn:
                status = conn.execute(select(s.jobs.c.status).where(s.jobs.c.id == job.id)).scalar()
                if status != "running":
                    raise ValueError(f"job {job.id} is {status}, not running: it cannot be finished again")
                version_id = self._insert_version(
                    conn, job.source, weights_sha256, trained_ids if trained_ids is not None else [], weights_path,
                    job.version_id, job.forget_ids, None, "unlearn", {"job": job.id, "requests": list(job.request_ids)}, None)
                # compare-and-swap: the new version must keep every deletion done since the job started
                dropped = self._held_deletions(conn, job.source, self._state(conn, version_id, job.source.num_samples))
                if dropped:
                    newest = conn.execute(select(func.max(s.model_versions.c.id)).where(
                        s.model_versions.c.source_id == job.source.id, s.model_versions.c.id != version_id)).scalar()
                    count = len(set().union(*dropped.values()))
                    raise _Superseded(
                        f"model version {job.version_id} was superseded by version {newest} while job {job.id[:12]} ran: "
                        f"its result would still hold {count} sample(s) of done request(s) {sorted(dropped)[:10]}; "
                        f"request(s) {list(job.request_ids)} go back to the queue: run again to serve them on the newest "
                        "version")
                conn.execute(insert(s.evidence).values(
                    job_id=job.id, version_id=version_id, method=method, weights_path=str(weights_path),
                    weights_sha256=weights_sha256, report_path=str(report_path),
                    report_sha256=hashlib.sha256(report_text.encode()).hexdigest(), report_json=report_text,
                    mask_path=str(mask_path) if mask_path else None, mask_sha256=mask_sha256,
                    metrics=dict(metrics), attacks=dict(attacks), created_at=now))
                conn.execute(update(s.jobs).where(s.jobs.c.id == job.id).values(
                    status="done", finished_at=now, result_version_id=version_id))
                conn.execute(update(s.requests).where(s.requests.c.job_id == job.id, s.requests.c.status == "running")
                             .values(status="done", finished_at=now, version_after_id=version_id))
        except _Superseded as err:  # rolled back: the requests go back to the queue, for the newest version
            self.abandon_job(job.id, str(err))
            raise ValueError(str(err)) from None
        return version_id

    def close_without_change(self, job: Job, reason: str) -> None:
        """Finish a job's requests with no new model: the version never held any of their samples."""
        now = utcnow()
        with self._write() as conn:
            conn.execute(update(s.jobs).where(s.jobs.c.id == job.id, s.jobs.c.status == "running")
                         .values(status="done", finished_at=now, result_version_id=job.version_id, error=reason))
            conn.execute(update(s.requests).where(s.requests.c.job_id == job.id, s.requests.c.status == "running")
                         .values(status="done", finished_at=now, version_after_id=job.version_id))

    def fail_job(self, job: Job, error: str) -> None:
        """Mark the job and its requests failed, with the reason (final: resubmit to try again)."""
        now = utcnow()
        with self._write() as conn:
            conn.execute(update(s.jobs).where(s.jobs.c.id == job.id, s.jobs.c.status == "running")
                         .values(status="failed", finished_at=now, error=error))
            conn.execute(update(s.requests).where(s.requests.c.job_id == job.id, s.requests.c.status == "running")
                         .values(status="failed", finished_at=now, error=error))

    def abandon_job(self, job_id: str, reason: str) -> None:
        """A job whose process died: its requests go back to ``received`` so the next run takes them again."""
        now = utcnow()
        with self._write() as conn:
            conn.execute(update(s.jobs).where(s.jobs.c.id == job_id, s.jobs.c.status == "running")
                         .values(status="abandoned", finished_at=now, error=reason))
            conn.execute(update(s.requests).where(s.requests.c.job_id == job_id, s.requests.c.status == "running")
                         .values(status="received", job_id=None, started_at=None, version_before_id=None))

    def evidence(self, job_id: str) -> dict | None:
        with self._read() as conn:
            row = conn.execute(select(s.evidence).where(s.evidence.c.job_id == job_id)).mappings().first()
        return _plain(row) if row is not None else None

    # -- deployments --------------------------------------------------------------------
    def deploy(self, version_id: int, deployed_by: str) -> None:
        """Record that a model version went into service (once per version)."""
        self.version(version_id)
        with self._write() as conn:
            if conn.execute(select(s.deployments.c.id).where(s.deployments.c.version_id == version_id)).first():
                raise ValueError(f"model version {version_id} is already recorded as deployed")
            conn.execute(insert(s.deployments).values(version_id=version_id, deployed_by=deployed_by, deployed_at=utcnow()))

    def deployed_at(self, version_ids: Sequence[int]) -> dict[int, datetime]:
        ids = [v for v in version_ids if v is not None]
        if not ids:
            return {}
        with self._read() as conn:
            rows = conn.execute(select(s.deployments.c.version_id, s.deployments.c.deployed_at)
                                .where(s.deployments.c.version_id.in_(bindparam("ids", expanding=True))), {"ids": ids}).all()
        return {v: _aware(t) for v, t in rows}


# -- helpers ------------------------------------------------------------------------------
class _Superseded(ValueError):
    """A job's result would undo a deletion recorded since the job started."""


def _check_sqlite_ledger(path: Path) -> None:
    """An existing SQLite file with the ledger's tables, read without writing to it."""
    if not path.exists():
        raise ValueError(f"no ledger at {path}: the file does not exist (check --db)")
    if not path.is_file():
        raise ValueError(f"{path} is not a ledger (not a file; check --db)")
    with path.open("rb") as f:
        header = f.read(16)
    if header != b"SQLite format 3\x00":
        what = "an empty file" if not header else "not an SQLite database"
        raise ValueError(f"{path} is not a ledger ({what}; check --db)")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path} is not a ledger (SQLite cannot read it: {err})") from None
    if found is None:
        raise ValueError(f"{path} is not a ledger (the database has no ledger tables; check --db)")


def _id_array(values: np.ndarray | Sequence[int], n: int, message: str) -> np.ndarray:
    """``values`` as int64 ids in ``0..n-1``; else ValueError(message with {bad}, plus the allowed range).

    Checked before the conversion: an id too large for int64 is named, not an OverflowError.
    """
    if isinstance(values, np.ndarray) and np.issubdtype(values.dtype, np.integer):
        ids = values.astype(np.int64, copy=False)
        bad = ids[(ids < 0) | (ids >= n)].tolist()
    else:
        values = list(values)
        bad = [v for v in values if not 0 <= v < n]
        ids = np.asarray(values if not bad else [], dtype=np.int64)
    if bad:
        raise ValueError(message.format(bad=bad[:20]) + f"; allowed ids are 0..{n - 1}")
    return ids


def to_ranges(ids: np.ndarray | Sequence[int]) -> list[tuple[int, int]]:
    """Sorted unique ids as half-open ``(start, stop)`` runs: ``[0, 1, 2, 5]`` -> ``[(0, 3), (5, 6)]``."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if not len(ids):
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate([[ids[0]], ids[breaks]])
    stops = np.concatenate([ids[breaks - 1] + 1, [ids[-1] + 1]])
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def from_ranges(ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros(0, dtype=np.int64)


def ids_sha256(ids: np.ndarray | Sequence[int]) -> str:
    """Hash of a sample-id set (sorted, as little-endian int64)."""
    return hashlib.sha256(np.unique(np.asarray(ids, dtype=np.int64)).astype("<i8").tobytes()).hexdigest()


def _check_ids(ids, source: Source, what: str) -> np.ndarray:
    return np.unique(_id_array(ids, source.num_samples, f"{what} id(s) {{bad}} out of range for source {source.name!r}"))


def _chunks(values: Sequence, size: int = _CHUNK) -> Iterator[list]:
    values = list(values)
    for i in range(0, len(values), size):
        yield values[i:i + size]


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; the ledger stores UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _row_by_id(conn: Connection, table: Table, row_id: Any, what: str) -> Mapping:
    """The row of ``table`` with this id, else a one-line ValueError naming the unknown id (and the known range)."""
    storable = not isinstance(row_id, int) or _INT64[0] <= row_id < _INT64[1]
    row = conn.execute(select(table).where(table.c.id == row_id)).mappings().first() if storable else None
    if row is None:
        known = ""
        if isinstance(row_id, int):
            lo, hi = conn.execute(select(func.min(table.c.id), func.max(table.c.id))).one()
            known = f"; allowed ids are {lo}..{hi}" if lo is not None else "; the ledger has none yet"
        raise ValueError(f"unknown {what} {row_id!r}{known}")
    return row


def _plain(row: Mapping) -> dict:
    return {k: _aware(v) if isinstance(v, datetime) else v for k, v in dict(row).items()}
