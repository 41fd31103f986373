"""CatalogueStore: what the worker learned from its backends, and the small controls the API leaves
for the worker (default checkpoint, options to apply, refresh requests). The only SQL for the
`catalogue` and `controls` tables."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import String, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from a1111_proxy.db.engine import Database
from a1111_proxy.db.sqlite_driver import Prepared, positional
from a1111_proxy.db.tables import catalogue, controls
from a1111_proxy.db.upsert import insert_missing, upsert
from a1111_proxy.wakeup import WORK_CHANNEL

# What the worker fetches from a backend (Backend.catalogue_entry), by the name the API answers
# it under: /sdapi/v1/<name>, or /controlnet/<rest> for `controlnet-<rest>`.
ENTRIES: tuple[str, ...] = (
    "sd-models",
    "loras",
    "samplers",
    "schedulers",
    "upscalers",
    "latent-upscale-modes",
    "sd-vae",
    "scripts",
    "script-info",
    "embeddings",
    "prompt-styles",
    "hypernetworks",
    "face-restorers",
    "realesrgan-models",
    "extensions",
    "memory",
    "cmd-flags",
    "options",
    "controlnet-version",
    "controlnet-model_list",
    "controlnet-module_list",
)

# What only the bundled engine answers, fetched with ENTRIES and after an unload or reload; the
# detailed /health shows it (no A1111 route: an A1111 backend answers None).
DEVICE = "device"
ENGINE_FACTS: tuple[str, ...] = (DEVICE,)

DEFAULT_CHECKPOINT = "default_checkpoint"
# POST /options by a tenant (not an admin): its own default checkpoint and options, applied to
# its jobs at submit, {"checkpoint": title or None, "options": {...}}; the key ends with its name.
TENANT_OPTIONS = "tenant_options:"
PENDING_OPTIONS = "pending_options"  # {"version": n, "options": {...}}
REFRESH_REQUESTED = "refresh_requested"  # {"at": unix seconds, "what": [...]}
# POST /sdapi/v1/unload-checkpoint and reload-checkpoint: the state every backend is asked to
# reach between its jobs, {"version": n, "loaded": bool, "at": unix seconds}; the latest wins.
CHECKPOINT_REQUEST = "checkpoint_request"

# A control value by key: the worker reads the checkpoint request before each claim, so the
# statement is built once.
_CONTROL = select(controls.c.value).where(controls.c.key == bindparam("b_key"))


@dataclass(frozen=True)
class SubmitDefaults:
    """What POST /options set for the jobs about to be stored: the default checkpoint, and each
    tenant's own (which wins for its jobs) with its options."""

    checkpoint: str | None
    tenants: dict[str, dict[str, Any]]

    def checkpoint_for(self, owner: str | None) -> str | None:
        own = self.tenants.get(owner or "", {}).get("checkpoint")
        return own or self.checkpoint

    def options_for(self, owner: str | None) -> dict[str, Any]:
        return dict(self.tenants.get(owner or "", {}).get("options") or {})


@dataclass(frozen=True)
class Entry:
    body: Any
    fetched_at: float  # unix seconds


class CatalogueStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    async def get(self, name: str) -> Any:
        """The stored answer for `name`, or None if no worker has fetched it yet."""
        async with self.db.reading() as conn:
            body = (
                await conn.execute(select(catalogue.c.body).where(catalogue.c.name == name))
            ).scalar_one_or_none()
        return None if body is None else json.loads(body)

    async def entry(self, name: str) -> Entry | None:
        """The stored answer for `name` with when it was fetched, or None if never fetched."""
        async with self.db.reading() as conn:
            row = (
                await conn.execute(
                    select(catalogue.c.body, catalogue.c.fetched_at).where(catalogue.c.name == name)
                )
            ).one_or_none()
        return None if row is None else Entry(json.loads(row.body), row.fetched_at)

    async def ever_fetched(self) -> bool:
        """Whether a worker ever fetched a backend's catalogue (its model list comes first; a
        lone /memory fetched after an unload does not count)."""
        async with self.db.reading() as conn:
            found = (
                await conn.execute(select(catalogue.c.name).where(catalogue.c.name == ENTRIES[0]))
            ).first()
        return found is not None

    async def put(self, name: str, body: Any, backend: str) -> None:
        await self._upsert(
            catalogue,
            catalogue.c.name,
            name,
            {"body": json.dumps(body), "backend": backend, "fetched_at": self.clock()},
        )

    async def get_control(self, key: str) -> Any:
        async with self.db.reading() as conn:
            value = (await conn.execute(_CONTROL, {"b_key": key})).scalar_one_or_none()
        return None if value is None else json.loads(value)

    async def submit_defaults_in(self, conn: AsyncConnection, owners: set[str]) -> SubmitDefaults:
        """The defaults POST /options set (globally, and by these tenants), read on `conn`
        just before the jobs are stored: a job takes what was set before it was stored."""
        keys = [DEFAULT_CHECKPOINT, *(TENANT_OPTIONS + owner for owner in owners)]
        query = select(controls.c.key, controls.c.value).where(controls.c.key.in_(keys))
        return _submit_defaults((await conn.execute(query)).all())

    async def tenant_options(self, tenant: str) -> dict[str, Any]:
        """What `tenant` set with POST /options: {"checkpoint": ..., "options": {...}}."""
        return dict(await self.get_control(TENANT_OPTIONS + tenant) or {})

    async def set_tenant_options(
        self, tenant: str, options: dict[str, Any], checkpoint: str | None
    ) -> None:
        """Merge `options` (and the checkpoint, when given) into what `tenant` set before."""
        current = await self.tenant_options(tenant)
        merged = {
            "checkpoint": checkpoint or current.get("checkpoint"),
            "options": {**(current.get("options") or {}), **options},
        }
        await self.set_control(TENANT_OPTIONS + tenant, merged)

    async def set_control(self, key: str, value: Any) -> None:
        await self._upsert(
            controls, controls.c.key, key, {"value": json.dumps(value), "updated_at": self.clock()}
        )

    async def merge_pending_options(self, options: dict[str, Any]) -> int:
        """Add options for the worker to apply to every backend between jobs; return the version."""
        async with self.db.writing() as conn:
            empty = {"version": 0, "options": {}}
            current = await self._locked_control(conn, PENDING_OPTIONS, empty)
            merged: dict[str, Any] = {
                "version": current["version"] + 1,
                "options": {**current["options"], **options},
            }
            await self._set_control_in(conn, PENDING_OPTIONS, merged)
        return int(merged["version"])

    async def request_checkpoint(self, loaded: bool) -> int:
        """Ask every backend to unload (False) or reload (True) its checkpoint between jobs (a
        reload names the default checkpoint set with POST /options, when there is one); return
        the request's version, which workers report once they applied it."""
        async with self.db.writing() as conn:
            current = await self._locked_control(conn, CHECKPOINT_REQUEST, {"version": 0})
            version = int(current["version"]) + 1
            request: dict[str, Any] = {"version": version, "loaded": loaded, "at": self.clock()}
            default = (await self.submit_defaults_in(conn, set())).checkpoint
            if loaded and default:
                request["checkpoint"] = default
            await self._set_control_in(conn, CHECKPOINT_REQUEST, request)
            if not self.db.is_sqlite:  # wake idle workers (SQLite's change counter does itself)
                await conn.execute(select(func.pg_notify(WORK_CHANNEL, "")))
        return version

    async def _locked_control(self, conn: AsyncConnection, key: str, empty: Any) -> Any:
        """A control's value (`empty` when it has none yet), its row locked until the caller's
        transaction ends: two API processes changing it at once take turns, and neither's change
        is lost (SQLite's write transaction holds the whole database anyway)."""
        values = {"key": key, "value": json.dumps(empty), "updated_at": self.clock()}
        await conn.execute(insert_missing(self.db, controls, values))
        query = select(controls.c.value).where(controls.c.key == key).with_for_update()
        return json.loads((await conn.execute(query)).scalar_one())

    async def _set_control_in(self, conn: AsyncConnection, key: str, value: Any) -> None:
        values = {"value": json.dumps(value), "updated_at": self.clock()}
        await conn.execute(update(controls).where(controls.c.key == key).values(**values))

    async def _upsert(self, table: Any, key_column: Any, key: str, values: dict[str, Any]) -> None:
        async with self.db.writing() as conn:
            await conn.execute(upsert(self.db, table, {key_column.name: key, **values}))


def checkpoint_titles(models: Any) -> list[str]:
    return [m["title"] for m in models or [] if isinstance(m, dict) and m.get("title")]


def find_checkpoint(models: Any, wanted: str) -> dict[str, Any] | None:
    """A1111's checkpoint aliases: title, model_name, file name, short/long hash, 'name [hash]'."""
    wanted = wanted.strip()
    for model in models or []:
        if isinstance(model, dict) and wanted in checkpoint_names(model):
            return model
    return None


def checkpoint_names(model: dict[str, Any]) -> set[str]:
    """Every name A1111 knows a checkpoint by (what a job's sd_model_checkpoint may say)."""
    filename = str(model.get("filename") or "")
    names = {
        model.get("title"),
        model.get("model_name"),
        model.get("hash"),
        model.get("sha256"),
        filename.rsplit("/", 1)[-1],
        filename.rsplit("/", 1)[-1].rsplit(".", 1)[0],
        (model.get("sha256") or "")[:10] or None,
    }
    return {str(n) for n in names if n}


def submit_defaults_sqlite(connection: sqlite3.Connection, owners: set[str]) -> SubmitDefaults:
    """CatalogueStore.submit_defaults_in with sqlite3 itself, on the connection's thread, in its
    transaction (the submit path's one round trip: jobs/intake.py)."""
    keys = [DEFAULT_CHECKPOINT, *(TENANT_OPTIONS + owner for owner in owners)]
    prepared = _defaults_prepared()
    found = connection.execute(prepared.sql, prepared.args(keys=json.dumps(keys))).fetchall()
    return _submit_defaults(found)


@cache
def _defaults_prepared() -> Prepared:
    keys = func.json_each(bindparam("keys", type_=String)).table_valued("value").alias("k")
    query = select(controls.c.key, controls.c.value)
    return positional(query.where(controls.c.key.in_(select(keys.c.value))))


def _submit_defaults(rows: Iterable[Any]) -> SubmitDefaults:
    """SubmitDefaults from the (key, value) rows of the controls read."""
    found = {key: json.loads(value) for key, value in rows}
    return SubmitDefaults(
        found.get(DEFAULT_CHECKPOINT) or None,
        {
            key.removeprefix(TENANT_OPTIONS): value
            for key, value in found.items()
            if key.startswith(TENANT_OPTIONS)
        },
    )
