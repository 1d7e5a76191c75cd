"""Every setting of the service in one place: `TALKGEN_<NAME>` environment variables, or the
`talkgen serve` / `talkgen worker` flags, which override them.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from talkgen.errors import InputError


def cache_root() -> Path:
    """The same cache folder as the CLI's (`TALKGEN_CACHE`, else `XDG_CACHE_HOME/talkgen`)."""
    root = os.environ.get("TALKGEN_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "talkgen"


def default_data_dir() -> Path:
    return cache_root() / "service"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TALKGEN_", extra="ignore")

    # -- HTTP ------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated keys for `Authorization: Bearer`; required off loopback")
    max_upload_mb: float = Field(512, gt=0, description="largest request body (all files together)")
    max_audio_s: float = Field(1800, gt=0, description="longest speech a job may bring (each audio file), in seconds")
    max_image_mp: float = Field(64, gt=0, le=179, description="largest portrait, in megapixels (decoded at intake)")
    input_root: Path | None = Field(
        None, description="JSON jobs may name local files under this folder (none: local paths are refused)")
    input_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated buckets JSON jobs may name as s3:// inputs; default: the "
                                          "storage's own bucket when the storage is S3, else none")

    # -- the model -------------------------------------------------------------------------------
    model: Literal["tiny", "multitalk", "infinitetalk"] = "multitalk"
    weights: Path | None = Field(None, description="weights directory; default for tiny: the cache")
    people: Literal["single", "multi"] = "single"
    device: str | None = Field(None, description="cuda | cuda:1 | cpu; default: every GPU, else the CPU")
    workers: int | None = Field(None, ge=0, description="embedded workers: default one per GPU (1 on CPU); 0 = none")

    # -- jobs and storage ------------------------------------------------------------------------
    data_dir: Path = Field(default_factory=default_data_dir, description="the SQLite job store and local storage")
    database: Path | None = Field(None, description="SQLite file; default DATA_DIR/jobs.sqlite3")
    storage: str = Field("", description="'' = DATA_DIR/storage, a directory, or s3://bucket/prefix")
    max_attempts: int = Field(3, ge=1, description="times a job is started before a dying worker fails it")
    storage_tries: int = Field(3, ge=1, le=20, description="tries to store a result before the job fails")
    storage_retry_delay_s: float = Field(2, ge=0, le=300, description="wait before the second try (doubles after)")

    # -- S3 (boto3; unset credentials fall back to boto3's own chain) --------------------------------
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = Field(None, description="endpoint written into presigned URLs")
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_multipart_chunk_mb: int = Field(16, ge=5)
    s3_max_attempts: int = Field(5, ge=1, le=20, description="boto3's own tries per S3 call (standard retry mode)")
    presign_expiry_s: int = Field(3600, ge=1)

    # -- Redis queue (dramatiq) ------------------------------------------------------------------
    redis_url: str | None = None
    queue_name: str = "talkgen"
    heartbeat_timeout_s: float = Field(60, gt=0, description="a worker silent this long is dead; its job is requeued")
    redis_maintenance_chance: int = Field(
        10_000, ge=1, le=1_000_000, description="per million broker calls: how often dead workers are looked for")
    job_lease_s: float = Field(30, gt=0, description="a running job's lock, renewed every third of it")

    # -- tests only ------------------------------------------------------------------------------
    faults: str = Field("", description="fault injection for the reliability tests (see talkgen.service.faults); "
                                        "leave empty")

    @field_validator("api_keys", "input_buckets", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("faults")
    @classmethod
    def _check_faults(cls, value: str) -> str:
        from talkgen.service.faults import parse_faults

        parse_faults(value)  # a typo fails at start, not silently
        return value

    # -- derived ---------------------------------------------------------------------------------

    @property
    def database_path(self) -> Path:
        return self.database or self.data_dir / "jobs.sqlite3"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def allowed_buckets(self) -> list[str]:
        """Buckets JSON jobs may read inputs from: TALKGEN_INPUT_BUCKETS, else the storage's bucket."""
        if self.input_buckets:
            return list(self.input_buckets)
        if self.storage.startswith("s3://"):
            return [self.storage[len("s3://"):].split("/", 1)[0]]
        return []

    @property
    def weights_dir(self) -> Path:
        if self.weights is not None:
            return self.weights
        if self.model == "tiny":
            return cache_root() / "tiny"
        raise InputError(f"--weights (TALKGEN_WEIGHTS) is required for the {self.model} model: give the weights "
                         "directory laid out as the README shows.")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def check_exposure(self) -> None:
        """API keys are required as soon as the server listens beyond this machine."""
        if not self.loopback and not self.api_keys:
            raise InputError(
                f"Listening on {self.host} exposes the API beyond this machine: set TALKGEN_API_KEYS "
                "(comma-separated keys clients send as 'Authorization: Bearer KEY'), or use --host 127.0.0.1."
            )

    def describe(self) -> list[str]:
        """`name = value` lines with secrets masked (for logs and `talkgen info`)."""
        lines = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "***"
            elif name == "api_keys":
                value = f"{len(value)} key(s)"
            lines.append(f"TALKGEN_{name.upper()} = {value if value not in (None, '') else '-'}")
        return lines


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
