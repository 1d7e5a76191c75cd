"""Where inputs and results live: a local directory (default) or an S3-compatible bucket.

Objects are named by keys (``jobs/<id>/inputs/image.png``, ``jobs/<id>/video.mp4``,
``jobs/<id>/chunks/00003.mp4``) and handed around as URIs (``file:///...`` or
``s3://bucket/prefix/key``), so a worker on another machine reads exactly what the API stored.
S3 uploads are multipart above one chunk (boto3's transfer manager); downloads of results are
presigned URLs, so the video bytes never pass through the API server.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from talkgen.errors import InputError, ResourceError
from talkgen.service.settings import Settings


class Storage(ABC):
    """The interface both backends implement."""

    @abstractmethod
    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str:
        """Store a local file under ``key``; returns its URI."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO, content_type: str | None = None) -> str:
        """Store a stream under ``key``; returns its URI."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """The URI ``key`` has in this storage."""

    # The URI-based operations work for any URI the settings can reach (a local storage server
    # can still read s3:// inputs when S3 credentials are configured).

    def fetch(self, uri: str, dest: Path) -> Path:
        """Make the object readable as a local file: its own path when local, else a download to ``dest``."""
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
            if not path.is_file():
                raise InputError(f"Input {uri} no longer exists in the job's storage.")
            return path
        if parsed.scheme == "s3":
            bucket, key = split_s3(uri)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.s3.download_file(bucket, key, str(dest))
            except Exception as exc:
                raise InputError(f"Could not read {uri} ({s3_reason(exc)}).") from None
            return dest
        raise InputError(f"Unsupported input location {uri!r}: give an s3://bucket/key URI.")

    def size(self, uri: str) -> int | None:
        """Size in bytes, or None when the object does not exist."""
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
            return path.stat().st_size if path.is_file() else None
        if parsed.scheme == "s3":
            bucket, key = split_s3(uri)
            try:
                return int(self.s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
            except Exception as exc:
                if _status(exc) in (404, 403):
                    return None
                raise ResourceError(f"S3 did not answer for {uri} ({s3_reason(exc)}): check TALKGEN_S3_ENDPOINT_URL.") from None
        raise InputError(f"Unsupported location {uri!r}: give an s3://bucket/key URI.")

    def local_path(self, uri: str) -> Path | None:
        parsed = urlparse(uri)
        return Path(unquote(parsed.path)) if parsed.scheme == "file" else None

    def download_url(self, uri: str, filename: str | None = None) -> str | None:
        """A presigned GET URL for s3:// objects (None for local files, served by the API itself)."""
        if urlparse(uri).scheme != "s3":
            return None
        bucket, key = split_s3(uri)
        params = {"Bucket": bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = f'inline; filename="{filename}"'
        return self.presigner.generate_presigned_url("get_object", Params=params, ExpiresIn=self.settings.presign_expiry_s)

    # -- S3 clients (created on first use) --------------------------------------------------------

    settings: Settings

    @property
    def s3(self):
        if getattr(self, "_s3", None) is None:
            self._s3 = make_s3_client(self.settings)
        return self._s3

    @property
    def presigner(self):
        if getattr(self, "_presigner", None) is None:
            public = self.settings.s3_public_endpoint_url
            self._presigner = make_s3_client(self.settings, endpoint=public) if public else self.s3
        return self._presigner


class LocalStorage(Storage):
    def __init__(self, root: Path, settings: Settings):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = settings

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key {key!r} escapes the storage root")
        return path

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            shutil.copyfile(path, partial)
            partial.replace(target)  # readers never see half a file
        except BaseException:  # a full disk: leave no half file behind
            partial.unlink(missing_ok=True)
            raise
        return target.as_uri()

    def put_stream(self, key: str, stream: BinaryIO, content_type: str | None = None) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            with open(partial, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
            partial.replace(target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return target.as_uri()


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str, settings: Settings):
        self.bucket, self.prefix, self.settings = bucket, prefix.strip("/"), settings

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _transfer(self):
        from boto3.s3.transfer import TransferConfig

        chunk = self.settings.s3_multipart_chunk_mb * 2**20
        return TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, use_threads=True)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str:
        extra = {"ContentType": content_type} if content_type else None
        try:
            self.s3.upload_file(str(path), self.bucket, self._key(key), ExtraArgs=extra, Config=self._transfer())
        except Exception as exc:
            raise ResourceError(f"Could not write {self.uri(key)} ({s3_reason(exc)}).") from None
        return self.uri(key)

    def put_stream(self, key: str, stream: BinaryIO, content_type: str | None = None) -> str:
        extra = {"ContentType": content_type} if content_type else None
        try:
            self.s3.upload_fileobj(stream, self.bucket, self._key(key), ExtraArgs=extra, Config=self._transfer())
        except Exception as exc:
            raise ResourceError(f"Could not write {self.uri(key)} ({s3_reason(exc)}).") from None
        return self.uri(key)


def open_storage(settings: Settings) -> Storage:
    if settings.storage.startswith("s3://"):
        bucket, prefix = split_s3(settings.storage, key_required=False)
        return S3Storage(bucket, prefix, settings)
    root = Path(settings.storage) if settings.storage else settings.data_dir / "storage"
    return LocalStorage(root, settings)


def make_s3_client(settings: Settings, endpoint: str | None = None):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ResourceError("S3 needs boto3: install the service extra (`pip install 'talkgen[service]'`).") from None
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    return boto3.client(
        "s3",
        endpoint_url=endpoint or settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=secret,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, connect_timeout=10,
                      retries={"max_attempts": settings.s3_max_attempts, "mode": "standard"}),
    )


def split_s3(uri: str, key_required: bool = True) -> tuple[str, str]:
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if parsed.scheme != "s3" or not bucket or (key_required and not key):
        raise InputError(f"{uri!r} is not an S3 location: write it as s3://bucket/key.")
    return bucket, key


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def s3_reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if response and "Error" in response:
        error = response["Error"]
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".strip(": ")
    return f"{type(exc).__name__}: {exc}"
