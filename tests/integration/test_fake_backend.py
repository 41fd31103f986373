"""FakeBackend's catalogue, stored by the worker's keeper in a real SQLite file."""

from __future__ import annotations

import pytest

from a1111_proxy.backends.fake import FakeBackend
from a1111_proxy.catalogue import CatalogueStore
from a1111_proxy.db.engine import Database
from worker.catalogue import CatalogueKeeper

pytestmark = pytest.mark.anyio


async def test_the_keeper_stores_the_fakes_catalogue_with_its_credentials_redacted(
    sqlite_url: str,
) -> None:
    db = Database(sqlite_url)
    store = CatalogueStore(db)
    try:
        await CatalogueKeeper(store).fetch_all([FakeBackend("f")])
        assert (await store.get("sd-models"))[0]["model_name"] == "fake-model"
        assert (await store.get("cmd-flags"))["api_auth"] == "<redacted>"
        assert await store.get("controlnet-model_list") is None  # the fake lacks it
    finally:
        await db.dispose()
