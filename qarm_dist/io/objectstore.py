"""Object-store roots: one reading of ``tables.storage_options`` for every client of the tables.

deltalake (the Delta log), pyarrow (staged files and every read), Ray Data, Ray Train and
Spark's S3A connector each take S3 settings in their own spelling. The config holds them once,
in deltalake's spelling (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ALLOW_HTTP``, ...; case and the ``AWS_`` prefix are optional, as in
deltalake), and this module translates them: `s3_filesystem` for pyarrow (and so Ray), and
`spark_s3a_conf` for a Spark that has the hadoop-aws jars. Settings not given fall back to the
usual AWS environment variables and files, in deltalake and pyarrow alike.

Commit safety on S3 (`check_options`): deltalake 1.6 writes each log entry with a conditional
put (``If-None-Match: *``), so of two writers racing for one version exactly one wins and the
other retries or fails; AWS S3, MinIO and moto honour it, and no lock service is needed. The
options that older delta-rs used for locking are refused rather than silently ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow.fs as pafs

S3_SCHEMES = ("s3", "s3a")

#: deltalake's key spellings (lowercase, without the ``aws_`` prefix) -> our field
_ALIASES = {
    "access_key_id": "access_key",
    "secret_access_key": "secret_key",
    "session_token": "session_token",
    "token": "session_token",
    "region": "region",
    "default_region": "region",
    "endpoint_url": "endpoint",
    "endpoint": "endpoint",
    "endpoint_url_s3": "endpoint",
    "allow_http": "allow_http",
    "virtual_hosted_style_request": "virtual_hosted",
    "skip_signature": "anonymous",
}
_TRUE = ("true", "1", "yes", "on")


class StorageOptionsError(ValueError):
    """Storage options that cannot work; the message names the option under ``tables.storage_options``."""


@dataclass(frozen=True)
class S3Settings:
    """The S3 client settings in ``storage_options`` (None: not given, the client's default applies)."""

    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    region: str | None = None
    endpoint: str | None = None  # a URL: http(s)://host:port
    allow_http: bool = False
    virtual_hosted: bool = False
    anonymous: bool = False


def _key(option: str) -> str:
    k = option.lower()
    return k[4:] if k.startswith("aws_") else k


def s3_settings(storage_options: dict[str, str] | None) -> S3Settings:
    """Read the S3 client settings from deltalake-style options; unknown keys are left to deltalake."""
    fields: dict[str, str | bool] = {}
    for option, value in (storage_options or {}).items():
        name = _ALIASES.get(_key(option))
        if name in ("allow_http", "virtual_hosted", "anonymous"):
            fields[name] = str(value).lower() in _TRUE
        elif name is not None:
            fields[name] = str(value)
    return S3Settings(**fields)  # type: ignore[arg-type]


def is_s3(uri: str) -> bool:
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme.lower() in S3_SCHEMES


def s3_filesystem(storage_options: dict[str, str] | None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for these options (cheap to build; pickles to Spark and Ray workers)."""
    s = s3_settings(storage_options)
    kwargs: dict[str, object] = {}
    if s.endpoint:
        url = urlsplit(s.endpoint if "://" in s.endpoint else f"https://{s.endpoint}")
        kwargs["endpoint_override"], kwargs["scheme"] = url.netloc, url.scheme
    if s.anonymous:
        kwargs["anonymous"] = True
    elif s.access_key:
        kwargs.update(access_key=s.access_key, secret_key=s.secret_key, session_token=s.session_token)
    if s.region:
        kwargs["region"] = s.region
    if s.virtual_hosted:
        kwargs["force_virtual_addressing"] = True
    return pafs.S3FileSystem(**kwargs)  # type: ignore[arg-type]


def check_options(root: str, storage_options: dict[str, str] | None) -> None:
    """Refuse options that would make commits to an ``s3://`` root fail late or look safer than they are.

    - ``AWS_S3_LOCKING_PROVIDER`` (option or environment): deltalake 1.6 has no DynamoDB log store
      and ignores it, logging only a deprecation. Commits are already safe through conditional put,
      but a writer that still locks through DynamoDB (delta-rs < 1.0) would not be coordinated with
      them, so a table must not be shared that way; say so instead of pretending to lock.
    - ``AWS_CONDITIONAL_PUT=disabled``: every commit would fail after its files were staged.
    - an ``http://`` endpoint without ``AWS_ALLOW_HTTP=true``: deltalake refuses plain HTTP, while
      pyarrow would happily stage files first.
    """
    if not is_s3(root):
        return
    options = {_key(k): (k, str(v)) for k, v in (storage_options or {}).items()}
    where = "tables.storage_options"
    provider, env = options.get("s3_locking_provider"), os.environ.get("AWS_S3_LOCKING_PROVIDER")
    if provider or env:
        source = (
            f"{where}.{provider[0]}={provider[1]}"
            if provider
            else f"AWS_S3_LOCKING_PROVIDER={env} (environment)"
        )
        raise StorageOptionsError(
            f"{source}: deltalake 1.6 has no locking providers and would ignore it. Commits to S3 are safe "
            f"without one (conditional put, If-None-Match), provided every writer of the table is "
            f"deltalake >= 1.0; remove it"
        )
    name, value = options.get("conditional_put", ("", ""))
    if value.lower() == "disabled":
        raise StorageOptionsError(
            f"{where}.{name}=disabled: deltalake commits to S3 by conditional put, so every commit would "
            f"fail; remove the option (the store must honour If-None-Match)"
        )
    s = s3_settings(storage_options)
    if s.endpoint and s.endpoint.lower().startswith("http://") and not s.allow_http:
        raise StorageOptionsError(
            f"{where}: endpoint {s.endpoint} is plain HTTP; set AWS_ALLOW_HTTP: 'true' to allow it"
        )


def spark_s3a_conf(root: str, storage_options: dict[str, str] | None) -> dict[str, str]:
    """``spark.hadoop.fs.s3a.*`` settings equal to the storage options (empty for other roots).

    They let a Spark that has the hadoop-aws jars read the tables' ``s3://`` file URIs directly
    (``fs.s3.impl`` maps that scheme onto S3A). pip's pyspark has no such jars, so `Tables.spark`
    never relies on them: it reads object-store files with pyarrow inside the Python tasks.
    """
    if not is_s3(root):
        return {}
    s = s3_settings(storage_options)
    conf = {"fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem"}
    if s.endpoint:
        conf["fs.s3a.endpoint"] = s.endpoint
        conf["fs.s3a.connection.ssl.enabled"] = str(not s.endpoint.lower().startswith("http://")).lower()
    conf["fs.s3a.path.style.access"] = str(not s.virtual_hosted).lower()
    if s.region:
        conf["fs.s3a.endpoint.region"] = s.region
    if s.anonymous:
        conf["fs.s3a.aws.credentials.provider"] = "org.apache.hadoop.fs.s3a.AnonymousAWSCredentialsProvider"
    elif s.access_key:
        conf["fs.s3a.access.key"] = s.access_key
        conf["fs.s3a.secret.key"] = s.secret_key or ""
        if s.session_token:
            conf["fs.s3a.session.token"] = s.session_token
            conf["fs.s3a.aws.credentials.provider"] = (
                "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider"
            )
        else:
            conf["fs.s3a.aws.credentials.provider"] = "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"
    return {f"spark.hadoop.{k}": v for k, v in conf.items()}
