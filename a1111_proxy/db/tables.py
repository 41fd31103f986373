"""The schema. Times are unix seconds (float), so comparisons are index-friendly on both
databases."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# BIGINT on PostgreSQL, but SQLite only makes a rowid alias of "INTEGER PRIMARY KEY".
SeqType = BigInteger().with_variant(Integer(), "sqlite")

STATUSES = ("queued", "processing", "completed", "error", "canceled")

jobs = Table(
    "jobs",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(36), nullable=False, unique=True),
    Column("type", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("request", Text, nullable=False),
    Column("result", Text, nullable=True),
    Column("image_count", Integer, nullable=False, server_default=text("0")),
    Column("error", Text, nullable=True),
    Column("progress", Double, nullable=False, server_default=text("0")),
    Column("eta_relative", Double, nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False),
    Column("run_after", Double, nullable=False),
    Column("lease_owner", String(200), nullable=True),
    Column("lease_token", String(36), nullable=True),
    Column("lease_expires_at", Double, nullable=True),
    Column("backend", String(500), nullable=True),
    Column("cancel_requested_at", Double, nullable=True),
    Column("skip_requested_at", Double, nullable=True),
    Column("checkpoint", String(500), nullable=True),
    Column("idempotency_key", String(255), nullable=True),
    Column("request_hash", String(64), nullable=True),
    Column("webhook_url", Text, nullable=True),
    Column("webhook_secret", Text, nullable=True),
    Column("webhook_events", Text, nullable=True),
    Column("created_at", Double, nullable=False),
    Column("started_at", Double, nullable=True),
    Column("completed_at", Double, nullable=True),
    Column("updated_at", Double, nullable=False),
    # Cancel-After / `timeout`: a job not done by then ends canceled ("deadline").
    Column("deadline_at", Double, nullable=True),
    # Who submitted it (the tenant: the token's name, or the client address with tokens off).
    Column("owner", String(200), nullable=True),
    # Its place among its priority's queued jobs (fair share across owners, jobs/turns.py).
    Column("turn", BigInteger, nullable=False, server_default=text("0")),
    # What a job must share with others to run in one engine batch (engine/compat.py); NULL:
    # it always runs alone.
    Column("batch_key", String(64), nullable=True),
    # Until when someone looks at its live preview (an event stream, A1111's /progress): its
    # worker fetches previews only before then (jobs/control.py watch).
    Column("preview_wanted_until", Double, nullable=True),
    # Until when someone looks at its progress (the above, or a read of the job): its worker
    # reads progress from its A1111 at PROGRESS_SECONDS only before then (jobs/control.py).
    Column("progress_wanted_until", Double, nullable=True),
    CheckConstraint(f"status IN {STATUSES!r}", name="status"),
    CheckConstraint("(status = 'processing') = (lease_token IS NOT NULL)", name="lease"),
    Index(
        "ix_jobs_leases",
        "lease_expires_at",
        postgresql_where=text("status = 'processing'"),
        sqlite_where=text("status = 'processing'"),
    ),
    Index("ix_jobs_status_seq", "status", "seq"),
    Index("ix_jobs_type_seq", "type", "seq"),
    Index("ix_jobs_completed_at", "completed_at"),
    Index(
        "ix_jobs_deadlines",
        "deadline_at",
        postgresql_where=text("status IN ('queued', 'processing') AND deadline_at IS NOT NULL"),
        sqlite_where=text("status IN ('queued', 'processing') AND deadline_at IS NOT NULL"),
    ),
    Index("ix_jobs_idempotency_key", "idempotency_key", unique=True),
    # An owner's jobs by status; and its last turn among its queued jobs of a priority.
    Index("ix_jobs_owner_turns", "owner", "status", "priority", "turn"),
    Index("ix_jobs_owner_seq", "owner", "seq"),  # a tenant's listing; its submit rate
    Index("ix_jobs_checkpoint_seq", "checkpoint", "seq"),  # a listing by model (?model=)
    # A batch claim's companions: queued jobs with the head job's batch key.
    Index(
        "ix_jobs_batch_key",
        "batch_key",
        "priority",
        "turn",
        "seq",
        postgresql_where=text("status = 'queued' AND batch_key IS NOT NULL"),
        sqlite_where=text("status = 'queued' AND batch_key IS NOT NULL"),
    ),
)

# The claim order (jobs/clauses.py QUEUE_ORDER), so that a claim reads its first rows only.
# Queries name the status in their SQL (clauses.QUEUED): SQLite and PostgreSQL's generic plans
# use a partial index only for a WHERE they can see implies the index's.
Index(
    "ix_jobs_queue",
    jobs.c.status,
    jobs.c.priority.desc(),
    jobs.c.turn,
    jobs.c.seq,
    postgresql_where=text("status = 'queued'"),
    sqlite_where=text("status = 'queued'"),
)

# The full A1111 body (input images included) that the worker sends; kept apart so that
# listing jobs never reads image data.
job_payloads = Table(
    "job_payloads",
    metadata,
    Column("job_seq", SeqType, ForeignKey("jobs.seq", ondelete="CASCADE"), primary_key=True),
    Column("body", Text, nullable=False),
)

job_images = Table(
    "job_images",
    metadata,
    Column("job_seq", SeqType, ForeignKey("jobs.seq", ondelete="CASCADE"), primary_key=True),
    Column("n", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

# The latest live preview of a running job (base64, as A1111's /progress gives it).
job_previews = Table(
    "job_previews",
    metadata,
    Column("job_seq", SeqType, ForeignKey("jobs.seq", ondelete="CASCADE"), primary_key=True),
    Column("image", Text, nullable=False),
    Column("updated_at", Double, nullable=False),
)

# What the worker last fetched from its backends (sd-models, samplers, options, ...), so the API
# answers these without waiting on a backend.
catalogue = Table(
    "catalogue",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("body", Text, nullable=False),
    Column("backend", String(500), nullable=True),
    Column("fetched_at", Double, nullable=False),
)

# Small shared state between API and worker processes: the default checkpoint, options waiting to
# be applied to the backends, refresh requests.
controls = Table(
    "controls",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", Double, nullable=False),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("started_at", Double, nullable=False),
    Column("heartbeat_at", Double, nullable=False),
    Column("slots", Text, nullable=False),
)

# The webhook outbox: one row per message (a job's event), written in the same transaction as the
# state change that causes it. `id` is the Standard Webhooks `webhook-id`, stable across retries;
# `data` is a snapshot of the job's columns at that moment (never its webhook secret).
DELIVERY_STATUSES = ("pending", "sending", "delivered", "failed", "superseded")
DELIVERY_EVENTS = ("started", "progress", "completed")

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("job_seq", SeqType, ForeignKey("jobs.seq", ondelete="CASCADE"), nullable=False),
    Column("event", String(16), nullable=False),
    Column("url", Text, nullable=False),
    Column("data", Text, nullable=False),
    Column("occurred_at", Double, nullable=False),
    Column("status", String(16), nullable=False),
    Column("trigger", String(16), nullable=False, server_default=text("'scheduled'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Double, nullable=True),
    Column("lease_token", String(36), nullable=True),
    Column("lease_expires_at", Double, nullable=True),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("delivered_at", Double, nullable=True),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    CheckConstraint(f"status IN {DELIVERY_STATUSES!r}", name="status"),
    CheckConstraint(f"event IN {DELIVERY_EVENTS!r}", name="event"),
    CheckConstraint("trigger IN ('scheduled', 'manual')", name="trigger"),
    Index(
        "ix_webhook_deliveries_due",
        "next_attempt_at",
        postgresql_where=text("status = 'pending'"),
        sqlite_where=text("status = 'pending'"),
    ),
    Index(
        "ix_webhook_deliveries_leases",
        "lease_expires_at",
        postgresql_where=text("status = 'sending'"),
        sqlite_where=text("status = 'sending'"),
    ),
    Index("ix_webhook_deliveries_job", "job_seq", "seq"),
)

# The delivery log: one row per HTTP attempt.
webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column(
        "delivery_seq",
        SeqType,
        ForeignKey("webhook_deliveries.seq", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("number", Integer, nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("started_at", Double, nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("response_body", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("address", String(64), nullable=True),
    Index("ix_webhook_attempts_delivery", "delivery_seq", "seq"),
)

# Hashes of model files under MODELS_DIR, by path, size and mtime: a restart never hashes a file
# again. Workers on several machines share the table without disturbing one another: a file that
# changed (or differs between machines) gets a row of its own; rows no worker has seen for a month
# go. `kind` is checkpoint or lora; `rel` the path inside its folder (Stable-diffusion/, Lora/),
# which is how catalogue entries find their file.
model_files = Table(
    "model_files",
    metadata,
    Column("path", String(1024), primary_key=True),
    Column("size", BigInteger, primary_key=True),
    Column("mtime_ns", BigInteger, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("rel", String(1024), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("autov3", String(12), nullable=True),
    Column("hashed_at", Double, nullable=False),
    Column("seen_at", Double, nullable=False),
)

# Civitai's by-hash answers, by the hash asked (lower case): `body` is the summary the API shows
# as `civitai`, or null when Civitai has no such version (404). Asked again after `expires_at`.
civitai_lookups = Table(
    "civitai_lookups",
    metadata,
    Column("hash", String(64), primary_key=True),
    Column("found", Boolean, nullable=False),
    Column("body", Text, nullable=True),
    Column("fetched_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
)

# Model downloads (POST /sdapi/v1/models/downloads): one row per file to fetch into MODELS_DIR.
# The API adds it `queued`; a worker claims it with a lease (`running`, fenced by `lease_token`,
# renewed while it streams), resolves the source (Civitai's model-version JSON into `version`,
# the file's `url`, `sha256`, `kind` and `path` inside MODELS_DIR), streams into `<path>.part`
# and ends it `completed`, `failed` or `canceled`. A lease that expires (the worker died) lets
# another worker claim it and resume from the part file.
DOWNLOAD_STATUSES = ("queued", "running", "completed", "failed", "canceled")

downloads = Table(
    "downloads",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(36), nullable=False, unique=True),
    Column("source", Text, nullable=False),  # as the admin gave it
    Column("kind", String(16), nullable=True),  # given, or Civitai's type once resolved
    Column("file", String(500), nullable=True),  # the file asked for (a version's file name)
    Column("sha256", String(64), nullable=True),  # expected: given, or Civitai's
    Column("status", String(16), nullable=False),
    Column("requested_by", String(200), nullable=True),
    Column("url", Text, nullable=True),  # where the file is fetched from, once resolved
    Column("path", String(1024), nullable=True),  # inside MODELS_DIR, "<folder>/<file name>"
    Column("version", Text, nullable=True),  # Civitai's model-version JSON
    Column("bytes_done", BigInteger, nullable=False, server_default=text("0")),
    Column("bytes_total", BigInteger, nullable=True),
    Column("speed", Double, nullable=True),  # bytes per second, lately
    Column("error", Text, nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("run_after", Double, nullable=False),
    Column("lease_owner", String(200), nullable=True),
    Column("lease_token", String(36), nullable=True),
    Column("lease_expires_at", Double, nullable=True),
    Column("cancel_requested_at", Double, nullable=True),
    Column("created_at", Double, nullable=False),
    Column("started_at", Double, nullable=True),
    Column("completed_at", Double, nullable=True),
    Column("updated_at", Double, nullable=False),
    CheckConstraint(f"status IN {DOWNLOAD_STATUSES!r}", name="status"),
    CheckConstraint("(status = 'running') = (lease_token IS NOT NULL)", name="lease"),
    Index(
        "ix_downloads_due",
        "run_after",
        postgresql_where=text("status = 'queued'"),
        sqlite_where=text("status = 'queued'"),
    ),
    Index(
        "ix_downloads_leases",
        "lease_expires_at",
        postgresql_where=text("status = 'running'"),
        sqlite_where=text("status = 'running'"),
    ),
    Index("ix_downloads_status_seq", "status", "seq"),
)
