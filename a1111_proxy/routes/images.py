"""A job's result images: each as stored, or a thumbnail of it (`?size=`), made on the
process's CpuPool and kept in its ThumbnailCache (thumbnails.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from a1111_proxy import thumbnails
from a1111_proxy.errors import ImageNotFound, ThumbnailUnavailable
from a1111_proxy.jobs import JobRecord, JobRepository
from a1111_proxy.routes import context
from a1111_proxy.routes.context import choice, find_job

IMAGE_HEADERS = {"Cache-Control": "private, max-age=86400", "Vary": "Authorization"}


async def get_image(request: Request) -> Response:
    """A result image as stored, or (`?size=`) a cached thumbnail of it."""
    row = await find_job(request, request.path_params["job_id"])
    n = request.path_params["n"]
    size = choice(request, "size", THUMBNAIL_SIZES)
    if size is not None:
        thumbnail = await _thumbnail(request, row, n, int(size))
        return Response(thumbnail.data, media_type=thumbnail.media_type, headers=IMAGE_HEADERS)
    data = await _image(context.repo(request), row, n)
    return Response(data, media_type=_media_type(data), headers=IMAGE_HEADERS)


THUMBNAIL_SIZES = tuple(str(size) for size in thumbnails.SIZES)


async def _thumbnail(request: Request, row: JobRecord, n: int, size: int) -> thumbnails.Thumbnail:
    """From the process's cache, else made on the CpuPool (off the event loop) and cached."""
    cache = context.thumbnails(request)
    key = (row.id, n, size)
    found = cache.get(key)
    if found is None:
        data = await _image(context.repo(request), row, n)
        try:
            found = await context.cpu(request).run(thumbnails.make_thumbnail, data, size)
        except ValueError as exc:
            raise ThumbnailUnavailable(
                f"Image {n} of job {row.id} cannot be scaled down ({exc}); GET it without `size`."
            ) from None
        cache.put(key, found)
    return found


async def _image(repo: JobRepository, row: JobRecord, n: int) -> bytes:
    # Only an index the job can have reaches the database (2**63 would overflow its integer).
    has = n < row.image_count  # stored with the final answer: completed, or canceled
    data = await repo.image(row.seq, n) if has else None
    if data is None:
        raise ImageNotFound(
            f"Job {row.id} has no image {n}: it is {row.status} with {row.image_count} image(s) "
            "(numbered from 0)."
        )
    return data


def _media_type(data: bytes) -> str:
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"
