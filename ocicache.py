#!/usr/bin/env python3
"""ocicache: an OCI image cache and registry client in one standard-library file.

The cache is an OCI image layout (``oci-layout``, ``index.json``, ``blobs/``), the
same layout linuxkit's image cache uses, readable by skopeo, umoci and crane. Names
live in ``index.json`` as full canonical references
(``docker.io/library/alpine:3.20``), so ``alpine:3.20``, ``library/alpine:3.20`` and
``docker.io/alpine:3.20`` all find the same entry.

Command line::

    python3 ocicache.py pull alpine:3.20
    python3 ocicache.py export alpine:3.20 --format filesystem -o rootfs.tar
    python3 ocicache.py --help

Python::

    import ocicache
    cache = ocicache.Provider("~/.cache/ocicache")
    source = cache.image_pull("alpine:3.20", architecture="arm64")
    print(source.config()["Cmd"])

The API is linuxkit's ``CacheProvider`` / ``ImageSource`` / ``PackageResolver`` in
Python spelling. Python 3.9 or newer, standard library only.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import errno
import functools
import importlib
import io
import itertools
import operator
import os
import re
import stat
import sys
import threading
import time
import zlib
from types import MappingProxyType
from typing import (IO, TYPE_CHECKING, Any, BinaryIO, Callable, Dict, Generator, Iterable,
                    Iterator, List, Mapping, NoReturn, Optional, Sequence, Set, Tuple, Type,
                    TypeVar, Union)

__version__ = "0.1.0"

__all__ = [
    # errors
    "OciCacheError", "InvalidReferenceError", "InvalidDigestError",
    "DigestMismatchError", "NotFoundError", "PlatformNotFoundError", "RegistryError",
    "AuthenticationError", "InvalidArchiveError", "InvalidPlatformError", "CorruptCacheError",
    # value types and the pure logic over them
    "Digest", "Reference", "Platform", "Descriptor", "Index", "Manifest",
    "canonical_name", "select_platform", "merge_index", "read_document", "label_problem",
    "name_problem",
    "without_dangling_attestations", "merge_remote_index",
    # the disk
    "Layout", "ContentStore", "ContentInfo", "GcReport", "VerifyReport",
    # registries
    "Challenge", "Credentials", "parse_challenges", "find_credentials", "store_credentials",
    "erase_credentials", "TransportOptions",
    "RegistryClient", "PullProgress", "parse_mirror", "default_mirrors", "parse_copy_location",
    "SyncSpec", "SyncSource", "SyncResult", "InvalidSyncFileError", "read_sync_file",
    "parse_sync_spec", "semver_matches",
    "MAX_REFERRERS", "referrers_tag", "is_referrers_tag", "referrer_descriptor",
    "parse_referrers", "with_referrer", "ReferrerList",
    # interfaces and implementation
    "CacheProvider", "ImageSource", "PackageResolver", "Provider", "ImageSummary",
    "default_cache_dir", "package_resolver", "resolve_templates", "package_tag", "main",
]


class _LazyModule:
    """A standard module imported on first use, so that ``import ocicache`` and the
    commands that never need it do not pay for it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def __getattr__(self, attribute: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        value = getattr(self._module, attribute)
        self.__dict__[attribute] = value  # found directly from now on: flattening asks often
        return value


# The modules only some paths need; type checkers see them as the real imports.
if TYPE_CHECKING:
    import argparse
    import fcntl
    import hashlib
    import json
    import logging
    import platform as _platform_module
    import tarfile
else:
    argparse = _LazyModule("argparse")
    fcntl = _LazyModule("fcntl")
    hashlib = _LazyModule("hashlib")
    json = _LazyModule("json")
    logging = _LazyModule("logging")
    _platform_module = _LazyModule("platform")
    tarfile = _LazyModule("tarfile")
_subprocess = _LazyModule("subprocess")


# =====================================================================================
# Errors
#
# One base class, so callers can catch everything ocicache raises; the subclasses say
# what kind of thing went wrong. Every message is one line that names the problem.
# =====================================================================================

class OciCacheError(Exception):
    """Base class of every error ocicache raises on purpose."""


class InvalidReferenceError(OciCacheError, ValueError):
    """A string is not a valid image reference."""


class InvalidDigestError(OciCacheError, ValueError):
    """A string is not a supported digest (sha256 or sha512, lowercase hex)."""


class DigestMismatchError(OciCacheError):
    """Content does not hash to the digest (or size) it was announced with."""


class NotFoundError(OciCacheError, LookupError):
    """A name, blob or file does not exist."""


class PlatformNotFoundError(NotFoundError):
    """An image has no child for the requested platform."""


class RegistryError(OciCacheError):
    """A registry answered with an error status.

    ``status`` is the HTTP status and ``codes`` the registry's own error codes
    (``MANIFEST_UNKNOWN``, ``DENIED``, ...), from its ``{"errors": [...]}`` body.
    """

    def __init__(self, message: str, status: int = 0, codes: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.codes = tuple(codes)


class AuthenticationError(RegistryError):
    """Credentials were missing, wrong, or refused."""


class InvalidArchiveError(OciCacheError):
    """An image archive (tar) is malformed, truncated or hostile."""


class InvalidPlatformError(OciCacheError, ValueError):
    """A string is not a platform (``os/arch[/variant]``)."""


class InvalidSyncFileError(OciCacheError, ValueError):
    """A sync file is not valid: its message names the field."""


class CorruptCacheError(OciCacheError):
    """The cache on disk is damaged: an unreadable index.json or a bad blob."""


# =====================================================================================
# Media types and constants
# =====================================================================================

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_OCI_LAYER_FOREIGN = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MEDIA_OCI_LAYER_FOREIGN_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
MEDIA_DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
MEDIA_IN_TOTO = "application/vnd.in-toto+json"

INDEX_MEDIA_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
IMAGE_MEDIA_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})
FOREIGN_LAYER_MEDIA_TYPES = frozenset({
    MEDIA_OCI_LAYER_FOREIGN, MEDIA_OCI_LAYER_FOREIGN_GZIP, MEDIA_DOCKER_LAYER_FOREIGN})

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REFERENCE_TYPE = "vnd.docker.reference.type"
ANNOTATION_REFERENCE_DIGEST = "vnd.docker.reference.digest"
ANNOTATION_PREDICATE_TYPE = "in-toto.io/predicate-type"
SPDX_PREDICATE_TYPE = "https://spdx.dev/Document"
# SBOMs attached as referrers (oras attach, cosign attach sbom, syft): the documents'
# own media types, and the predicate types of in-toto attestations that carry one.
SBOM_MEDIA_TYPES = frozenset({"application/spdx+json", "text/spdx+json", "text/spdx",
                              "application/vnd.cyclonedx+json", "application/vnd.cyclonedx+xml",
                              "application/vnd.cyclonedx"})
SBOM_PREDICATE_TYPES = frozenset({SPDX_PREDICATE_TYPE, "https://spdx.dev/Document/v2.3",
                                  "https://cyclonedx.org/bom", "https://cyclonedx.org/bom/v1.4",
                                  "https://cyclonedx.org/bom/v1.5",
                                  "https://cyclonedx.org/bom/v1.6"})
MEDIA_DSSE_ENVELOPE = "application/vnd.dsse.envelope.v1+json"
ALL_PLATFORMS = "all"
FORMAT_OCI, FORMAT_DOCKER, FORMAT_FILESYSTEM = "oci", "docker", "filesystem"

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
# index.json is read whole: it may never be written larger than this, and one root
# entry copied from an archive may take at most _MAX_IMPORTED_ENTRY bytes of it.
MAX_INDEX_SIZE = 64 * MAX_MANIFEST_SIZE
_MAX_IMPORTED_ENTRY = 16 * 1024
# ls's memo of what each root reaches (_SummaryMemo), in the cache beside index.json;
# one larger than this is ignored and rebuilt smaller (the memory bound holds).
SUMMARIES_FILE = "ocicache-summaries.json"
# Where blobs were last seen (see _parse_locations), in the cache beside index.json.
_LOCATIONS_FILE = ".ocicache-blob-locations.json"
# The large blobs a pull or import wrote and verified, or an export hashed, each with its
# file's identity then, so that an export of an unchanged file copies it without hashing
# it again (_BlobChecks), in the cache beside index.json: at most _MAX_CHECKED, of
# _CHECKED_MIN_SIZE bytes or more (a smaller one hashes in the time reading it takes).
_CHECKED_FILE = ".ocicache-checked-blobs.json"
_MAX_CHECKED = 1024
_CHECKED_MIN_SIZE = 8 * 1024 * 1024
MAX_SUMMARIES_SIZE = 64 * 1024 * 1024
MAX_STATEMENT_SIZE = 64 * 1024 * 1024
COPY_BUFFER_SIZE = 1024 * 1024
# An export starts each blob's bytes of _ALIGNED_MIN_SIZE or more at a multiple of this
# offset in its tar (a PAX comment fills the gap): measured on Linux 6.18, ext4, a copy
# into a file at an offset that is not one ran at 2.7 GB/s, at one (64 KiB or more) at
# 4.0 GB/s, as fast as cp (the page cache's large folios are then copied whole).
_BODY_ALIGNMENT = 64 * 1024
_ALIGNED_MIN_SIZE = 4 * 1024 * 1024
# Compressed input is read, and decompressed data passes through Python (zlib -> tar
# reader -> writer), in pieces of this size. Measured on flattening 1 GiB: 256 KiB was
# fastest; 128 KiB cost 15% more in calls, and from 512 KiB on nearly every piece was
# a fresh mmap, page faults and all, 2.5 times slower.
_STREAM_CHUNK_SIZE = 256 * 1024
DEFAULT_GC_GRACE_SECONDS = 3600.0
_TEMP_MARK = ".tmp-"


# main() leaves the command line's logging setup here, and _log() applies it when
# something is first logged: a command that logs nothing never imports logging.
_log_setup: Optional["functools.partial[None]"] = None


def _log() -> logging.Logger:
    """The "ocicache" logger, looked up when something is logged."""
    global _log_setup
    logger = logging.getLogger("ocicache")
    setup, _log_setup = _log_setup, None
    if setup is not None:
        setup(logger)
    return logger


def _debugging() -> bool:
    """Whether a debug message could be shown: logging is imported (something may have
    set the logger up), or the command line's setup waiting in ``_log_setup`` is -v's.
    Otherwise neither logging (3 ms to import) nor the message's arguments are needed."""
    return "logging" in sys.modules or (
        _log_setup is not None and _log_setup.keywords.get("level") == "DEBUG")


def _debug(message: str, *args: Any) -> None:
    """``_log().debug``, without importing logging when nothing could show it."""
    if _debugging():
        _log().debug(message, *args)


# =====================================================================================
# Value types
#
# Digest, Reference, Descriptor and the other records are frozen value types: built
# from their fields, compared, hashed and shown by them, never changed. They behave as
# frozen dataclasses, but the dataclasses module is not used: importing it (it imports
# inspect, ast and dis) and building the classes (it execs six generated methods per
# class) took 24 ms of a 30 ms ``import ocicache``, and a quarter of a warm pull.
# Type checkers see _value_type as the dataclass transform it is.
# =====================================================================================

if TYPE_CHECKING:
    from typing import dataclass_transform  # new in 3.11: type checkers alone read it
else:
    def dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        """A stand-in for ``typing.dataclass_transform``, a note for type checkers only."""
        return lambda decorated: decorated

_V = TypeVar("_V")
_MISSING: Any = object()


class _Field:
    """One field of a value type: its name, how it gets a default, whether repr shows it."""

    def __init__(self, default: Any = _MISSING,
                 default_factory: Optional[Callable[[], Any]] = None, repr: bool = True) -> None:
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.repr = repr


def _field(*, default: Any = _MISSING, default_factory: Optional[Callable[[], Any]] = None,
           repr: bool = True) -> Any:
    """Declare a field whose default is made by ``default_factory``, or that ``repr``
    leaves out (secrets)."""
    return _Field(default, default_factory, repr)


@dataclass_transform(frozen_default=True, field_specifiers=(_field,))
def _value_type(cls: Optional[type] = None, *, frozen: bool = True) -> Any:
    """Make ``cls`` a value type from its annotated fields, in order, like
    ``dataclasses.dataclass(frozen=True)``: ``__init__`` (which calls ``__post_init__``),
    ``__repr__``, ``__eq__`` and, when frozen, ``__hash__`` (unless the class has its
    own) and ``__setattr__``/``__delattr__`` that refuse."""
    if cls is None:
        return functools.partial(_value_type, frozen=frozen)
    fields = []
    for name in cls.__dict__.get("__annotations__", {}):
        declared = cls.__dict__.get(name, _MISSING)
        field = declared if isinstance(declared, _Field) else _Field(declared)
        field.name = name
        if field.default is _MISSING:
            if name in cls.__dict__:
                delattr(cls, name)
        else:
            setattr(cls, name, field.default)
        fields.append(field)
    names = tuple(field.name for field in fields)
    key = operator.attrgetter(*names)
    title = cls.__qualname__
    post_init = cls.__dict__.get("__post_init__")

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if not kwargs and len(args) == len(fields):  # every field given in order: no defaults
            self.__dict__.update(zip(names, args))
            if post_init is not None:
                post_init(self)
            return
        if len(args) > len(fields):
            raise TypeError(f"{title}() takes {len(fields)} arguments, {len(args)} given")
        values = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names or name in values:
                raise TypeError(f"{title}() got an unexpected or repeated argument {name!r}")
            values[name] = value
        for field in fields[len(args):]:
            if field.name in values:
                continue
            if field.default_factory is not None:
                values[field.name] = field.default_factory()
            elif field.default is not _MISSING:
                values[field.name] = field.default
            else:
                raise TypeError(f"{title}() missing argument {field.name!r}")
        self.__dict__.update(values)
        if post_init is not None:
            post_init(self)

    def __repr__(self: Any) -> str:
        shown = ", ".join(f"{field.name}={getattr(self, field.name)!r}"
                          for field in fields if field.repr)
        return f"{title}({shown})"

    def __eq__(self: Any, other: Any) -> Any:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return bool(key(self) == key(other))

    def __hash__(self: Any) -> int:
        return hash(key(self))

    def _refuse(self: Any, name: str, *_: Any) -> NoReturn:
        raise AttributeError(f"cannot set {name!r}: a {title} is frozen")

    cls._value_fields = names  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]
    for method in (__repr__, __eq__):
        if method.__name__ not in cls.__dict__:
            setattr(cls, method.__name__, method)
    if not frozen:
        cls.__hash__ = None  # type: ignore[assignment]
    else:
        if "__hash__" not in cls.__dict__:
            cls.__hash__ = __hash__  # type: ignore[assignment]
        cls.__setattr__ = cls.__delattr__ = _refuse  # type: ignore[method-assign,assignment]
    return cls


def _replace(value: _V, **changes: Any) -> _V:
    """A copy of a value type with some fields changed, checked again as a new one is."""
    names: Tuple[str, ...] = getattr(type(value), "_value_fields")
    return type(value)(**{**{name: getattr(value, name) for name in names}, **changes})


# =====================================================================================
# Digest
#
# Only sha256 and sha512 with lowercase hex of the exact length: a digest is turned
# into a file name, so nothing looser is ever accepted.
# =====================================================================================

_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = frozenset("0123456789abcdef")


@_value_type
class Digest:
    """A content digest such as ``sha256:<64 hex>``; ``str()`` gives that form."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        length = _DIGEST_HEX_LENGTHS.get(self.algorithm)
        if length is None:
            raise InvalidDigestError(
                f"unsupported digest algorithm {self.algorithm!r} (sha256 or sha512)")
        if len(self.hex) != length or not _HEX.issuperset(self.hex):
            raise InvalidDigestError(
                f"invalid {self.algorithm} digest: want {length} lowercase hex "
                f"characters, got {_shorten(self.hex)!r}")

    @classmethod
    def parse(cls, value: Union[str, "Digest"]) -> "Digest":
        """Parse ``alg:hex``; raise InvalidDigestError for anything else."""
        if isinstance(value, Digest):
            return value
        if not isinstance(value, str):
            raise InvalidDigestError(f"a digest must be a string, not {type(value).__name__}")
        algorithm, sep, hexpart = value.partition(":")
        if not sep:
            raise InvalidDigestError(f"invalid digest {_shorten(value)!r}: no algorithm")
        if len(hexpart) == _DIGEST_HEX_LENGTHS.get(algorithm) and _HEX.issuperset(hexpart):
            # Valid, as __post_init__ would find: built without the generic __init__, as
            # reading index.json and manifests parses several digests per entry.
            digest = object.__new__(cls)
            digest.__dict__.update(algorithm=algorithm, hex=hexpart)
            return digest
        return cls(algorithm, hexpart)  # raises the error naming what is wrong

    @classmethod
    def from_bytes(cls, data: bytes, algorithm: str = "sha256") -> "Digest":
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> "hashlib._Hash":
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# Every character ``str.splitlines`` breaks at is one of these: the C0 and C1 controls
# (\n, \r, \x1c-\x1e, \x85 among them) and Unicode's line and paragraph separators.
_CONTROL_CHARACTERS = r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+"


def _one_line(text: str) -> str:
    """``text`` safe for one line of a terminal: control characters and line separators
    become spaces."""
    return re.sub(_CONTROL_CHARACTERS, " ", text).strip()


# =====================================================================================
# Reference
#
# The distribution reference grammar (github.com/distribution/reference), with Docker
# Hub normalisation. ``str(ref)`` is the canonical form used on every write and lookup;
# ``ref.familiar`` is the short form a docker tarball's RepoTags holds.
# =====================================================================================

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_LEGACY_DEFAULT_REGISTRY = "index.docker.io"
_NAME_TOTAL_LENGTH_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
# Always used with fullmatch: "$" would also match before a trailing newline. Patterns
# stay strings that re compiles (and caches) on first use: importing compiles none.
_REFERENCE = (rf"((?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
              rf"(?::({_TAG}))?(?:@({_DIGEST}))?")
_PATH = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_IDENTIFIER = r"[a-f0-9]{64}"


@_value_type
class Reference:
    """An image reference: ``registry/repository[:tag][@digest]``.

    ``Reference.parse`` normalises Docker Hub names (``alpine`` becomes
    ``docker.io/library/alpine:latest``). A reference with a digest is fetched and
    looked up by its digest; the tag, if any, is kept for naming.
    """

    registry: str
    repository: str
    tag: str = ""
    digest: Optional[Digest] = None

    @classmethod
    def parse(cls, value: Union[str, "Reference"], default_tag: str = "latest") -> "Reference":
        """Parse and normalise; ``default_tag`` is added when there is neither tag nor digest."""
        if isinstance(value, Reference):
            return value
        if not isinstance(value, str):
            raise InvalidReferenceError(
                f"a reference must be a string, not {type(value).__name__}")
        if not value:
            raise InvalidReferenceError("invalid reference: empty string")
        match = re.fullmatch(_REFERENCE, value)
        if match is None:
            if re.fullmatch(_REFERENCE, value.lower()) is not None:
                # Domains, tags and digests may hold capitals; only the path may not.
                raise InvalidReferenceError(
                    f"invalid reference {_shorten(value)!r}: repository name must be lowercase")
            raise InvalidReferenceError(f"invalid reference format: {_shorten(value)!r}")
        name, tag, digest = match.group(1), match.group(2) or "", match.group(3)
        if re.fullmatch(_IDENTIFIER, value):
            raise InvalidReferenceError(
                f"invalid reference {_shorten(value)!r}: a 64-character hex string is an "
                "image ID, not a name")
        # The grammar alone lets "my_host.io/app" be a path and "[20]/app" a host; docker
        # decides what the first component is first, and each part must then be valid.
        domain, path = _split_domain(name)
        if domain and not re.fullmatch(_DOMAIN, domain):
            raise InvalidReferenceError(
                f"invalid reference {_shorten(value)!r}: {_shorten(domain)!r} is not a "
                "valid registry host")
        if not re.fullmatch(_PATH, path):
            raise InvalidReferenceError(f"invalid reference format: {_shorten(value)!r}")
        registry, repository = _split_registry(name)
        if len(repository) > _NAME_TOTAL_LENGTH_MAX:
            raise InvalidReferenceError(
                f"invalid reference {_shorten(value)!r}: repository path is longer "
                f"than {_NAME_TOTAL_LENGTH_MAX} characters")
        try:
            parsed_digest = Digest.parse(digest) if digest else None
        except InvalidDigestError as e:
            raise InvalidReferenceError(f"invalid reference {_shorten(value)!r}: {e}") from None
        if not tag and parsed_digest is None:
            tag = default_tag
        return cls(registry, repository, tag, parsed_digest)

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar(self) -> str:
        """The short form docker shows: ``alpine:3.19``, ``ghcr.io/o/r:v1``."""
        name = self.name
        if self.registry == DEFAULT_REGISTRY:
            name = self.repository
            if name.startswith("library/") and name.count("/") == 1:
                name = name[len("library/"):]
        return name + self._suffix()

    @property
    def api_host(self) -> str:
        """The host serving the registry API (``registry-1.docker.io`` for Docker Hub)."""
        return DOCKER_HUB_API_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    def with_tag(self, tag: str) -> "Reference":
        if not re.fullmatch(_TAG, tag):
            raise InvalidReferenceError(f"invalid tag {_shorten(tag)!r}")
        return Reference(self.registry, self.repository, tag, None)

    def _suffix(self) -> str:
        suffix = f":{self.tag}" if self.tag else ""
        if self.digest is not None:
            suffix += f"@{self.digest}"
        return suffix

    def __str__(self) -> str:
        return self.name + self._suffix()


def _split_domain(name: str) -> Tuple[str, str]:
    """(domain or "", path) as written, by distribution's rule for the first component."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return "", name


def _split_registry(name: str) -> Tuple[str, str]:
    registry, repository = _split_domain(name)
    if registry in ("", _LEGACY_DEFAULT_REGISTRY):
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = "library/" + repository
    return registry, repository


def canonical_name(value: Union[str, Reference]) -> str:
    """The canonical form of a reference: ``alpine`` -> ``docker.io/library/alpine:latest``."""
    return str(Reference.parse(value))


# =====================================================================================
# Platform
#
# os/architecture/variant with the aliases people type, arm64 == arm64/v8, and the arm
# variant chain (v7 falls back to v6, then v5). ``unknown/unknown`` marks BuildKit
# attestations, which are never images.
# =====================================================================================

_ARCH_ALIASES = {
    "x86_64": ("amd64", ""), "x86-64": ("amd64", ""), "x64": ("amd64", ""),
    "aarch64": ("arm64", ""), "armhf": ("arm", "v7"), "armel": ("arm", "v6"),
    "armv7l": ("arm", "v7"), "armv7": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "armv6": ("arm", "v6"), "armv5": ("arm", "v5"), "i386": ("386", ""),
    "i686": ("386", ""), "x86": ("386", ""), "ppc64el": ("ppc64le", ""),
}
_ARM_VARIANTS = ("v8", "v7", "v6", "v5")
_PLATFORM_PART = r"[a-z0-9_.-]+"


@_value_type
class Platform:
    """An OCI platform. ``Platform.parse`` normalises aliases and variants."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: Tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: Union[str, "Platform", None]) -> "Platform":
        """Parse ``[os/]arch[/variant]``; empty or None means the host platform."""
        if isinstance(value, Platform):
            return value.normalized()
        if not value:
            return cls.host()
        if not isinstance(value, str):
            raise InvalidPlatformError(f"a platform must be a string, not {type(value).__name__}")
        parts = value.strip().lower().split("/")
        if len(parts) == 1:
            os_name, arch, variant = "linux", parts[0], ""
        elif len(parts) == 2:
            if parts[0] in _KNOWN_OSES or parts[0] == "unknown":
                os_name, arch, variant = parts[0], parts[1], ""
            else:
                os_name, arch, variant = "linux", parts[0], parts[1]
        elif len(parts) == 3:
            os_name, arch, variant = parts
        else:
            raise InvalidPlatformError(f"invalid platform {value!r}: use os/arch[/variant]")
        if not all(re.fullmatch(_PLATFORM_PART, p) for p in (os_name, arch)) or (
                variant and not re.fullmatch(_PLATFORM_PART, variant)):
            raise InvalidPlatformError(f"invalid platform {value!r}: use os/arch[/variant]")
        return cls(os_name, arch, variant).normalized()

    @classmethod
    def host(cls) -> "Platform":
        # os.uname() is what platform.machine() reads on POSIX, without importing
        # platform (2 ms of a pull that names no platform).
        machine = os.uname().machine if hasattr(os, "uname") else _platform_module.machine()
        return cls.parse(machine or "amd64")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Platform":
        features = data.get("os.features") or ()
        if not isinstance(features, (list, tuple)) or \
                not all(isinstance(f, str) for f in features):
            raise InvalidPlatformError("invalid platform: os.features must be a list of "
                                       f"strings, not {type(features).__name__} "
                                       f"{_shorten(_one_line(repr(features)), 40)}")
        return cls(str(data.get("os", "")), str(data.get("architecture", "")),
                   str(data.get("variant", "")), str(data.get("os.version", "")),
                   tuple(features))

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out

    def normalized(self) -> "Platform":
        """Aliases resolved; ``arm64/v8`` becomes ``arm64``; ``arm`` gets ``v7``."""
        arch, variant = self.architecture, self.variant
        if arch in _ARCH_ALIASES:
            arch, alias_variant = _ARCH_ALIASES[arch]
            variant = variant or alias_variant
        if arch == "arm64" and variant == "v8":
            variant = ""
        if arch == "arm" and not variant:
            variant = "v7"
        if arch == "arm" and variant in ("5", "6", "7", "8"):
            variant = "v" + variant
        return _replace(self, architecture=arch, variant=variant)

    @property
    def is_attestation(self) -> bool:
        return self.os == "unknown" and self.architecture == "unknown"

    def candidates(self) -> List["Platform"]:
        """This platform, then the ones it can also run: arm/v7 -> v7, v6, v5."""
        wanted = self.normalized()
        if wanted.architecture == "arm" and wanted.variant in _ARM_VARIANTS:
            start = _ARM_VARIANTS.index(wanted.variant)
            return [_replace(wanted, variant=v) for v in _ARM_VARIANTS[start:]]
        return [wanted]

    def matches(self, other: "Platform") -> bool:
        """Same os, architecture and (normalised) variant; os.version only if both set."""
        a, b = self.normalized(), other.normalized()
        if (a.os, a.architecture, a.variant) != (b.os, b.architecture, b.variant):
            return False
        return not (a.os_version and b.os_version and a.os_version != b.os_version)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_KNOWN_OSES = frozenset({
    "linux", "windows", "darwin", "freebsd", "netbsd", "openbsd", "solaris", "illumos",
    "aix", "android", "ios", "plan9", "dragonfly", "js", "wasip1"})


def select_platform(children: Sequence["Descriptor"], wanted: Platform) -> Optional["Descriptor"]:
    """The child that best serves ``wanted``, following the variant chain; None if none."""
    images = [c for c in children if c.platform is not None and not c.platform.is_attestation
              and c.media_type not in INDEX_MEDIA_TYPES]
    for candidate in wanted.candidates():
        for child in images:
            if child.platform is not None and child.platform.matches(candidate):
                return child
    return None


# =====================================================================================
# Descriptor and manifests
#
# Frozen value types read from JSON. Unknown fields are kept in ``extra`` and written
# back, so nothing another tool put there is lost. Manifest bytes are never
# re-serialised: these types are for reading; blobs keep the bytes they arrived with.
# =====================================================================================

_DESCRIPTOR_KEYS = frozenset({"mediaType", "size", "digest", "data", "urls", "annotations",
                              "platform", "artifactType"})


_NOTHING: Mapping[str, Any] = MappingProxyType({})  # immutable: one for every empty extra


def _freeze(mapping: Optional[Mapping[str, Any]]) -> Mapping[str, Any]:
    # A dict is asked first: the ABC check of typing.Mapping is slow, and this runs twice
    # for every descriptor built.
    if mapping is not None and type(mapping) is not dict and not isinstance(mapping, Mapping):
        raise OciCacheError(f"expected a JSON object, not {type(mapping).__name__}")
    return MappingProxyType(dict(mapping or {}))


@_value_type
class Descriptor:
    """An OCI content descriptor: media type, digest and size, plus optional fields."""

    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = _field(default_factory=dict)
    platform: Optional[Platform] = None
    urls: Tuple[str, ...] = ()
    artifact_type: str = ""
    data: str = ""
    extra: Mapping[str, Any] = _field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", Digest.parse(self.digest))
        object.__setattr__(self, "annotations", _freeze(self.annotations))
        object.__setattr__(self, "extra", _freeze(self.extra))
        object.__setattr__(self, "urls", tuple(self.urls))
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise OciCacheError(f"descriptor {self.digest}: invalid size {self.size!r}")

    def __hash__(self) -> int:
        return hash((self.media_type, self.digest, self.size))

    @classmethod
    def from_json(cls, data: Any) -> "Descriptor":
        if not isinstance(data, dict):
            raise OciCacheError(f"a descriptor must be a JSON object, not {type(data).__name__}")
        try:
            platform = data.get("platform")
            annotations = data.get("annotations") or {}
            if not isinstance(annotations, dict) or not all(
                    isinstance(v, str) for v in annotations.values()):
                raise OciCacheError("annotations must map strings to strings")
            urls = data.get("urls") or ()
            if urls and (not isinstance(urls, list) or not all(isinstance(u, str) for u in urls)):
                raise OciCacheError("urls must be a list of strings")
            media_type = str(data.get("mediaType", ""))
            digest = Digest.parse(data.get("digest", ""))
            size = data.get("size", -1)
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise OciCacheError(f"descriptor {digest}: invalid size {size!r}")
            # Built directly, each field already what __post_init__ makes it: reading an
            # index.json of 20,000 names parses a descriptor per name, and manifests more.
            descriptor = object.__new__(cls)
            descriptor.__dict__.update(
                media_type=media_type, digest=digest, size=size,
                annotations=MappingProxyType(dict(annotations)),
                platform=Platform.from_json(platform) if isinstance(platform, dict) else None,
                urls=tuple(urls),
                artifact_type=str(data.get("artifactType", "")),
                data=str(data.get("data", "")),
                extra=_NOTHING if data.keys() <= _DESCRIPTOR_KEYS else MappingProxyType(
                    {k: v for k, v in data.items() if k not in _DESCRIPTOR_KEYS}))
            return descriptor
        except (TypeError, AttributeError) as e:
            raise OciCacheError(f"invalid descriptor: {e}") from None

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"mediaType": self.media_type, "size": self.size,
                               "digest": str(self.digest)}
        if self.data:
            out["data"] = self.data
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out.update(self.extra)
        return out

    @property
    def name(self) -> str:
        """The ``org.opencontainers.image.ref.name`` annotation, or ``""``."""
        return self.annotations.get(ANNOTATION_REF_NAME, "")

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES

    @property
    def is_attestation(self) -> bool:
        return self.platform is not None and self.platform.is_attestation

    def with_annotations(self, **changes: Optional[str]) -> "Descriptor":
        """A copy with annotations set (or removed, for a value of None)."""
        annotations = dict(self.annotations)
        for key, value in changes.items():
            key = _ANNOTATION_ALIASES.get(key, key)
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value
        return _replace(self, annotations=annotations)

    def named(self, name: str) -> "Descriptor":
        """A copy carrying ``name`` in both name annotations."""
        return self.with_annotations(ref_name=name, containerd_name=name)


_ANNOTATION_ALIASES = {"ref_name": ANNOTATION_REF_NAME,
                       "containerd_name": ANNOTATION_CONTAINERD_NAME}


_SURROGATE_ESCAPE = r"\\u[dD][89a-fA-F]"
# A parsed value costs 50 to 100 bytes of memory: 4 MiB of '{},' repeated made 1.4
# million objects, 96 MiB. Image documents spend tens of bytes on each value (a
# descriptor about 25, an SPDX relationship 30); one packed tighter than this is
# refused before it is parsed, which bounds a 4 MiB document to about 20 MiB.
_MIN_JSON_BYTES_PER_VALUE = 16


# JSON nested deeper than this is refused on every Python version. The decoder's own
# limit differs: up to 3.12 it is the recursion limit (about 1000), while 3.13's accepts
# documents far deeper than the json encoder (or any recursive reader) can walk again.
_JSON_MAX_DEPTH = 500


def _nested_deeper_than(obj: Any, limit: int) -> bool:
    """Whether decoded JSON nests arrays and objects more than ``limit`` levels deep;
    walked with a stack of its own, as the point is that recursion would not do."""
    # Level by level, in comprehensions: index.json of 20,000 names holds 40,000 objects.
    level = [obj] if isinstance(obj, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        level = [c for value in level for c in (
            value.values() if isinstance(value, dict) else value) if isinstance(c, (dict, list))]
    return False


def _parse_json(data: Union[bytes, str], what: str,
                error: Type[OciCacheError] = OciCacheError,
                packed: int = _MIN_JSON_BYTES_PER_VALUE) -> Any:
    """``data`` decoded as JSON, or ``error`` naming ``what``.

    Every document that comes from outside goes through here, so that nesting deeper
    than ``_JSON_MAX_DEPTH``, escaped lone surrogates (which decode but can never be
    written back as UTF-8) and documents packed with values (fewer than ``packed``
    bytes each) are refused like any other bad JSON."""
    # Checked as text, decoded once as json.loads would: a caller that hands over its
    # text (``_read_index_object``) never holds it beside its bytes and the objects too.
    if isinstance(data, str):  # as its UTF-8 would be read: a byte order mark skipped
        text = data[1:] if data.startswith("\ufeff") else data
    else:
        try:
            text = data.decode(json.detect_encoding(data), "surrogatepass")
        except ValueError as e:
            raise error(f"{what} is not valid JSON: {_shorten(_one_line(str(e)))}") from None
    size = len(text) if text.isascii() else len(text.encode(errors="surrogatepass"))
    too_deep = f"{what} is not valid JSON: nested more than {_JSON_MAX_DEPTH} levels deep"
    containers = text.count("{") + text.count("[")
    values = text.count(",") + containers  # an upper bound
    if values > size // packed + 1024:
        if re.search(r"(?:[\[{]\s*){%d}" % (_JSON_MAX_DEPTH + 1), text):
            raise error(too_deep)  # what it is, though packed too
        raise error(f"{what} is not valid JSON for an image document: it packs {values} "
                    f"values into {size} bytes (refused unparsed, to bound memory)")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise error(too_deep) from None
    except ValueError as e:
        raise error(f"{what} is not valid JSON: {_shorten(_one_line(str(e)))}") from None
    if containers > _JSON_MAX_DEPTH and _nested_deeper_than(obj, _JSON_MAX_DEPTH):
        raise error(too_deep)
    if re.search(_SURROGATE_ESCAPE, text):
        try:
            json.dumps(obj, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise error(f"{what} is not valid JSON: it escapes a lone UTF-16 surrogate"
                        ) from None
    return obj


def _json_bytes(obj: Any, **options: Any) -> bytes:
    """``obj`` as UTF-8 JSON; strings that are not Unicode (lone surrogates, which only
    the Python API can put there) are an error, not a crash half-way through a write."""
    try:
        return json.dumps(obj, ensure_ascii=False, **options).encode()
    except UnicodeEncodeError:
        raise OciCacheError("cannot write JSON holding a string that is not valid Unicode "
                            "(a lone surrogate)") from None


def _load_json_object(data: Union[bytes, str], what: str) -> Dict[str, Any]:
    obj = _parse_json(data, what)
    if not isinstance(obj, dict):
        raise OciCacheError(f"{what} is not a JSON object")
    return obj


class _UnusualIndex(Exception):
    """index.json is not one ``_IndexScan`` decodes an entry at a time: the caller decodes
    it whole (``Layout.index_object``), which accepts, refuses and says why as always."""


_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")  # json.decoder's own
_JSON_COMMA = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")


def _past_space(text: str, at: int) -> int:
    """Where the JSON whitespace at ``at`` in ``text`` ends."""
    match = _JSON_WHITESPACE.match(text, at)
    return match.end() if match else at


class _IndexScan:
    """index.json's text decoded one root entry at a time (20,000 decoded at once are 13
    MB, which ``rm`` held beside all it did), the rest of it into ``head``, as
    ``_load_json_object`` decodes it whole: the same entries and the same ``head`` (its
    ``manifests`` kept where it stood, with the value None), or ``_UnusualIndex`` for
    anything that decode would refuse and for what this does not take (a duplicate
    ``manifests``, one that is no array, an escaped surrogate, deep nesting).

    ``_UnusualIndex`` may come at any entry: a caller acts on none before the last."""

    def __init__(self, text: str) -> None:
        text = text[1:] if text.startswith("\ufeff") else text  # as _parse_json takes it
        size = len(text) if text.isascii() else len(text.encode(errors="surrogatepass"))
        values = text.count(",") + text.count("{") + text.count("[")
        if values > size // _MIN_JSON_BYTES_PER_VALUE + 1024 or \
                re.search(_SURROGATE_ESCAPE, text):
            raise _UnusualIndex()  # refused packed, or its surrogates checked whole
        self.text = text
        self.head: Dict[str, Any] = {}

    def _value(self, at: int, levels: int) -> Tuple[Any, int]:
        """The value at ``at`` and where it ends; nested no more than ``levels`` deep."""
        text = self.text
        try:
            value, end = _JSON_DECODER.raw_decode(text, at)
        except (ValueError, RecursionError):
            raise _UnusualIndex() from None
        # Counted first (a bracket in a string counts too): walked only when there are many.
        if end - at > levels and text.count("{", at, end) + text.count("[", at, end) > \
                levels and _nested_deeper_than(value, levels):
            raise _UnusualIndex()
        return value, end

    def _entries(self, at: int) -> Generator[Any, None, int]:
        """The entries from ``at`` on (``_value`` inlined: 20,000 of them), and where the
        array's "]" is."""
        scan = _JSON_DECODER.scan_once  # type: ignore[attr-defined]
        text, comma, levels = self.text, _JSON_COMMA.match, _JSON_MAX_DEPTH - 2
        while True:
            try:
                entry, end = scan(text, at)
            except (StopIteration, ValueError, RecursionError):
                raise _UnusualIndex() from None
            if end - at > levels and text.count("{", at, end) + text.count(
                    "[", at, end) > levels and _nested_deeper_than(entry, levels):
                raise _UnusualIndex()
            yield entry
            match = comma(text, end)
            if match is None:
                at = _past_space(text, end)
                if not text.startswith("]", at):
                    raise _UnusualIndex()
                return at
            at = match.end()

    def entries(self) -> Iterator[Any]:
        """Each entry of ``manifests`` as decoded, in order; ``head`` is complete after
        the last."""
        text, space = self.text, _past_space
        at = space(text, 0)
        if not text.startswith("{", at):
            raise _UnusualIndex()
        at = space(text, at + 1)
        seen = False
        while not text.startswith("}", at):  # a member: "key": value
            if not text.startswith('"', at):
                raise _UnusualIndex()
            key, at = self._value(at, 0)
            at = space(text, at)
            if not text.startswith(":", at):
                raise _UnusualIndex()
            at = space(text, at + 1)
            if key != "manifests":
                self.head[key], at = self._value(at, _JSON_MAX_DEPTH - 1)
            elif seen or not text.startswith("[", at):  # (of two, the last would count)
                raise _UnusualIndex()
            else:
                seen, self.head[key] = True, None
                at = space(text, at + 1)
                if not text.startswith("]", at):
                    at = yield from self._entries(at)
                at += 1
            at = space(text, at)
            if text.startswith(",", at):
                at = space(text, at + 1)
                if text.startswith("}", at):  # a trailing comma, which json refuses
                    raise _UnusualIndex()
            elif not text.startswith("}", at):
                raise _UnusualIndex()
        if space(text, at + 1) != len(text):
            raise _UnusualIndex()


_JSON_DECODER = json.JSONDecoder()  # json.loads's own (no options)


@_value_type
class Index:
    """An OCI image index or Docker manifest list."""

    media_type: str
    manifests: Tuple[Descriptor, ...]
    annotations: Mapping[str, str] = _field(default_factory=dict)
    extra: Mapping[str, Any] = _field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifests", tuple(self.manifests))
        object.__setattr__(self, "annotations", _freeze(self.annotations))
        object.__setattr__(self, "extra", _freeze(self.extra))

    @classmethod
    def from_json(cls, data: Union[bytes, Mapping[str, Any]], what: str = "index") -> "Index":
        obj = _load_json_object(data, what) if isinstance(data, bytes) else dict(data)
        manifests = obj.get("manifests") or []
        if not isinstance(manifests, list):
            raise OciCacheError(f"{what}: 'manifests' is not a list")
        return cls(
            media_type=str(obj.get("mediaType", "")),
            manifests=tuple(Descriptor.from_json(m) for m in manifests),
            annotations=obj.get("annotations") or {},
            extra={k: v for k, v in obj.items()
                   if k not in ("schemaVersion", "mediaType", "manifests", "annotations")},
        )

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"schemaVersion": 2}
        if self.media_type:
            out["mediaType"] = self.media_type
        out["manifests"] = [m.to_json() for m in self.manifests]
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        out.update(self.extra)
        return out

    def to_bytes(self) -> bytes:
        """Compact JSON, as linuxkit writes the indexes it makes (stable digests)."""
        return _json_bytes(self.to_json(), separators=(",", ":"))

    def attestations_for(self, digest: Digest) -> List[Descriptor]:
        return [m for m in self.manifests
                if m.annotations.get(ANNOTATION_REFERENCE_DIGEST) == str(digest)]


@_value_type
class Manifest:
    """An OCI image manifest or Docker schema 2 manifest."""

    media_type: str
    config: Descriptor
    layers: Tuple[Descriptor, ...]
    annotations: Mapping[str, str] = _field(default_factory=dict)
    subject: Optional[Descriptor] = None

    @classmethod
    def from_json(cls, data: Union[bytes, Mapping[str, Any]], what: str = "manifest") -> "Manifest":
        obj = _load_json_object(data, what) if isinstance(data, bytes) else dict(data)
        media_type = str(obj.get("mediaType", ""))
        if media_type in (MEDIA_DOCKER_SCHEMA1, MEDIA_DOCKER_SCHEMA1_SIGNED) or \
                obj.get("schemaVersion") == 1:
            raise OciCacheError(f"{what}: Docker schema 1 manifests are not supported")
        if "config" not in obj:
            raise OciCacheError(f"{what}: not an image manifest (no config)")
        layers = obj.get("layers") or []
        if not isinstance(layers, list):
            raise OciCacheError(f"{what}: 'layers' is not a list")
        subject = obj.get("subject")
        return cls(
            media_type=media_type,
            config=Descriptor.from_json(obj["config"]),
            layers=tuple(Descriptor.from_json(layer) for layer in layers),
            annotations=_freeze(obj.get("annotations")),
            subject=Descriptor.from_json(subject) if isinstance(subject, dict) else None,
        )

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type,
                               "config": self.config.to_json(),
                               "layers": [layer.to_json() for layer in self.layers]}
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.subject is not None:
            out["subject"] = self.subject.to_json()
        return out

    def to_bytes(self) -> bytes:
        return _json_bytes(self.to_json(), separators=(",", ":"))

    def blobs(self) -> List[Descriptor]:
        """Config and layers: the blobs an image needs besides its manifest."""
        return [self.config, *self.layers]


DOCUMENT_MEDIA_TYPES = INDEX_MEDIA_TYPES | IMAGE_MEDIA_TYPES
_SCHEMA1_MEDIA_TYPES = frozenset({MEDIA_DOCKER_SCHEMA1, MEDIA_DOCKER_SCHEMA1_SIGNED})


def read_document(data: bytes, label: str,
                  what: str = "blob") -> Tuple[str, Union[Index, Manifest, None]]:
    """What a blob in a manifest's place (a root, an index's child) is,
    decided by its bytes: ``(media type, parsed index or manifest)``, or ``("", None)``
    for any other blob (an in-toto statement, an artifact).

    A document's own ``mediaType`` wins (another type than an index's or an image
    manifest's makes it a leaf of that type); one without it is an index when it lists
    ``manifests`` and an image manifest when its ``config`` is a descriptor. The label
    (the descriptor's mediaType) only picks between an OCI and a Docker type of the
    same kind; a label promising an index or manifest that bytes saying nothing about
    themselves are not is an error.

    The label is never believed over the bytes: linuxkit's ``cache export --format
    oci`` labels a single manifest as an index, other tools write
    ``application/vnd.oci.descriptor.v1+json``. Everything that follows a descriptor
    to a document (reachability, gc, verify, name resolution, import, export, push)
    decides through this function, so they cannot disagree; ``label_problem`` says
    whether the label was right.
    """
    try:
        obj = _parse_json(data, what)
    except OciCacheError:
        if label in DOCUMENT_MEDIA_TYPES:
            raise
        return "", None
    declared = obj.get("mediaType", "") if isinstance(obj, dict) else None
    if not isinstance(declared, str):
        if label in DOCUMENT_MEDIA_TYPES:
            raise OciCacheError(f"{what} is labelled {_shorten(_one_line(label))} but is "
                                "not a JSON object with a string mediaType")
        return "", None
    assert isinstance(obj, dict)
    kind = ""
    if declared in DOCUMENT_MEDIA_TYPES or declared in _SCHEMA1_MEDIA_TYPES:
        kind = declared
    elif not declared and isinstance(obj.get("manifests"), list):
        kind = label if label in INDEX_MEDIA_TYPES else MEDIA_OCI_INDEX
    elif not declared and isinstance(obj.get("config"), dict) and "digest" in obj["config"]:
        kind = label if label in IMAGE_MEDIA_TYPES else MEDIA_OCI_MANIFEST
    elif not declared and obj.get("schemaVersion") == 1 and "fsLayers" in obj:
        kind = MEDIA_DOCKER_SCHEMA1
    if kind in INDEX_MEDIA_TYPES:
        return kind, Index.from_json(obj, what)
    if kind:
        return kind, Manifest.from_json(obj, what)  # schema 1 is refused there
    if declared:
        return declared, None  # it says what else it is (an artifact): a leaf
    if label in DOCUMENT_MEDIA_TYPES:
        raise OciCacheError(f"{what} is labelled {label} but is neither an image manifest "
                            "nor an index")
    return "", None


def label_problem(descriptor: Descriptor, media_type: str) -> str:
    """Why ``descriptor``'s label is wrong for a blob ``read_document`` found to be
    ``media_type`` ("" when it is right, or when the blob is not a document). The OCI
    and the Docker type of one kind stand for each other: readers accept either, and
    real layouts mix them (go-containerregistry's test layouts label Docker manifests
    as OCI ones)."""
    if not media_type or descriptor.media_type == media_type:
        return ""
    for kind in (IMAGE_MEDIA_TYPES, INDEX_MEDIA_TYPES):
        if descriptor.media_type in kind and media_type in kind:
            return ""
    label = _shorten(_one_line(descriptor.media_type)) or "(no media type)"
    return f"is labelled {label} but is {_shorten(_one_line(media_type))}"


def _promised_digest(name: str) -> Optional[Digest]:
    """The digest a root entry's name pins (``repo:tag@sha256:...``), if any."""
    if "@" not in name:  # no digest without one: not parsed (reachable asks every name)
        return None
    try:
        return Reference.parse(name, default_tag="").digest
    except (InvalidReferenceError, InvalidDigestError):
        return None  # linuxkit writes names no reference parses (``...@sha256:...-amd64``)


def name_problem(entry: Descriptor) -> str:
    """Why a root entry breaks its name's promise: a digest in a name is the digest of
    the entry's content, on every write, lookup and verify ("" when it keeps it)."""
    promised = _promised_digest(entry.name)
    if promised is None or promised == entry.digest:
        return ""
    return f"the name pins {promised}, but its entry is {entry.digest}"


def _is_foreign(descriptor: Descriptor) -> bool:
    return descriptor.media_type in FOREIGN_LAYER_MEDIA_TYPES


def _platform_key(descriptor: Descriptor) -> Optional[Tuple[str, str, str, str]]:
    """What ``index_write`` replaces by: the normalised platform; None for attestations."""
    if descriptor.platform is None or descriptor.is_attestation:
        return None
    p = descriptor.platform.normalized()
    return (p.os, p.architecture, p.variant, p.os_version)


def merge_index(existing: Index, incoming: Sequence[Descriptor]) -> Index:
    """linuxkit's IndexWrite merge, made deterministic.

    A child whose normalised platform matches an incoming descriptor is replaced in
    place; new platforms follow in the order given, then incoming attestations. Each
    digest is kept once, and attestations whose image is no longer listed are dropped.
    """
    replacing: Dict[Tuple[str, str, str, str], Descriptor] = {}
    attestations: List[Descriptor] = []
    for descriptor in incoming:
        key = _platform_key(descriptor)
        if key is None:
            attestations.append(descriptor)
        else:
            replacing[key] = descriptor
    merged: List[Descriptor] = []
    for child in existing.manifests:
        key = _platform_key(child)
        merged.append(replacing.pop(key) if key is not None and key in replacing else child)
    merged.extend(replacing.values())
    merged.extend(attestations)
    unique: List[Descriptor] = []
    seen = set()
    for descriptor in merged:
        if descriptor.digest not in seen:
            seen.add(descriptor.digest)
            unique.append(descriptor)
    digests = {str(d.digest) for d in unique}
    kept = [d for d in unique
            if d.annotations.get(ANNOTATION_REFERENCE_DIGEST, "") in digests
            or ANNOTATION_REFERENCE_DIGEST not in d.annotations]
    return _replace(existing, manifests=tuple(kept))


def _is_real_platform(descriptor: Descriptor) -> bool:
    p = descriptor.platform
    return p is not None and p.architecture not in ("", "unknown") and not p.is_attestation


def without_dangling_attestations(index: Index) -> Index:
    """The index without attestations whose image is not one of its platform children."""
    images = {str(c.digest) for c in index.manifests if _is_real_platform(c)}
    kept = [c for c in index.manifests
            if not (c.is_attestation and c.annotations.get(ANNOTATION_REFERENCE_DIGEST, "")
                    not in images)]
    return _replace(index, manifests=tuple(kept))


def merge_remote_index(local: Index, remote: Index) -> Index:
    """linuxkit's push merge: the local index first, then the remote platforms it lacks
    and their attestations; dangling attestations dropped."""
    local_digests = {c.digest for c in local.manifests}
    if local_digests <= {c.digest for c in remote.manifests}:
        return without_dangling_attestations(remote)
    merged = list(local.manifests)
    keys = {_platform_key(c) for c in merged if _is_real_platform(c)}
    for child in remote.manifests:
        if _is_real_platform(child) and _platform_key(child) not in keys and \
                child.digest not in {c.digest for c in merged}:
            merged.append(child)
    digests = {str(c.digest) for c in merged}
    for child in remote.manifests:
        if child.is_attestation and child.digest not in {c.digest for c in merged} and \
                child.annotations.get(ANNOTATION_REFERENCE_DIGEST, "") in digests:
            merged.append(child)
    return without_dangling_attestations(_replace(local, manifests=tuple(merged)))


# -- referrers (OCI 1.1) ----------------------------------------------------------------
#
# A referrer is a manifest whose ``subject`` names another manifest: a signature, an
# SBOM, an attestation attached to an image after the fact. A registry with the
# referrers API lists them (``GET /v2/<repo>/referrers/<digest>``, an index of their
# descriptors); one without it (distribution 2.8, Docker Hub, GHCR) is given the same
# index by the clients themselves, under the tag ``<algorithm>-<hex>`` of the subject
# (the distribution spec's "referrers tag schema", which oras, regclient and cosign
# write and read).

MAX_REFERRERS = 10_000  # descriptors one subject's list may hold, over every page
_MAX_REFERRER_PAGES = 1000  # pages of one referrers list: an endless one stops in seconds


def referrers_tag(digest: Union[str, Digest]) -> str:
    """The fallback tag listing ``digest``'s referrers: ``sha256-<hex>`` (the algorithm
    cut to 32 characters and the hex to 64, as the spec says, so the tag is valid)."""
    parsed = Digest.parse(digest)
    return f"{parsed.algorithm[:32]}-{parsed.hex[:64]}"


def is_referrers_tag(tag: str) -> bool:
    """Whether ``tag`` has the form of a fallback tag (``referrers_tag``)."""
    return re.fullmatch(r"[a-z0-9]{1,32}-[0-9a-f]{64}", tag) is not None


def _document_subject(obj: Mapping[str, Any]) -> Optional[Descriptor]:
    subject = obj.get("subject")
    return Descriptor.from_json(subject) if isinstance(subject, dict) else None


def referrer_descriptor(data: bytes, media_type: str, what: str = "referrer"
                        ) -> Tuple[Descriptor, Optional[Descriptor]]:
    """A manifest (or index) as a referrers list holds it, and its subject (None when
    it has none). The list's entry carries the document's ``artifactType`` (for an
    image manifest without one, its config's media type) and its annotations, as the
    spec asks, so that a client can filter without fetching each referrer."""
    obj = _load_json_object(data, what)
    kind = str(obj.get("mediaType") or media_type)
    artifact_type = obj.get("artifactType")
    if not isinstance(artifact_type, str) or not artifact_type:
        config = obj.get("config")
        artifact_type = str(config.get("mediaType") or "") \
            if isinstance(config, dict) and kind not in INDEX_MEDIA_TYPES else ""
    annotations = obj.get("annotations")
    if not isinstance(annotations, dict) or not all(
            isinstance(v, str) for v in annotations.values()):
        annotations = {}
    descriptor = Descriptor(kind, Digest.from_bytes(data), len(data),
                            annotations=annotations, artifact_type=artifact_type)
    return descriptor, _document_subject(obj)


def parse_referrers(data: bytes, what: str) -> List[Descriptor]:
    """The descriptors of a referrers list (the API's answer or the fallback tag's
    index): it must be an index, each entry a valid descriptor; each digest once."""
    obj = _load_json_object(data, what)
    declared = obj.get("mediaType")
    if (declared and declared not in INDEX_MEDIA_TYPES) or \
            not isinstance(obj.get("manifests"), list):
        kind = declared if isinstance(declared, str) and declared else \
            "a manifest" if "config" in obj or "layers" in obj else "no index"
        raise OciCacheError(f"{what} is {_shorten(_one_line(str(kind)))}, not an index of "
                            "referrers")
    entries = obj["manifests"]
    if len(entries) > MAX_REFERRERS:
        raise OciCacheError(f"{what} lists {len(entries)} referrers, more than "
                            f"{MAX_REFERRERS}")
    found: Dict[Digest, Descriptor] = {}
    for number, entry in enumerate(entries, 1):
        try:
            descriptor = Descriptor.from_json(entry)
        except OciCacheError as e:
            raise OciCacheError(f"{what}: entry {number} is not a valid descriptor: "
                                f"{_shorten(_one_line(str(e)), 160)}") from None
        found.setdefault(descriptor.digest, descriptor)
    return list(found.values())


def _lists_subject(headers: "_Headers", subject: Digest) -> bool:
    """Whether a registry answered the PUT of a manifest with ``subject`` saying it lists
    it in its referrers itself: ``OCI-Subject`` naming that subject. A header naming
    another digest says nothing about this one (the fallback tag is written)."""
    return (headers.get("OCI-Subject") or "").strip() == str(subject)


def _bounded_referrers(data: bytes, what: str) -> bytes:
    """``data``, a referrers list about to be written, when its readers will take it:
    the fallback tag, the cache's name (read whole, at most MAX_MANIFEST_SIZE bytes)."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise OciCacheError(f"{what} would be {len(data)} bytes, more than {MAX_MANIFEST_SIZE} "
                            "bytes (what a list may be to be read); not writing it")
    return data


def with_referrer(existing: Optional[bytes], referrer: Descriptor, what: str) -> Optional[bytes]:
    """The fallback tag's index with ``referrer`` added (read-modify-write: every entry
    already there is kept, as written); None when it lists it already. A list it would
    make that no reader takes (over MAX_REFERRERS entries or MAX_MANIFEST_SIZE bytes)
    is an error."""
    if existing is None:
        return _bounded_referrers(Index(MEDIA_OCI_INDEX, (referrer,)).to_bytes(), what)
    listed = parse_referrers(existing, what)
    if any(d.digest == referrer.digest for d in listed):
        return None
    if len(listed) >= MAX_REFERRERS:  # one more and every reader (parse_referrers) refuses it
        raise OciCacheError(f"{what} already lists {MAX_REFERRERS} referrers; not adding "
                            f"{referrer.digest}")
    obj = _load_json_object(existing, what)
    obj["manifests"] = [*obj["manifests"], referrer.to_json()]
    obj.setdefault("mediaType", MEDIA_OCI_INDEX)
    return _bounded_referrers(_json_bytes(obj, separators=(",", ":")), what)


# =====================================================================================
# Layout
#
# The cache on disk: ``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>`` and ``.lock``.
# Blobs are written to a temporary file beside their final name, verified, fsynced and
# renamed; ``index.json`` is replaced atomically under an exclusive lock on ``.lock``
# (``flock`` and linuxkit's POSIX record lock) that is reentrant within a process and
# safe across threads. Names are written last, after a
# check (under the lock) that every blob they need is present, so no name ever points
# at missing content, whatever runs at the same time.
# =====================================================================================

_OCI_LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'
_EMPTY_INDEX_BYTES = (
    b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",'
    b'"manifests":[]}')
# index.json is written compact, as the C encoder writes it: with an indent json falls
# back to its pure-Python encoder, a third of a second for 20,000 names. linuxkit reads
# it with Go's encoding/json and its tests with jq, so any valid JSON does.
_INDEX_SEPARATORS = (",", ":")


_CREATE_MODE = 0o666  # the umask decides: 0644 for one user, 0664 in a group-shared cache
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


DEFAULT_LOCK_TIMEOUT_SECONDS = 600.0  # $OCICACHE_LOCK_TIMEOUT overrides it


def _lock_timeout() -> float:
    value = os.environ.get("OCICACHE_LOCK_TIMEOUT", "")
    try:
        return max(0.0, float(value)) if value else DEFAULT_LOCK_TIMEOUT_SECONDS
    except ValueError:
        raise OciCacheError(f"OCICACHE_LOCK_TIMEOUT={value!r} is not a number of seconds") \
            from None


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _record_lock(fd: int, kind: int) -> bool:
    """linuxkit's lock: a whole-file POSIX write lock on ``.lock`` (``util.Lock`` in
    src/cmd/linuxkit/util/filelock_unix.go: ``fcntl(F_SETLKW, F_WRLCK)``), which
    ``flock`` does not exclude on Linux. There it is taken as an open-file-description
    lock: that conflicts with linuxkit's record lock, but belongs to this descriptor, not
    to the process, so no other ``close()`` of the file in this process can drop it.
    Elsewhere it is a classic record lock (``lockf``), which any close of ``.lock`` by
    this process drops: ``_DirectoryLock`` is the only code that opens that file.
    Never blocks; False when another process holds the lock.
    """
    import struct
    if sys.platform.startswith("linux"):
        command = getattr(fcntl, "F_OFD_SETLK", 37)  # Linux's value, where Python lacks it
        try:  # struct flock: type, whence, start, length 0 = the whole file, pid 0
            fcntl.fcntl(fd, command, struct.pack("@hhqqi", kind, os.SEEK_SET, 0, 0, 0))
            return True
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            if e.errno != errno.EINVAL:  # EINVAL: a kernel before 3.15, without OFD locks
                raise
    operation = {fcntl.F_WRLCK: fcntl.LOCK_EX, fcntl.F_UNLCK: fcntl.LOCK_UN}[kind]
    try:
        fcntl.lockf(fd, operation if kind == fcntl.F_UNLCK else operation | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _lock_holders(fd: int) -> str:
    """Who holds a lock on the file open as ``fd``, from /proc/locks (Linux), or ""."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks", "rb") as f:
            lines = f.read(1 << 20).decode("ascii", "replace").splitlines()
    except OSError:
        return ""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders: List[str] = []
    for line in lines:
        # "1: POSIX  ADVISORY  WRITE 4321 08:01:1234 0 EOF"; a waiter's line has "->"
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->" or fields[5] != key:
            continue
        pid = fields[4]
        if not pid.isdigit() or pid == str(os.getpid()):
            continue  # an open-file-description lock names no process (ocicache's flock does)
        try:
            with open(f"/proc/{pid}/comm", "rb") as f:
                command = f.read(64).decode("utf-8", "replace").strip()
        except OSError:
            command = ""
        holder = f"process {pid} ({_one_line(command)})" if command else f"process {pid}"
        if holder not in holders:
            holders.append(holder)
    return ", ".join(holders)


_LOCK_QUIET_SECONDS = 1.0  # a wait this short is ordinary sharing, not worth a line


def _wait_for_lock(fd: int, take: Callable[[], bool], what: str) -> None:
    """Call ``take`` until it gets the lock. A wait longer than a second says on the log
    what it waits for, and after ``$OCICACHE_LOCK_TIMEOUT`` seconds it gives up with an
    error. It polls: neither ``flock`` nor ``fcntl`` can wait with a timeout."""
    if take():
        return
    timeout = _lock_timeout()
    start = time.monotonic()
    said = False
    pause = 0.001
    while not take():
        waited = time.monotonic() - start
        if waited >= timeout or (not said and waited >= _LOCK_QUIET_SECONDS):
            holders = _lock_holders(fd)
            held = f", held by {holders}" if holders else ""
            if waited >= timeout:
                raise OciCacheError(
                    f"gave up after {timeout:g} s waiting for {what}{held}; if that process "
                    "is stuck, stop it (OCICACHE_LOCK_TIMEOUT sets how long to wait)")
            _log().warning("waiting for %s%s (giving up after %g s)", what, held, timeout)
            said = True
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class _DirectoryLock:
    """An exclusive lock on one file, shared by every thread of this process.

    One instance per lock file per process (see ``_lock_for``): a thread that holds it
    may take it again; other threads of the process wait on the ``RLock``; other
    processes wait on the ``flock`` (ocicache) and on the record lock (linuxkit, see
    ``_record_lock``). Every taker takes ``flock`` first, so ocicache processes queue on
    it and never hold the record lock while waiting for each other.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd = -1

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                fd = self._open()
                try:
                    self._take(fd)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fd, self._fd = self._fd, -1
                    try:  # explicitly: a forked child may still share this descriptor
                        _record_lock(fd, fcntl.F_UNLCK)
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    finally:
                        os.close(fd)

    def _open(self) -> int:
        """The lock file, created if missing; a link, a FIFO, a directory or a file with
        other names planted there (at any time: the cache's group may write its
        directory) is refused in one line, never opened through or locked instead."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK,
                         _CREATE_MODE)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise OciCacheError(f"cannot lock {self.path}: {e.strerror or e}") from None
            raise _not_ours(self.path, self.path, None, "a regular file") from None
        try:
            held = os.fstat(fd)
            if not stat.S_ISREG(held.st_mode):
                raise _not_ours(self.path, self.path, None, "a regular file")
            if held.st_nlink != 1:
                raise OciCacheError(f"{self.path} has other names (a hard link); ocicache "
                                    "locks only a file of its own (remove it)")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _take(self, fd: int) -> None:
        flocked = False

        def take() -> bool:
            nonlocal flocked
            flocked = flocked or _try_flock(fd, fcntl.LOCK_EX)
            return flocked and _record_lock(fd, fcntl.F_WRLCK)

        _wait_for_lock(fd, take, f"the lock on {self.path}")


_LOCKS: Dict[str, _DirectoryLock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(path: str) -> _DirectoryLock:
    # The directory's real path, so that every spelling of a cache shares one lock; the
    # file's own name is never resolved: a link planted there is refused, not followed.
    key = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = _DirectoryLock(key)
        return lock


def _forget_locks_after_fork() -> None:
    # A forked child does not hold its parent's flock; start it with fresh lock state.
    global _LOCKS_GUARD
    _LOCKS.clear()
    _LOCKS_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_locks_after_fork)


# Every temporary file in the cache is named <final name>.tmp-<suffix>: random letters,
# or "partial" for a download that can be resumed: ``<hex>.tmp-*`` and ``blob.tmp-*`` in
# blobs, ``.index.json.tmp-*`` and ``.oci-layout.tmp-*`` in the cache. linuxkit's are
# ggcr's layout.writeBlob (pkg/v1/layout/write.go), ``os.CreateTemp(dir, hex)``: the
# 64-hex digest, then a random decimal number. One predicate recognises them all, for
# verify and for gc to remove the stale ones (a crash or a SIGKILL leaves them behind).
_PARTIAL_SUFFIX = _TEMP_MARK + "partial"
_OWN_TEMPORARY = r"(?:[0-9a-f]{64}|[0-9a-f]{128}|blob)\.tmp-[A-Za-z0-9_]+"
# Each file ocicache replaces in the cache's own directory: the temporary file of any
# of them that a kill or a crash left there is gc's to remove, the hints' as index.json's.
_ROOT_FILES = ("index.json", "oci-layout", SUMMARIES_FILE, _LOCATIONS_FILE, _CHECKED_FILE)
_ROOT_TEMPORARY = r"\.(?:%s)\.tmp-[A-Za-z0-9_]+" % "|".join(map(re.escape, _ROOT_FILES))
_LINUXKIT_TEMPORARY = r"[0-9a-f]{64}[0-9]{1,10}"


def _is_temporary(algorithm: str, name: str) -> bool:
    """Whether ``name`` in ``blobs/<algorithm>`` (the cache itself for "") is a temporary
    file ocicache or linuxkit writes."""
    if not algorithm:
        return re.fullmatch(_ROOT_TEMPORARY, name) is not None
    if algorithm == "sha256" and re.fullmatch(_LINUXKIT_TEMPORARY, name):
        return True
    return re.fullmatch(_OWN_TEMPORARY, name) is not None and \
        len(name.partition(".")[0]) in (4, _DIGEST_HEX_LENGTHS.get(algorithm, 0))


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What a write itself can fail with; other OSErrors met while writing (a corrupt gzip
# stream being read, a refused connection) are not the file's, and pass unchanged.
_WRITE_ERRNOS = _FULL_ERRNOS | {errno.EFBIG, errno.EIO, errno.EROFS}


def _is_write_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _WRITE_ERRNOS


class _DiskFullError(OciCacheError):
    """A write found its filesystem full (a pull then drops its partial files)."""


def _disk_error(path: str, error: OSError, frees: str) -> OciCacheError:
    """One line for an error writing ``path``; for a full disk, ``frees`` says what helps."""
    reason = error.strerror or str(error)
    if error.errno in _FULL_ERRNOS:
        return _DiskFullError(f"cannot write {path}: {reason}; {frees}")
    return OciCacheError(f"cannot write {path}: {reason}")


_CACHE_FULL = ("free space on its filesystem ('ocicache gc --grace 0' deletes unused blobs "
               "and partial downloads, 'ocicache rm NAME' an image)")


def _write_all(fd: int, data: Union[bytes, memoryview]) -> None:
    """Write every byte of ``data`` or raise: ``os.write`` may write less, as it does
    when a disk fills up (the next call then fails with ENOSPC)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if not written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _not_ours(where: str, name: str, dir_fd: Optional[int], kind: str) -> OciCacheError:
    """The one line for an entry of the cache that is not the ``kind`` it must be: a
    link or something else planted there (after the checks of ``Layout``, too)."""
    try:
        link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        link = False
    if link:
        return OciCacheError(f"{where} is a symbolic link; ocicache never follows links "
                             "inside its cache (remove it)")
    return OciCacheError(f"{where} is not {kind}; remove it")


def _open_directory(name: str, dir_fd: Optional[int] = None, where: str = "") -> int:
    """A directory inside the cache, never reached through a symbolic link: one that is
    a link (or no directory) is refused, naming ``where``."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=dir_fd)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        raise CorruptCacheError(f"{where or name} is a symbolic link or not a directory; "
                                "ocicache never follows a link inside its cache") from None


def _open_regular(name: str, flags: int = os.O_RDONLY, dir_fd: Optional[int] = None,
                  where: str = "") -> int:
    """Open a file of the cache, never through a symbolic link, and check with ``fstat``
    that it is a regular file before a byte is read or written (a FIFO would block, a
    device would be written). ``where`` is the path that messages name."""
    where = where or name
    try:
        fd = os.open(name, flags | _NOFOLLOW | os.O_NONBLOCK, _CREATE_MODE, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OciCacheError(f"{where} is a symbolic link; ocicache never follows links "
                                "inside its cache (remove it)") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OciCacheError(f"{where} is not a regular file; remove it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


# A new file is created exclusively, so nothing planted under its name (a link,
# another's file) is ever written to.
_NEW_FILE = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW


def _temporary_name(final: str) -> str:
    return f"{final}{_TEMP_MARK}{os.urandom(8).hex()}"


def _create_temporary(dir_fd: int, final: str, mode: int = _CREATE_MODE) -> Tuple[int, str]:
    """A new, empty temporary file beside ``final`` in ``dir_fd``."""
    while True:
        name = _temporary_name(final)
        try:
            return os.open(name, _NEW_FILE, mode, dir_fd=dir_fd), name
        except FileExistsError:
            continue


def _write_file_atomically(dir_fd: int, name: str, data: Union[bytes, Iterable[bytes]],
                           mode: int = _CREATE_MODE, durable: bool = True,
                           sync_directory: bool = True) -> None:
    """Write ``data`` (or its pieces, made as written) to a new temporary file beside
    ``name`` in ``dir_fd``, fsync, and rename it over ``name`` (a rename replaces a link;
    it never writes through one).
    A hint that a crash may lose (``durable=False``, a file read only if it parses) is
    not fsynced: two fsyncs are most of what writing it costs. Without
    ``sync_directory`` the file is fsynced but its name reaches the disk with the
    directory's next fsync: for a file whose loss a crash may cost (never its bytes)."""
    fd, temp = _create_temporary(dir_fd, f".{name}", mode)
    try:
        try:
            for piece in (data,) if isinstance(data, bytes) else data:
                _write_all(fd, piece)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    if durable and sync_directory:
        os.fsync(dir_fd)


class _PendingBlob:
    """A blob being written under a temporary name (a download's partial file, open and
    locked: see ``Layout.partial_blob``); ``commit`` gives it its final name, and tells
    ``named`` the status of the file then."""

    def __init__(self, fd: int, directory: int, name: str, final: str, where: str,
                 named: Callable[[os.stat_result], None]) -> None:
        self.fd = fd
        self._directory = directory
        self._name = name
        self._final = final
        self.where = where
        self._named = named

    def commit(self, size: int) -> None:
        """Give the verified content its final name, once its size on disk is right and
        the name is still this file's."""
        held = os.fstat(self.fd)
        if held.st_size != size:
            raise OciCacheError(f"{self.where} holds {held.st_size} bytes, not {size}; "
                                "not renamed")
        named = os.stat(self._name, dir_fd=self._directory, follow_symlinks=False)
        if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            raise OciCacheError(f"{self.where} was replaced while it was written; not renamed")
        os.fsync(self.fd)
        try:
            os.replace(self._name, self._final, src_dir_fd=self._directory,
                       dst_dir_fd=self._directory)
        except OSError as e:
            if _is_write_error(e):
                raise
            final = os.path.join(os.path.dirname(self.where), self._final)
            raise OciCacheError(f"cannot name {final}: {e.strerror or e}; remove what is "
                                "there") from None
        self._named(os.fstat(self.fd))
        # The rename reaches the disk with the directory's next fsync: one per directory
        # before a name is written (``Layout.sync_blob_directories``), not one per blob
        # (half the fsyncs of a pull of 500 small layers).


class _Reachable:
    """What a walk from some root entries found (see ``Layout.reachable``)."""

    def __init__(self, owners: Mapping[Digest, Union[str, Mapping[str, None]]],
                 missing: Tuple[str, ...], unreadable: Tuple[str, ...], wrong: Tuple[str, ...],
                 absent: int = 0) -> None:
        self._owners = owners   # digest -> the name that reaches it, or the names (keys)
        self.digests = {d: n if type(n) is str else next(iter(n)) for d, n in owners.items()}
        self.missing = missing          # needed and absent
        self.absent = absent            # how many blobs were absent when the walk met them,
                                        # needed or not (then not followed)
        self.unreadable = unreadable    # a document that cannot be read as what it is
        self.wrong = wrong              # a descriptor that disagrees with its blob or name

    def owners(self, digest: Digest) -> Tuple[str, ...]:
        """The names that reach ``digest``, in the order found (none if none does); asked
        of a few blobs (verify's corrupt ones), so not made for each (40,000 tuples)."""
        names = self._owners.get(digest, ())
        return (names,) if type(names) is str else tuple(names)


@_value_type
class GcReport:
    """What ``gc`` deleted (or would delete, with ``dry_run``)."""

    deleted: Tuple[Tuple[str, int], ...]   # (digest or temporary file name, bytes)
    kept_young: int                        # unreachable but inside the grace period
    reachable: int

    @property
    def freed_bytes(self) -> int:
        return sum(size for _, size in self.deleted)


@_value_type
class VerifyReport:
    """What ``verify`` found: ``ok`` when nothing is corrupt, missing or wrong."""

    checked: int
    corrupt: Tuple[str, ...]          # "<digest> (needed by <names>): <why>"
    missing: Tuple[str, ...]          # "<digest> (needed by <names>)"
    wrong: Tuple[str, ...] = ()       # "<digest> (needed by <names>): <why>": a size, media
                                      # type or pinned digest disagrees with the content
    repaired: Tuple[str, ...] = ()    # corrupt blobs deleted by verify(repair=True)

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing and not self.wrong


def _only_ours(st: os.stat_result) -> bool:
    """Whether only this user or root may change the file or directory ``st`` is of."""
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def _raw_entry(raw: Any) -> Tuple[str, str, int]:
    """A root entry of index.json as decoded: its name, digest and size as written ("",
    "", -1 for what is absent or of another type), parsing nothing."""
    if type(raw) is not dict:
        return "", "", -1
    annotations, digest, size = raw.get("annotations"), raw.get("digest"), raw.get("size")
    name = annotations.get(ANNOTATION_REF_NAME) if type(annotations) is dict else ""
    return (name if type(name) is str else "", digest if type(digest) is str else "",
            size if type(size) is int else -1)


_FileIdentity = Tuple[int, int, int, int, int]


def _file_identity(st: os.stat_result) -> _FileIdentity:
    """What changes whenever a file's bytes may have: another file (device, inode), a
    write (size, modification time) and anything else done to it (change time, which
    no one but the clock sets)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _parse_checked(data: bytes) -> Dict[str, _FileIdentity]:
    """The checked blobs in a _CHECKED_FILE's bytes, each digest with its file's identity
    when it was hashed; rows of any other shape are skipped (it is only a hint)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    rows = obj.get("checked") if isinstance(obj, dict) and obj.get("version") == 1 else None
    found: Dict[str, _FileIdentity] = {}
    for row in rows if isinstance(rows, list) else ():
        if isinstance(row, list) and len(row) == 6 and type(row[0]) is str and \
                all(type(n) is int for n in row[1:]):
            found[row[0]] = tuple(row[1:])  # type: ignore[assignment]
    return found


class _EncodedEntries:
    """Root entries of index.json as ``Layout.write_index_object`` writes them, encoded
    1,024 at a time as they are added (20,000 kept decoded, for ``rm`` to write back, were
    13 MB; encoded, 4 MB); ``pieces`` and ``decoded`` asked after the last is added."""

    def __init__(self) -> None:
        # Each piece its entries' bytes in the array (after a comma but the first), or
        # the entries themselves when they cannot be encoded: writing them says why.
        self._pieces: List[Union[bytes, List[Any]]] = []
        self._batch: List[Any] = []

    def __len__(self) -> int:
        return 1024 * len(self._pieces) + len(self._batch)

    def append(self, raw: Any) -> None:
        self._batch.append(raw)
        if len(self._batch) == 1024:
            self._seal()

    def _seal(self) -> None:
        if self._batch:
            self._pieces.append(self._batch)
            with contextlib.suppress(OciCacheError):
                self._pieces[-1] = self._encoded(len(self._pieces) - 1)
            self._batch = []

    def _encoded(self, at: int) -> bytes:
        piece = self._pieces[at]
        if isinstance(piece, bytes):
            return piece
        data = _json_bytes(piece, separators=_INDEX_SEPARATORS)[1:-1]
        return _INDEX_SEPARATORS[0].encode() + data if at else data

    def pieces(self) -> List[bytes]:
        self._seal()
        return [self._encoded(at) for at in range(len(self._pieces))]

    def decoded(self, wanted: Optional[Iterable[int]] = None) -> Iterator[Any]:
        """The entries (those at the places ``wanted``, ascending) as decoded: as
        json.loads gives what json.dumps wrote; a piece decoded at a time."""
        self._seal()
        places = None if wanted is None else iter(wanted)
        want = -1 if places is None else next(places, None)
        for at, piece in enumerate(self._pieces):
            if want is not None and want < 1024 * (at + 1):
                entries = piece if isinstance(piece, list) else \
                    json.loads(b"[" + piece[1 if at else 0:] + b"]")
                if places is None:
                    yield from entries
                    continue
                while want is not None and want < 1024 * (at + 1):
                    yield entries[want - 1024 * at]
                    want = next(places, None)


class Layout:
    """An OCI image layout directory used as a cache. Creates it when missing."""

    def __init__(self, root: Union[str, "os.PathLike[str]"]) -> None:
        if not os.fspath(root):  # an unset variable: not the current directory
            raise OciCacheError("the cache directory is an empty string; name a directory, "
                                "or leave --cache out for the default")
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.index_path = os.path.join(self.root, "index.json")
        self.summaries_path = os.path.join(self.root, SUMMARIES_FILE)
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise OciCacheError(f"cannot create cache directory {self.root}: "
                                f"{e.strerror or e}") from None
        self.blobs_dir = os.path.join(self.root, "blobs")
        self._check_tree()
        self._lock = _lock_for(os.path.join(self.root, ".lock"))
        # Large blobs this process wrote and verified, for the record of checked blobs
        # (checked_blobs), written with the next sync_blob_directories.
        self._written_checked: Dict[str, _FileIdentity] = {}
        if not os.path.lexists(self.index_path):
            with self.lock(), self._root_directory() as directory:
                if not os.path.lexists(self.index_path):
                    # The empty index's name reaches the disk with the directory's next
                    # fsync (the first name written): a crash before it loses an empty
                    # cache, made again by the next run; oci-layout is durable first.
                    try:
                        _write_file_atomically(directory, "oci-layout", _OCI_LAYOUT_BYTES)
                        _write_file_atomically(directory, "index.json", _EMPTY_INDEX_BYTES,
                                               sync_directory=False)
                    except OSError as e:
                        raise _disk_error(self.index_path, e, "free space on its "
                                          "filesystem") from None

    def _check_tree(self) -> None:
        """Make ``blobs/sha256`` when missing; refuse a cache whose own entries are links,
        of the wrong kind, or owned by a stranger: someone other than root, this user
        or, in a group-shared cache (its directory set-group-ID), a member of its group.
        The operations below never follow a link either; this says why, up front."""
        try:
            top = os.stat(self.root)
        except OSError as e:
            raise OciCacheError(f"cannot use cache directory {self.root}: "
                                f"{e.strerror or e}") from None
        shared_group = top.st_gid if top.st_mode & stat.S_ISGID else None
        for name, directory in (("blobs", True), ("blobs/sha256", True),
                                ("index.json", False), (".lock", False)):
            path = os.path.join(self.root, name)
            try:
                if directory:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(path)  # never through a link: EEXIST
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise OciCacheError(f"cannot use cache directory {self.root}: "
                                    f"{path}: {e.strerror or e}") from None
            if stat.S_ISLNK(info.st_mode):
                problem = "is a symbolic link; ocicache never follows links inside its cache"
            elif directory and not stat.S_ISDIR(info.st_mode):
                problem = "is not a directory"
            elif not directory and not stat.S_ISREG(info.st_mode):
                problem = "is not a regular file"
            elif info.st_uid not in (0, os.geteuid()) and info.st_gid != shared_group:
                problem = (f"belongs to uid {info.st_uid}, neither you nor root (a shared "
                           "cache's directory is set-group-ID: see the README)")
            else:
                continue
            raise OciCacheError(f"refusing the cache {self.root}: {path} {problem}")

    @contextlib.contextmanager
    def _root_directory(self) -> Iterator[int]:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _blob_directory(self, algorithm: str, create: bool = False) -> Iterator[int]:
        """``blobs/<algorithm>``, reached from the root without following a link, so a
        directory swapped for a link after ``_check_tree`` still leads nowhere else."""
        with self._root_directory() as root:
            blobs = _open_directory("blobs", root, self.blobs_dir)
            try:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(algorithm, dir_fd=blobs)
                directory = _open_directory(algorithm, blobs,
                                            os.path.join(self.blobs_dir, algorithm))
            finally:
                os.close(blobs)
            try:
                yield directory
            finally:
                os.close(directory)

    def lock(self) -> "contextlib.AbstractContextManager[None]":
        """The cache's exclusive lock; reentrant, thread-safe and across processes."""
        return self._lock.hold()

    def adding_blobs(self) -> "contextlib.AbstractContextManager[None]":
        """Held (shared) by work that writes or reuses blobs and names them afterwards.

        Deleting blobs (``rm``, ``clean``, ``gc``) takes the same lock exclusively, so
        a blob a load has just found present cannot vanish before the load names it.
        Take it before ``lock()``, never while holding ``lock()``.
        """
        return self._blob_lock(fcntl.LOCK_SH)

    def deleting_blobs(self) -> "contextlib.AbstractContextManager[None]":
        """Held (exclusively) while blobs are deleted; see ``adding_blobs``."""
        return self._blob_lock(fcntl.LOCK_EX)

    @contextlib.contextmanager
    def _blob_lock(self, mode: int) -> Iterator[None]:
        with self._root_directory() as root:
            fd = _open_directory("blobs", root, self.blobs_dir)
        try:
            what = (f"{self.blobs_dir}: a pull or import is adding blobs"
                    if mode == fcntl.LOCK_EX else f"{self.blobs_dir}: blobs are being deleted")
            _wait_for_lock(fd, functools.partial(_try_flock, fd, mode), what)
            yield
        finally:
            os.close(fd)

    # -- blobs ------------------------------------------------------------------------

    def blob_path(self, digest: Union[str, Digest]) -> str:
        d = Digest.parse(digest)
        return f"{self.blobs_dir}/{d.algorithm}/{d.hex}"  # os.path.join: a third of a stat

    def has_blob(self, digest: Union[str, Digest], size: Optional[int] = None) -> bool:
        """True when the blob file exists (with ``size`` bytes, when given)."""
        actual = self.blob_size(digest)
        return actual is not None and (size is None or size < 0 or actual == size)

    def open_blob(self, digest: Union[str, Digest]) -> BinaryIO:
        d = Digest.parse(digest)
        try:
            with self._blob_directory(d.algorithm) as directory:
                fd = _open_regular(d.hex, os.O_RDONLY, directory, self.blob_path(d))
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the cache {self.root}") from None
        return os.fdopen(fd, "rb")

    def read_blob(self, digest: Union[str, Digest], limit: int = MAX_MANIFEST_SIZE) -> bytes:
        """A small blob (manifest, index, config), read whole and checked against its digest."""
        d = Digest.parse(digest)
        with self.open_blob(d) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise OciCacheError(f"blob {d} is larger than {limit} bytes; refusing to read it whole")
        if hashlib.new(d.algorithm, data).hexdigest() != d.hex:
            raise CorruptCacheError(
                f"blob {d} in {self.root} does not match its digest; "
                "run 'ocicache verify', then pull or import the image again")
        return data

    def write_blob(self, stream: IO[bytes], digest: Optional[Union[str, Digest]] = None,
                   size: Optional[int] = None, algorithm: str = "sha256") -> Tuple[Digest, int]:
        """Copy ``stream`` into the cache, verifying ``digest`` and ``size`` when given.

        A blob already present with the right size is not written again; its
        modification time is refreshed so that ``gc``'s grace period protects it until
        the caller names it. Returns the digest and size.
        """
        expected = Digest.parse(digest) if digest is not None else None
        if expected is not None and self.has_blob(expected, size):
            self._touch(expected)
            return expected, os.lstat(self.blob_path(expected)).st_size
        algorithm = expected.algorithm if expected is not None else algorithm
        with self._blob_directory(algorithm, create=True) as directory:
            fd, temp = _create_temporary(directory, expected.hex if expected else "blob")
            where = os.path.join(self.blobs_dir, algorithm, temp)
            try:
                try:
                    actual, written = self._copy_verified(stream, fd, expected, size, algorithm)
                    _PendingBlob(fd, directory, temp, actual.hex, where,
                                 functools.partial(self._verified, actual)).commit(written)
                finally:
                    os.close(fd)
            except BaseException as e:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=directory)
                if isinstance(e, OSError) and _is_write_error(e):
                    raise _disk_error(where, e, _CACHE_FULL) from None
                raise
        return actual, written

    @staticmethod
    def _copy_verified(stream: IO[bytes], fd: int, expected: Optional[Digest],
                       size: Optional[int], algorithm: str) -> Tuple[Digest, int]:
        """Copy ``stream`` to ``fd``, checking ``size`` and the digest of what was
        written (every byte of it: ``_write_all``)."""
        hasher = hashlib.new(algorithm)
        written = 0
        while True:
            chunk = stream.read(COPY_BUFFER_SIZE)
            if not chunk:
                break
            written += len(chunk)
            if size is not None and size >= 0 and written > size:
                raise DigestMismatchError(
                    f"blob {expected or 'content'} is longer than its declared size {size}")
            _write_all(fd, chunk)
            hasher.update(chunk)
        if size is not None and size >= 0 and written != size:
            raise DigestMismatchError(
                f"blob {expected or 'content'}: got {written} bytes, expected {size}")
        actual = Digest(algorithm, hasher.hexdigest())
        if expected is not None and actual != expected:
            raise DigestMismatchError(
                f"content does not match its digest: expected {expected}, got {actual}")
        return actual, written

    @contextlib.contextmanager
    def partial_blob(self, digest: Digest, size: int) -> Iterator[Optional[_PendingBlob]]:
        """The partial file a download of ``digest`` resumes, open and ``flock``ed; None
        when the blob is present with ``size`` bytes (another process fetched it).

        A download that finishes renames its partial file to the final name, and a
        process waiting for that file's lock then holds the verified blob itself: once
        locked, the file must still bear the partial name, or it is opened afresh.
        Whatever else bears that name (a link, a file with other names or another
        owner) is not a download of ours: it is removed, never written to. A full disk
        removes the partial file, since resuming it needs the space it holds.
        """
        name = digest.hex + _PARTIAL_SUFFIX
        where = self.blob_path(digest) + _PARTIAL_SUFFIX
        with self._blob_directory(digest.algorithm, create=True) as directory:
            while True:
                if self.has_blob(digest, size):
                    yield None
                    return
                fd = self._open_partial(directory, name, where)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # another process may be fetching it
                    state = self._partial_state(fd, directory, name)
                    if state == "foreign":  # removed under its lock, as a rename is
                        _log().warning("removing %s: not a partial download of yours", where)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=directory)
                except BaseException:
                    os.close(fd)
                    raise
                if state == "ours":
                    break
                os.close(fd)
            try:
                if self.has_blob(digest, size):
                    yield None
                else:
                    yield _PendingBlob(fd, directory, name, digest.hex, where,
                                       functools.partial(self._verified, digest))
            except OSError as e:
                if not _is_write_error(e):
                    raise
                if e.errno in _FULL_ERRNOS:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=directory)
                raise _disk_error(where, e, _CACHE_FULL) from None
            finally:
                os.close(fd)

    @staticmethod
    def _open_partial(directory: int, name: str, where: str) -> int:
        while True:
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK,
                             _CREATE_MODE, dir_fd=directory)
            except OSError as e:
                if e.errno == errno.EISDIR:
                    raise OciCacheError(f"cannot write {where}: it is a directory; "
                                        "remove it") from None
                if e.errno != errno.ELOOP:
                    raise _disk_error(where, e, _CACHE_FULL) from None
                _log().warning("removing %s: a symbolic link, not a partial download", where)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=directory)
                continue
            os.set_blocking(fd, True)
            return fd

    def discard_partial(self, digest: Digest) -> None:
        """Remove the partial file of ``digest`` unless another download holds it."""
        name = digest.hex + _PARTIAL_SUFFIX
        with self._blob_directory(digest.algorithm) as directory:
            try:
                fd = os.open(name, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
            except OSError:
                return  # none, or a link: nothing of ours to remove
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self._partial_state(fd, directory, name) == "ours":
                    os.unlink(name, dir_fd=directory)
            except OSError:
                pass  # being written by another pull, or already gone
            finally:
                os.close(fd)

    @staticmethod
    def _partial_state(fd: int, directory: int, name: str) -> str:
        """What the locked file is: "ours" (a regular file of this user's, bearing only
        the partial name), "gone" (renamed or removed while we waited) or "foreign"."""
        held = os.fstat(fd)
        try:
            named = os.stat(name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            return "gone"
        if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            return "gone"
        if stat.S_ISREG(held.st_mode) and held.st_nlink == 1 and held.st_uid == os.geteuid():
            return "ours"
        return "foreign"

    def write_blob_bytes(self, data: bytes, digest: Optional[Union[str, Digest]] = None) -> Digest:
        # Hashed first, so that bytes already stored (a manifest an import makes for each
        # of many entries alike) are found, not written and fsynced again.
        expected = Digest.from_bytes(data) if digest is None else digest
        return self.write_blob(io.BytesIO(data), expected, len(data))[0]

    def _touch(self, digest: Digest) -> None:
        with contextlib.suppress(OSError):  # a shared cache may hold other users' blobs
            with self._blob_directory(digest.algorithm) as directory:
                os.utime(digest.hex, dir_fd=directory, follow_symlinks=False)

    def blob_files(self) -> Iterator[Tuple[Optional[Digest], str, os.stat_result]]:
        """Every entry of each ``blobs/<alg>`` directory (never through a symlinked
        directory): (its digest, or None for other names, path, lstat)."""
        for algorithm, directory in self._blob_directories():
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for entry in os.scandir(directory):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    try:
                        digest: Optional[Digest] = Digest(algorithm, entry.name)
                    except InvalidDigestError:
                        digest = None
                    yield digest, entry.path, st

    def _blob_directories(self) -> List[Tuple[str, str]]:
        """(algorithm, path) of each ``blobs/<alg>`` that is a real directory."""
        found = []
        for path in (self.blobs_dir, *(os.path.join(self.blobs_dir, a)
                                       for a in sorted(_DIGEST_HEX_LENGTHS))):
            try:
                is_directory = stat.S_ISDIR(os.lstat(path).st_mode)
            except FileNotFoundError:
                is_directory = False
            if path == self.blobs_dir:
                if not is_directory:
                    return []
            elif is_directory:
                found.append((os.path.basename(path), path))
        return found

    def blob_names(self) -> Set[str]:
        """``alg:hex`` of every entry of each ``blobs/<alg>`` directory, listed without a
        stat of each (``ls`` asks only whether a blob is there)."""
        names: Set[str] = set()
        for algorithm, directory in self._blob_directories():
            prefix = f"{algorithm}:"
            # scandir, not listdir: as fast, and no list of 40,000 names (4.5 MB) beside
            # the set (``ls`` calls it holding its memo: it was ls's peak).
            with contextlib.suppress(FileNotFoundError, NotADirectoryError), \
                    os.scandir(directory) as entries:
                names.update(prefix + entry.name for entry in entries)
        return names

    def read_summaries(self) -> Tuple[bytes, bool]:
        """The bytes of the summary memo (``_SummaryMemo``), b"" when it is absent or no
        regular file (never read through a symlink); and whether it is trusted: a file
        of this user's or root's that no one else may write, in a cache directory no one
        else may write either. Where a co-user may write the directory (a group-shared
        cache), they may rename any file of ours to the memo's name: a blob whose bytes
        an image's publisher chose, an index.json holding keys they put beside its
        ``manifests``; such a memo is never believed, and none is written there."""
        try:
            with self._root_directory() as directory, os.fdopen(_open_regular(
                    SUMMARIES_FILE, os.O_RDONLY, directory, self.summaries_path), "rb") as f:
                trusted = _only_ours(os.fstat(directory)) and _only_ours(os.fstat(f.fileno()))
                return f.read(MAX_SUMMARIES_SIZE + 1), trusted
        except (OSError, OciCacheError):
            return b"", False

    def write_summaries(self, data: Iterable[bytes]) -> None:
        """Replace the summary memo, writable by this user alone (see read_summaries),
        unless others may write the cache directory, where no memo is believed; it is
        only a memo, so failing to write it is not an error."""
        try:
            with self._root_directory() as directory:
                if _only_ours(os.fstat(directory)):
                    _write_file_atomically(directory, SUMMARIES_FILE, data, mode=0o644)
        except OSError as e:
            _log().debug("cannot write %s: %s", self.summaries_path, e)

    def checked_blobs(self) -> Dict[str, _FileIdentity]:
        """The blobs found whole (written and verified by a pull or an import, or hashed
        by an export), each with its file's identity then (``_file_identity``): a blob
        whose file has that identity still holds those bytes. Believed only where the memo is (``read_summaries``): a co-user who may
        write the cache directory could otherwise vouch for a blob they planted. Nor
        where they may write a blob directory (``_blob_directories_ours``)."""
        path = os.path.join(self.root, _CHECKED_FILE)
        limit = _MAX_CHECKED * 256
        try:
            with self._root_directory() as directory, os.fdopen(_open_regular(
                    _CHECKED_FILE, os.O_RDONLY, directory, path), "rb") as f:
                if not (self._blob_directories_ours(directory) and
                        _only_ours(os.fstat(f.fileno()))):
                    return {}
                data = f.read(limit + 1)
        except (OSError, OciCacheError):
            return {}
        return _parse_checked(data) if len(data) <= limit else {}

    def record_checked(self, checked: Mapping[str, _FileIdentity],
                       forget: Iterable[str] = ()) -> None:
        """Add ``checked`` to the blobs ``checked_blobs`` holds, the newest last and the
        oldest dropped past _MAX_CHECKED, and drop those in ``forget``. Not under the
        lock: an addition another export makes at the same moment may be lost, and
        costs only a hash the next time."""
        forget = set(forget)
        known = self.checked_blobs() if checked or forget else {}
        if not checked and forget.isdisjoint(known):
            return
        merged = {d: i for d, i in known.items() if d not in checked and d not in forget}
        merged.update(checked)
        rows = [[digest, *identity] for digest, identity in merged.items()][-_MAX_CHECKED:]
        data = _json_bytes({"version": 1, "checked": rows}, separators=(",", ":"))
        try:
            with self._root_directory() as directory:
                if self._blob_directories_ours(directory):
                    _write_file_atomically(directory, _CHECKED_FILE, data, mode=0o644,
                                           durable=False)  # a hint: a torn one is ignored
        except (OSError, OciCacheError) as e:  # a read-only or full cache: a hint lost
            _log().debug("cannot write %s: %s", os.path.join(self.root, _CHECKED_FILE), e)

    @staticmethod
    def _blob_directories_ours(root: int) -> bool:
        """Whether only this user or root may write the cache directory ``root``,
        ``blobs`` and each ``blobs/<alg>``: where a co-user may, they may put a file of
        theirs in a blob's place, which, were it given the recorded inode again in the
        clock tick the blob was named in (timestamps of a coarse clock, inode numbers
        reused), would have the identity recorded for it."""
        if not _only_ours(os.fstat(root)):
            return False
        for name in ("blobs", *(f"blobs/{a}" for a in sorted(_DIGEST_HEX_LENGTHS))):
            try:
                st = os.stat(name, dir_fd=root, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not (stat.S_ISDIR(st.st_mode) and _only_ours(st)):
                return False
        return True

    # -- index.json -------------------------------------------------------------------

    def read_index(self) -> Index:
        try:
            return self._read_index()
        except CorruptCacheError:
            # linuxkit rewrites index.json in place (truncate, then write) under its lock
            # (DescriptorWrite in src/cmd/linuxkit/cache/write.go): what looks broken may
            # be a rewrite under way. Read it again while holding that lock.
            with self.lock():
                return self._read_index()

    def _read_index(self) -> Index:
        try:
            return Index.from_json(self._read_index_object(), what=self.index_path)
        except OciCacheError as e:
            raise CorruptCacheError(f"invalid image cache: {e}") from None

    def _read_index_bytes(self) -> bytes:
        try:
            with os.fdopen(_open_regular(self.index_path), "rb") as f:
                data = f.read(MAX_INDEX_SIZE + 1)
        except FileNotFoundError:
            raise CorruptCacheError(f"{self.index_path} is missing") from None
        if len(data) > MAX_INDEX_SIZE:
            raise CorruptCacheError(f"{self.index_path} is larger than {MAX_INDEX_SIZE} bytes, "
                                    "more than ocicache reads; 'ocicache clean' empties it")
        return data

    def index_digest(self) -> str:
        """The sha256 (as hex) of index.json's bytes, read in pieces (not held: ``ls``
        from its memo holds nothing else then); "" when they cannot be read whole."""
        hasher, read = hashlib.sha256(), 0
        try:
            with os.fdopen(_open_regular(self.index_path), "rb") as f:
                for piece in iter(lambda: f.read(COPY_BUFFER_SIZE), b""):
                    read += len(piece)
                    if read > MAX_INDEX_SIZE:  # not read to its end: no read of it does
                        return ""
                    hasher.update(piece)
        except (OSError, OciCacheError):
            return ""  # reading it again says why, as the caller will
        return hasher.hexdigest()

    def _read_index_object(self, digests: Optional[List[str]] = None) -> Dict[str, Any]:
        """index.json decoded, an object whose ``manifests`` (if any) is a list; the
        sha256 of its bytes appended to ``digests``."""
        data = self._read_index_bytes()
        if digests is not None:
            digests.append(hashlib.sha256(data).hexdigest())
        try:
            # Decoded here, the bytes dropped: 20,000 names are 6 MB of them, which would
            # otherwise be held beside the text and the 20 MB of objects made of it.
            text = data.decode(json.detect_encoding(data), "surrogatepass")
            del data
            obj = _load_json_object(text, self.index_path)
        except UnicodeDecodeError as e:
            raise CorruptCacheError(f"invalid image cache: {self.index_path} is not valid "
                                    f"JSON: {_shorten(_one_line(str(e)))}") from None
        except OciCacheError as e:
            raise CorruptCacheError(f"invalid image cache: {e}") from None
        if not isinstance(obj.get("manifests") or [], list):
            raise CorruptCacheError(f"invalid image cache: {self.index_path}: 'manifests' "
                                    "is not a list")
        return obj

    def index_object(self, digests: Optional[List[str]] = None) -> Dict[str, Any]:
        """index.json decoded, its entries left as they are (see ``_raw_entry``), and the
        sha256 of its bytes appended to ``digests``; read again under the lock when it
        looks broken (see read_index)."""
        try:
            return self._read_index_object(digests)
        except CorruptCacheError:
            with self.lock():
                return self._read_index_object(digests)

    def index_scan(self, digests: Optional[List[str]] = None) -> _IndexScan:
        """index.json to decode an entry at a time (``_IndexScan``), the sha256 of its
        bytes appended to ``digests``; ``_UnusualIndex`` when it cannot be read or
        decoded so, for ``index_object`` to read it again and say why."""
        try:
            data = self._read_index_bytes()
        except CorruptCacheError:
            raise _UnusualIndex() from None
        if digests is not None:
            digests.append(hashlib.sha256(data).hexdigest())
        try:
            text = data.decode(json.detect_encoding(data), "surrogatepass")
        except UnicodeDecodeError:
            raise _UnusualIndex() from None
        del data  # (not held beside its text)
        return _IndexScan(text)

    def root_entries(self) -> Iterator[Descriptor]:
        """``read_index().manifests``, each entry parsed as it is given and none kept
        (20,000 parsed are 15 MB, and a walk of them holds what it found besides); the
        rest of index.json is checked as read_index checks it, before the first."""
        obj = self.index_object()
        entries = obj.pop("manifests", None) or []
        try:
            Index.from_json(obj, what=self.index_path)
        except OciCacheError as e:
            raise CorruptCacheError(f"invalid image cache: {e}") from None
        del obj
        entries.reverse()
        while entries:
            try:
                entry = Descriptor.from_json(entries.pop())
            except OciCacheError as e:  # as read_index says it
                raise CorruptCacheError(f"invalid image cache: {e}") from None
            yield entry

    def index_entries(self, keep: Callable[[str, str], bool]) -> List[Descriptor]:
        """The root entries, in index order, for which ``keep(name, digest)`` holds (each
        given as index.json spells it, "" when absent or not a string). Only those are
        parsed as descriptors: a lookup in 20,000 names builds one."""
        try:
            return self._index_entries(keep)
        except CorruptCacheError:
            with self.lock():  # perhaps a rewrite by linuxkit under way: see read_index
                return self._index_entries(keep)

    def index_names(self) -> List[str]:
        """Every root entry's name as index.json spells it ("" for none), in index order;
        no entry is parsed as a descriptor."""
        names: List[str] = []

        def record(name: str, _: str) -> bool:
            names.append(name)
            return False

        self.index_entries(record)
        return names

    def _index_entries(self, keep: Callable[[str, str], bool]) -> List[Descriptor]:
        found = []
        entries = self._read_index_object().get("manifests") or []
        entries.reverse()
        while entries:  # each decoded entry freed as it is read: they never all coexist
            raw = entries.pop()  # with the descriptors made of them (20,000 names: 15 MB)
            name, digest, _ = _raw_entry(raw)
            if keep(name, digest):
                found.append(self.entry(raw))
        return found

    def entry(self, raw: Any) -> Descriptor:
        """A root entry of index.json as decoded, parsed; CorruptCacheError if it is none."""
        try:
            return Descriptor.from_json(raw)
        except OciCacheError as e:
            raise CorruptCacheError(f"invalid image cache: {self.index_path}: {e}") from None

    def update_index(self, change: Callable[[List[Descriptor]], List[Descriptor]],
                     on_full: Optional[Callable[[], None]] = None,
                     index: Optional[Index] = None, what: str = "") -> None:
        """Apply ``change`` to the root entries under the lock, then replace index.json
        (``write_index_object``). ``index`` is index.json as the caller read it holding
        the lock already (read here otherwise): one read per command."""
        with self.lock():
            if index is None:
                index = self.read_index()
            manifests = change(list(index.manifests))
            new = _replace(index, manifests=tuple(manifests),
                           media_type=index.media_type or MEDIA_OCI_INDEX).to_json()
            self.write_index_object(new, new["manifests"], on_full, what)

    def update_index_entries(self, change: Callable[[List[Any]], List[Any]],
                             what: str = "") -> None:
        """``update_index`` on the root entries as decoded (``_raw_entry``): an entry the
        change keeps is written back as it was, never parsed (20,000 of them cost 0.2 s
        to parse and write again for one name)."""
        with self.lock():
            index = self.index_object()
            self.write_index_object(index, change(index.get("manifests") or []), what=what)

    def write_index_object(self, index: Mapping[str, Any],
                           manifests: Union[List[Any], "_EncodedEntries"],
                           on_full: Optional[Callable[[], None]] = None, what: str = "") -> None:
        """Replace index.json with ``index`` (as the caller read it holding the lock)
        holding ``manifests`` (as decoded, or encoded already). An index.json past
        MAX_INDEX_SIZE, which could not be read
        back, is refused, saying ``what`` was being done.

        Replacing it needs room for a second copy; on a full disk ``on_full`` (given by
        ``rm`` and ``clean``, whose change frees blobs) deletes them first, then it is
        tried once more.
        """
        # Encoded 1,024 entries at a time, as json.dumps encodes the whole: its text and
        # then its bytes, beside each other, were rm's peak (12 MB of 20,000 names).
        def whole(entries: List[Any]) -> bytes:
            return _json_bytes({"schemaVersion": 2, **index, "mediaType": index.get(
                "mediaType") or MEDIA_OCI_INDEX, "manifests": entries},
                separators=_INDEX_SEPARATORS)
        mark = "\ue000ocicache: the entries\ue000"
        before, _, after = whole([mark]).partition(_json_bytes([mark]))
        if after.find(_json_bytes([mark])) >= 0:  # the mark is in index.json itself
            pieces = [whole(list(manifests.decoded()) if isinstance(
                manifests, _EncodedEntries) else manifests)]
        elif isinstance(manifests, _EncodedEntries):
            pieces = [before + b"[", *manifests.pieces(), b"]" + after]
        else:
            pieces = [before + b"["]
            comma = _INDEX_SEPARATORS[0].encode()
            for start in range(0, len(manifests), 1024):
                piece = _json_bytes(manifests[start:start + 1024],
                                    separators=_INDEX_SEPARATORS)
                pieces.append((comma if start else b"") + piece[1:-1])
            pieces.append(b"]" + after)
        size = sum(map(len, pieces))
        if size > MAX_INDEX_SIZE:
            raise OciCacheError(f"{what or 'cannot update index.json'}: index.json would "
                                f"grow to {size} bytes, past the {MAX_INDEX_SIZE} "
                                "ocicache reads; remove names first")
        self.replace_index(pieces, on_full)

    def sync_blob_directories(self) -> None:
        """fsync each ``blobs/<alg>`` directory: every blob visible in it now, whichever
        process wrote it, keeps its name through a crash. Blob writes leave this to
        whatever names them (``replace_index``), once for all their renames. The large
        blobs this process wrote since are added to the record of checked blobs."""
        for algorithm in sorted(_DIGEST_HEX_LENGTHS):
            try:
                with self._blob_directory(algorithm) as directory:
                    os.fsync(directory)
            except (FileNotFoundError, CorruptCacheError):
                continue  # no such directory, or a link: no blob there can be named
        written = dict(self._written_checked)  # a copy: other threads add to it
        for digest in written:
            self._written_checked.pop(digest, None)
        self.record_checked(written)

    def _verified(self, digest: Digest, st: os.stat_result) -> None:
        """The blob ``digest``, written by this process and verified, was just given its
        name, its file ``st`` then: remembered as checked (see checked_blobs) when it is
        large and only this user or root may change it. A write by anyone else would
        change its identity; unlike an export's (_BlobChecks), no settling time is
        waited for, as no one else can write it within the clock tick of the rename."""
        if st.st_size >= _CHECKED_MIN_SIZE and _only_ours(st):
            self._written_checked[str(digest)] = _file_identity(st)

    def replace_index(self, data: Union[bytes, Sequence[bytes]],
                      on_full: Optional[Callable[[], None]] = None) -> None:
        """Replace index.json with ``data`` (or its pieces) under the lock, without reading
        it (``clean`` empties a cache whose index.json cannot be read); ``on_full`` as in
        update_index.
        The blob directories are synced first: no name outlives a crash that its blobs'
        renames do not."""
        with self.lock(), self._root_directory() as directory:
            self.sync_blob_directories()
            try:
                _write_file_atomically(directory, "index.json", data)
            except OSError as e:
                if on_full is None or e.errno not in _FULL_ERRNOS:
                    raise _disk_error(self.index_path, e, _CACHE_FULL) from None
                on_full()
                try:
                    _write_file_atomically(directory, "index.json", data)
                except OSError as again:
                    raise _disk_error(self.index_path, again, _CACHE_FULL) from None

    # -- reachability, gc, verify -----------------------------------------------------

    def blob_size(self, digest: Union[str, Digest]) -> Optional[int]:
        """The size of the blob's file; None when there is no regular file of that name."""
        try:
            st = os.lstat(self.blob_path(digest))
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def document(self, descriptor: Descriptor) -> Tuple[str, Union[Index, Manifest, None]]:
        """What the blob of a descriptor in a manifest's place is (``read_document``)."""
        if descriptor.media_type not in DOCUMENT_MEDIA_TYPES:
            size = self.blob_size(descriptor.digest)
            if size is None or size > MAX_MANIFEST_SIZE:
                return "", None  # too big for any manifest: a plain blob, as labelled
        return read_document(self.read_blob(descriptor.digest), descriptor.media_type,
                             f"blob {descriptor.digest}")

    def believed(self, entry: Descriptor) -> Descriptor:
        """``entry`` with the media type its blob has (``read_document``); unchanged when
        the label is right or the blob cannot be read."""
        try:
            kind, _ = self.document(entry)
        except OciCacheError:
            return entry
        return _replace(entry, media_type=kind) if kind and kind != entry.media_type else entry

    def believed_all(self, entries: Sequence[Descriptor]) -> List[Descriptor]:
        """``believed`` of each entry, each blob read once however many entries share
        it (an archive's 300 roots naming one 1 MiB manifest read it 300 times)."""
        kinds: Dict[Tuple[Digest, str], str] = {}
        out = []
        for entry in entries:
            key = (entry.digest, entry.media_type)
            if key not in kinds:
                kinds[key] = self.believed(entry).media_type
            out.append(entry if kinds[key] == entry.media_type else
                       _replace(entry, media_type=kinds[key]))
        return out

    def reachable(self, roots: Iterable[Descriptor]) -> "_Reachable":
        """Everything ``roots`` reach, following the documents (``read_document``), never
        the labels: for each digest the names that reach it, and every problem.

        A missing root, or a present manifest whose config or layers are missing, is
        ``missing``; a missing child of an index is not (pulls fetch one platform). A
        manifest's ``subject`` is not followed: a referrer does not need it. A
        document that cannot be read is ``unreadable``. A descriptor whose size or label
        disagrees with its blob, and a name pinning another digest than its entry's, are
        ``wrong``. Each problem names the names that need the blob.
        """
        # digest -> the names that reach it, in the order found: the one name, until a
        # second (a dict of one per blob was 9 MB of 40,000 blobs), then a dict as an
        # ordered set (a layer shared by every name must not cost a scan of them per name)
        owners: Dict[Digest, Union[str, Dict[str, None]]] = {}
        # (kind, digest, why) -> the names whose walk met it, in the order found
        problems: Dict[Tuple[str, Digest, str], Dict[str, None]] = {}

        def problem(kind: str, digest: Digest, why: str, owner: str) -> None:
            problems.setdefault((kind, digest, why), {})[owner] = None

        documents: Dict[Digest, Union[str, Tuple[str, List[Tuple[Descriptor, bool, bool]]]]] = {}
        read_once: Set[Digest] = set()  # documents read, not kept: read twice at most
        absent = 0
        for root in roots:
            # Names come from index.json and archives: made safe for one-line messages.
            owner = _shorten(_one_line(root.name), _NAME_SHOWN) or str(root.digest)
            promise = name_problem(root)
            if promise:
                problem("wrong", root.digest, promise, owner)
            # digest -> (required, a document) as met so far: a blob met again as needed
            # (a layer an index also lists as an optional child) is looked at again
            seen: Dict[Digest, Tuple[bool, bool]] = {}
            stack: List[Tuple[Descriptor, bool, bool]] = [(root, True, True)]
            while stack:
                descriptor, required, is_document = stack.pop()
                digest = descriptor.digest
                size = self.blob_size(digest)
                if size is not None and size != descriptor.size:
                    problem("wrong", digest, f"a descriptor says {descriptor.size} bytes, "
                                             f"the blob has {size}", owner)
                was_required, was_document = seen.get(digest, (False, False))
                if digest in seen and (was_required or not required) and \
                        (was_document or not is_document):
                    continue
                seen[digest] = (required or was_required, is_document or was_document)
                owned = owners.setdefault(digest, owner)
                if isinstance(owned, dict):
                    owned[owner] = None
                elif owned != owner:
                    owners[digest] = {owned: None, owner: None}
                if size is None:
                    absent += 1
                    if required and not _is_foreign(descriptor):
                        problem("missing", digest, "", owner)
                    continue
                if not is_document:
                    continue
                found = documents.get(digest)
                if found is None:
                    found = self._links(descriptor)
                    if isinstance(found, str) or any(link[2] for link in found[1]) or \
                            digest in read_once:
                        # Kept when it links to documents (an index's children), which
                        # many roots may share, or when a second root reaches it; an
                        # image manifest's links are leaves, and keeping every one held
                        # 80 MB for a walk of 20,000 names.
                        documents[digest] = found
                    else:
                        read_once.add(digest)
                if isinstance(found, str):
                    problem("unreadable", digest, found, owner)
                    continue
                kind, links = found
                label = label_problem(descriptor, kind)
                if label:
                    problem("wrong", digest, label, owner)
                stack.extend(links)

        def listed(which: str) -> Tuple[str, ...]:
            out = []
            for (kind, digest, why), names in problems.items():
                if kind == which:
                    out.append(f"{digest} (needed by {_names_list(list(names))})" +
                               (f": {why}" if why else ""))
            return tuple(out)

        return _Reachable(owners, listed("missing"), listed("unreadable"), listed("wrong"),
                          absent)

    def _links(self, descriptor: Descriptor
               ) -> Union[str, Tuple[str, List[Tuple[Descriptor, bool, bool]]]]:
        """A document's kind and what it links to, as (descriptor, required, document);
        or why it cannot be read."""
        try:
            kind, parsed = self.document(descriptor)
        except OciCacheError as e:
            return str(e)
        if isinstance(parsed, Index):
            return kind, [(child, False, True) for child in parsed.manifests]
        if isinstance(parsed, Manifest):
            # Not its subject: that names the manifest it refers to, a weak link to
            # another graph (image-spec), often in another repository; neither skopeo
            # nor regclient copies or keeps it with the referrer.
            return kind, [(blob, True, False) for blob in parsed.blobs()]
        return kind, []

    def blob_problem(self, digest: Digest) -> str:
        """Why the blob's file does not hold its digest's bytes ("" when it does, or when
        it is gone); OSError when it cannot be read."""
        try:
            with self.open_blob(digest) as f:
                return _content_problem_at(f.fileno(), digest)
        except (NotFoundError, FileNotFoundError):  # deleted meanwhile: nothing to check
            return ""

    def discard_if_corrupt(self, digest: Digest) -> bool:
        """Delete the blob when its bytes do not hash to its name, so that the next pull
        fetches it again; True when it was deleted. Only the file that was checked is
        deleted, never one a concurrent write has just put in its place."""
        path = self.blob_path(digest)
        try:
            before = os.lstat(path)
        except FileNotFoundError:
            return False
        try:
            if not stat.S_ISREG(before.st_mode) or not self.blob_problem(digest):
                return False
        except OSError:
            return False  # unreadable here (another user's blob) is not corrupt
        if not self.delete_blob(digest, only=before):
            return False
        _log().warning("deleted corrupt blob %s", digest)
        return True

    def gc(self, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS,
           dry_run: bool = False) -> GcReport:
        """Delete what ocicache (or linuxkit) wrote and nothing needs, once older than the
        grace period: blobs named by a valid digest that no name reaches, and temporary
        files. Any other file is left alone, and no directory is followed through a
        symlink (files are deleted relative to a directory opened with O_NOFOLLOW)."""
        with self.deleting_blobs(), self.lock():
            marked = self.reachable(self.root_entries())
            if marked.unreadable:
                raise CorruptCacheError(
                    f"gc stopped: cannot read {marked.unreadable[0]}; run 'ocicache verify'")
            deadline = time.time() - grace_seconds
            deleted: List[Tuple[str, int]] = []
            young = 0
            places = [(".", ""), *((f"blobs/{a}", a) for a in sorted(_DIGEST_HEX_LENGTHS))]
            for directory, algorithm in places:
                for name, st, unlink in self._own_files(directory):
                    digest = _digest_or_none(algorithm, name) if algorithm else None
                    if digest is not None:
                        if digest in marked.digests:
                            continue
                        label = str(digest)
                    elif _is_temporary(algorithm, name):
                        label = name
                    else:
                        continue  # not ocicache's: never deleted
                    if st.st_mtime > deadline:
                        young += 1
                        continue
                    deleted.append((label, st.st_size))
                    if not dry_run:
                        unlink()
            return GcReport(tuple(deleted), young, len(marked.digests))

    @contextlib.contextmanager
    def _directory(self, directory: str) -> Iterator[Optional[int]]:
        """A descriptor of ``directory`` (relative to the cache), each component opened
        with O_NOFOLLOW; None when it is missing or a symlink, which is never followed."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
        fds: List[int] = []
        try:
            try:
                fds.append(os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                for part in [p for p in directory.split("/") if p != "."]:
                    fds.append(os.open(part, flags, dir_fd=fds[-1]))
            except (FileNotFoundError, NotADirectoryError):
                fds.append(-1)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                fds.append(-1)
            yield fds[-1] if fds[-1] >= 0 else None
        finally:
            for fd in reversed(fds):
                if fd >= 0:
                    os.close(fd)

    def _own_files(self, directory: str
                   ) -> Iterator[Tuple[str, os.stat_result, Callable[[], None]]]:
        """The regular files of ``directory`` (see ``_directory``): (name, lstat, a
        function deleting that name there)."""
        with self._directory(directory) as fd:
            if fd is None:
                return
            for entry in os.scandir(fd):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    def unlink(name: str = entry.name, where: int = fd) -> None:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=where)
                    yield entry.name, st, unlink

    def delete_blob(self, digest: Union[str, Digest],
                    only: Optional[os.stat_result] = None) -> bool:
        """Delete the blob's file, a regular file reached without following a symlink
        (and, given ``only``, that very file); True when it was deleted. rm, clean, gc
        and repair delete through this, so none can delete outside the cache."""
        d = Digest.parse(digest)
        with self._directory(f"blobs/{d.algorithm}") as fd:
            if fd is None:
                return False
            try:
                st = os.stat(d.hex, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or (only is not None and (
                        st.st_ino, st.st_dev, st.st_mtime_ns) != (
                        only.st_ino, only.st_dev, only.st_mtime_ns)):
                    return False
                os.unlink(d.hex, dir_fd=fd)
            except FileNotFoundError:
                return False
        return True

    def verify(self, repair: bool = False) -> VerifyReport:
        """Re-hash every blob, and check that every name reaches complete content whose
        descriptors (sizes, media types, pinned digests) agree with it. Each problem
        names the images that need the blob. With ``repair``, corrupt blobs are
        deleted, so that the next pull of an image needing one fetches it again.

        Consistent beside concurrent pulls and removals: the names are followed while
        holding the lock that deleting blobs takes exclusively, so a name read from
        index.json cannot lose its blobs while they are looked at."""
        corrupt: Dict[Digest, str] = {}
        strays: List[str] = []
        checked = 0
        for digest, path, st in self.blob_files():
            if digest is None:
                name = os.path.basename(path)
                if not _is_temporary(os.path.basename(os.path.dirname(path)), name):
                    strays.append(f"{_printable(path)}: not named by a valid digest")
                continue
            if not stat.S_ISREG(st.st_mode):
                corrupt[digest] = "not a regular file"
                continue
            try:
                problem = self.blob_problem(digest)
            except OSError as e:
                strays.append(f"{digest}: cannot be read ({e.strerror or e})")
                continue
            if os.path.lexists(path):  # one deleted meanwhile was not checked
                checked += 1
            if problem:
                corrupt[digest] = problem
        # A blob whose bytes changed and identity did not (a disk's error, a write through
        # a mapping) is no longer vouched for: the next export hashes it, and refuses it.
        self.record_checked({}, forget={str(d) for d in corrupt})
        with self.adding_blobs():
            marked = self.reachable(self.root_entries())
        repaired: List[str] = []
        if repair and corrupt:
            with self.deleting_blobs():
                for digest in corrupt:
                    if self.discard_if_corrupt(digest):
                        repaired.append(str(digest))
        described = []
        for digest, why in corrupt.items():
            names = marked.owners(digest)
            needed = f" (needed by {_names_list(names)})" if names else " (no name uses it)"
            described.append(f"{digest}{needed}: {why}")
        return VerifyReport(checked, tuple(strays + described),
                            marked.missing + marked.unreadable, marked.wrong, tuple(repaired))


_NAME_SHOWN = 300  # characters of a name in a message: a whole reference, never megabytes


def _names_list(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _digest_or_none(algorithm: str, name: str) -> Optional[Digest]:
    try:
        return Digest(algorithm, name)
    except InvalidDigestError:
        return None


def _printable(text: str) -> str:
    """A file name (which may hold any bytes) safe for one line of any terminal."""
    return _one_line(text.encode(errors="surrogateescape").decode(errors="backslashreplace"))


# =====================================================================================
# Credentials and challenges
#
# Where credentials come from (docker config.json, credential helpers, podman's
# auth.json) and how a registry asks for them (WWW-Authenticate). Parsing is pure; the
# lookups read files and run helpers. Secrets never reach a message or a repr.
# =====================================================================================

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_HELPER_TIMEOUT_SECONDS = 30.0
_HELPER_OUTPUT_LIMIT = 1024 * 1024


@_value_type
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header: ``Bearer realm=...,service=...``."""

    scheme: str                                   # lowercase: "basic", "bearer"
    params: Mapping[str, str] = _field(default_factory=dict)


_CHALLENGE_TOKEN = r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*"
_CHALLENGE_VALUE = r'"((?:[^"\\]|\\.)*)"|([^,\s]*)'


def parse_challenges(header: str) -> List[Challenge]:
    """The challenges of a ``WWW-Authenticate`` header, in order; [] for garbage."""
    challenges: List[Challenge] = []
    token, quoted_or_bare = re.compile(_CHALLENGE_TOKEN), re.compile(_CHALLENGE_VALUE)
    position, length = 0, len(header)
    while position < length:
        match = token.match(header, position)
        if match is None:
            position = header.find(",", position + 1)
            if position < 0:
                break
            position += 1
            continue
        scheme, position = match.group(1).lower(), match.end()
        params: Dict[str, str] = {}
        while position < length:
            param = token.match(header, position)
            if param is None or header[param.end():param.end() + 1] != "=":
                break
            value = quoted_or_bare.match(header, param.end() + 1)
            assert value is not None  # the pattern also matches the empty string
            text = value.group(1)
            params[param.group(1).lower()] = (re.sub(r"\\(.)", r"\1", text) if text is not None
                                              else value.group(2))
            position = value.end()
            while position < length and header[position] in " \t,":
                position += 1
        challenges.append(Challenge(scheme, params))
    return challenges


@_value_type
class Credentials:
    """A username and secret for one registry, and where they came from (``source``:
    a file and its key, a helper, a mirror URL). ``repr`` never shows a secret."""

    username: str = ""
    password: str = _field(default="", repr=False)
    identity_token: str = _field(default="", repr=False)
    registry_token: str = _field(default="", repr=False)
    source: str = _field(default="", repr=False)  # said in messages, not in reprs

    def basic_header(self) -> str:
        import base64
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    def hidden(self, text: str) -> str:
        """``text`` with every secret of these credentials replaced, as sent and as
        encoded: a server may quote what it was sent in its error message."""
        import urllib.parse
        secrets = [self.password, self.identity_token, self.registry_token]
        secrets += [urllib.parse.quote_plus(secret) for secret in secrets]
        if self.username or self.password:
            secrets.append(self.basic_header()[len("Basic "):])
        for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
            text = text.replace(secret, "<secret>")
        return text

    def checked(self) -> "Credentials":
        """These credentials, if every token can go into an HTTP header or form as it
        is; else AuthenticationError naming the source and the key, never the value."""
        for key, value in (("identitytoken", self.identity_token),
                           ("registrytoken", self.registry_token)):
            if value and not re.fullmatch(r"[\x21-\x7e]+", value):
                raise AuthenticationError(
                    f"{self.source or 'the credentials'}: its {key} holds a character an "
                    "HTTP header cannot carry (a space, control or non-ASCII character)")
        return self


def _auth_files() -> List[str]:
    """docker's config.json, then podman's auth files, in the order peers read them."""
    home = os.path.expanduser("~")
    docker = os.environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker")
    files = [os.path.join(docker, "config.json")]
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    files.append(os.path.join(config_home, "containers", "auth.json"))
    return files


def _normalise_auth_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``http://h:5000/v2/ns`` ->
    ``h:5000/ns``."""
    key = re.sub(r"^[a-z]+://", "", key.strip()).rstrip("/")
    key = re.sub(r"/v[12](?=/|$)", "", key, count=1)
    host, sep, path = key.partition("/")
    if host in (_LEGACY_DEFAULT_REGISTRY, DOCKER_HUB_API_HOST):
        host = DEFAULT_REGISTRY
    return host + sep + path


def _auth_lookup_keys(registry: str, repository: str) -> List[str]:
    """Most specific first: ``host/ns/repo``, ``host/ns``, ``host``."""
    parts = repository.split("/")
    return [f"{registry}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)] + [registry]


def _read_auth_file(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OciCacheError(f"cannot read credentials file {path}: {e.strerror}") from None
    try:
        return _load_json_object(data, f"credentials file {path}")
    except OciCacheError as e:
        raise OciCacheError(f"{e}; fix or remove it") from None


def _run_bounded(argv: Sequence[str], stdin: bytes, limit: int,
                 timeout: float) -> Tuple[int, bytes, bytes]:
    """Run ``argv`` and return its status, stdout and stderr, as ``subprocess.run``
    would, but killed past ``timeout`` (TimeoutExpired) or past ``limit`` bytes of
    output (ValueError): a helper printing without end must not fill the memory."""
    import selectors
    deadline = time.monotonic() + timeout
    with _subprocess.Popen(argv, stdin=_subprocess.PIPE, stdout=_subprocess.PIPE,
                           stderr=_subprocess.PIPE) as process:
        assert process.stdin and process.stdout and process.stderr  # all three are pipes
        output = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
        try:
            # It may exit without reading; then the write, or the flush in close(),
            # fails (close() closes the pipe even so).
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write(stdin)
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
            with selectors.DefaultSelector() as selector:
                selector.register(process.stdout, selectors.EVENT_READ)
                selector.register(process.stderr, selectors.EVENT_READ)
                while selector.get_map():
                    ready = selector.select(deadline - time.monotonic())
                    if not ready:
                        raise _subprocess.TimeoutExpired(list(argv), timeout)
                    for key, _ in ready:
                        chunk = os.read(key.fd, 64 * 1024)
                        if not chunk:
                            selector.unregister(key.fileobj)
                        output[key.fd] += chunk
                        if sum(map(len, output.values())) > limit:
                            raise ValueError("too much output")
            status = process.wait(max(deadline - time.monotonic(), 0.0))
        finally:
            if process.poll() is None:
                process.kill()
        return (status, bytes(output[process.stdout.fileno()]),
                bytes(output[process.stderr.fileno()]))


def _call_credential_helper(helper: str, action: str,
                            stdin: bytes) -> Tuple[str, int, bytes, bytes]:
    """Run ``docker-credential-<helper> <action>`` (get, store, erase): its program
    name, status, stdout and stderr; a helper that cannot run is one clear error."""
    program = f"docker-credential-{helper}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
        raise OciCacheError(f"invalid credential helper name {helper!r}")
    try:
        status, stdout, stderr = _run_bounded([program, action], stdin,
                                              _HELPER_OUTPUT_LIMIT, _HELPER_TIMEOUT_SECONDS)
    except FileNotFoundError:
        raise OciCacheError(f"credential helper {program} is not on PATH") from None
    except OSError as e:
        raise OciCacheError(f"cannot run credential helper {_shorten(program)}: "
                            f"{e.strerror}") from None
    except _subprocess.TimeoutExpired:
        raise OciCacheError(f"credential helper {program} did not answer within "
                            f"{_HELPER_TIMEOUT_SECONDS:.0f}s") from None
    except ValueError:
        raise OciCacheError(f"credential helper {program} printed more than "
                            f"{_HELPER_OUTPUT_LIMIT} bytes") from None
    return program, status, stdout, stderr


def _run_credential_helper(helper: str, server: str) -> Optional[Credentials]:
    program, status, stdout, stderr = _call_credential_helper(helper, "get", server.encode())
    if status != 0:
        if b"credentials not found" in (stdout + stderr).lower():
            return None
        raise OciCacheError(f"credential helper {program} failed with status {status}")
    try:
        answer = _parse_json(stdout, "answer")
        username, secret = str(answer.get("Username", "")), str(answer.get("Secret", ""))
    except (OciCacheError, AttributeError):
        raise OciCacheError(f"credential helper {program} printed something that is not "
                            "its JSON answer") from None
    source = f"credential helper {program}"
    if username == "<token>":
        return Credentials(identity_token=secret, source=source).checked()
    return Credentials(username, secret, source=source)


def _credentials_from_entry(entry: Any, where: str) -> Optional[Credentials]:
    if not isinstance(entry, dict):
        return None
    username, password = str(entry.get("username", "")), str(entry.get("password", ""))
    if entry.get("auth"):
        import base64
        import binascii
        try:
            username, _, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
        except (binascii.Error, ValueError):  # not base64, not ASCII, not UTF-8
            raise OciCacheError(f"{where}: an 'auth' value is not "
                                "base64 of user:password") from None
    if entry.get("identitytoken"):
        return Credentials(username, identity_token=str(entry["identitytoken"]),
                           source=where).checked()
    if entry.get("registrytoken"):
        return Credentials(username, registry_token=str(entry["registrytoken"]),
                           source=where).checked()
    if username == "<token>":
        return Credentials(identity_token=password, source=where).checked()
    return Credentials(username, password, source=where) if username or password else None


def _server_url(registry: str) -> str:
    """What docker names a registry by in ``auths`` and to credential helpers."""
    return DOCKER_HUB_AUTH_KEY if registry == DEFAULT_REGISTRY else registry


def _helper_for(config: Mapping[str, Any], registry: str) -> str:
    """The ``credHelpers`` entry of an auth file for ``registry``, or ""."""
    helpers = config.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _normalise_auth_key(key) == registry and isinstance(helper, str) and helper:
                return helper
    return ""


def find_credentials(registry: str, repository: str = "") -> Optional[Credentials]:
    """Credentials for ``registry`` (a host[:port], ``docker.io`` for Docker Hub).

    Each auth file in turn: its ``credHelpers`` for the host, its ``auths`` (the most
    specific key wins), then its ``credsStore``. None means anonymous.
    """
    keys = _auth_lookup_keys(registry, repository)
    server = _server_url(registry)
    for path in _auth_files():
        config = _read_auth_file(path)
        if config is None:
            continue
        helper = _helper_for(config, registry)
        if helper:
            return _run_credential_helper(helper, server)
        auths = config.get("auths") or {}
        if isinstance(auths, dict):
            normalised = {_normalise_auth_key(k): (k, v) for k, v in auths.items()}
            for key in keys:
                if key in normalised:
                    original, entry = normalised[key]
                    where = f"credentials file {path} (auths {_shorten(_one_line(original))!r})"
                    credentials = _credentials_from_entry(entry, where)
                    if credentials is not None:
                        return credentials
        store = config.get("credsStore")
        if isinstance(store, str) and store:
            return _run_credential_helper(store, server)
    return None


def _login_registry(value: str) -> str:
    """The registry a login names, as credentials are looked up by: ``docker.io`` for
    Docker Hub (also ``index.docker.io`` and ``https://index.docker.io/v1/``), else
    ``host[:port]``; an error for anything else (a path, a blank)."""
    registry = _normalise_auth_key(value) if value.isprintable() else ""
    if not re.fullmatch(_DOMAIN, registry):
        raise OciCacheError(f"invalid registry {_shorten(_one_line(value))!r}: name a "
                            "host[:port], e.g. ghcr.io or localhost:5000 (docker.io for "
                            "Docker Hub)")
    return registry


def _check_login(username: str, password: str) -> None:
    """What a user name and password must be to be stored as docker stores them
    (``user:password`` in base64, so no colon in the name)."""
    if not username or not username.isprintable() or ":" in username:
        raise OciCacheError("invalid user name: it must be non-empty, without a colon or "
                            "control characters")
    if not password:
        raise OciCacheError("empty password")


def _docker_config_file() -> Tuple[str, Dict[str, Any]]:
    """docker's config.json (``$DOCKER_CONFIG``, else ``~/.docker``) and what it holds;
    {} when it does not exist. One that cannot be read is an error: it is never
    replaced by a login, since that would lose what it held."""
    path = _auth_files()[0]
    config = _read_auth_file(path) or {}
    auths = config.get("auths")
    if auths is not None and not isinstance(auths, dict):
        raise OciCacheError(f"credentials file {path}: 'auths' is not a JSON object; fix it")
    return path, config


def _write_docker_config(path: str, config: Mapping[str, Any]) -> None:
    """Replace docker's config.json with ``config``, as docker does (a tab indent): a
    file of mode 0600 written beside it (beside its target, if it is a link), fsynced
    and renamed over it, so that a reader sees the old file or the new one, whole."""
    data = _json_bytes(config, indent="\t") + b"\n"
    target = os.path.realpath(path)
    try:
        os.makedirs(os.path.dirname(target), 0o700, exist_ok=True)
        directory = os.open(os.path.dirname(target), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise OciCacheError(f"cannot write credentials file {path}: {e.strerror}") from None
    temp = _temporary_name(f".{os.path.basename(target)}")
    try:
        fd = os.open(temp, _NEW_FILE, 0o600, dir_fd=directory)
        try:
            os.fchmod(fd, 0o600)  # the umask may only have narrowed it; this is exact
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, os.path.basename(target), src_dir_fd=directory, dst_dir_fd=directory)
        os.fsync(directory)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=directory)
        raise OciCacheError(f"cannot write credentials file {path}: {e.strerror}") from None
    finally:
        os.close(directory)


def _without_registry(auths: Mapping[str, Any], registry: str) -> Dict[str, Any]:
    """``auths`` without any key that names ``registry`` (``host``, ``https://host``,
    ``http://host/v2/`` all do): a stale spelling would shadow what a login stores."""
    return {k: v for k, v in auths.items() if _normalise_auth_key(k) != registry}


def store_credentials(registry: str, username: str, password: str) -> str:
    """Store credentials for ``registry`` where docker keeps them, and say where: the
    ``credHelpers`` helper for it or the ``credsStore`` of ``$DOCKER_CONFIG/config.json``
    (``docker-credential-<name> store``), else that file's ``auths``. The file keeps
    every other key it had; entries of ``auths`` naming the registry otherwise are
    dropped, since they would be read before a helper's or instead of the new one."""
    registry = _login_registry(registry)
    _check_login(username, password)
    path, config = _docker_config_file()
    auths = config.get("auths") or {}
    server = _server_url(registry)
    helper = _helper_for(config, registry) or config.get("credsStore") or ""
    if isinstance(helper, str) and helper:
        payload = _json_bytes({"ServerURL": server, "Username": username, "Secret": password})
        program, status, _, _ = _call_credential_helper(helper, "store", payload)
        if status != 0:
            raise OciCacheError(f"credential helper {program} failed to store the credentials "
                                f"for {registry} (status {status})")
        if _without_registry(auths, registry) != auths:
            _write_docker_config(path, {**config, "auths": _without_registry(auths, registry)})
        return f"credential helper {program}"
    import base64
    entry = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
    kept = _without_registry(auths, registry)
    # The registry's entry stays where it was in the file, as docker keeps it.
    new_auths = {k: (entry if k == server else v) for k, v in auths.items()
                 if k == server or k in kept}
    new_auths.setdefault(server, entry)
    _write_docker_config(path, {**config, "auths": new_auths})
    return f"credentials file {path}"


def erase_credentials(registry: str) -> List[str]:
    """Forget the credentials docker keeps for ``registry``: the helper's (``erase``)
    and the ``auths`` entries of ``$DOCKER_CONFIG/config.json``. Where they were
    removed from; [] when there were none."""
    registry = _login_registry(registry)
    path, config = _docker_config_file()
    erased = []
    helper = _helper_for(config, registry) or config.get("credsStore") or ""
    if isinstance(helper, str) and helper:
        program, status, stdout, stderr = _call_credential_helper(
            helper, "erase", _server_url(registry).encode())
        if status == 0:
            erased.append(f"credential helper {program}")
        elif b"credentials not found" not in (stdout + stderr).lower():
            raise OciCacheError(f"credential helper {program} failed to erase the credentials "
                                f"for {registry} (status {status})")
    auths = config.get("auths") or {}
    if _without_registry(auths, registry) != auths:
        _write_docker_config(path, {**config, "auths": _without_registry(auths, registry)})
        erased.append(f"credentials file {path}")
    return erased


# =====================================================================================
# Transport
#
# HTTP for the registry client: keep-alive connections (one per worker thread and
# host), TLS verified with extra CAs and certs.d, plain HTTP only for loopback and
# registries named insecure, retries with backoff that honour Retry-After (shared per
# host), redirects that never carry Authorization to another host, proxies from the
# environment, and a timeout on every socket operation.
# =====================================================================================

_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 522})
_CERTS_D_ROOTS = ("/etc/docker/certs.d", "/etc/containers/certs.d",
                  "~/.config/containers/certs.d")


def _certs_d_roots() -> Tuple[str, ...]:
    """certs.d directories: ``$OCICACHE_CERTS_D`` (colon-separated) replaces the defaults."""
    value = os.environ.get("OCICACHE_CERTS_D")
    return tuple(p for p in value.split(":") if p) if value is not None else _CERTS_D_ROOTS


_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d, connected to as a.b.c.d


def _address(name: str) -> Optional[bytes]:
    """The address (4 or 16 bytes) a host name is as the resolver reads it, None for a
    name it looks up. Not as ipaddress reads it: glibc's getaddrinfo takes 127.1,
    0x7f.0.0.1, 0177.0.0.1, 2130706433 and 0x7f000001 for 127.0.0.1 (inet_aton's forms)."""
    if ":" not in name and (not name[:1].isdigit() or name.strip("0123456789abcdefxABCDEFX.")):
        return None  # a host name, not an address (a part of an address starts with a digit)
    import socket
    try:
        if ":" in name:  # a zone (%eth0) names an interface, not another address
            return socket.inet_pton(socket.AF_INET6, name.partition("%")[0])
        return socket.inet_aton(name)
    except OSError:
        return None


def _host_name(host: str) -> str:
    """The name of ``host[:port]`` (``[v6]:port``), lower-case as a resolver matches it."""
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.find("]")]
    return name.lower()


@functools.lru_cache(maxsize=256)  # asked for each request
def _is_loopback(host: str) -> bool:
    """Whether ``host[:port]`` is this machine's loopback by its name alone: ``localhost``,
    or an address in 127.0.0.0/8 or ::1 however spelled (IPv4-mapped too). What loopback
    allows (plain HTTP, no proxy) is safe only where the bytes never leave the machine,
    so a name that DNS answers is never loopback here, whatever it resolves to now."""
    name = _host_name(host)
    if name == "localhost":  # not "*.localhost": a resolver may send those anywhere
        return True
    address = _address(name)
    if address is not None and address[:12] == _V4_MAPPED:
        address = address[12:]
    return address is not None and (address[0] == 127 if len(address) == 4
                                    else address == bytes(15) + b"\x01")


def _is_here(address: bytes) -> bool:
    """Whether a connection to ``address`` reaches this machine: loopback, and the
    unspecified 0.0.0.0/8 and :: that Linux connects to loopback, IPv4-mapped or not."""
    if address[:12] == _V4_MAPPED:
        address = address[12:]
    if len(address) == 4:
        return address[0] in (0, 127)
    return address[:15] == bytes(15) and address[15] in (0, 1)


def _sends_here(source: str, target: str) -> bool:
    """Whether a server at ``source`` (host[:port]) names ``target`` on this machine
    while it is elsewhere itself: a registry must not make ocicache send requests (a
    DELETE to an upload Location, say) to a local service such as a docker API. What
    the target's name says, in any spelling the resolver reads as this machine."""
    if _is_loopback(source):
        return False
    name = _host_name(target)
    address = _address(name)
    return name == "localhost" or (address is not None and _is_here(address))


def _open_socket(address: Union[str, bytes], port: int, timeout: float,
                 named_by: str = "") -> Any:
    """A TCP connection to ``address`` (a name or an address) and ``port``. A host that a
    remote server named (``named_by``, that server: a redirect, an upload Location, a
    token realm) is looked up once, here, and refused if an address of it is on this
    machine: a check before connecting would ask DNS a second time, and a rebinding
    server answers a remote address first and 127.0.0.1 next. Nor may it be another
    address of this machine's own (eth0's, docker0's 172.17.0.1, where a docker API may
    listen): a connection to one comes from that same address, and is closed unused."""
    import socket
    if not named_by:
        return socket.create_connection((address, port), timeout)  # type: ignore[arg-type]
    found = []  # (address, the connection's address: its zone kept for fe80::, no name)
    for family, _, _, _, sockaddr in socket.getaddrinfo(address, port, type=socket.SOCK_STREAM):
        ip, _, *rest = sockaddr
        found.append((str(ip), f"{ip}%{rest[1]}" if len(rest) > 1 and rest[1] else str(ip),
                      socket.inet_pton(family, str(ip))))
    name = address.decode("ascii") if isinstance(address, bytes) else address
    here = [host for host, _, packed in found if _is_here(packed)]
    if here:
        raise RegistryError(f"{named_by} named {_shorten(name)}, which resolves to {here[0]}, "
                            "on this machine; refusing")
    error: Optional[OSError] = None
    for host, numeric, _ in found:
        try:
            sock = socket.create_connection((numeric, port), timeout)
        except OSError as e:
            error = e
            continue
        if sock.getsockname()[0] == sock.getpeername()[0]:
            sock.close()
            raise RegistryError(f"{named_by} named {_shorten(name)}, which resolves to "
                                f"{host}, on this machine; refusing")
        return sock
    raise error or OSError(f"{_shorten(name)} has no address")


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,9}", value):
        return float(value)
    import email.utils
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(when - time.time(), 0.0)


def _without_userinfo(url: str) -> str:
    """A URL as it may be shown: ``user:password@`` left out, up to the last ``@``: a
    password holding ``/``, ``?`` or ``#`` unencoded ends the host part early, and no
    part of it may show."""
    scheme, sep, rest = url.partition("//") if "//" in url else ("", "", url)
    return scheme + sep + rest.rpartition("@")[2]


def _shown_url(url: str) -> str:
    """A URL as a message names it: no user name, no query (a CDN's signed URL holds its
    signature there, as S3's ``X-Amz-Signature``), no fragment."""
    return _without_userinfo(url).split("#", 1)[0].split("?", 1)[0]


def _is_http_url(url: str) -> bool:
    """Whether a request can go to ``url``: http or https, a host, a valid port, nothing
    that a request line cannot carry (a space, a control character, anything not
    ASCII). The one test for every URL a server names: a redirect, an upload Location,
    a token realm."""
    import urllib.parse
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # a bad port raises here
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and \
        re.fullmatch(r"[\x21-\x7e]+", url) is not None


def _may_send_credentials(url: str, registry: str, realm: str = "") -> bool:
    """Where a credential may go; the one place that decides it. ``registry`` is the
    ``scheme://host`` the credentials are for; ``realm`` the token realm that registry's
    own challenge named. A credential goes to that host (never downgraded to plain
    HTTP) and to that realm (plain HTTP only for a plain-HTTP registry or loopback);
    nowhere else: not to a redirect target, a CDN, an upload Location elsewhere."""
    import urllib.parse
    try:
        target, own = urllib.parse.urlsplit(url), urllib.parse.urlsplit(registry)
    except ValueError:
        return False
    if target.scheme not in ("http", "https") or "@" in target.netloc:
        return False
    if target.netloc == own.netloc:
        return not (own.scheme == "https" and target.scheme == "http")
    if not realm:
        return False
    wanted = urllib.parse.urlsplit(realm)
    if (target.scheme, target.netloc, target.path) != (wanted.scheme, wanted.netloc,
                                                       wanted.path):
        return False
    return target.scheme == "https" or own.scheme == "http" or _is_loopback(target.netloc)


@_value_type(frozen=False)
class TransportOptions:
    """How to reach registries. Tests and the command line fill it in."""

    insecure_registries: Tuple[str, ...] = ()
    ca_files: Tuple[str, ...] = ()
    certs_d_roots: Tuple[str, ...] = _field(default_factory=lambda: _certs_d_roots())
    timeout: float = 60.0
    attempts: int = 5
    backoff: float = 0.5
    max_retry_after: float = 60.0   # the longest wait a server may ask for and get
    retry_budget: float = 120.0     # seconds one operation may wait for retries, in all
    # One request costs a registry less than many (distribution saves its hash state
    # after every PATCH; pushing 512 MiB cost it 2.9 s of CPU in chunks, 2.3 s whole),
    # and docker and skopeo send whole blobs too; Quay refuses single uploads near 20 GB.
    chunked_upload_threshold: int = 8 * 1024 * 1024 * 1024
    upload_chunk_size: int = 16 * 1024 * 1024


Body = Union[None, bytes, Callable[[], io.RawIOBase], Callable[[], IO[bytes]]]
"""A request body: bytes, or a function opening a fresh stream for each attempt."""


class _Clock:
    """The deadline of what one connection reads now: a response's head, a small body
    whole, the rest of a body left to drain; none while a blob streams (a stall watch
    judges that). Every read checks it, so a server answering a byte at a time, with
    endless ``100 Continue`` or endless chunked trailers, ends at the deadline too."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = float("inf")

    def start(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def stop(self) -> None:
        self.deadline = float("inf")


class _TimedReader(io.RawIOBase):
    """A socket's bytes, read within its connection's deadline."""

    def __init__(self, sock: Any, clock: _Clock) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # keeps the socket open until closed
        self._clock = clock
        self.polling = False  # reads nothing: a buffer's peek shows only what it holds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.polling:
            return 0
        left = self._clock.deadline - time.monotonic()
        if left >= self._clock.timeout:
            return int(self._raw.readinto(buffer))
        if left <= 0:
            raise TimeoutError(f"timed out: no whole answer within {self._clock.timeout:g}s")
        self._sock.settimeout(left)
        try:
            return int(self._raw.readinto(buffer))
        finally:
            self._sock.settimeout(self._clock.timeout)

    def close(self) -> None:
        self._raw.close()
        super().close()


# -- HTTP/1.1 ------------------------------------------------------------------------
#
# The protocol itself, over one socket: what a registry client sends and reads, and no
# more. http.client would do, but importing it imports email.parser and ssl with it,
# 15 ms of every command that makes a request (a small pull is 100 ms); and it takes a
# length such as "+5" or "1_000", and a Transfer-Encoding it does not decode, for a body
# read to the end of the connection. Here a head that cannot be framed one way only is
# an error, and every line and count has the same bound as http.client's.

_MAX_HEAD_LINE = 65536     # bytes of a status, header, chunk-size or trailer line
_MAX_HEAD_FIELDS = 100     # header (or trailer) lines of one answer


class _HTTPError(Exception):
    """An answer that is not HTTP/1.1 as ocicache reads it, or that ended early. What
    the server said is quoted (``said``), on one line and shortened, and kept apart
    until the credentials the request carried are taken out of it (``hiding``): a
    server may say back what it was sent, in a field, a length, a chunk size."""

    said = ""  # a subclass that is an OSError too (_RemoteDisconnected) quotes nothing

    def __init__(self, message: str, said: str = "") -> None:
        super().__init__(f"{message}: {_shorten(_one_line(said), 60)!r}" if said else message)
        self.message, self.said = message, said

    def hiding(self, authorizations: Sequence[str]) -> "_HTTPError":
        """This error without the credentials of these Authorization values."""
        if not self.said or not authorizations:
            return self
        return _HTTPError(self.message, _without_credentials(self.said, authorizations))


def _without_credentials(text: str, authorizations: Sequence[str]) -> str:
    """``text`` without the credentials of these Authorization (or Proxy-Authorization)
    values, in the forms a server may say them back in: the value's secret, and a Basic
    one's user:password and password, in any case."""
    import base64
    forms = []
    for value in authorizations:
        scheme, _, secret = value.partition(" ")
        forms.append(secret)
        if scheme.lower() == "basic":
            with contextlib.suppress(ValueError):
                said = base64.b64decode(secret).decode("latin-1")
                forms += [said, said.partition(":")[2]]
    for form in sorted({f for f in forms if len(f) >= 4}, key=len, reverse=True):
        text = re.sub(re.escape(form), "<secret>", text, flags=re.IGNORECASE)
    return text


class _RemoteDisconnected(ConnectionResetError, _HTTPError):
    """The connection closed before the first byte of an answer (a kept-alive connection
    the server had closed: worth one fresh try)."""


class _TunnelRefused(OSError):
    """A proxy's answer to CONNECT other than 200; ``permanent`` for a 4xx that waiting
    does not change (407: the proxy wants other credentials, 403: not there)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.permanent = 400 <= status < 500 and status not in _RETRY_STATUSES


class _InvalidURL(_HTTPError):
    """A host or target no request can carry."""


def _host_and_port(host: str, default: int) -> Tuple[str, int]:
    """``host[:port]`` (``[v6]:port`` for IPv6) split, the port ``default`` when none."""
    name, port = host, ""
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or host[end + 1:end + 2] not in ("", ":"):
            raise _InvalidURL(f"not a valid host: {_shorten(host)!r}")
        name, port = host[1:end], host[end + 2:]
    elif ":" in host:
        name, _, port = host.rpartition(":")
    if not port:
        return name, default
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise _InvalidURL(f"not a valid port: {_shorten(port)!r}")
    return name, int(port)


class _Headers:
    """A head's fields: looked up by name in any case, the first of a repeated field."""

    __slots__ = ("_fields", "_first")

    def __init__(self, fields: List[Tuple[str, str]]) -> None:
        self._fields = fields
        self._first: Dict[str, str] = {}
        for name, value in fields:
            self._first.setdefault(name.lower(), value)

    def get(self, name: str, default: Any = None) -> Any:
        return self._first.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._first[name.lower()]

    def get_all(self, name: str) -> List[str]:
        name = name.lower()
        return [value for key, value in self._fields if key.lower() == name]


def _read_head_line(reader: IO[bytes], what: str) -> bytes:
    """One line of a head, "" at the end of the connection. A line the connection ended
    in the middle of is no line; one holding a CR but at its end is refused (RFC 9112
    2.2 lets a recipient): a parser that ends lines at a bare CR (http.client's email
    parser does) reads other fields in it than this one, and a proxy on the way may be
    that parser."""
    line = reader.readline(_MAX_HEAD_LINE + 1)
    if len(line) > _MAX_HEAD_LINE:
        raise _HTTPError(f"a {what} line longer than {_MAX_HEAD_LINE} bytes")
    if line and not line.endswith(b"\n"):
        raise _HTTPError(f"the connection closed in the middle of a {what} line")
    if b"\r" in line[:-2]:
        raise _HTTPError(f"a {what} line holding a bare CR", line.decode("iso-8859-1"))
    return line


def _read_fields(reader: IO[bytes], what: str) -> List[Tuple[str, str]]:
    """Header (or trailer) lines up to the blank line that ends them; a line that begins
    with white space continues the one before (obsolete, but still sent). Every line
    counts against the bound, a continuation too. A NUL becomes a space (RFC 9110 5.5):
    a value that holds one is then as invalid as it is (a realm, a length)."""
    fields: List[Tuple[str, str]] = []
    for _ in range(_MAX_HEAD_FIELDS + 1):
        line = _read_head_line(reader, what)
        if not line:
            raise _HTTPError(f"the connection closed in the middle of the {what}s")
        if line in (b"\r\n", b"\n"):
            return fields
        text = line.decode("iso-8859-1").rstrip("\r\n").replace("\0", " ")
        if text[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {text.strip()}".strip())
            continue
        name, colon, value = text.partition(":")
        if not colon or re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) is None:
            raise _HTTPError(f"not a {what} line", text)
        fields.append((name, value.strip(" \t")))
    raise _HTTPError(f"more than {_MAX_HEAD_FIELDS} {what} lines")


class _HTTPResponse:
    """An answer's status and headers, and its body as framed by them: Content-Length,
    chunked, or up to the end of the connection. ``length`` is what Content-Length says
    is still to come (None for the other two); ``will_close`` that the connection
    cannot carry another request after this one."""

    def __init__(self, reader: IO[bytes], method: str) -> None:
        self._reader: Optional[IO[bytes]] = reader
        self.authorizations: Sequence[str] = ()  # what the request carried, never quoted
        self.clock: Optional[_Clock] = None  # the connection's, for a chunk's framing
        while True:
            line = _read_head_line(reader, "status")
            if not line:
                raise _RemoteDisconnected("the connection closed before an answer")
            version, status, self.reason = [
                *line.decode("iso-8859-1").strip().split(None, 2), "", "", ""][:3]
            # A later HTTP/1 minor version reads as 1.1 (RFC 9110 2.5), as http.client did.
            if re.fullmatch(r"HTTP/1\.[0-9]", version) is None or len(status) != 3 or \
                    not (status.isascii() and status.isdigit()) or status[0] == "0":
                raise _HTTPError("not an HTTP/1.1 status line", line.decode("iso-8859-1"))
            self.status = int(status)
            self.headers = _Headers(_read_fields(reader, "header"))
            if not 100 <= self.status < 200 or self.status == 101:
                break  # a final answer (101 too: no upgrade was asked for, none is made)
        # Split at white space too: an obs-fold joins "close" to the next line's word.
        tokens = set(re.split(r"[\s,]+", ",".join(self.headers.get_all("Connection")).lower()))
        self.will_close = "close" in tokens or version == "HTTP/1.0" and \
            "keep-alive" not in tokens
        # Every Transfer-Encoding field, not the first: "chunked" then "gzip" is a gzip
        # body, which no chunked reading frames.
        codings = self.headers.get_all("Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length")
        self.length: Optional[int] = None
        self._chunk_left: Optional[int] = None  # of the chunk read now; None before one
        self.chunked = False
        if method == "HEAD" or self.status in (101, 204, 304) or \
                method == "CONNECT" and 200 <= self.status < 300:
            # No body, whatever the head says (RFC 9110 9.3.6: a tunnel's 2xx ignores
            # Content-Length and Transfer-Encoding). After a 101 the connection speaks
            # another protocol: nothing more of it is HTTP.
            self.length = 0
            self.will_close = self.will_close or self.status == 101
        elif codings:
            coding = ",".join(codings).strip(" \t").lower()
            if coding != "chunked":
                raise _HTTPError("a Transfer-Encoding ocicache does not decode",
                                 ", ".join(codings))
            self.chunked = True
            # Framed by both (or HTTP/1.0, which has no chunked): whoever framed it by
            # its Content-Length (a proxy on the way) reads the connection's next answer
            # elsewhere than here, so it carries none (RFC 9112 6.1, 6.3).
            self.will_close = self.will_close or bool(lengths) or version == "HTTP/1.0"
        elif lengths:
            # Repeated (as fields or in a list) only if every one says the same.
            values = {part.strip(" \t") for length in lengths for part in length.split(",")}
            value = values.pop()
            if values or not (value.isascii() and value.isdigit()):
                raise _HTTPError("not a valid Content-Length", ", ".join(lengths))
            self.length = int(value)
        else:
            self.will_close = True  # the body ends with the connection
        if self.length == 0:
            self.close()

    def isclosed(self) -> bool:
        """Whether the body was read to its end (or the response closed)."""
        return self._reader is None

    def close(self) -> None:
        self._reader = None

    def read1(self, n: int = COPY_BUFFER_SIZE) -> bytes:
        """Some of the body, at most ``n`` bytes, at least one unless it has ended."""
        reader = self._reader
        if reader is None or n == 0:
            return b""
        if self.chunked:
            try:
                return self._read1_chunked(reader, n)
            except _HTTPError as e:
                raise e.hiding(self.authorizations) from None
        if self.length is not None:
            data = reader.read1(min(n, self.length))  # type: ignore[attr-defined]
            if not data:  # ended early: ``length`` says by how much
                self.will_close = True  # and the connection with it
                self.close()
                return b""
            self.length -= len(data)
            if not self.length:
                self.close()
            return data  # type: ignore[no-any-return]
        data = reader.read1(n)  # type: ignore[attr-defined]
        if not data:
            self.close()
        return data  # type: ignore[no-any-return]

    def _read1_chunked(self, reader: IO[bytes], n: int) -> bytes:
        if not self._chunk_left:
            # A chunk's framing within the timeout even while a blob streams without a
            # deadline: the stall watch sees only a body's bytes, and a size line sent
            # a byte every 59 s takes six weeks to reach its 64 KiB bound.
            clock = self.clock
            paused = clock is not None and clock.deadline == float("inf")
            if clock is not None and paused:
                clock.start()
            try:
                self._chunk_left = self._next_chunk(reader)
            finally:
                if clock is not None and paused:
                    clock.stop()
            if not self._chunk_left:
                self.close()
                return b""
        data = reader.read1(min(n, self._chunk_left))  # type: ignore[attr-defined]
        if not data:
            raise _HTTPError("the connection closed in the middle of a chunked body")
        self._chunk_left -= len(data)
        return data  # type: ignore[no-any-return]

    def _next_chunk(self, reader: IO[bytes]) -> int:
        """The size of the next chunk, its line read (and the trailers after the last)."""
        if self._chunk_left == 0 and reader.read(2) != b"\r\n":
            raise _HTTPError("a chunk of the body did not end with CRLF")
        line = _read_head_line(reader, "chunk size")
        if not line:
            raise _HTTPError("the connection closed in the middle of a chunked body")
        size = line.split(b";", 1)[0].strip()
        if len(size) > 16 or re.fullmatch(rb"[0-9A-Fa-f]+", size) is None:
            raise _HTTPError("not a chunk size line", line.decode("iso-8859-1"))
        chunk = int(size, 16)
        if not chunk:
            _read_fields(reader, "trailer")
        return chunk

    def read(self, n: int = -1) -> bytes:
        """The body up to ``n`` bytes (all of it when ``n`` is negative)."""
        pieces = []
        left = n
        while left:
            piece = self.read1(COPY_BUFFER_SIZE if left < 0 else left)
            if not piece:
                break
            pieces.append(piece)
            left -= len(piece) if left > 0 else 0
        return b"".join(pieces)


class _HTTPConnection:
    """One connection to ``host`` (``host[:port]``), opened at its first request, plain
    or TLS (with ``context``), directly or through an HTTP proxy's CONNECT tunnel. Its
    reads keep to ``clock``'s deadline, its other socket operations to ``timeout``."""

    def __init__(self, host: str, timeout: float, clock: _Clock, context: Any = None,
                 tunnel: Optional[Tuple[str, Dict[str, str]]] = None) -> None:
        self.host = host            # the proxy, for a tunnel
        self.sock: Any = None
        self.blocksize = COPY_BUFFER_SIZE
        self._timeout = timeout
        self._clock = clock
        self._context = context
        self._tunnel = tunnel       # the host the tunnel leads to, and CONNECT's headers
        self._reader: Optional[IO[bytes]] = None
        self._timed: Optional[_TimedReader] = None
        self._response: Optional[_HTTPResponse] = None  # the last answer read
        self._method = ""
        self._authorizations: Tuple[str, ...] = ()  # the request's, kept out of errors
        self.named_by = ""  # the remote server that named the host, if one did

    def _connect(self) -> None:
        import socket
        name, port = _host_and_port(self.host, 443 if self._context and not self._tunnel
                                    else 80)
        # bytes: a str host is encoded with the idna codec, whose import costs 2 ms
        address = name.encode("ascii") if name.isascii() else name
        sock = _open_socket(address, port, self._timeout, self.named_by)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server = name
            if self._tunnel is not None:
                target, headers = self._tunnel
                server, target_port = _host_and_port(target, 443)
                target = f"[{server}]:{target_port}" if ":" in server else \
                    f"{server}:{target_port}"
                lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}",
                         *(f"{k}: {v}" for k, v in headers.items()), "", ""]
                sock.sendall("\r\n".join(lines).encode("latin-1"))
                timed = _TimedReader(sock, self._clock)
                reader = io.BufferedReader(timed)
                secrets = [v for k, v in headers.items() if k.lower() == "proxy-authorization"]
                try:
                    answer = _HTTPResponse(reader, "CONNECT")
                except _HTTPError as e:
                    raise e.hiding(secrets) from None
                if answer.status != 200:
                    reason = _without_credentials(answer.reason, secrets)
                    raise _TunnelRefused(f"the proxy {self.host} refused the tunnel to "
                                         f"{target}: {answer.status} "
                                         f"{_shorten(_one_line(reason), 60)}".rstrip(),
                                         answer.status)
                timed.polling = True  # what the buffer holds past the head, and no more
                if reader.peek(1):
                    # The tunnel's first bytes are the server's answer to a TLS hello not
                    # sent yet: these are the proxy's, and would be lost unseen.
                    raise OSError(f"the proxy {self.host} sent bytes after its answer to "
                                  "CONNECT")
            if self._context is not None:
                sock = self._context.wrap_socket(sock, server_hostname=server)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._timed = _TimedReader(sock, self._clock)
        self._reader = io.BufferedReader(self._timed)

    def quiet(self) -> bool:
        """Whether the connection is open with nothing to read: what a server sent
        before it was asked (a body after the head of a HEAD's or a 204's answer, bytes
        past a Content-Length) would be read as the answer to the next request."""
        import select
        sock, reader, timed = self.sock, self._reader, self._timed
        if sock is None or reader is None or timed is None:
            return False
        timed.polling = True
        try:
            if reader.peek(1):  # type: ignore[attr-defined]
                return False
        finally:
            timed.polling = False
        if getattr(sock, "pending", lambda: 0)():
            return False
        poller = select.poll()  # not select(): a descriptor past 1023 raises there
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return True
        if self._context is None:
            return False  # bytes, or the end of the connection
        # A TLS record that holds no data (a session ticket) makes the socket readable too.
        import ssl
        sock.setblocking(False)
        try:
            sock.recv(1)  # bytes, or b"" at the end: no next answer either way
            return False
        except ssl.SSLWantReadError:
            return True
        except OSError:
            return False
        finally:
            sock.settimeout(self._timeout)

    def request(self, method: str, target: str, body: Any = None,
                headers: Optional[Mapping[str, str]] = None) -> None:
        """Send a request: ``body`` is bytes or a stream read ``blocksize`` at a time (a
        stream's length is in the Content-Length given). The Host header is the host
        the request is for: the tunnel's, or in an absolute target, its own."""
        if re.fullmatch(r"[\x21-\x7e]+", target) is None:
            raise _InvalidURL(f"not a request target: {_shorten(_one_line(target))!r}")
        if self._response is not None and not self._response.isclosed():
            # The rest of the last answer would be read as this one's (http.client
            # refused with CannotSendRequest): it ends here, and so does the connection.
            self._response.close()
            self.close()
        self._response = None
        if self.sock is None:
            self._connect()
        headers = dict(headers or {})
        names = {name.lower() for name in headers}
        if "host" not in names:
            headers["Host"] = self._host_header(target)
        if "accept-encoding" not in names:
            headers["Accept-Encoding"] = "identity"  # a blob's bytes, as its digest says
        if "content-length" not in names:
            if isinstance(body, (bytes, bytearray)):
                headers["Content-Length"] = str(len(body))
            elif body is None and method in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = "0"
            elif body is not None:
                raise ValueError("a streamed request body needs its Content-Length")
        head = "".join([f"{method} {target} HTTP/1.1\r\n",
                        *(f"{k}: {v}\r\n" for k, v in headers.items()), "\r\n"])
        data = head.encode("latin-1")
        self._method = method
        self._authorizations = tuple(v for k, v in headers.items()
                                     if k.lower() in ("authorization", "proxy-authorization"))
        if isinstance(body, (bytes, bytearray)) and len(body) <= 64 * 1024:
            self.sock.sendall(data + body)
            return
        self.sock.sendall(data)
        if isinstance(body, (bytes, bytearray)):
            self.sock.sendall(body)
        elif body is not None:
            # Exactly the Content-Length: bytes past it (a file grown since its size was
            # taken) would be the server's next request, and its answer this
            # connection's next; bytes short of it leave the server waiting for them.
            left = int(next(v for k, v in headers.items() if k.lower() == "content-length"))
            while left:
                piece = body.read(min(self.blocksize, left))
                if not piece:
                    self.close()
                    raise _HTTPError(f"the request body ended {left} bytes short of its "
                                     "Content-Length")
                self.sock.sendall(piece)
                left -= len(piece)

    def _host_header(self, target: str) -> str:
        if self._tunnel is not None:
            host, default = self._tunnel[0], 443
        elif "://" in target:
            # Through a plain-HTTP proxy: the target's authority, as it is (RFC 9112
            # 3.2), ":80" too: a registry builds its upload Locations from it, and one
            # without the port the registry was named with is another host's.
            host = target.split("://", 1)[1].split("/", 1)[0]
            _host_and_port(host, 80)
            return host
        else:
            host, default = self.host, 443 if self._context is not None else 80
        name, port = _host_and_port(host, default)
        shown = f"[{name}]" if ":" in name else name
        return shown if port == default else f"{shown}:{port}"

    def getresponse(self) -> _HTTPResponse:
        if self._reader is None:
            raise _RemoteDisconnected("the connection is closed")
        try:
            self._response = _HTTPResponse(self._reader, self._method)
        except _HTTPError as e:
            raise e.hiding(self._authorizations) from None
        self._response.authorizations = self._authorizations
        self._response.clock = self._clock
        return self._response

    def close(self) -> None:
        sock, self.sock = self.sock, None
        reader, self._reader, self._timed = self._reader, None, None
        if reader is not None:
            reader.close()
        if sock is not None:
            sock.close()


class _Response:
    """A response whose body is read by the caller (``read``) or whole (``body``)."""

    def __init__(self, raw: _HTTPResponse, url: str,
                 connection: _HTTPConnection, timeout: float,
                 clock: Optional[_Clock] = None,
                 release: Callable[[], None] = lambda: None) -> None:
        self.raw = raw
        self.status = raw.status
        self.headers = raw.headers
        self.url = url
        self.timeout = timeout
        self._connection = connection
        self._clock = clock or _Clock(timeout)
        self._release = release  # the connection, free for another request
        self._closed = False

    def read(self, n: int = -1) -> bytes:
        return self.raw.read(n)

    def streaming(self) -> None:
        """The caller streams a long body and watches for stalls itself: no deadline."""
        self._clock.stop()

    def body(self, limit: int = MAX_MANIFEST_SIZE) -> bytes:
        """The whole body, at most ``limit`` bytes, within ``timeout`` seconds in all: a
        server trickling a byte at a time gets no longer than one that is silent."""
        self._clock.start()
        deadline = time.monotonic() + self.timeout
        data = bytearray()
        while len(data) <= limit:
            chunk = self.raw.read1(min(COPY_BUFFER_SIZE, limit + 1 - len(data)))
            if not chunk:
                if self.raw.length:  # the connection ended before Content-Length
                    raise _HTTPError(f"the answer ended {self.raw.length} bytes short of "
                                     "its Content-Length")
                return bytes(data)
            data += chunk
            if time.monotonic() > deadline:
                raise TimeoutError(f"its answer took longer than {self.timeout:.0f}s to arrive")
        self.close(reuse=False)
        raise OciCacheError(f"{_shown_url(self.url)} answered with more than {limit} bytes")

    def close(self, reuse: bool = True) -> None:
        """Done with the response: its connection goes back to the pool when the body
        was read whole (what is left is drained, up to a limit), else it is closed. Once:
        a released connection may be another thread's by the next call."""
        if self._closed:
            return
        self._closed = True
        if reuse and not self.raw.isclosed():
            # Read what is left to keep the connection, but not without end.
            self._clock.start()
            with contextlib.suppress(OSError, _HTTPError):
                drained = 0
                while drained <= COPY_BUFFER_SIZE:
                    chunk = self.raw.read(64 * 1024)
                    if not chunk:
                        break
                    drained += len(chunk)
                else:
                    reuse = False
            if not self.raw.isclosed():
                reuse = False
        if not reuse or self.raw.will_close:
            self._connection.close()
        else:
            self._release()


class _RetryBudget:
    """What one operation (a manifest, a blob, an upload) may still spend on retries,
    shared by every level that retries: the transport, a body fetched again, a resumed
    download. Levels that counted for themselves multiplied: five tries of five tries
    of a 60 s Retry-After made 25 minutes for one document."""

    def __init__(self, options: "TransportOptions") -> None:
        self.attempts = max(1, options.attempts)
        self.failures = 0
        self.wait_left = options.retry_budget
        self.max_wait = options.max_retry_after


# What OpenSSL says when the server speaks plain HTTP (its versions differ)...
_PLAIN_HTTP_TLS_ERRORS = ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE")
# ... and when the server wants a client certificate (TLS 1.3, then 1.2).
_CLIENT_CERTIFICATE_TLS_ERRORS = ("CERTIFICATE_REQUIRED", "ALERT_BAD_CERTIFICATE",
                                  "ALERT_HANDSHAKE_FAILURE")
_PERMANENT_TLS_ERRORS = (*_PLAIN_HTTP_TLS_ERRORS, *_CLIENT_CERTIFICATE_TLS_ERRORS,
                         "CERTIFICATE_VERIFY_FAILED")


def _is_permanent(error: BaseException) -> bool:
    """Failures that waiting does not fix: a name that does not resolve, TLS refused."""
    import socket
    return isinstance(error, (socket.gaierror, _InvalidURL)) or \
        getattr(error, "permanent", False) or any(
        reason in str(error).upper().replace(" ", "_") for reason in _PERMANENT_TLS_ERRORS)


_PooledConnection = Tuple[_HTTPConnection, _Clock, str, Dict[str, str]]


class _Transport:
    """Sends requests; a thread holds a connection per scheme://host until a response on
    it is read whole, then it goes back to the pool for whichever thread asks next: the
    workers of a pull reuse each other's connections (and TLS sessions) rather than each
    opening its own."""

    def __init__(self, options: TransportOptions) -> None:
        self.options = options
        self._local = threading.local()
        self._schemes: Dict[str, str] = {}
        self._not_before: Dict[str, float] = {}
        self._guard = threading.Lock()
        self._contexts: Dict[Tuple[str, bool], Any] = {}
        self._open: List[_HTTPConnection] = []
        self._idle: Dict[Tuple[str, str], List[_PooledConnection]] = {}
        self._named_by: Dict[str, str] = {}  # host: the remote server that named it

    def named(self, host: str, by: str) -> None:
        """Note that the server at ``by`` named ``host`` (both host[:port]) for a request:
        a redirect, an upload Location, a token realm. A connection opened to ``host``
        from then on refuses an address on this machine, unless ``by`` is on it too or is
        ``host`` itself. Through a proxy the proxy looks the name up, not ocicache."""
        if host != by and not _is_loopback(by):
            with self._guard:
                self._named_by.setdefault(host, by)

    def _ssl_context(self, host: str, verify: bool) -> Any:
        import ssl
        with self._guard:
            key = (host, verify)
            if key in self._contexts:
                return self._contexts[key]
            context = ssl.create_default_context()
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            for ca_file in self.options.ca_files:
                try:
                    context.load_verify_locations(cafile=ca_file)
                except (OSError, ssl.SSLError) as e:
                    raise OciCacheError(
                        f"cannot load CA certificates from {ca_file}: {e}") from None
            for root in self.options.certs_d_roots:
                directory = os.path.join(os.path.expanduser(root), host)
                if not os.path.isdir(directory):
                    continue
                for name in sorted(os.listdir(directory)):
                    path = os.path.join(directory, name)
                    key_file = path[:-len(".cert")] + ".key"
                    if name.endswith(".cert") and not os.path.exists(key_file):
                        raise OciCacheError(f"client certificate {path} has no key: "
                                            f"{key_file} is missing")
                    try:
                        if name.endswith(".crt"):
                            context.load_verify_locations(cafile=path)
                        elif name.endswith(".cert"):
                            context.load_cert_chain(path, key_file)
                    except (OSError, ssl.SSLError) as e:
                        raise OciCacheError(f"cannot load {path}: {e}") from None
            self._contexts[key] = context
            return context

    def _connection(self, scheme: str, host: str, reuse_idle: bool = True) -> _PooledConnection:
        """The thread's connection to scheme://host (an idle one, else a new one), its
        clock, and for plain HTTP through a proxy the prefix that makes a request
        target absolute and the headers each request adds (Proxy-Authorization)."""
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        if (scheme, host) in pool:
            return pool[(scheme, host)]  # type: ignore[no-any-return]
        with self._guard:
            idle = self._idle.get((scheme, host)) if reuse_idle else None
            while idle:
                entry = idle.pop()
                if entry[0].quiet():
                    pool[(scheme, host)] = entry
                    return entry
                entry[0].close()  # bytes nobody asked for, or closed by the server
        proxy, proxy_headers = self._proxy_for(scheme, host)
        with self._guard:
            named_by = "" if proxy else self._named_by.get(host, "")
        timeout = self.options.timeout
        prefix, added = "", {}
        clock = _Clock(timeout)
        if scheme == "https":
            verify = host not in self.options.insecure_registries
            context = self._ssl_context(host, verify)
            connection = _HTTPConnection(proxy or host, timeout, clock, context,
                                         tunnel=(host, proxy_headers) if proxy else None)
        else:
            connection = _HTTPConnection(proxy or host, timeout, clock)
            if proxy:  # the proxy is told where to, in each request
                prefix, added = f"http://{host}", proxy_headers
        connection.named_by = named_by
        pool[(scheme, host)] = (connection, clock, prefix, added)
        with self._guard:
            self._open.append(connection)
        return connection, clock, prefix, added

    def _release(self, scheme: str, host: str,
                 connection: _HTTPConnection) -> None:
        """The thread's ``connection`` to scheme://host, its response read, goes back to
        the pool (a response closed by another thread than its own changes nothing)."""
        pool = getattr(self._local, "pool", {})
        entry = pool.get((scheme, host))
        if entry is None or entry[0] is not connection or connection.sock is None:
            return
        del pool[(scheme, host)]
        with self._guard:
            self._idle.setdefault((scheme, host), []).append(entry)

    def close(self) -> None:
        """Close every connection, whichever thread opened it."""
        with self._guard:
            connections, self._open = self._open, []
            self._idle.clear()
        for connection in connections:
            if connection.sock is not None:
                import socket  # imported by then: a command that connected nowhere pays none
                # Wakes a thread still reading a body (an interrupted pull's): it holds
                # the buffer's lock that closing the response waits for.
                with contextlib.suppress(OSError):
                    connection.sock.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _drop(self, scheme: str, host: str) -> None:
        pool = getattr(self._local, "pool", {})
        entry = pool.pop((scheme, host), None)
        if entry is not None:
            entry[0].close()

    @staticmethod
    def _proxy_for(scheme: str, host: str) -> Tuple[str, Dict[str, str]]:
        """The proxy's host:port for scheme://host ("" for none), and the headers that
        carry its own ``user:password`` (which must never be a host name to resolve)."""
        # Loopback is never proxied, and on Linux urllib reads proxies only from *_proxy
        # variables: without one, urllib.request (tens of ms to import) is not needed.
        if _is_loopback(host) or (sys.platform not in ("darwin", "win32") and not any(
                value and name[-6:].lower() == "_proxy" and name.lower() != "no_proxy"
                for name, value in os.environ.items())):
            return "", {}
        import urllib.parse
        import urllib.request
        if urllib.request.proxy_bypass(host.rsplit(":", 1)[0]):
            return "", {}
        proxy = urllib.request.getproxies().get(scheme, "")
        if not proxy:
            return "", {}
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        address = parts.netloc.rpartition("@")[2]
        if "@" not in parts.netloc:
            return address, {}
        credentials = Credentials(urllib.parse.unquote(parts.username or ""),
                                  urllib.parse.unquote(parts.password or ""))
        return address, {"Proxy-Authorization": credentials.basic_header()}

    def _may_use_http(self, host: str) -> bool:
        return _is_loopback(host) or host in self.options.insecure_registries

    def scheme(self, host: str) -> str:
        """https; loopback and insecure registries are tried with plain HTTP first."""
        return self._schemes.get(host, "http" if self._may_use_http(host) else "https")

    def request(self, method: str, url: str, headers: Optional[Mapping[str, str]] = None,
                body: Body = None, retry: bool = True, redirects: int = 5,
                budget: Optional[_RetryBudget] = None) -> _Response:
        """Send one request, retrying what is worth retrying and following redirects.

        ``url`` is ``https://host/path``; for a host that turned out to speak plain
        HTTP the scheme is switched. ``Authorization`` and a body go only where
        ``_may_send_credentials`` allows: a redirect elsewhere (a CDN, S3) goes without
        them. Retries spend ``budget``, the operation's (a fresh one by default).
        """
        import urllib.parse
        headers = dict(headers or {})
        for name, value in headers.items():
            # What a header says may come from data (a manifest's media type): one line
            # naming the header, never a traceback, and never its value (a credential).
            if not re.fullmatch(r"[\t\x20-\x7e]*", value):
                raise OciCacheError(f"cannot send {method} {_shown_url(url)}: its {name} header "
                                    "would hold a character HTTP cannot carry (a control or "
                                    "non-ASCII character)")
        budget = budget or _RetryBudget(self.options)
        while True:
            parts = urllib.parse.urlsplit(url)
            host = parts.netloc
            scheme = self.scheme(host) if parts.scheme == "https" else parts.scheme
            probing = scheme == "http" and parts.scheme == "https" and host not in self._schemes
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            if probing and method == "HEAD":
                # A HEAD's answer has no body to tell a TLS server's 400 by: GET /v2/
                # finds the scheme first.
                self.request("GET", f"https://{host}/v2/",
                             {k: v for k, v in headers.items() if k.lower() == "user-agent"},
                             retry=retry, budget=budget).close()
                continue
            self._wait_for_host(host)
            try:
                try:
                    response = self._send(scheme, host, method, path, headers, body)
                except (OSError, _HTTPError) as first:
                    self._drop(scheme, host)
                    if not probing:
                        raise
                    # No HTTP answer: maybe a TLS server, maybe a fault. Only a TLS
                    # handshake decides it; otherwise the first error stands.
                    try:
                        response = self._send("https", host, method, path, headers, body)
                    except (OSError, _HTTPError) as second:
                        self._drop("https", host)
                        raise second if _is_certificate_error(second) else first
                    self._schemes[host] = scheme = "https"
                    probing = False
            except (OSError, _HTTPError) as e:
                error = _connection_error(host, e)
                # Nothing listening is rarely fixed by waiting: one more try, not five.
                if not retry or _is_permanent(e) or not self.retry(
                        budget, host, str(error), limit=2 if isinstance(
                            e, ConnectionRefusedError) else 0):
                    raise error from None
                continue
            if _debugging():  # its arguments cost each request 4 header lookups
                _debug("%s %s://%s%s: %d%s", method, scheme, host,
                       _shorten(_one_line(parts.path), 200), response.status,
                       _rate_limits(response, ", "))
            if probing:
                if response.status == 400 and _speaks_tls(response):
                    self._schemes[host] = "https"
                    continue
                self._schemes[host] = "http"
            if response.status in (301, 302, 303, 307, 308) and redirects > 0:
                location = response.headers.get("Location", "")
                response.close()
                if not location:
                    raise RegistryError(f"{host} answered {response.status} without a Location",
                                        response.status)
                try:
                    target = urllib.parse.urljoin(f"{scheme}://{host}{path}", location)
                except ValueError:
                    target = ""
                if not _is_http_url(target):
                    shown = _shorten(_one_line(_shown_url(location)))
                    raise RegistryError(f"{host} redirected to {shown!r}, which is not a usable "
                                        "http or https URL", response.status)
                moved = urllib.parse.urlsplit(target)
                if "@" in moved.netloc:
                    raise RegistryError(f"{host} redirected to a URL with a user name in it; "
                                        "refusing", response.status)
                if _sends_here(host, moved.netloc):
                    raise RegistryError(f"{host} redirected to {moved.netloc}, on this machine; "
                                        "refusing", response.status)
                self.named(moved.netloc, host)
                if scheme == "https" and moved.scheme == "http" and \
                        not self._may_use_http(moved.netloc):
                    # What a manifest by tag is, only its answer says: in clear text, anyone
                    # on the way would choose the image.
                    raise RegistryError(f"{host} redirected to plain http://{moved.netloc}; "
                                        "https is never followed to plain http (pass "
                                        f"--insecure-registry {moved.netloc} to allow it)",
                                        response.status)
                if not _may_send_credentials(target, f"{scheme}://{host}"):
                    # Elsewhere, or the same host in clear text: no secret follows, in a
                    # header or in a body (a token POST holds one), whatever the status.
                    if body and response.status != 303:
                        raise RegistryError(f"{host} redirected a {method} with a body to "
                                            "another host or to plain HTTP; refusing",
                                            response.status)
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                if response.status == 303:
                    method, body = "GET", None
                url, redirects = target, redirects - 1
                continue
            if response.status in _RETRY_STATUSES and retry and self.retry(
                    budget, host, f"{method} answered {response.status}",
                    _retry_after(response.headers.get("Retry-After"))):
                response.close()
                continue
            return response

    def _send(self, scheme: str, host: str, method: str, path: str,
              headers: Mapping[str, str], body: Body) -> _Response:
        for fresh in (False, True):
            connection, clock, prefix, added = self._connection(scheme, host,
                                                                reuse_idle=not fresh)
            opened = body() if callable(body) else None
            clock.start()  # the answer's head must arrive within the timeout, in all
            try:
                connection.request(method, prefix + path, body=opened or body,
                                   headers={**headers, **added})
                raw = connection.getresponse()
            except (ConnectionResetError, BrokenPipeError):  # _RemoteDisconnected too
                # A kept-alive connection the server had closed: one fresh try.
                self._drop(scheme, host)
                if fresh:
                    raise
                continue
            finally:
                if opened is not None:
                    opened.close()
            return _Response(raw, f"{scheme}://{host}{path}", connection, self.options.timeout,
                             clock, functools.partial(self._release, scheme, host, connection))
        raise AssertionError("unreachable")

    def retry(self, budget: _RetryBudget, host: str, reason: str,
              wait: Optional[float] = None, limit: int = 0) -> bool:
        """Whether to try again after a failure (``reason``), having waited; False once
        the operation's budget is spent, or when the server asks to wait (``wait``)
        longer than the budget allows."""
        budget.failures += 1
        if budget.failures >= min(limit or budget.attempts, budget.attempts):
            return False
        if wait is None:
            import random
            wait = self.options.backoff * (2 ** (budget.failures - 1)) * (0.5 + random.random())
            wait = min(wait, max(budget.wait_left, 0.0))
        elif wait > min(budget.max_wait, budget.wait_left):
            _debug("%s: not retrying: %s, and asks to wait %.0fs", host, reason, wait)
            return False
        budget.wait_left -= wait
        _debug("%s: retrying in %.1fs (%s; attempt %d of %d)", host, wait,
               _shorten(reason, 200), budget.failures + 1, budget.attempts)
        self._back_off(host, wait)
        return True

    def _wait_for_host(self, host: str) -> None:
        with self._guard:
            delay = self._not_before.get(host, 0.0) - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _back_off(self, host: str, wait: float) -> None:
        with self._guard:
            self._not_before[host] = max(self._not_before.get(host, 0.0),
                                         time.monotonic() + wait)
        self._wait_for_host(host)


class _StallWatch:
    """Counts what a long body delivers per ``timeout`` window: a server that keeps a
    connection alive with a trickle (under 1 KiB/s) is as stuck as a silent one."""

    MIN_BYTES_PER_SECOND = 1024

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def arrived(self, size: int) -> None:
        self._window_bytes += size
        now = time.monotonic()
        if now - self._window_start >= self.timeout:
            if self._window_bytes < self.MIN_BYTES_PER_SECOND * self.timeout:
                raise TimeoutError(f"it sent {self._window_bytes} bytes in the last "
                                   f"{now - self._window_start:.0f}s")
            self._window_start, self._window_bytes = now, 0


# Blobs from this size on are hashed by a thread of their own (``_HashingThread``).
_OWN_HASHER_SIZE = 16 * COPY_BUFFER_SIZE


class _HashingThread:
    """A digest computed by a thread of its own, a couple of pieces behind what is
    written: hashlib lets go of the GIL, so hashing a blob overlaps receiving and
    writing it (on a gigabyte, each costs about half a second). A blob of a few pieces
    has little to overlap (a piece hashes in under a millisecond) and costs a thread's
    start and a hand-off per piece, while the other downloads of its pull hash in their
    own threads meanwhile: under ``_OWN_HASHER_SIZE`` it is hashed in the caller's thread
    (a pull of 100 layers of 1 MiB started 100 threads, 10 % of its CPU time)."""

    def __init__(self, algorithm: str, size: int) -> None:
        self._algorithm = algorithm
        self._hasher = hashlib.new(algorithm)
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        if size >= _OWN_HASHER_SIZE:
            import queue  # with heapq, 1 ms of a pull of small blobs only: not before
            self._pieces: "queue.Queue[Optional[bytes]]" = queue.Queue(2)
            self._thread = threading.Thread(target=self._run, name="ocicache-hash", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for piece in iter(self._pieces.get, None):
            try:
                if self._error is None:
                    self._hasher.update(piece)
            except BaseException as e:  # raised by hexdigest(); the queue keeps moving
                self._error = e
            finally:
                self._pieces.task_done()

    def update(self, piece: bytes) -> None:
        if self._thread is None:
            self._hasher.update(piece)
        else:
            self._pieces.put(piece)

    def reset(self) -> None:
        """Start a new digest."""
        if self._thread is not None:
            self._pieces.join()
        self._hasher = hashlib.new(self._algorithm)

    def hexdigest(self) -> str:
        if self._thread is not None:
            self._pieces.join()
        if self._error is not None:
            raise self._error
        return self._hasher.hexdigest()

    def __enter__(self) -> "_HashingThread":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._thread is not None:
            self._pieces.put(None)
            self._thread.join()


def _speaks_tls(response: _Response) -> bool:
    """Whether a 400 is a TLS server's answer to plain HTTP (Go says so in the body)."""
    try:
        text = response.body(4096)
    except (OciCacheError, OSError, _HTTPError):
        text = b""
    response.close(reuse=False)
    # Go's answer, and nginx's
    return b"HTTP request to an HTTPS server" in text or b"sent to HTTPS port" in text


def _is_certificate_error(error: BaseException) -> bool:
    import ssl
    return isinstance(error, ssl.SSLCertVerificationError) or \
        "CERTIFICATE_VERIFY_FAILED" in str(error)


def _rate_limits(response: _Response, prefix: str = "") -> str:
    """The rate-limit headers of an answer (Docker Hub's, and the draft standard's)."""
    found = [f"{name}={_shorten(_one_line(response.headers[name]), 60)}"
             for name in ("ratelimit-limit", "ratelimit-remaining", "docker-ratelimit-source",
                          "retry-after") if response.headers.get(name)]
    return prefix + ", ".join(found) if found else ""


def _connection_error(host: str, error: BaseException) -> OciCacheError:
    """One line for a failure below HTTP, saying what to do where something can be done."""
    import socket
    if _is_certificate_error(error):
        return OciCacheError(f"cannot verify the TLS certificate of {host}: "
                             f"{getattr(error, 'verify_message', '') or error}; "
                             "pass its CA with --ca-file or put it in certs.d")
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    reason = _shorten(_one_line(reason), 200)
    said = str(error).upper().replace(" ", "_")
    if isinstance(error, socket.gaierror):
        name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        return OciCacheError(f"cannot reach {host}: {name} could not be resolved ({reason}); "
                             "check the name, or pull through a mirror (--mirror) or a proxy "
                             "(HTTPS_PROXY)")
    if any(reason in said for reason in _PLAIN_HTTP_TLS_ERRORS):
        return OciCacheError(f"cannot reach {host}: it does not speak TLS ({reason}); if it is "
                             f"a plain-HTTP registry, pass --insecure-registry {host}")
    if any(alert in said for alert in _CLIENT_CERTIFICATE_TLS_ERRORS):
        wants = "it wants a client certificate" if "HANDSHAKE" not in said else \
            "the TLS handshake failed; if it wants a client certificate"
        return OciCacheError(f"cannot reach {host}: {reason}; {wants}, put client.cert and "
                             f"client.key in certs.d/{host}/ (such as "
                             f"{_CERTS_D_ROOTS[0]}/{host}/)")
    return OciCacheError(f"cannot reach {host}: {reason}")


# =====================================================================================
# Registry
#
# The distribution API on top of the transport: authentication (Basic, Bearer tokens
# cached per realm, service and scope, scope growth), manifests fetched with every
# media type in Accept and hashed as received, blobs streamed into the cache with
# Range resume from a partial file, mirrors, and errors that carry the registry's own
# codes.
# =====================================================================================

MANIFEST_ACCEPT = ", ".join([MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_LIST,
                             MEDIA_DOCKER_MANIFEST])


@functools.lru_cache(maxsize=None)
def _user_agent() -> str:
    # sys.version's first word is what platform.python_version() says, without importing
    # platform (and compiling its regular expressions): 2 ms of a small pull.
    return f"ocicache/{__version__} python/{sys.version.split()[0]}"


def parse_mirror(value: str) -> Tuple[str, str]:
    """``[registry=]URL`` -> (registry or "*", URL without trailing slash)."""
    registry, sep, url = value.partition("=")
    if not sep or (re.match(r"https?://", value) and not re.match(r"https?://", url)):
        registry, url = "*", value  # the '=' is the URL's own (in a password, a query)
    if not re.match(r"^https?://[^/]", url):
        raise OciCacheError(f"mirror {_without_userinfo(value)!r} must start with http:// or "
                            "https://")
    rest = url.partition("://")[2]
    if "@" in rest and "@" not in re.split(r"[/?#]", rest, maxsplit=1)[0]:
        # The host part ends before the '@': a password holding '/', '?' or '#' would be
        # taken for a host and shown in messages.
        raise OciCacheError(f"mirror {_without_userinfo(value)!r}: percent-encode '/', '?', "
                            "'#' and '@' in the user name and password (as %2F, %3F, %23, "
                            "%40)")
    if not _is_http_url(url):
        raise OciCacheError(f"mirror {_shorten(_one_line(_without_userinfo(value)))!r} is not "
                            "a usable URL (a bad port, a space or a control character)")
    registry = _normalise_auth_key(registry) if registry != "*" else registry
    return registry, url.rstrip("/")


def _hidden(text: str, credentials: Optional[Credentials], authorization: str = "") -> str:
    """``text`` without the secrets of ``credentials`` nor the ``authorization`` header
    sent with them (the registry's own token is a secret too)."""
    if credentials is not None:
        text = credentials.hidden(text)
    value = authorization.partition(" ")[2]
    return text.replace(value, "<secret>") if len(value) >= 4 else text


def _reason_phrase(status: int) -> str:
    """The standard name of an HTTP status ("Not Found"), "" for one without."""
    from http import HTTPStatus  # on the way to an error only
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _registry_error(what: str, host: str, response: _Response,
                    hide: Callable[[str], str] = lambda text: text) -> RegistryError:
    """One line: ``<what>: <host> answered <status> <CODE>: <message>``, with ``hide``
    taking out the secrets it was sent, whatever the server says back."""
    codes: List[str] = []
    detail = ""
    try:
        body = response.body(64 * 1024)
        errors = _parse_json(body, "error").get("errors") or []
        for error in errors[:3] if isinstance(errors, list) else []:
            if isinstance(error, dict):
                codes.append(str(error.get("code", "")))
                detail = detail or str(error.get("message", ""))
    except (AttributeError, OciCacheError, OSError, _HTTPError):
        pass
    finally:
        response.close(reuse=False)
    status = response.status
    text = f"{what}: {host} answered {status} {_reason_phrase(status)}".rstrip()
    codes = [hide(code) for code in codes]
    if codes:
        text = f"{what}: {host} answered {status} {codes[0]}"
    detail = _one_line(hide(detail)).strip()
    if detail:
        text += f": {_shorten(detail, 200)}"
    if status in (429, 503) and _rate_limits(response):
        text += f" ({_rate_limits(response)})"
    text = _one_line(hide(text))
    if status in (401, 403):
        return AuthenticationError(text, status, codes)
    return RegistryError(text, status, codes)


def _with_query(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


_MAX_TAG_PAGES = 10000  # pages of one tag list followed before it is taken as endless
# One tag list, over every page, is at most this many entries and bytes of pages: some
# 100 MB of strings, not the 40 GB 10,000 pages of 4 MiB would be. A CI's repository
# of a million build numbers still lists (a few MB of JSON).
_MAX_TAGS = 1_000_000
_MAX_TAG_LIST_BYTES = 16 * MAX_MANIFEST_SIZE


def _next_link(header: str) -> str:
    """The target of the ``rel="next"`` link of a ``Link`` header (RFC 8288: several
    ``<URI>; param=value`` links, comma-separated; ``rel`` may list several relations,
    quoted or not), as written (relative or absolute); "" when there is none."""
    for match in re.finditer(r'<([^<>]*)>((?:\s*;\s*[^;,"]*(?:"(?:[^"\\]|\\.)*")?)*)', header):
        for name, quoted, bare in re.findall(
                r';\s*([A-Za-z*]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;,"]*))', match.group(2)):
            if name.lower() == "rel" and "next" in (quoted or bare).lower().split():
                return match.group(1).strip()
    return ""


class _FileSlice(io.RawIOBase):
    """``length`` bytes of a file from ``offset``: one chunk of a chunked upload."""

    def __init__(self, layout: Layout, digest: Digest, offset: int, length: int) -> None:
        super().__init__()
        self._file: Any = layout.open_blob(digest)  # a BufferedReader: it has readinto
        self._file.seek(offset)
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)[:self._left]
        count = self._file.readinto(view)
        self._left -= count
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


class _Endpoint:
    """Where a repository is served: base URL (mirror or registry) and repository path."""

    def __init__(self, base: str, host: str, repository: str, registry: str,
                 credentials: Optional[Credentials] = None, mirror_of: str = "") -> None:
        self.base = base                # https://host[:port][/prefix]
        self.host = host
        self.repository = repository
        self.registry = registry        # the registry the credentials belong to
        self.credentials = credentials  # a mirror URL's own user:password, if any
        self.mirror_of = mirror_of      # for a mirror, the registry it stands for

    def __repr__(self) -> str:
        return f"_Endpoint({self.base!r}, {self.repository!r})"


def _token_lifetime(value: Any) -> float:
    """A token's ``expires_in`` in seconds: 60 when absent or absurd (a string, a
    400-digit number, NaN), at most a day."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 60.0
    if isinstance(value, int):
        return float(min(max(value, 0), 86400)) if value else 60.0
    return min(max(value, 0.0), 86400.0) if value == value and value else 60.0


class RegistryClient:
    """The distribution API client shared by pulls and pushes."""

    def __init__(self, transport: Optional[_Transport] = None,
                 mirrors: Sequence[Tuple[str, str]] = ()) -> None:
        self.transport = transport or _Transport(TransportOptions())
        self.mirrors = list(mirrors)
        # Tokens per registry host, realm, service and scopes: a registry naming
        # another's realm and service never gets the other's token.
        self._tokens: Dict[Tuple[str, str, str, Tuple[str, ...]], Tuple[str, float]] = {}
        self._challenges: Dict[str, Challenge] = {}   # per registry host, from its own 401s
        self._credentials: Dict[Tuple[str, str], Optional[Credentials]] = {}
        self._anonymous: set = set()  # (host, repository) where stored credentials failed
        self._locations: Dict[Tuple[str, Digest], List[str]] = {}  # blob -> repositories
        self._said: set = set()       # what -v has said once (mirrors, credential sources)
        self._guard = threading.Lock()

    # -- endpoints and authentication -------------------------------------------------

    def _once(self, message: str, *args: Any) -> None:
        with self._guard:
            if message % args in self._said:
                return
            self._said.add(message % args)
        _debug(message, *args)

    def endpoint(self, ref: Reference, use_mirrors: bool = True) -> _Endpoint:
        if use_mirrors:
            chosen = [url for registry, url in self.mirrors if registry == ref.registry] + \
                [url for registry, url in self.mirrors if registry == "*"]
            for url in chosen[:1]:  # the registry's own mirror, else one for every registry
                import urllib.parse
                parts = urllib.parse.urlsplit(url)
                prefix = parts.path.strip("/")
                repository = f"{prefix}/{ref.repository}" if prefix else ref.repository
                host = parts.netloc.rpartition("@")[2]
                credentials = None
                if "@" in parts.netloc:  # http://user:password@host: the mirror's own
                    credentials = Credentials(
                        urllib.parse.unquote(parts.username or ""),
                        urllib.parse.unquote(parts.password or ""),
                        source=f"the user:password in the mirror URL for {host}")
                self._once("%s through the mirror %s", ref.registry,
                           _without_userinfo(url))
                return _Endpoint(f"{parts.scheme}://{host}", host, repository, host,
                                 credentials, mirror_of=ref.registry)
        host = ref.api_host
        return _Endpoint(f"https://{host}", host, ref.repository, ref.registry)

    def _origin(self, endpoint: _Endpoint) -> str:
        """The scheme://host the endpoint is reached at now (a loopback https may
        have turned out to be plain HTTP)."""
        if endpoint.base.startswith("http://"):
            return endpoint.base
        return f"{self.transport.scheme(endpoint.host)}://{endpoint.host}"

    def _stored(self, endpoint: _Endpoint) -> Optional[Credentials]:
        """The credentials already looked up for the endpoint, without a lookup: what a
        server may quote back even in an answer to an anonymous request."""
        with self._guard:
            return endpoint.credentials or self._credentials.get(
                (endpoint.registry, endpoint.repository))

    def _credentials_for(self, endpoint: _Endpoint) -> Optional[Credentials]:
        if endpoint.credentials is not None:
            self._once("credentials for %s from %s", endpoint.host, endpoint.credentials.source)
            return endpoint.credentials
        key = (endpoint.registry, endpoint.repository)
        with self._guard:
            if key in self._credentials:
                return self._credentials[key]
        credentials = find_credentials(endpoint.registry, endpoint.repository)
        with self._guard:
            self._credentials[key] = credentials
        if credentials is None:
            self._once("no credentials for %s in %s, nor in a credential helper they name",
                       endpoint.registry, ", ".join(_auth_files()))
        else:
            self._once("credentials for %s/%s from %s", endpoint.registry,
                       endpoint.repository, credentials.source)
        return credentials

    def _authorization(self, endpoint: _Endpoint, scopes: Sequence[str],
                       challenge: Optional[Challenge], anonymous: bool = False,
                       budget: Optional[_RetryBudget] = None
                       ) -> Tuple[Optional[str], Optional[Credentials]]:
        """The Authorization header for the endpoint (None: none), and the stored
        credentials it was made with (None: anonymous). A token request spends
        ``budget``, the operation's."""
        with self._guard:
            challenge = challenge or self._challenges.get(endpoint.host)
        if challenge is None:
            return None, None
        credentials = None if anonymous else self._credentials_for(endpoint)
        if challenge.scheme == "basic":
            if credentials is None or not (credentials.username or credentials.password):
                return None, None
            return credentials.basic_header(), credentials
        if challenge.scheme != "bearer":
            return None, None
        if credentials is not None and credentials.registry_token:
            return f"Bearer {credentials.checked().registry_token}", credentials
        token = self._token(endpoint, challenge, scopes, credentials, budget)
        return f"Bearer {token}", credentials

    def _token(self, endpoint: _Endpoint, challenge: Challenge, scopes: Sequence[str],
               credentials: Optional[Credentials],
               budget: Optional[_RetryBudget] = None) -> str:
        import urllib.parse
        realm = challenge.params.get("realm", "")
        service = challenge.params.get("service", "")
        if not _is_http_url(realm) or "@" in urllib.parse.urlsplit(realm).netloc:
            raise AuthenticationError(f"{endpoint.host} names an invalid token realm "
                                      f"{_shorten(_one_line(_shown_url(realm)))!r}")
        realm_parts = urllib.parse.urlsplit(realm)
        if _sends_here(endpoint.host, realm_parts.netloc):
            raise AuthenticationError(f"{endpoint.host} names a token realm on this machine "
                                      f"({realm_parts.netloc}); refusing")
        self.transport.named(realm_parts.netloc, endpoint.host)
        if not _may_send_credentials(realm, self._origin(endpoint), realm):
            raise AuthenticationError(f"{endpoint.host} sends credentials to a plain-http "
                                      f"token realm {_shorten(_one_line(_shown_url(realm)))}; "
                                      "refusing")
        wanted = tuple(sorted(set(scopes) | ({challenge.params["scope"]}
                                             if challenge.params.get("scope") else set())))
        key = (endpoint.host if credentials is None else f"{endpoint.host} {credentials.source}",
               realm, service, wanted)
        with self._guard:
            cached = self._tokens.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        query = [("service", service)] if service else []
        query += [("scope", scope) for scope in wanted]
        headers = {"User-Agent": _user_agent()}
        if credentials is not None and credentials.identity_token:
            form = urllib.parse.urlencode([("grant_type", "refresh_token"),
                                           ("refresh_token", credentials.identity_token),
                                           ("client_id", "ocicache")] + query).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            response = self.transport.request("POST", realm, headers, form, budget=budget)
        else:
            if credentials is not None and (credentials.username or credentials.password):
                headers["Authorization"] = credentials.basic_header()
            separator = "&" if realm_parts.query else "?"
            url = realm + (separator + urllib.parse.urlencode(query) if query else "")
            response = self.transport.request("GET", url, headers, budget=budget)
        if response.status != 200:
            hide = functools.partial(_hidden, credentials=credentials or self._stored(endpoint),
                                     authorization=headers.get("Authorization", ""))
            error = _registry_error(f"token for {endpoint.repository}", realm_parts.netloc,
                                    response, hide)
            if credentials is not None and response.status in (401, 403):
                raise AuthenticationError(f"{error}; it refused the credentials from "
                                          f"{credentials.source}", error.status,
                                          error.codes) from None
            raise error
        try:
            data = response.body(1024 * 1024)
        except (OSError, _HTTPError) as e:
            response.close(reuse=False)
            raise _connection_error(realm_parts.netloc, e) from None
        try:
            answer = _parse_json(data, "token")
            token = str(answer.get("token") or answer.get("access_token") or "")
            expires = _token_lifetime(answer.get("expires_in"))
        except (OciCacheError, ValueError, AttributeError, TypeError):
            response.close(reuse=False)
            raise AuthenticationError(f"token realm {realm_parts.netloc} answered something "
                                      "that is not a token") from None
        response.close()
        if not token or not re.fullmatch(r"[\x21-\x7e]+", token):
            raise AuthenticationError(f"token realm {realm_parts.netloc} answered without a "
                                      "usable token")
        with self._guard:
            # Renew a little early: a tenth of the lifetime, at most 10 s.
            self._tokens[key] = (token, time.monotonic() + expires - min(expires / 10, 10))
        return token

    def request(self, endpoint: _Endpoint, method: str, path: str, actions: str = "pull",
                headers: Optional[Mapping[str, str]] = None, body: Body = None,
                what: str = "", ok: Iterable[int] = (200,), url: str = "",
                extra_scopes: Sequence[str] = (), retry: bool = True,
                budget: Optional[_RetryBudget] = None) -> _Response:
        """An authenticated request to ``/v2/<repository>/<path>`` (or ``url``, an upload
        location); a status outside ``ok`` raises with the registry's error.

        Stored credentials that a pull is refused with are tried once more without
        (an expired token on an image anyone may pull), with a warning; a push always
        sends its own."""
        import urllib.parse
        url = url or f"{endpoint.base}/v2/{endpoint.repository}/{path}"
        what = what or f"{method} {endpoint.repository}/{path or _shown_url(url)}"
        scopes = [f"repository:{endpoint.repository}:{actions}", *extra_scopes]
        challenge: Optional[Challenge] = None
        accepted = set(ok)
        budget = budget or _RetryBudget(self.transport.options)
        refused: Optional[AuthenticationError] = None  # what the stored credentials met
        challenged = 0
        with self._guard:  # a pull that went anonymous, never a push after it
            gone = actions == "pull" and (endpoint.host, endpoint.repository) in self._anonymous
        while True:
            request_headers = {"User-Agent": _user_agent(), **(headers or {})}
            try:
                authorization, used = self._authorization(endpoint, scopes, challenge,
                                                          gone or refused is not None, budget)
            except AuthenticationError as e:
                if refused is not None:
                    raise refused from None  # anonymous failed too: the refusal is the news
                if actions != "pull" or self._credentials_for(endpoint) is None:
                    raise
                refused = e  # the token realm refused them
                continue
            if authorization and _may_send_credentials(url, self._origin(endpoint)):
                request_headers["Authorization"] = authorization
            try:
                response = self.transport.request(method, url, request_headers, body, retry,
                                                  budget=budget)
            except OciCacheError as e:
                if not endpoint.mirror_of or type(e) is not OciCacheError:
                    raise
                # The host alone would not say why a pull of docker.io went there.
                raise OciCacheError(f"{e} (the mirror for {endpoint.mirror_of}, set by "
                                    "--mirror, $OCICACHE_MIRROR, $LINUXKIT_MIRROR, "
                                    "daemon.json or registries.conf)") from None
            # Who answered: the registry itself, or a redirect target (a CDN, or the
            # registry's host in clear text, where anyone on the way may answer).
            answered = urllib.parse.urlsplit(response.url)
            origin = self._origin(endpoint)
            own = f"{answered.scheme}://{answered.netloc}" == origin
            who = endpoint.host if own else answered.netloc \
                if answered.netloc != endpoint.host else f"{answered.scheme}://{answered.netloc}"
            if response.status == 401:
                if not own:  # its challenge never directs credentials
                    response.close(reuse=False)
                    raise AuthenticationError(
                        f"{what}: {who} answered 401 after a redirect from {origin}; "
                        f"credentials go only to {origin} and its own token realm", 401)
                offered = parse_challenges(response.headers.get("WWW-Authenticate", ""))
                usable = [c for c in offered if c.scheme in ("bearer", "basic")]
                if challenged < 2 and usable and (
                        authorization is None or
                        usable[0].params.get("error") == "insufficient_scope"):
                    response.close()
                    challenge, challenged = usable[0], challenged + 1
                    with self._guard:
                        self._challenges[endpoint.host] = challenge
                    continue
            if response.status in accepted:
                if refused is not None:
                    self._go_anonymous(endpoint, refused)
                return response
            error = _registry_error(what, who, response, functools.partial(
                _hidden, credentials=used or self._stored(endpoint),
                authorization=request_headers.get("Authorization", "")))
            if refused is not None:
                raise refused  # anonymous failed too: the credentials' refusal is the news
            if not own:
                raise error  # a CDN's 403 (an expired signed URL) is no refusal of credentials
            if used is not None and error.status in (401, 403):
                refused = AuthenticationError(f"{error}; it refused the credentials from "
                                              f"{used.source}", error.status, error.codes)
                if actions == "pull":
                    continue
                raise refused
            if error.status == 401:
                raise AuthenticationError(
                    f"{error}; no credentials for {endpoint.registry} were found (looked up in "
                    f"{', '.join(_auth_files())} and the credential helpers they name)",
                    error.status, error.codes)
            raise error

    def _go_anonymous(self, endpoint: _Endpoint, refused: AuthenticationError) -> None:
        """Remember, and say once, that this repository is pulled without the stored
        credentials it refused."""
        with self._guard:
            if (endpoint.host, endpoint.repository) in self._anonymous:
                return
            self._anonymous.add((endpoint.host, endpoint.repository))
        _log().warning("%s; pulling %s anonymously instead", refused, endpoint.repository)

    # -- manifests and blobs ----------------------------------------------------------

    def _fetch_small(self, endpoint: _Endpoint, path: str, headers: Mapping[str, str],
                     what: str, check: Callable[[bytes, _Response], None]
                     ) -> Tuple[bytes, _Response]:
        """GET a small body whole; a body cut short, reset or failing ``check`` (its
        digest) is fetched again, like a failed request."""
        budget = _RetryBudget(self.transport.options)  # for the document, in all
        while True:
            response = self.request(endpoint, "GET", path, headers=headers, what=what,
                                    budget=budget)
            try:
                data = response.body(MAX_MANIFEST_SIZE)
                response.close()
                check(data, response)
                return data, response
            except (OSError, _HTTPError, DigestMismatchError) as e:
                response.close(reuse=False)
                error = e if isinstance(e, OciCacheError) else _connection_error(endpoint.host, e)
                if not self.transport.retry(budget, endpoint.host, str(error)):
                    raise error from None

    def get_manifest(self, ref: Reference, what: str = "") -> Tuple[bytes, Descriptor]:
        """The manifest (or index) bytes as served, and its descriptor (verified)."""
        endpoint = self.endpoint(ref)
        identifier = str(ref.digest) if ref.digest is not None else ref.tag
        algorithm = ref.digest.algorithm if ref.digest else "sha256"

        def check(data: bytes, response: _Response) -> None:
            digest = Digest.from_bytes(data, algorithm)
            if ref.digest is not None and digest != ref.digest:
                raise DigestMismatchError(f"{endpoint.host} served {ref} with digest {digest}")
            served = response.headers.get("Docker-Content-Digest", "")
            if served.startswith("sha256:") and algorithm == "sha256" and served != str(digest):
                raise DigestMismatchError(f"{endpoint.host} says {ref} is "
                                          f"{_shorten(_one_line(served))}, but its bytes "
                                          f"hash to {digest}")

        data, response = self._fetch_small(endpoint, f"manifests/{identifier}",
                                           {"Accept": MANIFEST_ACCEPT}, what or f"pull {ref}",
                                           check)
        digest = Digest.from_bytes(data, algorithm)
        obj = _parse_json(data, f"{endpoint.host}'s manifest for {ref}")
        if not isinstance(obj, dict):
            raise OciCacheError(f"{endpoint.host} served {ref} as something that is not "
                                "a JSON object")
        media_type = str(obj.get("mediaType") or "")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        media_type = media_type or content_type
        if media_type in (MEDIA_DOCKER_SCHEMA1, MEDIA_DOCKER_SCHEMA1_SIGNED) or \
                obj.get("schemaVersion") == 1:
            raise OciCacheError(f"{ref} is a Docker schema 1 manifest, which is not supported; "
                                "push it again with a current docker or skopeo")
        if media_type not in INDEX_MEDIA_TYPES | IMAGE_MEDIA_TYPES:
            media_type = MEDIA_OCI_INDEX if "manifests" in obj else (
                MEDIA_OCI_MANIFEST if "config" in obj else media_type)
        return data, Descriptor(media_type, digest, len(data))

    def get_blob_bytes(self, ref: Reference, descriptor: Descriptor) -> bytes:
        """A small blob (a config), read whole and verified."""
        endpoint = self.endpoint(ref)

        def check(data: bytes, response: _Response) -> None:
            if Digest.from_bytes(data, descriptor.digest.algorithm) != descriptor.digest:
                raise DigestMismatchError(f"{endpoint.host} served blob {descriptor.digest} "
                                          "with other content")

        return self._fetch_small(endpoint, f"blobs/{descriptor.digest}", {},
                                 f"pull {ref.name}@{descriptor.digest}", check)[0]

    def manifest_digest(self, ref: Reference) -> Optional[Descriptor]:
        """What ``ref`` names now, asked with HEAD (which Docker Hub's rate limit does
        not count): its descriptor, or None when the registry does not say (no
        ``Docker-Content-Digest``, HEAD refused). A missing manifest raises, as GET."""
        endpoint = self.endpoint(ref)
        identifier = str(ref.digest) if ref.digest is not None else ref.tag
        try:
            response = self.request(endpoint, "HEAD", f"manifests/{identifier}",
                                    headers={"Accept": MANIFEST_ACCEPT}, what=f"look up {ref}")
        except RegistryError as e:
            if e.status in (404, 401, 403) or not 400 <= e.status < 500:
                raise
            return None  # 405 and the like: the caller asks with GET
        response.close()
        served = response.headers.get("Docker-Content-Digest", "")
        length = response.headers.get("Content-Length", "")
        try:
            digest = Digest.parse(served.strip())
        except InvalidDigestError:
            return None
        if ref.digest is not None and digest != ref.digest:
            return None
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        size = int(length) if re.fullmatch(r"[0-9]{1,12}", length) else 0
        return Descriptor(media_type, digest, size)

    def digest(self, ref: Union[str, Reference]) -> Descriptor:
        """What ``ref`` names in its registry now: its manifest's (or index's)
        descriptor, asked with HEAD (which Docker Hub's rate limit does not count), with
        GET only when the HEAD does not say."""
        wanted = Reference.parse(ref)
        found = self.manifest_digest(wanted)
        if found is None:
            found = self.get_manifest(wanted, what=f"look up {wanted}")[1]
        return found

    def list_tags(self, ref: Union[str, Reference]) -> List[str]:
        """Every tag of ``ref``'s repository (its tag or digest aside), each once, in
        the registry's order. Pages are followed by their ``Link`` header, relative or
        absolute and as written (Quay's ``next_page`` tokens are in it), but only on the
        registry's own host; entries that are not tags (the nulls and digests that
        Artifactory and Nexus list) are left out."""
        wanted = Reference.parse(ref)
        endpoint = self.endpoint(wanted, use_mirrors=False)  # a mirror lists its own tags
        what = f"list the tags of {wanted.name}"
        url = f"{endpoint.base}/v2/{endpoint.repository}/tags/list"
        tags: Dict[str, None] = {}
        skipped = listed = read = 0
        for data, _ in self._pages(endpoint, url, what, (200,)):
            read += len(data)
            if read > _MAX_TAG_LIST_BYTES:  # each page is bounded; so is what they add up to
                raise RegistryError(f"{what}: {endpoint.host}'s tag list is more than "
                                    f"{_MAX_TAG_LIST_BYTES} bytes; not taking more of it")
            # A tag list is short strings ("1",): packed as no image document is, and
            # still a bounded page. Tighter than that is not a tag list.
            page = _parse_json(data, f"{endpoint.host}'s tag list of {wanted.name}",
                               packed=len('"1",'))
            entries = page.get("tags") if isinstance(page, dict) else ()
            if not isinstance(entries, list) and entries is not None:
                raise RegistryError(f"{what}: {endpoint.host} answered something that is not "
                                    "a tag list (a JSON object with a 'tags' array)")
            listed += len(entries or ())
            if listed > _MAX_TAGS:
                raise RegistryError(f"{what}: {endpoint.host} lists more than {_MAX_TAGS} "
                                    "tags; not taking more of the list")
            for entry in entries or ():
                if isinstance(entry, str) and re.fullmatch(_TAG, entry):
                    tags.setdefault(entry)
                else:
                    skipped += 1
        if skipped:
            _log().debug("%s listed %d entries that are not tags; left out", endpoint.host,
                         skipped)
        return list(tags)

    def _pages(self, endpoint: _Endpoint, url: str, what: str, ok: Sequence[int],
               headers: Optional[Mapping[str, str]] = None, most: int = _MAX_TAG_PAGES
               ) -> Iterator[Tuple[bytes, _Response]]:
        """Each page of a paged list (tags, referrers): its body (bounded) and response,
        the next one named by the ``Link`` header, relative or absolute and as written,
        followed only on the registry's own host, never twice, and ``most`` pages at most.
        A first answer outside 200 (one of ``ok``) is yielded with an empty body, and
        ends the list."""
        import urllib.parse
        fetched: set = set()
        while True:
            fetched.add(url)
            response = self.request(endpoint, "GET", "", url=url, what=what, ok=ok,
                                    headers=headers)
            if response.status != 200:
                response.close()
                yield b"", response
                return
            try:
                data = response.body(MAX_MANIFEST_SIZE)
            except (OSError, _HTTPError) as e:
                response.close(reuse=False)
                raise _connection_error(endpoint.host, e) from None
            except OciCacheError as e:
                raise RegistryError(f"{what}: {e}") from None
            response.close()
            yield data, response
            link = _next_link(response.headers.get("Link", ""))
            if not link:
                return
            following = urllib.parse.urljoin(response.url, link)
            shown = _shorten(_one_line(_without_userinfo(following)))
            if not _may_send_credentials(following, self._origin(endpoint)):
                raise RegistryError(f"{what}: {endpoint.host} links the next page to {shown}, "
                                    "off its own host (or from https to http); refusing to "
                                    "follow it")
            if following in fetched or len(fetched) >= most:
                raise RegistryError(f"{what}: {endpoint.host} links the next page to {shown} "
                                    f"after {len(fetched)} pages; the list does not end")
            url, ok = following, (200,)

    def referrers(self, ref: Union[str, Reference], artifact_type: str = ""
                  ) -> Tuple[List[Descriptor], str]:
        """What refers to the manifest ``ref`` pins by digest: the descriptors of its
        referrers, and where the list came from (``"api"``, or the fallback tag).

        The referrers API is asked first (every page, by ``Link``); a registry without
        it answers 404, and the index under the fallback tag ``sha256-<hex>`` is read
        instead (no such tag: no referrers). With ``artifact_type`` only referrers of
        that type are returned: the registry is asked to filter, and what it answers is
        filtered here too (one saying ``OCI-Filters-Applied`` may still list others). A
        list that is not an index, holds a bad descriptor or more than MAX_REFERRERS
        entries is an error."""
        import urllib.parse
        wanted = Reference.parse(ref)
        if wanted.digest is None:
            raise OciCacheError(f"referrers of {wanted}: name the manifest by its digest")
        endpoint = self.endpoint(wanted, use_mirrors=False)  # a mirror has its own tags
        what = f"list the referrers of {wanted.name}@{wanted.digest}"
        url = f"{endpoint.base}/v2/{endpoint.repository}/referrers/{wanted.digest}"
        if artifact_type:
            url += "?artifactType=" + urllib.parse.quote(artifact_type, safe="")
        found: Dict[Digest, Descriptor] = {}
        source = "api"
        for data, response in self._pages(endpoint, url, what, (200, 404),
                                          {"Accept": MEDIA_OCI_INDEX}, _MAX_REFERRER_PAGES):
            if response.status == 404:
                source = referrers_tag(wanted.digest)
                tagged = self.remote_manifest(endpoint, source)
                if tagged is None:
                    return [], source
                data = tagged[0]
            where = f"{endpoint.host}'s referrers list of {wanted.name}@{wanted.digest}" \
                if source == "api" else f"{endpoint.host}'s fallback tag {wanted.name}:{source}"
            before = len(found)
            for descriptor in parse_referrers(data, where):
                found.setdefault(descriptor.digest, descriptor)
            if len(found) == before and _next_link(response.headers.get("Link", "")):
                # Another page after one of nothing new: a list that ends never does that.
                raise RegistryError(f"{what}: {endpoint.host} links to a next page after one "
                                    "with no referrer it had not listed; the list does not end")
            if len(found) > MAX_REFERRERS:
                raise RegistryError(f"{what}: {endpoint.host} lists more than {MAX_REFERRERS} "
                                    "referrers")
        listed = list(found.values())
        if artifact_type:
            listed = [d for d in listed if d.artifact_type == artifact_type]
        return listed, source

    def add_referrer(self, endpoint: _Endpoint, subject: Digest, referrer: Descriptor) -> bool:
        """List ``referrer`` in the fallback tag of ``subject`` at ``endpoint``, for a
        registry without the referrers API: the tag's index is read, the entry added
        (every other entry kept), and the index put back; False when it was there
        already. Two clients doing this at once can lose one entry (distribution has no
        conditional PUT); running the push again puts it back."""
        tag = referrers_tag(subject)
        what = f"{endpoint.host}'s fallback tag {endpoint.repository}:{tag}"
        existing = self.remote_manifest(endpoint, tag, "pull,push")
        if existing is not None and existing[1].media_type not in INDEX_MEDIA_TYPES | {""}:
            parse_referrers(existing[0], what)  # says what it is instead
        updated = with_referrer(existing[0] if existing is not None else None, referrer, what)
        if updated is None:
            return False
        self.put_manifest(endpoint, tag, updated, MEDIA_OCI_INDEX)
        return True

    def check_credentials(self, registry: str, username: str, password: str) -> bool:
        """Whether ``registry`` takes this user name and password: a GET of ``/v2/``
        with them, through the token realm its challenge names (the token flow docker's
        login takes). False when ``/v2/`` lets anyone in, so that nothing could be
        checked; a refusal is an AuthenticationError, never naming the password."""
        import urllib.parse
        registry = _login_registry(registry)
        _check_login(username, password)
        host = DOCKER_HUB_API_HOST if registry == DEFAULT_REGISTRY else registry
        credentials = Credentials(username, password, source=f"the login of {username!r}")
        endpoint = _Endpoint(f"https://{host}", host, registry, registry, credentials)
        url, what = f"{endpoint.base}/v2/", f"log in to {registry}"
        headers = {"User-Agent": _user_agent()}
        response = self.transport.request("GET", url, headers)
        if response.status == 200:
            response.close()
            return False
        if response.status != 401:
            raise _registry_error(what, host, response)
        answered = urllib.parse.urlsplit(response.url).netloc
        offered = [c for c in parse_challenges(response.headers.get("WWW-Authenticate", ""))
                   if c.scheme in ("bearer", "basic")]
        response.close()
        if answered != host:
            raise AuthenticationError(f"{what}: {answered} answered 401 after a redirect from "
                                      f"{host}; credentials go only to {host} and its own token "
                                      "realm", 401)
        if not offered:
            raise AuthenticationError(f"{what}: {host} answered 401 without a Basic or Bearer "
                                      "challenge", 401)
        if offered[0].scheme == "basic":
            authorization = credentials.basic_header()
        else:
            try:
                authorization = "Bearer " + self._token(endpoint, offered[0], (), credentials)
            except RegistryError as e:
                raise type(e)(f"{what}: {e}", e.status, e.codes) from None
        if _may_send_credentials(url, self._origin(endpoint)):
            headers["Authorization"] = authorization
        response = self.transport.request("GET", url, headers)
        if response.status == 200:
            response.close()
            return True
        error = _registry_error(what, host, response)
        if error.status in (401, 403):
            raise AuthenticationError(f"{error}; it refused the login of {username!r}",
                                      error.status, error.codes)
        raise error

    def login(self, registry: str, username: str, password: str) -> str:
        """Check the credentials against ``registry`` (``check_credentials``), then
        store them where docker does (``store_credentials``); where they went. Nothing
        is stored when the check fails."""
        if not self.check_credentials(registry, username, password):
            _log().warning("%s lets anyone in, so the credentials could not be checked; "
                           "storing them anyway", _login_registry(registry))
        return store_credentials(registry, username, password)

    def remote_manifest(self, endpoint: _Endpoint, reference: str,
                        actions: str = "pull", denied_is_absent: bool = False
                        ) -> Optional[Tuple[bytes, Descriptor]]:
        """The manifest under ``reference`` at ``endpoint``, or None when there is none
        (or, with ``denied_is_absent``, when reading it is denied: Artifactory answers
        403 for a tag that does not exist)."""
        absent = (404, 403) if denied_is_absent else (404,)
        response = self.request(endpoint, "GET", f"manifests/{reference}", actions,
                                headers={"Accept": MANIFEST_ACCEPT}, ok=(200, *absent),
                                what=f"look up {endpoint.repository}:{reference}")
        if response.status in absent:
            if response.status == 403:
                _log().debug("%s denies reading %s:%s; taking it as absent", endpoint.host,
                             endpoint.repository, reference)
            response.close()
            return None
        try:
            data = response.body(MAX_MANIFEST_SIZE)
        except (OSError, _HTTPError) as e:
            response.close(reuse=False)
            raise _connection_error(endpoint.host, e) from None
        response.close()
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        obj = _parse_json(data, f"{endpoint.host}'s manifest {endpoint.repository}:{reference}")
        if isinstance(obj, dict) and isinstance(obj.get("mediaType"), str):
            media_type = obj["mediaType"] or media_type
        return data, Descriptor(media_type, Digest.from_bytes(data), len(data))

    def put_manifest(self, endpoint: _Endpoint, reference: str, data: bytes,
                     media_type: str) -> _Headers:
        """PUT a manifest; the response's headers (``OCI-Subject`` says the registry
        keeps the referrers list of the manifest's subject itself)."""
        response = self.request(endpoint, "PUT", f"manifests/{reference}", "pull,push",
                                headers={"Content-Type": media_type}, body=data, ok=(201, 200),
                                what=f"push {endpoint.host}/{endpoint.repository}:{reference}")
        response.close()
        return response.headers

    def upload_blob(self, endpoint: _Endpoint, descriptor: Descriptor, layout: Layout,
                    mount_from: Sequence[str] = ()) -> str:
        """Make a blob present in the repository: ``"present"``, ``"mounted"`` or
        ``"uploaded"``. Present blobs cost one HEAD; a blob in another repository of
        the same registry is mounted; the rest are uploaded, retried as a whole."""
        what = f"push blob {descriptor.digest} to {endpoint.host}/{endpoint.repository}"
        response = self.request(endpoint, "HEAD", f"blobs/{descriptor.digest}", "pull,push",
                                ok=(200, 404), what=what)
        response.close()
        if response.status == 200:
            self._remember(endpoint, descriptor.digest)
            return "present"
        with self._guard:
            seen = self._locations.get((endpoint.host, descriptor.digest), [])
        sources = list(dict.fromkeys([*mount_from, *seen]))
        session: Optional[_Response] = None  # an upload a failed mount opened
        for source in [s for s in sources if s != endpoint.repository]:
            if session is not None:  # cancel the last one: only one stays open
                self._cancel(endpoint, session)
            response = self.request(
                endpoint, "POST", f"blobs/uploads/?mount={descriptor.digest}&from={source}",
                "pull,push", ok=(201, 202), what=what,
                extra_scopes=[f"repository:{source}:pull"])
            response.close()
            if response.status == 201:
                self._remember(endpoint, descriptor.digest)
                return "mounted"
            # The registry opened an ordinary upload instead: it is used, not cancelled.
            session = response if response.headers.get("Location") else None
        budget = _RetryBudget(self.transport.options)
        chunked = descriptor.size > self.transport.options.chunked_upload_threshold
        switched = False
        while True:
            try:
                self._upload(endpoint, descriptor, layout, chunked, what, budget, session)
                self._remember(endpoint, descriptor.digest)
                return "uploaded"
            except RegistryError as e:
                if isinstance(e, AuthenticationError):
                    raise
                if 400 <= e.status < 500 and not switched:
                    # A registry that refuses monolithic uploads, or chunked ones.
                    _log().debug("%s refused a %s upload (%d); trying %s", endpoint.host,
                                 "chunked" if chunked else "monolithic", e.status,
                                 "monolithic" if chunked else "chunked")
                    chunked, switched = not chunked, True
                    budget.failures += 1
                    if budget.failures >= budget.attempts:
                        raise
                elif e.status < 500 or not self.transport.retry(budget, endpoint.host, str(e)):
                    raise
            except OciCacheError as e:
                if not self.transport.retry(budget, endpoint.host, str(e)):
                    raise
            session = None

    def _cancel(self, endpoint: _Endpoint, session: _Response) -> None:
        with contextlib.suppress(OciCacheError):
            self.request(endpoint, "DELETE", "", "pull,push", ok=(204, 404, 405),
                         url=self._absolute(endpoint, session.headers.get("Location", ""))
                         ).close()

    def _remember(self, endpoint: _Endpoint, digest: Digest) -> None:
        """Note that ``digest`` is in this repository, a source for later mounts."""
        with self._guard:
            repositories = self._locations.setdefault((endpoint.host, digest), [])
            if endpoint.repository not in repositories:
                repositories.append(endpoint.repository)

    def _absolute(self, endpoint: _Endpoint, location: str) -> str:
        import urllib.parse
        try:
            url = urllib.parse.urljoin(f"{endpoint.base}/v2/{endpoint.repository}/", location)
        except ValueError:
            url = ""
        if not _is_http_url(url):
            raise RegistryError(f"{endpoint.host} gave an invalid upload location "
                                f"{_shorten(_one_line(_shown_url(location)))!r}")
        netloc = urllib.parse.urlsplit(url).netloc
        if _sends_here(endpoint.host, netloc):
            raise RegistryError(f"{endpoint.host} gave an upload location on this machine "
                                f"({netloc}); refusing")
        self.transport.named(netloc, endpoint.host)
        return url

    def _upload(self, endpoint: _Endpoint, descriptor: Descriptor, layout: Layout,
                chunked: bool, what: str, budget: _RetryBudget,
                session: Optional[_Response] = None) -> None:
        """One upload session (``session``, the answer that opened one, else a new
        POST), then one PUT, or PATCH chunks and a closing PUT; their token requests
        spend ``budget``, the upload's."""
        import urllib.parse
        response = session or self.request(endpoint, "POST", "blobs/uploads/", "pull,push",
                                           ok=(202,), what=what, retry=False, budget=budget)
        response.close()
        location = self._absolute(endpoint, response.headers.get("Location", ""))
        announced = response.headers.get("OCI-Chunk-Min-Length") or ""
        minimum = int(announced) if re.fullmatch(r"[0-9]{1,12}", announced) else 0
        digest = urllib.parse.quote(str(descriptor.digest), safe="")
        if not chunked:
            response = self.request(
                endpoint, "PUT", "", "pull,push", url=_with_query(location, f"digest={digest}"),
                headers={"Content-Type": "application/octet-stream",
                         "Content-Length": str(descriptor.size)},
                body=lambda: layout.open_blob(descriptor.digest), ok=(201, 204), what=what,
                retry=False, budget=budget)
            response.close()
            return
        chunk = max(self.transport.options.upload_chunk_size, minimum)
        offset = 0
        while offset < descriptor.size:
            length = min(chunk, descriptor.size - offset)
            response = self.request(
                endpoint, "PATCH", "", "pull,push", url=location,
                headers={"Content-Type": "application/octet-stream",
                         "Content-Range": f"{offset}-{offset + length - 1}",
                         "Content-Length": str(length)},
                body=functools.partial(_FileSlice, layout, descriptor.digest, offset, length),
                ok=(201, 202, 204),
                what=what, retry=False, budget=budget)
            response.close()
            location = self._absolute(endpoint, response.headers.get("Location") or location)
            offset += length
        response = self.request(endpoint, "PUT", "", "pull,push",
                                url=_with_query(location, f"digest={digest}"),
                                headers={"Content-Length": "0"}, body=b"", ok=(201, 204),
                                what=what, retry=False, budget=budget)
        response.close()

    def download_blob(self, ref: Reference, descriptor: Descriptor, layout: Layout,
                      progress: Callable[[int], None] = lambda n: None,
                      received: Callable[[], None] = lambda: None) -> None:
        """Stream a blob into the cache, verified, resuming a partial file with Range;
        ``received`` is called once its bytes are in and verified, before the fsync and
        rename that name it."""
        if layout.has_blob(descriptor.digest, descriptor.size):
            layout._touch(descriptor.digest)
            progress(descriptor.size)
            return
        endpoint = self.endpoint(ref)
        with layout.partial_blob(descriptor.digest, descriptor.size) as partial:
            if partial is None:  # another process fetched it meanwhile
                progress(descriptor.size)
                return
            with _HashingThread(descriptor.digest.algorithm, descriptor.size) as hasher:
                self._fetch_into(endpoint, descriptor, partial.fd, progress, hasher)
            received()
            self._remember(endpoint, descriptor.digest)
            partial.commit(descriptor.size)

    def _fetch_into(self, endpoint: _Endpoint, descriptor: Descriptor, fd: int,
                    progress: Callable[[int], None], hasher: "_HashingThread") -> None:
        what = f"blob {descriptor.digest} of {endpoint.repository}"
        restarts = 0
        budget = _RetryBudget(self.transport.options)  # for the blob, in all
        while True:
            hasher.reset()
            have = 0
            os.lseek(fd, 0, os.SEEK_SET)
            while True:  # hash what an earlier attempt (or run) left
                chunk = os.read(fd, COPY_BUFFER_SIZE)
                if not chunk:
                    break
                hasher.update(chunk)
                have += len(chunk)
            if have > descriptor.size:
                os.ftruncate(fd, 0)
                continue
            progress(have)
            if have < descriptor.size:
                headers = {"Range": f"bytes={have}-"} if have else {}
                response = self.request(endpoint, "GET", f"blobs/{descriptor.digest}",
                                        headers=headers, what=f"pull {what}", budget=budget,
                                        ok=(200, 206, 400, 416) if have else (200, 206))
                if response.status in (400, 416):
                    # The resume is refused (a CDN that does not do Range, a partial
                    # file the server disowns): the partial goes, the blob starts over.
                    _log().debug("%s refused to resume %s at byte %d (%d); starting over",
                                 endpoint.host, descriptor.digest, have, response.status)
                    response.close(reuse=False)
                    os.ftruncate(fd, 0)
                    progress(-have)
                    continue
                if response.status == 200 and have:
                    os.ftruncate(fd, 0)  # the server ignored Range: start over
                    progress(-have)
                    hasher.reset()
                    have = 0
                os.lseek(fd, have, os.SEEK_SET)
                response.streaming()
                stall = _StallWatch(self.transport.options.timeout)
                try:
                    while have < descriptor.size:
                        # read1: what has arrived, so a reset loses nothing already received
                        chunk = response.raw.read1(min(COPY_BUFFER_SIZE, descriptor.size - have))
                        if not chunk:
                            break
                        _write_all(fd, chunk)
                        hasher.update(chunk)
                        have += len(chunk)
                        progress(len(chunk))
                        stall.arrived(len(chunk))
                    response.close(reuse=have >= descriptor.size)
                except (OSError, _HTTPError) as e:
                    response.close(reuse=False)
                    if _is_write_error(e):
                        raise  # partial_blob names the file (and removes it if full)
                    error = _connection_error(endpoint.host, e)
                    if not self.transport.retry(budget, endpoint.host, str(error)):
                        raise error from None
                    continue  # resume with Range from what we have
                if have < descriptor.size:
                    error = OciCacheError(f"pull {what}: {endpoint.host} ended the body at "
                                          f"{have} of {descriptor.size} bytes")
                    if not self.transport.retry(budget, endpoint.host, str(error)):
                        raise error
                    continue
            if hasher.hexdigest() == descriptor.digest.hex:
                return
            os.ftruncate(fd, 0)
            progress(-have)
            restarts += 1
            if restarts >= 3:
                raise DigestMismatchError(f"pull {what}: the content served does not match "
                                          "its digest")


# =====================================================================================
# Tar formats
#
# Reading image archives: an OCI layout tar (buildx ``type=oci``, skopeo
# ``oci-archive:``), Docker 25+ ``docker save`` (OCI layout plus ``manifest.json``),
# classic ``docker save`` (``manifest.json`` plus per-layer directories) and the one of
# Docker before 1.10 (``repositories`` and v1 JSON), optionally compressed as a whole
# (gzip, xz, bzip2, zstd). The stream is read once, in any entry order. Nothing in
# an archive becomes a path on disk except a blob named by its verified digest, so
# ``..``, absolute names and links can never write outside the cache.
# =====================================================================================

_ARCHIVE_METADATA = frozenset({"index.json", "manifest.json", "oci-layout", "repositories"})
_SMALL_FILE_SIZE = 64 * 1024
_SMALL_FILES_BUDGET = 16 * 1024 * 1024
_MAX_ARCHIVE_PATH = 4096  # PATH_MAX: no image archive needs a longer name
_ENTRY_OVERHEAD = 256  # what a kept name costs beyond its characters, roughly


def _archive_path(name: str) -> str:
    """An archive member name, normalised; hostile names raise InvalidArchiveError."""
    if name.startswith("/"):
        raise InvalidArchiveError(f"archive entry {_shorten(name)!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArchiveError(f"archive entry {_shorten(name)!r} climbs out with '..'")
    return "/".join(parts)


def _link_target(member: tarfile.TarInfo, path: str) -> str:
    """Where a link member points, as an archive path; links out raise."""
    target = member.linkname
    if member.issym():
        if target.startswith("/"):
            raise InvalidArchiveError(
                f"archive entry {_shorten(path)!r} links to an absolute path")
        parts = path.split("/")[:-1]
    else:
        parts = []
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InvalidArchiveError(
                    f"archive entry {_shorten(path)!r} links outside the archive")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


class _ArchiveContents:
    """What one pass over an archive found: metadata, stored files, small files, links.

    Small files outside ``blobs/`` (a classic archive's config, ``VERSION`` and ``json``
    files) wait in memory, within a budget, and become blobs only if a manifest needs
    them, so loading leaves no unreferenced blobs behind.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.metadata: Dict[str, bytes] = {}
        self.files: Dict[str, Tuple[Digest, int]] = {}
        self.small: Dict[str, bytes] = {}
        self.links: Dict[str, str] = {}
        self.small_budget = _SMALL_FILES_BUDGET
        # A classic archive may list one layer file many times: it is checked once.
        self.layers: Dict[Tuple[Digest, str], Descriptor] = {}
        # Where each link leads, once found, and what each config lists: an archive may
        # name one long chain of links, or one large config, from every entry it has,
        # which cost the product of the two.
        self._followed: Dict[str, str] = {}
        self.diff_ids: Dict[Digest, List[Any]] = {}
        self._manifests: Optional[Dict[Tuple[Digest, Tuple[Digest, ...]], Descriptor]] = None

    def _follow(self, path: str) -> str:
        """The file a path leads to through the archive's links; each link is followed
        once per archive, however many entries name it."""
        chain: List[str] = []
        seen = set()
        current = _archive_path(path)
        while current in self.links and current not in self._followed:
            if current in seen:
                raise InvalidArchiveError(f"archive entry {_shorten(path)!r} is a link loop")
            seen.add(current)
            chain.append(current)
            current = self.links[current]
        end = self._followed.get(current, current)
        for link in chain:
            self._followed[link] = end
        return end

    def contains(self, path: str) -> bool:
        current = self._follow(path)
        return current in self.small or current in self.files

    def read_small(self, path: str) -> bytes:
        """A small file's bytes (a v1 ``json``), following links, without storing it."""
        current = self._follow(path)
        if current in self.small:
            return self.small[current]
        if current in self.files:
            raise InvalidArchiveError(f"archive entry {_shorten(path)!r} is larger than "
                                      f"{_SMALL_FILE_SIZE} bytes")
        raise InvalidArchiveError(f"archive refers to {path!r}, which it does not contain")

    def resolve(self, path: str) -> Tuple[Digest, int]:
        """The content of a file path (stored as a blob now), following links."""
        current = self._follow(path)
        if current in self.small:
            data = self.small.pop(current)
            self.files[current] = (self.layout.write_blob_bytes(data), len(data))
        if current not in self.files:
            raise InvalidArchiveError(f"archive refers to {path!r}, which it does not contain")
        return self.files[current]

    def stored_manifest(self, config: Digest, layers: Sequence[Digest]
                        ) -> Optional[Descriptor]:
        """The image manifest among the archive's blobs with this config and these layers,
        if any; the blobs are read once, however many entries ask."""
        if self._manifests is None:
            self._manifests = {}
            for path, (digest, size) in self.files.items():
                if not path.startswith("blobs/") or size > MAX_MANIFEST_SIZE:
                    continue
                with self.layout.open_blob(digest) as f:
                    if f.read(1) != b"{":
                        continue
                try:
                    data = self.layout.read_blob(digest)
                    media_type = _load_json_object(data, "manifest").get("mediaType")
                    manifest = Manifest.from_json(data)
                except OciCacheError:
                    continue
                if isinstance(media_type, str) and media_type in IMAGE_MEDIA_TYPES:
                    key = (manifest.config.digest, tuple(b.digest for b in manifest.layers))
                    self._manifests.setdefault(key, Descriptor(media_type, digest, size))
        return self._manifests.get((config, tuple(layers)))


class _PrefixedReader:
    """A stream with some bytes, already read from it, put back in front."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self._head = head
        self._stream = stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if n < 0:
            data, self._head = self._head + self._stream.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        return data

    def close(self) -> None:
        """The stream stays open: it belongs to whoever handed it over."""


class _PieceReader:
    """A decompressed stream read in the pieces its decoder makes (``_inflate``, None at
    the end), each bounded, so a small input that expands enormously stays cheap."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._buffer = b""
        self._position = 0

    def _inflate(self) -> Optional[bytes]:
        raise NotImplementedError

    def read(self, n: int = -1) -> bytes:
        available = len(self._buffer) - self._position
        if 0 <= n <= available:
            start = self._position
            self._position += n
            return self._buffer[start:self._position]
        parts = [self._buffer[self._position:]] if available else []
        self._buffer, self._position = b"", 0
        while n < 0 or available < n:
            chunk = self._inflate()
            if chunk is None:
                break
            parts.append(chunk)
            available += len(chunk)
        data = b"".join(parts)
        if 0 <= n < len(data):
            self._buffer, self._position = data, n
            return data[:n]
        return data

    def read1(self, n: int) -> bytes:
        """At most ``n`` bytes: what is left of the last piece, or the next piece; a
        piece read whole is handed on as it is, without a copy."""
        if self._position >= len(self._buffer):
            chunk = self._inflate()
            if chunk is None:
                return b""
            self._buffer, self._position = chunk, 0
        start = self._position
        self._position = min(start + n, len(self._buffer))
        if start == 0 and self._position == len(self._buffer):
            return self._buffer
        return self._buffer[start:self._position]

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "_PieceReader":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class _GunzipReader(_PieceReader):
    """Decompresses a gzip stream (members may be concatenated); a cut-off end raises.

    tarfile's own gzip reading takes a truncated stream for a short one; this does not.
    ``unchecked`` makes a second read of a stream whose check was made skip it.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(stream)
        self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._in_member = False
        self._pending = b""
        self._finished = False
        self._checked = True
        self._raw = False  # the member being read is inflated raw (unchecked)
        self._trailer = 0  # bytes of its trailer still to pass over

    def unchecked(self) -> "_GunzipReader":
        """Inflate without computing the CRC-32 of each member (which costs as much as
        inflating stored data), for a stream read before: a member whose header is all
        in the piece read is inflated raw, its header and trailer passed over unread."""
        assert not self._in_member and not self._pending, "unchecked after reading"
        self._checked = False
        return self

    def _inflate(self) -> Optional[bytes]:
        """The next piece of output; None at the end of the stream."""
        while not self._finished:
            chunk, self._pending = self._pending or self._stream.read(_STREAM_CHUNK_SIZE), b""
            if not chunk:
                if self._in_member or self._trailer:
                    raise InvalidArchiveError("truncated archive: the gzip stream ends early")
                self._finished = True
                break
            # Where in the piece to go on, passed over by offset: a piece may hold many
            # small members, and a copy of the rest of it for each would cost its size
            # squared (zlib's own copy, of what follows a member, is one per member).
            at = 0
            if self._trailer:
                at = min(self._trailer, len(chunk))
                self._trailer -= at
            if not self._in_member:
                if at == len(chunk) or not chunk[at]:  # zero padding after a member is allowed
                    found = _NOT_ZERO.search(chunk, at)
                    if found is None:
                        continue
                    at = found.start()
                end = None if self._checked else _gzip_header_end(chunk, at)
                if end is None:
                    self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    at = end
                    self._decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
                self._in_member, self._raw = True, end is not None
            try:
                output = self._decompressor.decompress(memoryview(chunk)[at:] if at else chunk,
                                                       _STREAM_CHUNK_SIZE)
            except zlib.error as e:
                raise InvalidArchiveError(f"corrupt gzip stream: {e}") from None
            if self._decompressor.eof:
                self._in_member = False
                self._pending = self._decompressor.unused_data
                self._trailer = 8 if self._raw else 0  # CRC-32 and size, passed over
            else:
                self._pending = self._decompressor.unconsumed_tail
            if output:
                return output
        return None


_NOT_ZERO = re.compile(b"[^\0]")


def _gzip_header_end(data: bytes, start: int) -> Optional[int]:
    """Where the gzip member header that begins at ``start`` of ``data`` ends (RFC 1952),
    or None when it is not all in ``data`` or is no header zlib reads (zlib then reads it)."""
    if len(data) < start + 10 or data[start:start + 3] != b"\x1f\x8b\x08" or \
            data[start + 3] & 0xE0:
        return None
    flags, at = data[start + 3], start + 10
    if flags & 4:  # FEXTRA
        at += 2 + int.from_bytes(data[at:at + 2], "little")
    for flag in (8, 16):  # FNAME, FCOMMENT: NUL-terminated
        if flags & flag:
            end = data.find(b"\0", at)
            if end < 0:
                return None
            at = end + 1
    at += 2 if flags & 2 else 0  # FHCRC
    return at if at <= len(data) else None


# A decoder's window (xz's dictionary, zstd's window) is memory it fills as it writes:
# a stream may declare up to 1.5 GiB (xz) or 2 GiB (zstd --long=31), and a few KB of it
# then take that much. 64 MiB is what xz -9 and zstd --ultra -21 use; zstd -22 and
# --long (128 MiB) are refused unless the input was smaller (zstd shrinks the window to
# a file's size), and can be decompressed by the program first.
_MAX_DECOMPRESSION_WINDOW = 64 << 20


def _window_too_large(kind: str, what: str) -> InvalidArchiveError:
    again = " (decompress it with the program first, and import that)" \
        if what == "archive" else ""
    return InvalidArchiveError(
        f"the {kind} stream of the {what} declares a window larger than "
        f"{_MAX_DECOMPRESSION_WINDOW >> 20} MiB (xz -9 and zstd --ultra -21 use 64 MiB); "
        f"ocicache refuses it to bound its memory{again}")


class _XzReader(_PieceReader):
    """Decompresses an xz stream (streams may follow one another, with padding), its
    memory bounded whatever dictionary size it declares; a cut-off end raises."""

    def __init__(self, stream: IO[bytes], what: str) -> None:
        super().__init__(stream)
        self._what = what
        self._decompressor: Any = None  # lzma's, for the stream being read
        self._pending = b""

    def _inflate(self) -> Optional[bytes]:
        """The next piece of output; None at the end of the last stream."""
        import lzma
        while True:
            decompressor = self._decompressor
            if decompressor is None:  # before a stream: padding, a stream, or the end
                data = self._pending or self._stream.read(_STREAM_CHUNK_SIZE)
                self._pending = b""
                if not data:
                    return None
                data = data.lstrip(b"\0")
                if not data:
                    continue
                # liblzma counts its own state with the dictionary: -9 needs 65 MiB
                decompressor = self._decompressor = lzma.LZMADecompressor(
                    memlimit=_MAX_DECOMPRESSION_WINDOW + (2 << 20))
            elif decompressor.needs_input:
                data = self._stream.read(_STREAM_CHUNK_SIZE)
                if not data:
                    raise InvalidArchiveError(f"truncated {self._what}: the xz stream ends "
                                              "early")
            else:
                data = b""
            try:
                output = decompressor.decompress(data, _STREAM_CHUNK_SIZE)
            except lzma.LZMAError as e:
                if "memory" in str(e).lower():
                    raise _window_too_large("xz", self._what) from None
                raise InvalidArchiveError(f"corrupt xz stream in {self._what}: {e}") from None
            if decompressor.eof:
                self._pending, self._decompressor = decompressor.unused_data, None
            if output:
                return output


class _Decompressing:
    """A compressed stream's content, read through a file class of the standard library
    (or its backport) whose reads are bounded by what is asked; corrupt and cut-off
    streams become one line naming the compression and what was being read."""

    def __init__(self, file: Any, stream: IO[bytes], kind: str, what: str,
                 errors: Tuple[Type[BaseException], ...]) -> None:
        self._file = file
        self._stream = stream  # what ``file`` reads; closed with it
        self._kind = kind
        self._what = what
        self._errors = errors

    def _call(self, method: Callable[[int], bytes], n: int) -> bytes:
        try:
            return method(n)
        except EOFError:
            raise InvalidArchiveError(f"truncated {self._what}: the {self._kind} stream ends "
                                      "early") from None
        except self._errors as e:
            if "too much memory" in str(e):  # zstd: a window over window_log_max
                raise _window_too_large(self._kind, self._what) from None
            raise InvalidArchiveError(f"corrupt {self._kind} stream in {self._what}: "
                                      f"{e}") from None

    def read(self, n: int = -1) -> bytes:
        return self._call(self._file.read, n)

    def read1(self, n: int) -> bytes:
        return self._call(self._file.read1, n)

    def close(self) -> None:
        self._file.close()
        self._stream.close()

    def __enter__(self) -> "_Decompressing":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class _ZstdProgram:
    """``zstd -dc`` in a pipe, for Pythons without a zstd module: a thread feeds it the
    stream and its output is read; a failure is its own last line of stderr."""

    def __init__(self, program: str, stream: IO[bytes], what: str) -> None:
        self._what = what
        self._process = _subprocess.Popen(
            [program, "-dcq", f"--memory={_MAX_DECOMPRESSION_WINDOW >> 20}MB"],
            stdin=_subprocess.PIPE, stdout=_subprocess.PIPE, stderr=_subprocess.PIPE)
        self._feed_error: Optional[BaseException] = None
        self._feeder = threading.Thread(target=self._feed, args=(stream,),
                                        name="ocicache-zstd", daemon=True)
        self._feeder.start()

    def _feed(self, stream: IO[bytes]) -> None:
        pipe = self._process.stdin
        assert pipe is not None
        try:
            with pipe, contextlib.closing(stream):
                for chunk in iter(lambda: stream.read(_STREAM_CHUNK_SIZE), b""):
                    pipe.write(chunk)
        except BrokenPipeError:
            pass  # zstd stopped reading: its exit status says why
        except BaseException as e:  # handed to the reader
            self._feed_error = e

    def _finish(self) -> None:
        """At the end of the output: the feeder's error, or zstd's, is raised here."""
        self._feeder.join()
        assert self._process.stderr is not None
        said = self._process.stderr.read().decode(errors="replace").strip().splitlines()
        if self._process.wait() != 0 and self._feed_error is None:
            reason = said[-1] if said else f"exit status {self._process.returncode}"
            if any("too much memory" in line for line in said):
                raise _window_too_large("zstd", self._what)
            raise InvalidArchiveError(f"corrupt or truncated zstd stream in {self._what}: "
                                      f"zstd says {_shorten(reason)!r}")
        if self._feed_error is not None:
            error, self._feed_error = self._feed_error, None
            raise error

    def read(self, n: int = -1) -> bytes:
        assert self._process.stdout is not None
        data = self._process.stdout.read(n)
        if not data and n != 0:
            self._finish()
        return data

    def read1(self, n: int) -> bytes:
        assert self._process.stdout is not None
        data = self._process.stdout.read1(n)
        if not data and n != 0:
            self._finish()
        return data

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()  # the reader stopped before the end: zstd is not needed
        self._process.wait()
        for pipe in (self._process.stdout, self._process.stderr):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> "_ZstdProgram":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_BZIP2_MAGIC = rb"BZh[1-9](\x31\x41\x59\x26\x53\x59|\x17\x72\x45\x38\x50\x90)"


def _zstd_decoder(what: str) -> Callable[[IO[bytes]], IO[bytes]]:
    """How to read zstd here: the standard library's ``compression.zstd`` (3.14+), else
    its backport ``backports.zstd`` (same API), else the ``zstd`` program; none of them
    is one line naming all three."""
    import shutil
    for name in ("compression.zstd", "backports.zstd"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        window = {module.DecompressionParameter.window_log_max:
                  _MAX_DECOMPRESSION_WINDOW.bit_length() - 1}
        return lambda stream: _Decompressing(  # type: ignore[return-value]
            module.ZstdFile(stream, options=window), stream, "zstd", what,
            (module.ZstdError,))
    program = shutil.which("zstd")
    if program is not None:
        return lambda stream: _ZstdProgram(program, stream, what)  # type: ignore[return-value]
    raise OciCacheError(
        f"{what} is zstd-compressed; reading it needs Python 3.14 (compression.zstd), the "
        "backports.zstd module (pip install backports.zstd) or the zstd program on PATH, "
        f"and this Python {_platform_module.python_version()} has none of them")


def _zstd_reader(stream: IO[bytes], what: str) -> IO[bytes]:
    return _zstd_decoder(what)(stream)


def _decompressed(stream: IO[bytes]) -> IO[bytes]:
    """The archive stream, decompressed when it is gzip, xz, bzip2 or zstd (as podman
    load reads them); other streams pass unchanged. Only this outer compression is
    undone, with output bounded per read."""
    import bz2
    head = b""
    while len(head) < 10:
        chunk = stream.read(10 - len(head))
        if not chunk:
            break
        head += chunk
    rest: IO[bytes] = _PrefixedReader(head, stream)  # type: ignore[assignment]
    if head.startswith(b"\x1f\x8b"):
        return _GunzipReader(rest)  # type: ignore[return-value]
    if head.startswith(_XZ_MAGIC):
        return _XzReader(rest, "archive")  # type: ignore[return-value]
    if re.match(_BZIP2_MAGIC, head):
        return _Decompressing(bz2.BZ2File(rest), rest, "bzip2", "archive",  # type: ignore
                              (OSError, ValueError))
    if head.startswith(_ZSTD_MAGIC):
        return _zstd_reader(rest, "archive")
    return rest


# -- reading layers -------------------------------------------------------------------
#
# Flattening reads every byte of every layer, and tarfile's stream mode copies each
# byte several times through its own buffer on the way, and its header parser
# (TarInfo.frombuf) cost 13 us a member, most of a flatten of many small files.
# _TarStream walks a layer's members with a header parser of its own (a struct unpack
# and one regular expression for the numbers; 2 us) and hands data on in the pieces
# the decompressor makes. Extended headers are applied as tarfile applies them:
# PAX (local and global) and GNU long names. Sparse files (old GNU, GNU PAX 0.0, 0.1
# and 1.0, which bsdtar writes by itself for a file with holes) are read as their real
# content under their real name, as extraction makes them.

# tarfile's XHDTYPE, XGLTYPE, GNUTYPE_LONGNAME and GNUTYPE_LONGLINK (tarfile is imported
# on first use, not here)
_EXTENDED_TYPES = (b"x", b"g", b"L", b"K")
_MAX_EXTENDED_HEADER = 1024 * 1024
_PAX_NUMBERS = {"size": int, "uid": int, "gid": int, "mtime": float}
_MAX_LAYER_PATH = 4096  # PATH_MAX: no extractor can make a longer path, so none is kept
_NAME_CONTROLS = re.compile("[\x00-\x1f\x7f]")
_SPARSE_KEYS = ("GNU.sparse.offset", "GNU.sparse.numbytes")
# A header block's fields up to the prefix: name, mode, uid, gid, size, mtime, chksum,
# type, linkname, magic and version, uname, gname, devmajor, devminor, prefix.
_HEADER_LAYOUT = "100s8s8s8s12s12s8sc100s8s32s32s8s8s155s"
# Its eight numbers (mode, uid, gid, size, mtime, chksum, devmajor, devminor) joined by
# \x01, each as every writer makes them: octal digits between spaces and NULs. Other
# spellings (base-256, bytes after a NUL) are read one by one, as tarfile reads them.
_HEADER_NUMBERS = re.compile(b"\x01".join([rb" *([0-7]*)[ \0]*"] * 8))
_OCTAL_DIGITS = b"01234567"
_HIGH_BYTES = bytes(range(128, 256))
_ZERO_BLOCK = bytes(512)
_POSIX_MAGIC = b"ustar\x0000"
# The kinds whose header block a flattened layer may carry as it was read: regular
# files, symlinks, devices and FIFOs (what the writer would make of them is the same).
_VERBATIM_KINDS = (b"0", b"2", b"3", b"4", b"6")
# The kinds of entry that a directory may hold as a number (see _Node): files, devices
# and FIFOs.
_LEAF_KINDS = (b"0", b"\0", b"7", b"3", b"4", b"6")


def _pax_records(data: bytes) -> List[Tuple[str, str]]:
    """``"<length> <key>=<value>\n"`` records in order, as text (undecodable bytes kept
    by surrogateescape, so writing them again gives the same bytes); a key may repeat
    (GNU sparse 0.0 repeats its offsets)."""
    records: List[Tuple[str, str]] = []
    position = 0
    while position < len(data) and data[position] != 0:
        match = re.match(rb"([0-9]{1,7}) ", data[position:position + 8])
        length = int(match.group(1)) if match else 0
        record = data[position + (match.end() if match else 0):position + length]
        key, equals, value = record.partition(b"=")
        if not equals or not record.endswith(b"\n") or length > len(data) - position:
            raise InvalidArchiveError("layer has a malformed PAX header")
        records.append((key.decode("utf-8", "surrogateescape"),
                        value[:-1].decode("utf-8", "surrogateescape")))
        position += length
    return records


def _sparse_number(text: Union[str, bytes], name: str, base: int = 10) -> int:
    """A number of a sparse map: decimal text, or a header field (octal, or base-256
    when its first byte has the high bit set)."""
    try:
        if base == 10:
            number = int(text)
        elif isinstance(text, bytes) and text[:1] == b"\x80":
            number = int.from_bytes(text[1:], "big")
        else:
            number = int(text.split(b"\0", 1)[0].strip() or b"0", 8)  # type: ignore[arg-type]
    except ValueError:
        number = -1
    if number < 0:
        raise InvalidArchiveError(f"layer entry {_shorten(name)!r} has a malformed sparse map")
    return number


def _header_number(field: bytes) -> int:
    """A number field of a header not spelled the usual way: base-256 (GNU; the first
    byte 0x80, or 0xff for a negative number), or octal cut at its first NUL."""
    if field[:1] in (b"\x80", b"\xff"):
        number = int.from_bytes(field[1:], "big")
        if field[0] == 0xff:
            number -= 256 ** (len(field) - 1)
        if -(1 << 63) <= number < 1 << 63:
            return number
        raise InvalidArchiveError("layer has an invalid tar header (a base-256 number "
                                  "of more than 64 bits)")
    text = field.split(b"\0", 1)[0].strip()
    if text.strip(_OCTAL_DIGITS):
        raise InvalidArchiveError("layer has an invalid tar header (a number field that is "
                                  f"not octal: {_shorten(repr(field))})")
    return int(text or b"0", 8)


def _parse_header(unpack: Callable[[bytes], Tuple[bytes, ...]],
                  block: bytes) -> Tuple[tarfile.TarInfo, bool]:
    """The member a header block describes (ustar, GNU or v7; prefixes read as Go reads
    them: in ustar headers only), and whether the block may be copied to a flattened
    layer unchanged: a ustar header of a kind kept as it is, numbers spelled plainly."""
    (name, mode, uid, gid, size, mtime, chksum, kind, linkname, magic, uname, gname,
     devmajor, devminor, prefix) = unpack(block)
    fields = (mode, uid, gid, size, mtime, chksum, devmajor, devminor)
    plain = _HEADER_NUMBERS.fullmatch(b"\x01".join(fields))
    if plain:
        numbers = [int(digits, 8) if digits else 0 for digits in plain.groups()]
    else:
        numbers = [_header_number(field) for field in fields]
    # The sum of the block's bytes, the checksum field counted as spaces: adler32 sums
    # 256 bytes exactly (at most 65,280, under its modulus), faster than sum().
    unsigned = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) \
        - 2 - sum(chksum) + 256
    if numbers[5] != unsigned and numbers[5] != unsigned - 256 * (
            512 - len(block.translate(None, _HIGH_BYTES)) -
            (8 - len(chksum.translate(None, _HIGH_BYTES)))):  # signed bytes, as old tars
        raise InvalidArchiveError("layer has an invalid tar header (bad checksum)")
    path = name.split(b"\0", 1)[0]
    if magic == _POSIX_MAGIC and prefix[0]:  # star's keep times after 131 bytes of prefix
        path = prefix[:131 if block[508:512] == b"tar\0" else 155].split(b"\0", 1)[0] + \
            b"/" + path
    link = linkname.split(b"\0", 1)[0]
    info = tarfile.TarInfo(path.decode("utf-8", "surrogateescape"))
    (info.mode, info.uid, info.gid, info.size, info.mtime, info.chksum, info.devmajor,
     info.devminor) = numbers
    info.type = kind
    info.linkname = link.decode("utf-8", "surrogateescape")
    info.uname = uname.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    info.gname = gname.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if kind == tarfile.AREGTYPE and path.endswith(b"/"):
        info.type = tarfile.DIRTYPE  # v7 spells a directory so
    if info.type == tarfile.DIRTYPE:
        info.name = info.name.rstrip("/")
    verbatim = plain is not None and magic == _POSIX_MAGIC and kind in _VERBATIM_KINDS and \
        (kind == b"0" or not numbers[3]) and (kind == b"2" or not link) and \
        numbers[0] < 0o10000 and not path.endswith(b"/")
    return info, verbatim


class _TarStream:
    """The members of a tar stream; ``read`` reads the current member's data (a sparse
    file's holes read as zeros). The stream is read in its own pieces; ``offset`` is
    where in it the reader stands, ``start`` where the member last yielded began (its
    extended headers included), and ``verbatim`` whether that member's header block may
    be copied unchanged: no extended header applies to it and ``_parse_header`` says so.
    ``skip_to`` and ``copy_to`` move forward over raw bytes, for a second pass that
    knows where the members it wants begin."""

    def __init__(self, stream: IO[bytes]) -> None:
        import struct
        self._unpack = struct.Struct(_HEADER_LAYOUT).unpack_from
        self._read1 = getattr(stream, "read1", stream.read)
        self._piece = b""       # the stream's current piece, read up to _at
        self._at = 0
        self._base = 0          # the stream offset of the piece's first byte
        self._data_left = 0     # of the current member, as stored
        self._skip_left = 0     # its data and padding: what lies before the next header
        self._regions: List[Tuple[int, int]] = []  # a sparse member's data, reversed
        self._position = self._real_size = 0       # in a sparse member's real content
        self._sparse = False
        self.start = 0
        self.verbatim = False
        self.global_headers = False  # whether a global PAX header was met

    @property
    def offset(self) -> int:
        return self._base + self._at

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        global_headers: Dict[str, str] = {}
        headers: Dict[str, str] = {}
        names: Dict[str, str] = {}  # GNU long names: path, linkpath
        sparse_map: List[int] = []  # GNU sparse 0.0: offsets and sizes, in turn
        extended = global_size = 0  # bytes of extended headers kept in memory
        fresh = True                # no extended header read for the next member yet
        while True:
            at = self._at + self._skip_left
            if at + tarfile.BLOCKSIZE <= len(self._piece):  # the header within the piece
                self._data_left = self._skip_left = 0
                self._sparse = False
                if fresh:
                    self.start, fresh = self._base + at, False
                block = self._piece[at:at + tarfile.BLOCKSIZE]
                self._at = at + tarfile.BLOCKSIZE
            else:
                self._skip(self._skip_left)
                if fresh:
                    self.start, fresh = self.offset, False
                block = self._exact(tarfile.BLOCKSIZE, end_allowed=True)
            if not block or block == _ZERO_BLOCK:
                return  # a zero block, or nothing: the end of the archive
            info, verbatim = _parse_header(self._unpack, block)
            padded = -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if info.type in _EXTENDED_TYPES:
                if info.size < 0:
                    raise InvalidArchiveError("layer has an extended header of a negative "
                                              "size")
                extended += info.size
                global_size += info.size if info.type == tarfile.XGLTYPE else 0
                if max(extended, global_size) > _MAX_EXTENDED_HEADER:
                    raise InvalidArchiveError("layer has extended headers of more than "
                                              f"{_MAX_EXTENDED_HEADER} bytes")
                data = self._exact(padded)[:info.size]
                if info.type == tarfile.XHDTYPE:
                    records = _pax_records(data)
                    headers.update(records)
                    sparse_map += [_sparse_number(v, info.name) for k, v in records
                                   if k in _SPARSE_KEYS]
                elif info.type == tarfile.XGLTYPE:
                    global_headers.update(_pax_records(data))
                    self.global_headers = True
                else:
                    key = "path" if info.type == tarfile.GNUTYPE_LONGNAME else "linkpath"
                    names[key] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            # no extended header before it: its block is all there is of it
            self.verbatim = verbatim and not global_headers and \
                self.offset - self.start == tarfile.BLOCKSIZE
            if global_headers or headers or names:
                headers = {**global_headers, **headers}
                self._apply(info, headers, names)
            else:
                self._check(info)
            self._data_left = info.size if info.isreg() or \
                info.type not in tarfile.SUPPORTED_TYPES else 0
            self._skip_left = -(-self._data_left // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            self._sparse = False
            if info.type == tarfile.GNUTYPE_SPARSE:
                self._old_gnu_sparse(info, block)
            elif "GNU.sparse.major" in headers or "GNU.sparse.map" in headers or sparse_map:
                self._pax_sparse(info, headers, sparse_map)
            headers, names, sparse_map, extended, fresh = {}, {}, [], global_size, True
            yield info

    @classmethod
    def _apply(cls, info: tarfile.TarInfo, headers: Dict[str, str],
               names: Dict[str, str]) -> None:
        for key, value in {**headers, **names}.items():
            if key in ("path", "linkpath", "uname", "gname"):
                setattr(info, key, value.rstrip("/") if key == "path" else value)
            elif key in _PAX_NUMBERS:
                try:
                    setattr(info, key, _PAX_NUMBERS[key](value))
                except ValueError:
                    raise InvalidArchiveError(f"layer has a PAX {key} that is not a number: "
                                              f"{_shorten(value)!r}") from None
        if "GNU.sparse.name" in headers:
            info.name = headers["GNU.sparse.name"].rstrip("/")
        info.pax_headers = headers
        cls._check(info)

    @staticmethod
    def _check(info: tarfile.TarInfo) -> None:
        if info.size < 0:
            raise InvalidArchiveError(f"layer entry {_shorten(info.name)!r} has a bad size")
        for what, text in (("name", info.name), ("link target", info.linkname)):
            # A NUL cuts a name in two for every C extractor: one entry would be written
            # as another. PATH_MAX: no longer path can be made, and a deep one would
            # cost its depth squared in parent directories.
            if _NAME_CONTROLS.search(text):
                raise InvalidArchiveError(f"layer entry {_shorten(info.name)!r} has a control "
                                          f"character in its {what}")
            if len(text) > _MAX_LAYER_PATH // 4 and \
                    len(text.encode("utf-8", "surrogateescape")) > _MAX_LAYER_PATH:
                raise InvalidArchiveError(f"layer entry {_shorten(info.name)!r} has a {what} "
                                          f"longer than {_MAX_LAYER_PATH} bytes")

    def _old_gnu_sparse(self, info: tarfile.TarInfo, block: bytes) -> None:
        """Read an old GNU sparse header's map, with its extension blocks."""
        numbers: List[int] = []
        entries, extended_flag = block[386:482], block[482]
        taken = 0
        while True:
            for start in range(0, len(entries), 24):
                if not entries[start:start + 24].strip(b"\0"):
                    break
                numbers += [_sparse_number(entries[start:start + 12], info.name, 8),
                             _sparse_number(entries[start + 12:start + 24], info.name, 8)]
            if not extended_flag:
                break
            taken += tarfile.BLOCKSIZE
            if taken > _MAX_EXTENDED_HEADER:
                raise InvalidArchiveError("layer has extended headers of more than "
                                          f"{_MAX_EXTENDED_HEADER} bytes")
            extension = self._exact(tarfile.BLOCKSIZE)
            entries, extended_flag = extension[:504], extension[504]
        real_size = _sparse_number(block[483:495], info.name, 8)
        info.type = tarfile.REGTYPE
        self._start_sparse(info, numbers, real_size)

    def _pax_sparse(self, info: tarfile.TarInfo, headers: Dict[str, str],
                    numbers: List[int]) -> None:
        """GNU sparse in PAX: 0.0 (repeated records), 0.1 (one map record), 1.0 (the
        map in front of the data)."""
        size_text = headers.get("GNU.sparse.realsize", headers.get("GNU.sparse.size", ""))
        real_size = _sparse_number(size_text, info.name)
        if "GNU.sparse.map" in headers:
            numbers = [_sparse_number(n, info.name)
                       for n in headers["GNU.sparse.map"].split(",") if n]
        elif headers.get("GNU.sparse.major") == "1":
            numbers = self._sparse_map_in_data(info)
        self._start_sparse(info, numbers, real_size)

    def _sparse_map_in_data(self, info: tarfile.TarInfo) -> List[int]:
        lines: List[bytes] = []
        text = b""
        count = None
        while count is None or len(lines) < 1 + 2 * count:
            if self._data_left < tarfile.BLOCKSIZE or \
                    len(text) + len(lines) * 21 > _MAX_EXTENDED_HEADER:
                raise InvalidArchiveError(f"layer entry {_shorten(info.name)!r} has a "
                                          "malformed sparse map")
            text += self._raw(tarfile.BLOCKSIZE, exact=True)
            *complete, text = text.split(b"\n")
            lines += complete
            if lines and count is None:
                count = _sparse_number(lines[0], info.name)
        return [_sparse_number(n, info.name) for n in lines[1:1 + 2 * count]]

    def _start_sparse(self, info: tarfile.TarInfo, numbers: List[int], real_size: int) -> None:
        regions = list(zip(numbers[::2], numbers[1::2]))
        end = 0
        for offset, size in regions:
            if offset < end:
                break
            end = offset + size
        else:
            if len(numbers) % 2 == 0 and end <= real_size and \
                    sum(size for _, size in regions) == self._data_left:
                self._regions = [r for r in reversed(regions) if r[1]]
                self._position, self._real_size, self._sparse = 0, real_size, True
                info.size = real_size
                info.pax_headers = {k: v for k, v in info.pax_headers.items()
                                    if not k.startswith("GNU.sparse.")}
                return
        raise InvalidArchiveError(f"layer entry {_shorten(info.name)!r} has a malformed "
                                  "sparse map")

    def read(self, n: int = -1) -> bytes:
        if not self._sparse:
            return self._raw(n)
        left = self._real_size - self._position
        n = left if n < 0 else min(n, left)
        if n <= 0:
            return b""
        if self._regions and self._regions[-1][0] <= self._position:
            offset, size = self._regions[-1]
            chunk = self._raw(min(n, offset + size - self._position))
            if self._position + len(chunk) == offset + size:
                self._regions.pop()
        else:
            hole_end = self._regions[-1][0] if self._regions else self._real_size
            chunk = bytes(min(n, hole_end - self._position, _STREAM_CHUNK_SIZE))
        self._position += len(chunk)
        return chunk

    def _next_piece(self, end_allowed: bool = False) -> bool:
        """The next piece of the stream, the current one read to its end; False at the
        end of the stream where ``end_allowed``."""
        self._base += len(self._piece)
        self._piece, self._at = self._read1(_STREAM_CHUNK_SIZE), 0
        if not self._piece and not end_allowed:
            raise InvalidArchiveError("layer ends inside an entry")
        return bool(self._piece)

    def _raw(self, n: int = -1, exact: bool = False) -> bytes:
        n = self._data_left if n < 0 else min(n, self._data_left)
        if n <= 0:
            return b""
        if exact:
            chunk = self._exact(n)
        else:  # what is left of the piece, at most n bytes: a whole piece is not copied
            if self._at == len(self._piece):
                self._next_piece()
            start = self._at
            self._at = min(start + n, len(self._piece))
            chunk = self._piece if start == 0 and self._at == len(self._piece) else \
                self._piece[start:self._at]
        self._data_left -= len(chunk)
        self._skip_left -= len(chunk)
        return chunk

    def _exact(self, size: int, end_allowed: bool = False) -> bytes:
        end = self._at + size
        if end <= len(self._piece):
            data = self._piece[self._at:end]
            self._at = end
            return data
        parts, left = [self._piece[self._at:]], size - (len(self._piece) - self._at)
        self._at = len(self._piece)
        while left:
            if not self._next_piece(end_allowed and left == size):
                return b""  # the end of the stream, before the first byte
            parts.append(self._piece[:left])
            self._at = len(parts[-1])
            left -= self._at
        return b"".join(parts)

    def _skip(self, size: int) -> None:
        while size > len(self._piece) - self._at:
            size -= len(self._piece) - self._at
            self._at = len(self._piece)
            self._next_piece()
        self._at += size
        self._data_left = self._skip_left = 0
        self._sparse = False

    def drain(self) -> None:
        """Read the stream to its end, past the end of the archive: a compressed
        stream's own check (gzip's CRC, zstd's exit status) is made there."""
        self._at = len(self._piece)
        while self._next_piece(end_allowed=True):
            self._at = len(self._piece)

    def skip_to(self, offset: int) -> None:
        """Move to ``offset`` of the stream (not behind the reader), where a member
        begins: iterating goes on from there."""
        assert offset >= self.offset, (offset, self.offset)
        self._skip(offset - self.offset)

    def copy_to(self, offset: int, write: Callable[[Any], Any]) -> None:
        """Hand ``write`` the stream's bytes up to ``offset``, as they are (views of the
        pieces, not copies); iterating goes on from there."""
        left = offset - self.offset
        while left > 0:
            if self._at == len(self._piece):
                self._next_piece()
            take = min(left, len(self._piece) - self._at)
            if take == len(self._piece):
                write(self._piece)
            else:
                write(memoryview(self._piece)[self._at:self._at + take])
            self._at += take
            left -= take
        self._data_left = self._skip_left = 0
        self._sparse = False


def _bounded_member_class() -> Type[tarfile.TarInfo]:
    """A TarInfo class for one archive that refuses its extended headers (PAX, local and
    global, and GNU long names) beyond ``_MAX_EXTENDED_HEADER`` bytes before tarfile
    reads them: tarfile reads each whole into memory, and a chain of them, or global
    ones, add up. The layers' reader (_TarStream) keeps the same bound."""
    extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)

    class _BoundedMember(tarfile.TarInfo):
        kept = 0  # bytes of extended headers kept for the next member
        kept_globally = 0

        @classmethod
        def frombuf(cls, buf: Union[bytes, bytearray], encoding: str,
                    errors: str) -> "_BoundedMember":
            info = super().frombuf(buf, encoding, errors)
            if info.type not in extended:
                cls.kept = cls.kept_globally
                return info
            cls.kept += info.size
            if info.type == tarfile.XGLTYPE:
                cls.kept_globally += info.size
            if cls.kept > _MAX_EXTENDED_HEADER:
                raise InvalidArchiveError(f"archive has extended headers (PAX or GNU long "
                                          f"names) of more than {_MAX_EXTENDED_HEADER} bytes")
            return info

    return _BoundedMember


def _read_archive(stream: IO[bytes], layout: Layout) -> _ArchiveContents:
    """Read an archive once, storing its blobs (verified) and keeping small files."""
    contents = _ArchiveContents(layout)
    try:
        # "r|", not "r|*": only the whole-stream compression is undone (by _decompressed,
        # with bounded output); tarfile must not inflate a compressed stream found inside.
        with contextlib.closing(_decompressed(stream)) as decompressed, \
                tarfile.open(fileobj=decompressed, mode="r|", bufsize=_STREAM_CHUNK_SIZE,
                             tarinfo=_bounded_member_class()) as archive:
            for member in archive:
                archive.members.clear()  # type: ignore[attr-defined]  # bounded memory
                path = _archive_path(member.name)
                if member.isdir() or not path:
                    continue
                # Every name kept costs memory until the end: charge it to the budget.
                if len(path) > _MAX_ARCHIVE_PATH:
                    raise InvalidArchiveError(f"archive entry {_shorten(path)!r} has a name "
                                              f"longer than {_MAX_ARCHIVE_PATH} characters")
                contents.small_budget -= len(path) + _ENTRY_OVERHEAD
                if contents.small_budget < 0:
                    raise InvalidArchiveError("archive holds more entries than an image "
                                              "archive can")
                if member.issym() or member.islnk():
                    contents.links[path] = _link_target(member, path)
                    continue
                if not member.isreg() or member.issparse():
                    raise InvalidArchiveError(
                        f"archive entry {_shorten(path)!r} is not a regular file")
                if member.size < 0:
                    raise InvalidArchiveError(f"archive entry {_shorten(path)!r} has a bad size")
                data = archive.extractfile(member)
                assert data is not None  # regular files always have data
                if path in _ARCHIVE_METADATA:
                    if path in contents.metadata:
                        raise InvalidArchiveError(f"archive holds {path} twice")
                    if member.size > MAX_MANIFEST_SIZE:
                        raise InvalidArchiveError(
                            f"archive entry {path} is {member.size} bytes; "
                            f"the limit is {MAX_MANIFEST_SIZE}")
                    contents.metadata[path] = data.read()
                    continue
                expected = _blob_path_digest(path)
                contents.small.pop(path, None)
                contents.files.pop(path, None)  # a later entry of the same name wins
                if expected is None and member.size <= min(_SMALL_FILE_SIZE,
                                                           contents.small_budget):
                    contents.small[path] = data.read()
                    contents.small_budget -= member.size
                    continue
                try:
                    contents.files[path] = layout.write_blob(data, expected, member.size)
                except DigestMismatchError as e:
                    raise DigestMismatchError(f"archive entry {_shorten(path)}: {e}") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError, RecursionError) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES,
                                                  errno.EROFS):
            raise OciCacheError(f"cannot write to the cache {layout.root}: "
                                f"{e.strerror}") from None
        raise InvalidArchiveError(f"unreadable or truncated archive: {e}") from None
    return contents


def _blob_path_digest(path: str) -> Optional[Digest]:
    """The digest a ``blobs/<alg>/<hex>`` entry claims; None for paths outside blobs/."""
    parts = path.split("/")
    if parts[0] != "blobs":
        return None
    if len(parts) != 3:
        raise InvalidArchiveError(f"archive entry {_shorten(path)!r} is not blobs/<alg>/<hex>")
    try:
        return Digest(parts[1], parts[2])
    except InvalidDigestError as e:
        raise InvalidArchiveError(
            f"archive entry {_shorten(path)!r} is not named by a valid digest: {e}") from None


class _LoadedImage:
    """A root found in an archive: its descriptor, the names it should get, and the bare
    tag it carries instead of a name (skopeo's ``oci-archive:FILE:v1``), if any."""

    def __init__(self, descriptor: Descriptor, names: Tuple[str, ...], tag: str = "") -> None:
        self.descriptor = descriptor
        self.names = names
        self.tag = tag


def _archive_json(contents: _ArchiveContents, name: str) -> Any:
    return _parse_json(contents.metadata[name], f"archive's {name}", InvalidArchiveError)


def _canonical_names(values: Iterable[str], source: str) -> Tuple[str, ...]:
    names = []
    for value in values:
        try:
            name = str(Reference.parse(value))
        except InvalidReferenceError as e:
            raise InvalidArchiveError(f"archive's {source} names an invalid image: {e}") from None
        if name not in names:
            names.append(name)
    return tuple(names)


def _repo_tags_by_config(contents: _ArchiveContents) -> Dict[Digest, List[str]]:
    """manifest.json's RepoTags keyed by the digest of the config each entry names."""
    if "manifest.json" not in contents.metadata:
        return {}
    entries = _archive_json(contents, "manifest.json")
    if not isinstance(entries, list):
        raise InvalidArchiveError("archive's manifest.json is not a JSON array")
    tags: Dict[Digest, List[str]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise InvalidArchiveError("archive's manifest.json has an entry without Config")
        repo_tags = entry.get("RepoTags") or []
        if not isinstance(repo_tags, list) or not all(isinstance(t, str) for t in repo_tags):
            raise InvalidArchiveError("archive's manifest.json has a bad RepoTags list")
        digest, _ = contents.resolve(entry["Config"])
        tags.setdefault(digest, []).extend(repo_tags)
    return tags


def _oci_archive_images(contents: _ArchiveContents, layout: Layout) -> List[_LoadedImage]:
    """Roots of an OCI layout archive (buildx, skopeo, Docker 25+), with their names."""
    try:
        index = Index.from_json(contents.metadata["index.json"], what="archive's index.json")
    except OciCacheError as e:
        raise InvalidArchiveError(str(e)) from None
    if not index.manifests:
        if "manifest.json" in contents.metadata:  # Docker 25 saving an untagged image
            return _docker_archive_images(contents, layout)
        raise InvalidArchiveError("archive names no image: its index.json lists no manifests")
    repo_tags = _repo_tags_by_config(contents)
    _check_archive_roots(index.manifests, contents, layout)
    configs: Dict[Digest, Digest] = {}  # each manifest read once, however many roots name it
    images = []
    for root in index.manifests:
        containerd_name = root.annotations.get(ANNOTATION_CONTAINERD_NAME, "")
        ref_name = root.annotations.get(ANNOTATION_REF_NAME, "")
        if containerd_name:
            names = _canonical_names([containerd_name], "index.json")
        elif any(c in ref_name for c in "/:@"):  # a full reference, not a bare tag
            names = _canonical_names([ref_name], "index.json")
        elif root.media_type in IMAGE_MEDIA_TYPES and repo_tags:
            if root.digest not in configs:
                manifest = Manifest.from_json(layout.read_blob(root.digest))
                configs[root.digest] = manifest.config.digest
            names = _canonical_names(repo_tags.get(configs[root.digest], []), "manifest.json")
        else:
            names = ()
        images.append(_LoadedImage(root, names, "" if names else ref_name))
    return images


def _check_archive_roots(roots: Sequence[Descriptor], contents: _ArchiveContents,
                         layout: Layout) -> None:
    """Each root must be in the archive with its size (that of the bytes stored from it,
    not of whatever bears the blob's name now); its manifests must be complete. Blobs
    that many roots share are read once."""
    stored = {digest: size for digest, size in contents.files.values()}
    for root in roots:
        if root.digest not in stored:
            raise InvalidArchiveError(f"archive's index.json names {root.digest}, "
                                      "which the archive does not contain")
        if stored[root.digest] != root.size:
            raise InvalidArchiveError(f"archive's index.json gives {root.digest} size "
                                      f"{root.size}, but the blob has {stored[root.digest]} "
                                      "bytes")
    marked = layout.reachable(roots)
    if marked.unreadable:
        raise InvalidArchiveError(f"archive holds an invalid manifest: {marked.unreadable[0]}")
    if marked.missing:
        raise InvalidArchiveError(f"archive is incomplete: it lacks {marked.missing[0]}")


def _docker_archive_images(contents: _ArchiveContents, layout: Layout) -> List[_LoadedImage]:
    """Roots of a classic ``docker save`` archive: an OCI manifest is made for each entry."""
    entries = _archive_json(contents, "manifest.json")
    if not isinstance(entries, list) or not entries:
        raise InvalidArchiveError("archive's manifest.json is not a non-empty JSON array")
    images = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) or \
                not isinstance(entry.get("Layers"), list):
            raise InvalidArchiveError("archive's manifest.json entry needs Config and Layers")
        config_digest, config_size = contents.resolve(entry["Config"])
        if config_digest not in contents.diff_ids:
            config = _load_json_object(layout.read_blob(config_digest), "image config")
            rootfs = config.get("rootfs")
            listed = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
            if not isinstance(listed, list):
                raise InvalidArchiveError("archive's image config has no rootfs.diff_ids list")
            contents.diff_ids[config_digest] = listed
        diff_ids = contents.diff_ids[config_digest]
        if len(diff_ids) != len(entry["Layers"]):
            raise InvalidArchiveError(
                f"archive's manifest.json lists {len(entry['Layers'])} layers, but the "
                f"config has {len(diff_ids)} diff_ids")
        sources = entry.get("LayerSources") or {}
        if not isinstance(sources, dict):
            raise InvalidArchiveError("archive's manifest.json has a bad LayerSources map")
        layers = [_docker_archive_layer(contents, layout, path, diff_id,
                                        sources.get(diff_id) if isinstance(diff_id, str) else None)
                  for path, diff_id in zip(entry["Layers"], diff_ids)]
        config_descriptor = Descriptor(MEDIA_OCI_CONFIG, config_digest, config_size)
        repo_tags = entry.get("RepoTags") or []
        if not isinstance(repo_tags, list):
            raise InvalidArchiveError("archive's manifest.json has a bad RepoTags list")
        root = _stored_manifest(contents, layout, config_descriptor, layers) or \
            _made_manifest(layout, config_descriptor, layers)
        images.append(_LoadedImage(root, _canonical_names(repo_tags, "manifest.json")))
    return images


def _made_manifest(layout: Layout, config: Descriptor,
                   layers: Sequence[Descriptor]) -> Descriptor:
    """An OCI manifest made for an archive's image, stored; one too large for ocicache to
    read back (tens of thousands of layers) would make a name nothing can use."""
    data = Manifest(MEDIA_OCI_MANIFEST, config, tuple(layers)).to_bytes()
    if len(data) > MAX_MANIFEST_SIZE:
        raise InvalidArchiveError(f"archive's image has {len(layers)} layers: its manifest "
                                  f"would be {len(data)} bytes, and ocicache reads at most "
                                  f"{MAX_MANIFEST_SIZE}")
    return Descriptor(MEDIA_OCI_MANIFEST, layout.write_blob_bytes(data), len(data))


def _stored_manifest(contents: _ArchiveContents, layout: Layout, config: Descriptor,
                     layers: Sequence[Descriptor]) -> Optional[Descriptor]:
    """The manifest blob of a Docker 25 archive whose index.json lists nothing (an untagged
    image): the one with this config and these layers, so its digest is docker's own."""
    if "index.json" not in contents.metadata:
        return None
    return contents.stored_manifest(config.digest, [layer.digest for layer in layers])


def _docker_archive_layer(contents: _ArchiveContents, layout: Layout, path: Any,
                          diff_id: Any, source: Any) -> Descriptor:
    """A classic archive's layer file, checked against the config's diff_id (once per
    file). ``source`` is its ``LayerSources`` descriptor: a foreign (non-distributable)
    layer keeps its media type and ``urls``, and may be left out of the archive, as
    ``docker save`` does."""
    if not isinstance(path, str):
        raise InvalidArchiveError("archive's manifest.json has a layer that is not a path")
    foreign = _foreign_layer_source(source)
    if foreign is not None and not contents.contains(path):
        return foreign
    digest, size = contents.resolve(path)
    key = (digest, str(diff_id))
    if key not in contents.layers:
        contents.layers[key] = _checked_layer(layout, path, digest, size, diff_id)
    layer = contents.layers[key]
    if foreign is not None and foreign.digest == layer.digest:
        return foreign
    return layer


def _foreign_layer_source(source: Any) -> Optional[Descriptor]:
    """A LayerSources entry that is a foreign layer, as a descriptor for an OCI manifest:
    Docker's foreign type becomes OCI's non-distributable one (as skopeo converts it)."""
    if not isinstance(source, dict) or source.get("mediaType") not in FOREIGN_LAYER_MEDIA_TYPES:
        return None
    try:
        descriptor = Descriptor.from_json(source)
        if not all(isinstance(url, str) for url in descriptor.urls):
            raise OciCacheError("its urls are not all strings")
    except (OciCacheError, ValueError, TypeError) as e:
        raise InvalidArchiveError(f"archive's manifest.json has a bad LayerSources entry: "
                                  f"{e}") from None
    if descriptor.media_type == MEDIA_DOCKER_LAYER_FOREIGN:
        descriptor = _replace(descriptor, media_type=MEDIA_OCI_LAYER_FOREIGN_GZIP)
    return descriptor


def _checked_layer(layout: Layout, path: str, digest: Digest, size: int,
                   diff_id: Any) -> Descriptor:
    if str(digest) == diff_id:
        return Descriptor(MEDIA_OCI_LAYER, digest, size)
    with layout.open_blob(digest) as f:
        magic = f.read(2)
        f.seek(0)
        if magic != b"\x1f\x8b":
            raise DigestMismatchError(
                f"archive layer {_shorten(path)!r} hashes to {digest}, but the config says "
                f"{_shorten(str(diff_id))!r}")
        uncompressed = _gzip_content_digest(f)
    if str(uncompressed) != diff_id:
        raise DigestMismatchError(f"archive layer {_shorten(path)!r} uncompresses to "
                                  f"{uncompressed}, but the config says "
                                  f"{_shorten(str(diff_id))!r}")
    return Descriptor(MEDIA_OCI_LAYER_GZIP, digest, size)


def _gzip_content_digest(stream: IO[bytes]) -> Digest:
    """The digest of what a gzip stream holds, inflated a bounded piece at a time."""
    hasher = hashlib.sha256()
    reader = _GunzipReader(stream)
    for chunk in iter(lambda: reader.read1(_STREAM_CHUNK_SIZE), b""):
        hasher.update(chunk)
    return Digest("sha256", hasher.hexdigest())


# What moby's legacy load drops from a v1 image JSON to make an image config of it.
_V1_ONLY_KEYS = frozenset({"id", "parent", "Size", "parent_id", "layer_id", "throwaway"})
_MAX_V1_CHAIN = 1000  # layers a v1 image may have, as parents of one another
# Layers of all the images one archive names, each counted once per image: the configs
# and manifests made are as large as this sum, which a small archive can make huge (a
# thousand tags on the tip of a long chain of parents).
_MAX_V1_LAYERS = 10 * _MAX_V1_CHAIN


def _legacy_archive_images(contents: _ArchiveContents, layout: Layout) -> List[_LoadedImage]:
    """Roots of a ``docker save`` from before Docker 1.10 (``repositories`` and
    ``<id>/json`` + ``<id>/layer.tar``, no manifest.json): the config and manifest are
    made from the v1 JSON of each tagged image and its parents, as moby's legacy load
    makes them. Each v1 JSON is read once, however many images have it as a parent."""
    repositories = _archive_json(contents, "repositories")
    if not isinstance(repositories, dict) or not all(
            isinstance(tags, dict) and all(isinstance(i, str) for i in tags.values())
            for tags in repositories.values()):
        raise InvalidArchiveError("archive's repositories is not a map of repositories to "
                                  "tags to image IDs")
    roots: Dict[str, Descriptor] = {}
    names: Dict[str, List[str]] = {}
    layers: Dict[str, Tuple[Descriptor, str]] = {}  # by image ID: each inflated once
    v1s: Dict[str, Tuple[str, Dict[str, Any], int]] = {}  # by image ID: see _legacy_v1
    total = 0
    for repository, tags in repositories.items():
        for tag, image_id in tags.items():
            if image_id not in roots:
                chain = _legacy_chain(contents, image_id, v1s)
                total += len(chain)
                if total > _MAX_V1_LAYERS:
                    raise InvalidArchiveError(f"archive's images have more than "
                                              f"{_MAX_V1_LAYERS} layers in all")
                roots[image_id] = _legacy_image(contents, layout, chain, layers, v1s)
            names.setdefault(image_id, []).append(f"{repository}:{tag}")
    if not roots:
        raise InvalidArchiveError("archive names no image: its repositories file is empty")
    return [_LoadedImage(roots[i], _canonical_names(names[i], "repositories")) for i in roots]


def _legacy_chain(contents: _ArchiveContents, top: str,
                  v1s: Dict[str, Tuple[str, Dict[str, Any], int]]) -> List[str]:
    """The image ID ``top``, then its parents'. An empty ID ends a chain of parents; a
    tag naming one names no image, and is refused."""
    if not top:
        raise InvalidArchiveError("archive's repositories names an invalid image ID ''")
    chain: List[str] = []
    seen = set()
    current = top
    while current:
        if current in seen or len(chain) >= _MAX_V1_CHAIN:
            raise InvalidArchiveError(f"archive's image {_shorten(top)!r} has a loop or more "
                                      f"than {_MAX_V1_CHAIN} parents")
        if current not in v1s:
            v1s[current] = _legacy_v1(contents, current)
        seen.add(current)
        chain.append(current)
        current = v1s[current][0]
    return chain


def _legacy_json(contents: _ArchiveContents, image_id: str) -> Dict[str, Any]:
    if "/" in image_id or image_id in ("", ".", ".."):
        raise InvalidArchiveError(f"archive names an invalid image ID {_shorten(image_id)!r}")
    data = contents.read_small(f"{image_id}/json")
    try:
        return _load_json_object(data, f"archive's {_shorten(image_id)}/json")
    except OciCacheError as e:
        raise InvalidArchiveError(str(e)) from None


def _legacy_v1(contents: _ArchiveContents, image_id: str) -> Tuple[str, Dict[str, Any], int]:
    """What an image's v1 JSON gives the images made from it: its parent's ID, its entry
    of their config's history, and that entry's size in the config."""
    v1 = _legacy_json(contents, image_id)
    parent = v1.get("parent") or ""
    if not isinstance(parent, str):
        raise InvalidArchiveError(f"archive's {_shorten(image_id)}/json has a bad parent")
    container = v1.get("container_config")
    command = container.get("Cmd") if isinstance(container, dict) else None
    entry: Dict[str, Any] = {k: v1[k] for k in ("created", "author", "comment") if k in v1}
    if isinstance(command, list):
        entry["created_by"] = " ".join(str(c) for c in command)
    return parent, entry, len(_json_bytes(entry)) + 1


def _legacy_image(contents: _ArchiveContents, layout: Layout, chain: Sequence[str],
                  known: Dict[str, Tuple[Descriptor, str]],
                  v1s: Mapping[str, Tuple[str, Dict[str, Any], int]]) -> Descriptor:
    """The manifest (and config) made for the image ``chain[0]``, its parents after it."""
    history_size = sum(v1s[i][2] for i in chain)
    if history_size > MAX_MANIFEST_SIZE:  # known before the config is built in memory
        raise InvalidArchiveError(
            f"archive's image {_shorten(chain[0])!r} has a history of {history_size} bytes; "
            f"a config ocicache can read holds at most {MAX_MANIFEST_SIZE}")
    layers, diff_ids, history = [], [], []
    for image_id in reversed(chain):
        if image_id not in known:
            known[image_id] = _legacy_layer(contents, layout, f"{image_id}/layer.tar")
        layers.append(known[image_id][0])
        diff_ids.append(known[image_id][1])
        history.append(v1s[image_id][1])
    config = {k: v for k, v in _legacy_json(contents, chain[0]).items()
              if k not in _V1_ONLY_KEYS}
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config["history"] = history
    config_data = _json_bytes(config, sort_keys=True, separators=(",", ":"))
    if len(config_data) > MAX_MANIFEST_SIZE:
        raise InvalidArchiveError(f"archive's image {_shorten(chain[0])!r} makes a config of "
                                  f"{len(config_data)} bytes; ocicache reads at most "
                                  f"{MAX_MANIFEST_SIZE}")
    config_descriptor = Descriptor(MEDIA_OCI_CONFIG, layout.write_blob_bytes(config_data),
                                   len(config_data))
    return _made_manifest(layout, config_descriptor, layers)


def _legacy_layer(contents: _ArchiveContents, layout: Layout,
                  path: str) -> Tuple[Descriptor, str]:
    """A v1 layer file as a descriptor, and its diff_id (it has none to check against)."""
    digest, size = contents.resolve(path)
    with layout.open_blob(digest) as f:
        if f.read(2) != b"\x1f\x8b":
            return Descriptor(MEDIA_OCI_LAYER, digest, size), str(digest)
        f.seek(0)
        return Descriptor(MEDIA_OCI_LAYER_GZIP, digest, size), str(_gzip_content_digest(f))


def _name_image(images: Sequence[_LoadedImage], name: Reference) -> List[_LoadedImage]:
    """The archive's images with ``name`` given to the one it chooses: the only image,
    or the one whose bare tag is the tag of ``name``; the others keep their own names."""
    chosen = list(images) if len(images) == 1 else \
        [i for i in images if name.tag and i.tag == name.tag]
    if len(chosen) != 1:
        tags = ", ".join(sorted({i.tag for i in images if i.tag})) or "none"
        raise InvalidArchiveError(
            f"archive holds {len(images)} images; --name {name} must say which by its tag "
            f"({'several have' if chosen else 'none has'} the tag {name.tag or '(none)'}; "
            f"their tags: {tags})")
    return [_LoadedImage(i.descriptor, (str(name),)) if i is chosen[0] else i
            for i in images]


def _load_archive(stream: IO[bytes], layout: Layout) -> List[_LoadedImage]:
    """Store an archive's blobs (verified) and return its roots; names are not written."""
    contents = _read_archive(stream, layout)
    if "index.json" in contents.metadata:
        return _oci_archive_images(contents, layout)
    if "manifest.json" in contents.metadata:
        return _docker_archive_images(contents, layout)
    if "repositories" in contents.metadata:
        return _legacy_archive_images(contents, layout)
    raise InvalidArchiveError(
        "not an image archive: it has neither index.json nor manifest.json")


# -- writing archives -----------------------------------------------------------------
#
# Exports are produced by a function writing into a pipe from a background thread; the
# caller reads the other end. Memory stays bounded by the pipe and the copy buffer, and
# an error in the producer is raised from read() once the pipe drains: a failed export
# never looks like a short, complete one.

class _ProducerStream(io.RawIOBase):
    """The read end of a pipe that ``produce(out)`` fills from a background thread."""

    def __init__(self, produce: Callable[[BinaryIO], None]) -> None:
        super().__init__()
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), COPY_BUFFER_SIZE)
        self._fd = read_fd
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(produce, write_fd),
                                        name="ocicache-export", daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[BinaryIO], None], write_fd: int) -> None:
        try:
            with open(write_fd, "wb", buffering=COPY_BUFFER_SIZE) as out:
                produce(out)  # type: ignore[arg-type]
        except BrokenPipeError:
            pass  # the reader closed early
        except BaseException as e:  # handed to the reader
            self._error = e

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.read(self._fd, len(buffer))
        if not data:
            self._thread.join()
            if self._error is not None:
                error, self._error = self._error, None
                raise error
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self._thread.join()
        super().close()


def _produced(produce: Callable[[BinaryIO], None]) -> BinaryIO:
    stream = io.BufferedReader(_ProducerStream(produce), COPY_BUFFER_SIZE)
    return stream  # type: ignore[return-value]


def _pax_record(key: str, value: str) -> bytes:
    """One ``"<length> <key>=<value>\n"`` record; the value's bytes as they were read."""
    body = b" " + key.encode("utf-8", "surrogateescape") + b"=" + \
        value.encode("utf-8", "surrogateescape") + b"\n"
    length = len(body) + len(str(len(body)))
    length += len(str(length)) - len(str(len(body)))
    return str(length).encode() + body


def _ustar_block(name: bytes, info: tarfile.TarInfo, size: int, mtime: int,
                 linkname: bytes, uname: bytes, gname: bytes,
                 magic: bytes = b"ustar\x0000") -> bytes:
    def number(value: int, digits: int) -> bytes:
        if not 0 <= value < 8 ** (digits - 1):
            raise InvalidArchiveError(f"entry {_shorten(info.name)!r} has a number that "
                                      f"does not fit a tar header: {value}")
        return b"%0*o\0" % (digits - 1, value)

    block = b"".join([
        name.ljust(100, b"\0"), number(info.mode & 0o7777, 8), number(info.uid, 8),
        number(info.gid, 8), number(size, 12), number(mtime, 12), b" " * 8, info.type,
        linkname.ljust(100, b"\0"), magic, uname.ljust(32, b"\0"),
        gname.ljust(32, b"\0"), number(info.devmajor, 8), number(info.devminor, 8),
        bytes(167)])
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


def _alignment_records(offset: int, used: int) -> List[bytes]:
    """The ``comment`` record that, added to PAX records of ``used`` bytes in a header
    written at ``offset`` (the ustar block after them), starts the body at a multiple of
    _BODY_ALIGNMENT; none when it starts there without one."""
    if not used and (offset + tarfile.BLOCKSIZE) % _BODY_ALIGNMENT == 0:
        return []  # no PAX header is needed at all
    size = -(offset + 2 * tarfile.BLOCKSIZE) % _BODY_ALIGNMENT  # of the PAX records
    if used and (used + -used % tarfile.BLOCKSIZE - size) % _BODY_ALIGNMENT == 0:
        return []  # the records' own padding reaches the boundary
    while size < used + 12:  # room for the shortest record, "12 comment=\n"
        size += _BODY_ALIGNMENT
    length = size - used
    return [b"%d comment=%s\n" % (length, b"x" * (length - len(str(length)) - 10))]


def _tar_header(info: tarfile.TarInfo, xattrs: Mapping[str, str] = MappingProxyType({}),
                mtime: Union[int, float, str, None] = None,
                aligned_at: Optional[int] = None) -> bytes:
    """A ustar header, after a PAX header with what ustar cannot hold. Names, link
    targets and attribute values keep their exact bytes (what is not UTF-8 too: no
    ``hdrcharset``, which GNU tar warns about); attributes are ``SCHILY.xattr.*``, which
    GNU tar, bsdtar and Go read. Nothing else a layer's PAX headers said is copied. A
    long name that is not UTF-8 goes in a GNU long-name record: in a PAX record bsdtar
    refuses it without hdrcharset, and GNU tar warns about hdrcharset.

    With ``aligned_at``, the offset in the stream the header is written at, the PAX
    header gets a ``comment`` record (which every reader ignores) as long as it takes to
    start the body after it at a multiple of _BODY_ALIGNMENT."""
    records, long_names = [], []
    fields: Dict[str, bytes] = {}
    name = info.name + ("/" if info.type == tarfile.DIRTYPE else "")
    for key, text, limit in (("path", name, 100), ("linkpath", info.linkname, 100),
                             ("uname", info.uname, 32), ("gname", info.gname, 32)):
        raw = text.encode("utf-8", "surrogateescape")
        if len(raw) > limit:
            try:
                text.encode("utf-8")
                records.append(_pax_record(key, text))
            except UnicodeEncodeError:
                if key not in ("path", "linkpath"):
                    raise InvalidArchiveError(f"entry {_shorten(info.name)!r} has an owner "
                                              "name that is long and not UTF-8") from None
                long_name = tarfile.TarInfo("././@LongLink")
                long_name.type = tarfile.GNUTYPE_LONGNAME if key == "path" \
                    else tarfile.GNUTYPE_LONGLINK
                long_names.append(_ustar_block(b"././@LongLink", long_name, len(raw) + 1, 0,
                                               b"", b"", b"", b"ustar  \0") + raw +
                                  bytes(-len(raw) % tarfile.BLOCKSIZE or tarfile.BLOCKSIZE))
            raw = raw[:limit]
        fields[key] = raw
    numbers = {"uid": info.uid, "gid": info.gid, "size": info.size}
    for key, value in numbers.items():
        if value >= 8 ** (11 if key == "size" else 7):
            records.append(_pax_record(key, str(value)))
            numbers[key] = 0
    mtime = info.mtime if mtime is None else mtime
    whole = int(float(mtime))
    if str(mtime) != str(whole) or not 0 <= whole < 8 ** 11:
        records.append(_pax_record("mtime", str(mtime)))
        whole = min(max(whole, 0), 8 ** 11 - 1)
    records += [_pax_record("SCHILY.xattr." + key, value) for key, value in xattrs.items()]
    if aligned_at is not None:
        records += _alignment_records(aligned_at + sum(map(len, long_names)),
                                      sum(map(len, records)))
    header = tarfile.TarInfo(info.name)
    header.mode, header.uid, header.gid = info.mode, numbers["uid"], numbers["gid"]
    header.type, header.devmajor, header.devminor = info.type, info.devmajor, info.devminor
    block = _ustar_block(fields["path"], header, numbers["size"], whole, fields["linkpath"],
                         fields["uname"], fields["gname"])
    if not records:
        return b"".join(long_names) + block
    data = b"".join(records)
    extended = tarfile.TarInfo("././@PaxHeader")
    extended.type = tarfile.XHDTYPE
    return b"".join(long_names) + \
        _ustar_block(b"././@PaxHeader", extended, len(data), 0, b"", b"", b"") + data + \
        bytes(-len(data) % tarfile.BLOCKSIZE) + block


def _content_problem_at(fd: int, digest: Digest) -> str:
    """Why the file open as ``fd`` does not hold ``digest``'s bytes ("" when it does),
    read with ``pread``: the file offset, which a copy of the same file beside it moves,
    is left alone."""
    hasher, offset = digest.hasher(), 0
    for chunk in iter(lambda: os.pread(fd, COPY_BUFFER_SIZE, offset), b""):
        hasher.update(chunk)
        offset += len(chunk)
    if hasher.hexdigest() != digest.hex:
        return f"content hashes to {digest.algorithm}:{hasher.hexdigest()}"
    return ""


class _BlobChecks:
    """Which blobs of one export need hashing. A large blob whose file is the one found
    whole before, unchanged since (``Layout.checked_blobs``), is not hashed again: hashing is what an export of large layers costs (sha256 runs at
    a third of the speed of copying them). Blobs it hashes whole it adds to that record
    when the export succeeds (``save``), but only a file whose change time was already
    _CHECK_SETTLED_NS old when hashing began: a timestamp moves in clock ticks, and a
    write in the tick that last changed the file could leave its identity as it was."""

    _CHECK_SETTLED_NS = 2_000_000_000

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._known: Optional[Dict[str, _FileIdentity]] = None  # read when first asked
        self._passed: Dict[str, _FileIdentity] = {}

    def needed(self, digest: Digest, st: os.stat_result) -> bool:
        """Whether the blob open with status ``st`` must be hashed."""
        if st.st_size < _CHECKED_MIN_SIZE:
            return True
        if self._known is None:
            self._known = self._layout.checked_blobs()
        return self._known.get(str(digest)) != _file_identity(st)

    def passed(self, digest: Digest, before: os.stat_result, after: os.stat_result,
               started_ns: int) -> None:
        """The blob hashed whole from ``started_ns`` on, its file ``before`` then and
        ``after`` once hashed: remembered when it did not change meanwhile, and only
        this user or root may write it. A co-user who may (a group-writable file, or
        one of theirs) could change its bytes and leave its identity as it is: a write
        through a shared mapping moves its times at a page's first write only."""
        identity = _file_identity(before)
        if before.st_size >= _CHECKED_MIN_SIZE and identity == _file_identity(after) and \
                before.st_ctime_ns + self._CHECK_SETTLED_NS <= started_ns and \
                _only_ours(before):
            self._passed[str(digest)] = identity

    def save(self) -> None:
        self._layout.record_checked(self._passed)


class _TarWriter:
    """Writes a PAX tar to a stream: headers by _tar_header, file bodies copied with
    ``os.sendfile`` when both ends are files (no trip through Python), else in 1 MiB
    chunks. tarfile's own stream writer cuts everything into 10 KiB records."""

    def __init__(self, out: Union[BinaryIO, "_WriteBehind"]) -> None:
        self._out = out
        self._offset = 0  # of what is written next, in the tar

    def add(self, info: tarfile.TarInfo, data: Union[IO[bytes], _TarStream, None] = None,
            xattrs: Mapping[str, str] = MappingProxyType({}),
            mtime: Union[int, float, str, None] = None, aligned: bool = False) -> None:
        """An entry; with ``aligned``, its body starts at a multiple of _BODY_ALIGNMENT."""
        header = _tar_header(info, xattrs, mtime, self._offset if aligned else None)
        self._out.write(header)
        self._offset += len(header)
        if data is None or not info.size:
            return
        self._offset += info.size + -info.size % tarfile.BLOCKSIZE
        if isinstance(data, _TarStream) or not self._send(data, info.size):
            left = info.size
            while left:
                chunk = data.read(min(_STREAM_CHUNK_SIZE, left))
                if not chunk:
                    raise InvalidArchiveError(f"{info.name} ended {left} bytes early")
                self._out.write(chunk)
                left -= len(chunk)
        padding = -info.size % tarfile.BLOCKSIZE
        if padding:
            self._out.write(b"\0" * padding)

    def _send(self, data: IO[bytes], size: int) -> bool:
        try:
            source, target = data.fileno(), self._out.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            return False
        self._out.flush()
        offset = data.tell()
        end = offset + size
        while offset < end:
            try:
                sent = os.sendfile(target, source, offset, min(end - offset, 1 << 30))
            except OSError as e:
                if offset == data.tell() and e.errno in (errno.EINVAL, errno.ENOSYS):
                    return False  # this pair of files cannot: copy in Python instead
                raise
            if sent == 0:
                raise CorruptCacheError(f"{getattr(data, 'name', 'a blob')} is shorter than "
                                        f"{size} bytes")
            offset += sent
        data.seek(end)
        return True

    def add_bytes(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self.add(info, io.BytesIO(data))

    def add_directory(self, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
        self.add(info)

    def add_blob(self, layout: Layout, descriptor: Descriptor, name: str,
                 checks: _BlobChecks) -> None:
        if _is_foreign(descriptor) and not layout.has_blob(descriptor.digest):
            raise _foreign_layer_error(descriptor)
        with layout.open_blob(descriptor.digest) as blob:
            before = os.fstat(blob.fileno())
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = before.st_size, 0o644, 0
            if info.size != descriptor.size:
                raise CorruptCacheError(f"blob {descriptor.digest} has {info.size} bytes, not "
                                        f"{descriptor.size}; run 'ocicache verify'")
            aligned = info.size >= _ALIGNED_MIN_SIZE
            if not checks.needed(descriptor.digest, before):
                self.add(info, blob, aligned=aligned)
                return
            # The digest is checked by a second reader of the same open file (a blob
            # renamed over meanwhile is not what it checks) hashing beside the copy
            # (which may bypass Python with sendfile): a corrupt blob fails the export.
            problem: List[str] = []
            started = time.time_ns()

            def check() -> None:
                try:
                    problem.append(_content_problem_at(blob.fileno(), descriptor.digest))
                except OSError as e:
                    problem.append(f"it cannot be read: {e.strerror or e}")

            hashing = threading.Thread(target=check, name="ocicache-export-hash")
            hashing.start()
            try:
                self.add(info, blob, aligned=aligned)
            finally:
                hashing.join()
            if not problem or problem[0]:
                raise CorruptCacheError(f"blob {descriptor.digest} is corrupt "
                                        f"({problem[0] if problem else 'it was not read'}); "
                                        "run 'ocicache verify --repair', then pull the "
                                        "image again")
            checks.passed(descriptor.digest, before, os.fstat(blob.fileno()), started)

    def close(self) -> None:
        self._out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self._out.flush()


def _foreign_layer_error(descriptor: Descriptor) -> NotFoundError:
    return NotFoundError(f"layer {descriptor.digest} is a foreign layer "
                         f"({', '.join(descriptor.urls) or 'no URLs'}); it is not in the "
                         "cache and cannot be exported")


def _blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


# -- opening layers -------------------------------------------------------------------

def _open_layer(layout: Layout, descriptor: Descriptor,
                opened: Optional[Dict[Digest, Tuple[int, int, int]]] = None) -> IO[bytes]:
    """A layer's uncompressed tar stream; gzip and zstd are recognised by their bytes.
    With ``opened`` (the files earlier reads of one export opened), a blob that is not
    the file an earlier read opened is refused (see ``_same_blob``)."""
    blob = layout.open_blob(descriptor.digest)
    if opened is not None:
        _same_blob(blob, descriptor.digest, opened)
    head = blob.read(4)
    blob.seek(0)
    if head[:2] == b"\x1f\x8b":
        return _GunzipReader(blob)  # type: ignore[return-value]
    if head == _ZSTD_MAGIC:
        return _zstd_reader(blob, f"layer {descriptor.digest}")
    return blob


def _same_blob(blob: BinaryIO, digest: Digest, opened: Dict[Digest, Tuple[int, int, int]]
               ) -> os.stat_result:
    """The status of ``blob``; refuse it (closing it) when it is not the file an earlier
    read of the same export opened: a flatten reads each layer twice, the first pass
    checking what the second writes unchecked, and a co-user of a group-shared cache can rename another file over
    a blob in between. Device, inode and size, not times: a concurrent pull of an image
    sharing the layer refreshes its modification time, and ocicache never writes a blob
    in place."""
    found = os.fstat(blob.fileno())
    identity = (found.st_dev, found.st_ino, found.st_size)
    if opened.setdefault(digest, identity) != identity:
        blob.close()
        raise CorruptCacheError(f"layer {digest} was replaced while it was being read; "
                                "export again")
    return found


# -- flattening -----------------------------------------------------------------------
#
# Layers are applied as containers/storage (podman, Docker) and umoci apply them: in
# order, each entry at the path it names resolved inside the root (a symlink on the way
# is followed, an absolute or ``..`` target never leaves the root; the last component
# is not followed), an entry already there replaced unless both are directories (then
# the new entry's metadata is taken), a hard link sharing its target's inode. The first
# pass reads every layer's headers into that tree, keeping for a file only where its
# content lies; the second reads the layers again (a gzip layer inflated raw: the
# first pass checked its CRC-32) and writes each surviving entry as its content goes
# by, parents first, the other names of an inode as hard links to it
# (an entry that comes out as it went in is copied as it was read, header and all).
# A link whose target was rewritten or deleted later thus still has its own content,
# whichever layer holds it, with no pass of its own.

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_KINDS: Dict[bytes, bytes] = {}  # each type's one bytes object, not one per member
_AUFS_METADATA = ".wh..wh."  # .wh..wh.plnk and the like at the root: skipped, as podman does
_MAX_SYMLINK_HOPS = 255      # securejoin's bound
_THROUGH_SYMLINK = -2        # the layer of a node written by a path through a symlink


def _clean_path(name: str) -> List[str]:
    """A member name's components as Go's filepath.Clean and a join onto the root make
    them: empty and ``.`` parts dropped, ``..`` taken back lexically, never above the root;
    ``[]`` is the root itself."""
    parts: List[str] = []
    for part in name.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return parts


def _is_clean(name: str) -> bool:
    """Whether ``name`` is its own _clean_path already."""
    framed = f"/{name}/"
    return not ("//" in framed or "/./" in framed or "/../" in framed)


def _xattrs(member: tarfile.TarInfo) -> Dict[str, str]:
    """A member's extended attributes, name to value (bytes kept by surrogateescape):
    ``SCHILY.xattr.*`` as GNU tar and Go write them, else libarchive's own
    (``LIBARCHIVE.xattr.<url-quoted name>=<base64 value>``). An empty value sets
    nothing: a PAX record with an empty value removes its key, and containers/storage
    and umoci set no attribute for it."""
    found: Dict[str, str] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            found[key[len("SCHILY.xattr."):]] = value
    for key, value in member.pax_headers.items():
        if key.startswith("LIBARCHIVE.xattr."):
            import base64
            import urllib.parse
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):], errors="surrogateescape")
            try:
                encoded = value.encode("utf-8", "surrogateescape")
                data = base64.b64decode(encoded + b"=" * (-len(encoded) % 4))  # unpadded
            except ValueError:
                raise InvalidArchiveError(f"layer entry {_shorten(member.name)!r} has a "
                                          "malformed LIBARCHIVE.xattr record") from None
            found.setdefault(name, data.decode("utf-8", "surrogateescape"))
    return {name: value for name, value in found.items() if value}


# A directory's metadata: mode, uid, gid, mtime (the PAX text when it had one), uname,
# gname, extended attributes.
_DirectoryMeta = Tuple[int, int, int, Union[int, float, str], str, str, Dict[str, str]]
_IMPLICIT_DIRECTORY: _DirectoryMeta = (0o755, 0, 0, 0, "", "", {})


def _mtime(member: tarfile.TarInfo) -> Union[int, float, str]:
    """The mtime as written: a PAX mtime's own text keeps all its digits."""
    return member.pax_headers.get("mtime", member.mtime)


class _Node:
    """An inode of the merged tree: a directory with its children, or a file, symlink
    or special file, which several names share when hard-linked. A file or special
    file at its own name (not reached through a symlink) that no hard link names is
    no _Node but its entry's number (``source`` below): a layer of 200,000 files holds
    200,000 of them, and an int is a third of a _Node."""

    # Kept small: what few inodes need is in ``meta``.
    __slots__ = ("kind", "layer", "source", "meta", "children", "parent", "name", "emitted")

    def __init__(self, kind: bytes, layer: int, source: int,
                 parent: Optional["_Node"] = None) -> None:
        self.kind = kind
        self.layer = layer     # the last layer that put it at a name (-1: made implicitly)
        self.source = source   # its entry: layer << 32 | ordinal in the layer (-1: none)
        # a directory: its _DirectoryMeta; another inode: None, or a dict of a symlink's
        # "target", what a hard link's header changed, the "others" of its names
        self.meta: Any = None
        self.children: Optional[Dict[str, "_Child"]] = {} if kind == tarfile.DIRTYPE \
            else None
        self.parent = parent   # a directory's from the start; a file's from placing it
        self.name = ""
        self.emitted = False   # a directory's


_Child = Union[_Node, int]  # what a directory holds at a name: see _Node


class _MergedTree:
    """The root filesystem that applying the layers' entries in order makes (headers
    only): pure logic, no I/O."""

    def __init__(self) -> None:
        self.root = _Node(tarfile.DIRTYPE, -1, -1)
        self.root.name = ""
        self.followed = False  # whether the last path _directory resolved went through a symlink
        # The names this layer wrote through a symlink, or as hard links: an opaque
        # marker keeps what the layer wrote by the very path it walks (containers/storage
        # compares the joined names, not where they lead, nor inodes); a node written
        # through a symlink has layer _THROUGH_SYMLINK.
        self._through: Set[str] = set()
        self._layer = -1
        self.root.meta = _IMPLICIT_DIRECTORY
        # The directory part of the last entry's name, when it found a directory through
        # no symlink and put a number there, and that directory.
        self._head: Optional[str] = None
        self._head_directory = self.root

    def _directory(self, parts: Sequence[str], create: bool, what: str) -> Optional[_Node]:
        """The directory ``parts`` lead to from the root, through symlinks, never out of
        the root; missing ones made (``create``) as extraction makes them: not where a
        symlink's target is missing (containers/storage makes no directory there, its
        mkdir finds the symlink). None when a file stands in the way, or something is
        missing that is not made."""
        pending: List[Optional[str]] = list(reversed(parts))
        current, hops, expanding = self.root, 0, 0  # expanding: symlink targets being read
        while pending:
            part = pending.pop()
            if part is None:
                expanding -= 1
                continue
            if part == "..":
                current = current.parent or self.root
                continue
            if part in ("", "."):
                continue
            assert current.children is not None
            child = current.children.get(part)
            if child is None:
                if not create or expanding:
                    return None
                child = _Node(tarfile.DIRTYPE, -1, -1, current)
                child.meta = _IMPLICIT_DIRECTORY
                current.children[part] = child
            elif isinstance(child, int):
                return None
            elif child.kind == tarfile.SYMTYPE:
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise InvalidArchiveError(f"layer entry {_shorten(what)!r} goes through "
                                              "too many levels of symbolic links")
                target = child.meta["target"]
                if target.startswith("/"):
                    current = self.root
                pending.append(None)
                pending.extend(reversed(target.split("/")))
                expanding += 1
                continue
            elif child.children is None:
                return None
            current = child
        self.followed = hops > 0
        return current

    def apply(self, layer: int, ordinal: int, member: tarfile.TarInfo) -> None:
        source = layer << 32 | ordinal
        head, _, leaf = member.name.rpartition("/")
        if head == self._head and layer == self._layer and member.type in _LEAF_KINDS and \
                leaf not in ("", ".", "..") and not leaf.startswith(_WHITEOUT):
            # Beside the entry before it, which only put a number in the tree since it
            # found this directory: the directory is still where that path leads.
            holder = self._head_directory.children
            assert holder is not None
            if not isinstance(holder.get(leaf), _Node):
                holder[sys.intern(leaf)] = source
                return
        self._head = None
        parts = _clean_path(member.name)
        if not parts or parts[0].startswith(_AUFS_METADATA) or \
                member.type not in tarfile.SUPPORTED_TYPES:  # nothing a filesystem holds
            return
        if layer != self._layer:
            self._through, self._layer = set(), layer
        base = parts[-1]
        if base == _OPAQUE and self._is_symlink(parts[:-1]):
            return  # containers/storage walks the symlink, which holds nothing
        directory = self._directory(parts[:-1], True, member.name)
        if directory is None:
            return  # a file where a directory must be: extraction fails there, we drop it
        assert directory.children is not None
        if base == _OPAQUE:
            self._make_opaque(directory, layer, "/".join(parts[:-1]), not self.followed)
            return
        if (self.followed or member.islnk()) and not base.startswith(_WHITEOUT):
            # a hard link's inode keeps the layer that made it: its name is what was written
            self._through.add("/".join(parts))
            layer = _THROUGH_SYMLINK
        if base.startswith(_WHITEOUT):
            directory.children.pop(base[len(_WHITEOUT):], None)
            return
        existing: Optional[_Child] = directory.children.get(base)
        node: _Child
        if member.isdir():
            meta = (member.mode, member.uid, member.gid, _mtime(member), member.uname,
                    member.gname, _xattrs(member))
            if isinstance(existing, _Node) and existing.children is not None:
                # merged as extraction merges: new metadata, extended attributes added
                meta = (*meta[:6], {**existing.meta[6], **meta[6]})
                existing.meta, existing.layer, existing.source = meta, layer, source
                return
            node = _Node(tarfile.DIRTYPE, layer, source, directory)
            node.meta = meta
        elif member.islnk():
            if existing is not None:
                del directory.children[base]  # removed before the link is made
            target = self._link_target(member)
            if target is None:
                return  # its target is not there: no link can be made
            self._touch(target, member)
            node = target
        elif member.issym() or layer == _THROUGH_SYMLINK:
            node = _Node(_KINDS.setdefault(member.type, member.type), layer, source)
            if member.issym():
                node.meta = {"target": member.linkname}
        else:
            node = source
            if leaf == base:  # the next entry may be put beside it without a walk
                self._head, self._head_directory = head, directory
        directory.children[sys.intern(base)] = node

    def _is_symlink(self, parts: Sequence[str]) -> bool:
        holder = self._directory(parts[:-1], False, "/".join(parts)) if parts else None
        found = holder.children.get(parts[-1]) if holder and holder.children else None
        return isinstance(found, _Node) and found.kind == tarfile.SYMTYPE

    def _link_target(self, member: tarfile.TarInfo) -> Optional[_Node]:
        parts = _clean_path(member.linkname)
        if not parts:
            return None
        directory = self._directory(parts[:-1], False, member.name)
        found = directory.children.get(parts[-1]) if directory and directory.children else None
        if isinstance(found, int):  # linked to now: a _Node of its own
            assert directory is not None and directory.children is not None
            found = directory.children[parts[-1]] = _Node(tarfile.REGTYPE, found >> 32, found)
        return None if found is None or found.children is not None else found

    @staticmethod
    def _touch(inode: _Node, link: tarfile.TarInfo) -> None:
        """A hard link's header applied to its inode, as containers/storage applies it:
        owner and extended attributes always, mode and mtime unless it is a symlink."""
        meta = dict(inode.meta or {})
        meta.update(uid=link.uid, gid=link.gid, uname=link.uname, gname=link.gname,
                    xattrs={**meta.get("xattrs", {}), **_xattrs(link)})
        if inode.kind != tarfile.SYMTYPE:
            meta.update(mode=link.mode, mtime=_mtime(link))
        inode.meta = meta

    def _make_opaque(self, directory: _Node, layer: int, path: str, literal: bool) -> None:
        """Remove what ``directory`` (named ``path``, reached through no symlink when
        ``literal``) holds that this layer did not write by that path."""
        pending = [(directory, path)]
        while pending:
            holder, prefix = pending.pop()
            assert holder.children is not None
            for name, child in list(holder.children.items()):
                child_path = f"{prefix}/{name}" if prefix else name
                written = child >> 32 if isinstance(child, int) else child.layer
                if not (literal and written == layer or child_path in self._through):
                    del holder.children[name]
                elif isinstance(child, _Node) and child.children is not None:
                    pending.append((child, child_path))

    def schedule(self, counts: Sequence[int]) -> List[List[Optional[_Node]]]:
        """Name every inode (a hard-linked one once, its other names kept aside) and
        list, per layer of ``counts[layer]`` entries, what each entry is now: None when
        it left nothing, its _Node, or for an entry that is a number in the tree
        (see _Node) the directory holding it, told apart by its ``source``."""
        plan: List[List[Optional[_Node]]] = [[None] * count for count in counts]
        pending = [self.root]
        while pending:
            directory = pending.pop()
            assert directory.children is not None
            for name, child in directory.children.items():
                if isinstance(child, int):
                    plan[child >> 32][child & 0xFFFFFFFF] = directory
                    continue
                assert isinstance(child, _Node)
                if child.children is not None:
                    child.name = name
                    pending.append(child)
                elif child.parent is not None:
                    child.meta = child.meta or {}
                    child.meta.setdefault("others", []).append((directory, name))
                    continue
                else:
                    child.parent, child.name = directory, name
                if child.source >= 0:
                    plan[child.source >> 32][child.source & 0xFFFFFFFF] = child
        return plan


class _WriteBehind:
    """Writes to ``out`` from a thread of its own, in batches of about 1 MiB, so that
    writing the output overlaps making it. Writing a flattened layer to a file costs
    half as much as decompressing it; overlapped, flattening took a quarter less time.
    Files are written with ``os.write``, which lets go of the GIL while the kernel
    copies. ``write`` takes bytes, handed over without a copy; an error of the
    thread's is raised by the next ``write`` or by ``close``."""

    _BATCH = 1024 * 1024
    _DEPTH = 4  # batches queued: at most about 5 MiB held

    def __init__(self, out: BinaryIO) -> None:
        import queue
        out.flush()
        self._out = out
        self._fd = out.fileno() if isinstance(out, (io.BufferedWriter, io.FileIO)) else -1
        self._batches: "queue.Queue[Optional[List[bytes]]]" = queue.Queue(self._DEPTH)
        self._batch: List[bytes] = []
        self._size = 0
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="ocicache-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for batch in iter(self._batches.get, None):
            try:
                for piece in batch if self._error is None else ():
                    self._write(piece)
            except BaseException as e:  # raised in the producing thread
                self._error = e

    def _write(self, piece: bytes) -> None:
        if self._fd < 0:
            self._out.write(piece)
            return
        _write_all(self._fd, piece)

    def write(self, data: bytes) -> int:
        if self._error is not None:
            raise self._error
        self._batch.append(data)
        self._size += len(data)
        if self._size >= self._BATCH:
            self.flush()
        return len(data)

    def flush(self) -> None:
        """Hand the batch to the thread (``close`` waits for it to be written)."""
        if self._batch:
            self._batches.put(self._batch)
            self._batch, self._size = [], 0

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a write-behind stream has no file descriptor")

    def close(self) -> None:
        """Write what is left, wait for the thread, and raise its error if it had one."""
        self.flush()
        self._batches.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._fd < 0:
            self._out.flush()

    def __enter__(self) -> "_WriteBehind":
        return self

    def __exit__(self, error_type: Optional[type], *_: Any) -> None:
        if error_type is None:
            self.close()
        else:  # the producer's error is the one to report
            with contextlib.suppress(Exception):
                self.close()


class _Flattener:
    """Writes the flattened root filesystem of ``layers`` (bottom first) as one tar."""

    def __init__(self, layers: Sequence[Callable[[], IO[bytes]]], out: BinaryIO,
                 names: Sequence[str] = ()) -> None:
        self._layers = layers
        self._out = out
        self._names = names  # of the layers, for messages
        self._tree = _MergedTree()
        self._reading = 0    # the layer being read
        # Per layer, from the first pass: where each member begins (and the last one
        # ends), whether its header may be copied as it is, whether it has global headers.
        self._entries: List[Tuple[Any, bytearray, bool]] = []

    def run(self) -> None:
        try:
            self._flatten()
        except InvalidArchiveError as e:
            if self._reading < len(self._names):
                raise InvalidArchiveError(f"{e} (layer {self._names[self._reading]})") from None
            raise

    def _flatten(self) -> None:
        import array
        for index in range(len(self._layers)):
            self._reading = index
            starts, verbatim = array.array("Q"), bytearray()
            with self._layers[index]() as stream:
                layer = _TarStream(stream)
                start, keep, apply = starts.append, verbatim.append, self._tree.apply
                for ordinal, member in enumerate(layer):
                    start(layer.start)
                    keep(layer.verbatim and _is_clean(member.name))
                    apply(index, ordinal, member)
                starts.append(layer.start)  # where the last member ends
                layer.drain()
            self._entries.append((starts, verbatim, layer.global_headers))
        schedule = self._tree.schedule([len(starts) - 1 for starts, _, _ in self._entries])
        with _WriteBehind(self._out) as out:
            archive = _TarWriter(out)
            for index, plan in enumerate(schedule):
                if any(plan):
                    self._emit_layer(archive, out, index, plan)
            self._emit_the_rest(archive)
            archive.close()

    def _emit_layer(self, archive: _TarWriter, out: _WriteBehind, index: int,
                    plan: List[Optional[_Node]]) -> None:
        """Write the members of layer ``index`` that ``plan`` (see _MergedTree.schedule)
        keeps. A member the tree left as it was read (at its own name, its header
        verbatim, no other name or link header changing it) is copied as it is, header
        and data, with the members beside it in one piece; the others are read from
        where they begin (in turn in a layer with global headers, which apply to all
        that follow them)."""
        starts, verbatim, in_turn = self._entries[index]
        root = self._tree.root
        self._reading = index
        with self._layers[index]() as stream:
            if isinstance(stream, _GunzipReader):  # the first pass checked its CRC-32
                stream.unchecked()
            layer = _TarStream(stream)
            members = iter(layer)
            following = 0         # the ordinal of the member ``members`` yields next
            pending = [0, 0]      # the raw bytes to copy, not yet copied

            def copy_pending() -> None:
                if pending[1] > pending[0]:
                    layer.skip_to(pending[0])
                    layer.copy_to(pending[1], out.write)
                pending[:] = [0, 0]

            for ordinal, item in enumerate(plan):
                if item is None:
                    continue
                node = item if item.source == index << 32 | ordinal else None
                if verbatim[ordinal] and not in_turn and (node is None or (
                        node.layer != _THROUGH_SYMLINK and node.children is None and
                        (node.meta is None or len(node.meta) == 1 and "target" in node.meta))):
                    parent = item if node is None else node.parent
                    assert parent is not None
                    if starts[ordinal] != pending[1] or parent is not root and \
                            not parent.emitted:
                        copy_pending()
                        self._directory_path(archive, parent)
                        pending[0] = starts[ordinal]
                    pending[1] = starts[ordinal + 1]
                    continue
                copy_pending()
                if node is not None and node.children is not None:
                    self._directory_path(archive, node)
                    continue
                if in_turn:
                    while following < ordinal:
                        next(members)
                        following += 1
                else:
                    layer.skip_to(starts[ordinal])
                member = next(members)
                following = ordinal + 1
                if node is None:
                    self._emit_inode(archive, item, _clean_path(member.name)[-1], {}, member,
                                     layer)
                else:
                    assert node.parent is not None
                    self._emit_inode(archive, node.parent, node.name, node.meta or {}, member,
                                     layer)
            copy_pending()

    def _emit_inode(self, archive: _TarWriter, directory: _Node, name: str,
                    meta: Dict[str, Any], member: tarfile.TarInfo, layer: _TarStream) -> None:
        """Write ``member`` as the inode named ``name`` in ``directory``, with what
        ``meta`` says of it (see _Node), and its other names as hard links to it."""
        parent = self._directory_path(archive, directory)
        path = f"{parent}/{name}" if parent else name
        info = tarfile.TarInfo(path)
        for field in ("mode", "uid", "gid", "uname", "gname", "devmajor", "devminor"):
            setattr(info, field, getattr(member, field))
        info.type = tarfile.REGTYPE if member.isreg() else member.type
        info.size = member.size if member.isreg() else 0  # only file data is copied
        info.linkname = member.linkname if member.issym() else ""
        mtime, xattrs = _mtime(member), _xattrs(member)
        for field in ("mode", "uid", "gid", "uname", "gname"):
            if field in meta:
                setattr(info, field, meta[field])
        mtime = meta.get("mtime", mtime)
        xattrs = {**xattrs, **meta.get("xattrs", {})}
        archive.add(info, layer if info.isreg() else None, xattrs, mtime)
        for other_directory, other_name in meta.get("others", ()):
            parent = self._directory_path(archive, other_directory)
            info.name = f"{parent}/{other_name}" if parent else other_name
            info.type, info.linkname, info.size = tarfile.LNKTYPE, path, 0
            archive.add(info, None, xattrs, mtime)

    def _directory_path(self, archive: _TarWriter, directory: _Node) -> str:
        """The path of ``directory``, emitted (with its parents) if it was not yet."""
        chain = []
        node = directory
        while node is not self._tree.root and not node.emitted:
            chain.append(node)
            node = node.parent  # type: ignore[assignment]
        names = []
        while node is not self._tree.root:
            names.append(node.name)
            node = node.parent  # type: ignore[assignment]
        path = "/".join(reversed(names))
        for node in reversed(chain):
            path = f"{path}/{node.name}" if path else node.name
            mode, uid, gid, mtime, uname, gname, xattrs = node.meta
            info = tarfile.TarInfo(path)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, gid
            info.uname, info.gname = uname, gname
            archive.add(info, None, xattrs, mtime)
            node.emitted = True
        return path

    def _emit_the_rest(self, archive: _TarWriter) -> None:
        """Directories no entry of their own placed, and that hold nothing now."""
        pending = [self._tree.root]
        while pending:
            directory = pending.pop()
            for child in (directory.children or {}).values():
                if isinstance(child, _Node) and child.children is not None:
                    if not child.emitted:
                        self._directory_path(archive, child)
                    pending.append(child)


# =====================================================================================
# Interfaces
#
# linuxkit's ``spec`` package in Python spelling. ``Provider`` implements
# ``CacheProvider``; every method takes a reference as ``str`` or ``Reference`` and a
# digest as ``str`` or ``Digest``.
# =====================================================================================

RefLike = Union[str, Reference]
DigestLike = Union[str, Digest]
DescriptorLike = Union[Descriptor, Mapping[str, Any]]

PackageResolver = Callable[[str], str]
"""Maps ``@pkg:<path>`` to a canonical image tag; returns other strings unchanged."""


class ImageSource(abc.ABC):
    """One image in the cache, read lazily."""

    @abc.abstractmethod
    def config(self) -> Dict[str, Any]:
        """The ``config`` object of the image's OCI config (Env, Cmd, Entrypoint, ...)."""

    @abc.abstractmethod
    def tar_reader(self) -> BinaryIO:
        """The flattened root filesystem as a tar stream."""

    @abc.abstractmethod
    def descriptor(self) -> Optional[Descriptor]:
        """The descriptor this source was made with."""

    @abc.abstractmethod
    def v1_tar_reader(self, override_name: str = "") -> BinaryIO:
        """The image as a ``docker load`` tarball."""

    @abc.abstractmethod
    def oci_tar_reader(self, override_name: str = "") -> BinaryIO:
        """The image as an OCI layout tarball."""

    @abc.abstractmethod
    def sboms(self) -> List[BinaryIO]:
        """The SPDX documents attached to this platform's image, if any."""


class CacheProvider(abc.ABC):
    """An image cache: linuxkit's ``CacheProvider``."""

    @abc.abstractmethod
    def find_descriptor(self, ref: RefLike) -> Optional[Descriptor]: ...

    @abc.abstractmethod
    def image_pull(self, ref: RefLike, trusted_ref: str = "", architecture: str = "",
                   always_pull: bool = False) -> ImageSource: ...

    @abc.abstractmethod
    def image_in_cache(self, ref: RefLike, trusted_ref: str = "",
                       architecture: str = "") -> bool: ...

    @abc.abstractmethod
    def image_in_registry(self, ref: RefLike, trusted_ref: str = "",
                          architecture: str = "") -> bool: ...

    @abc.abstractmethod
    def index_write(self, ref: RefLike, *descriptors: DescriptorLike) -> ImageSource: ...

    @abc.abstractmethod
    def image_load(self, stream: IO[bytes]) -> List[Descriptor]: ...

    @abc.abstractmethod
    def descriptor_write(self, ref: RefLike, descriptor: DescriptorLike) -> ImageSource: ...

    @abc.abstractmethod
    def push(self, name: RefLike, remote_name: RefLike = "", with_manifest: bool = False,
             override: bool = False) -> None: ...

    @abc.abstractmethod
    def new_source(self, ref: RefLike, architecture: str = "",
                   descriptor: Optional[Descriptor] = None) -> ImageSource: ...

    @abc.abstractmethod
    def get_content(self, digest: DigestLike) -> BinaryIO: ...

    @abc.abstractmethod
    def store(self) -> "ContentStore": ...


# =====================================================================================
# Provider and sources
#
# The glue: names and platforms resolved against the Layout, archives loaded through
# the tar readers, and the content store linuxkit hands to BuildKit.
# =====================================================================================

def default_cache_dir() -> str:
    """``$OCICACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/ocicache``."""
    explicit = os.environ.get("OCICACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ocicache")


_MAX_INDEX_DEPTH = 8  # indexes within indexes that a pull follows (linuxkit's: no limit)
# On an index ocicache made of the children of a registry's index that the cache holds:
# the digest of that registry index (see Provider._root_to_name).
_ANNOTATION_SUBSET_OF = "io.ocicache.subset-of"


def _arch_tags(children: Sequence[Descriptor]) -> List[Tuple[Descriptor, str]]:
    """The suffix of linuxkit's ``<name>-<arch>`` names for each image child of an index.

    linuxkit (``Pull`` in src/cmd/linuxkit/cache/pull.go, ``Push`` in cache/push.go)
    uses the architecture alone, so arm/v7 is ``-arm``. Two children of one architecture
    (arm/v6 and arm/v7) collide there and the last wins; here the child that a bare
    ``linux/<arch>`` selects keeps ``-<arch>`` and the others get ``-<arch>-<variant>``.
    """
    images = [(c, c.platform) for c in children if c.platform is not None
              and _is_real_platform(c) and c.media_type not in INDEX_MEDIA_TYPES]
    tags = []
    for child, platform in images:
        rivals = [c for c, p in images if p.architecture == platform.architecture]
        if len(rivals) == 1 or child is (select_platform(
                rivals, Platform("linux", platform.architecture)) or rivals[0]):
            tags.append((child, platform.architecture))
        else:
            tags.append((child, f"{platform.architecture}-{platform.variant or platform.os}"))
    return tags


def _select_child(ref: Reference, index: Index, architecture: str) -> Descriptor:
    """The image child of ``index`` a pull of ``architecture`` takes, or an error naming
    the platforms the index has."""
    images = [c for c in index.manifests if c.platform is not None
              and not c.is_attestation and c.media_type in IMAGE_MEDIA_TYPES]
    wanted = Platform.parse(architecture)
    child = select_platform(images, wanted)
    if child is None:
        have = ", ".join(str(c.platform) for c in images) or "no platforms"
        raise PlatformNotFoundError(f"image {ref} has no {wanted}; it has {have}")
    return child


def _platform_list(architecture: str) -> List[str]:
    """The platforms of ``--platform A,B`` (one for a single platform), each checked,
    each once; an empty item is an error rather than the host's platform."""
    items = architecture.split(",")
    if len(items) > 1 and not all(item.strip() for item in items):
        raise InvalidPlatformError(f"platform list {architecture!r} has an empty item")
    chosen: Dict[str, str] = {}
    for item in items:
        chosen.setdefault(str(Platform.parse(item.strip()).normalized()), item.strip())
    return list(chosen.values())


def _chosen_children(ref: Reference, index: Index, architecture: str) -> List[Descriptor]:
    """The image child of ``index`` for each platform of ``architecture`` (a comma list)
    and their attestations, in the index's order; an error naming what the index has
    when a platform is not there. An ``unknown/unknown`` attestation follows the image
    its ``vnd.docker.reference.digest`` names and is never chosen as a platform."""
    picked = {str(_select_child(ref, index, p).digest) for p in _platform_list(architecture)}
    return [c for c in index.manifests if str(c.digest) in picked or (
        c.is_attestation and c.media_type in IMAGE_MEDIA_TYPES
        and c.annotations.get(ANNOTATION_REFERENCE_DIGEST) in picked)]


def _as_descriptor(value: DescriptorLike) -> Descriptor:
    return value if isinstance(value, Descriptor) else Descriptor.from_json(dict(value))


def _bounded_entry(descriptor: Descriptor) -> Descriptor:
    """A root entry from an archive, within what index.json may spend on one: beyond
    ``_MAX_IMPORTED_ENTRY`` bytes, only media type, digest, size (and the platform, if
    small) are kept, so that imports can never grow index.json past what is read back."""
    if len(_json_bytes(descriptor.to_json())) <= _MAX_IMPORTED_ENTRY:
        return descriptor
    slim = Descriptor(descriptor.media_type, descriptor.digest, descriptor.size,
                      platform=descriptor.platform)
    if len(_json_bytes(slim.to_json())) > _MAX_IMPORTED_ENTRY:
        slim = _replace(slim, platform=None)
    _log().warning("the archive's entry for %s carries more than %d bytes of annotations "
                   "and other fields; they are not copied into index.json",
                   descriptor.digest, _MAX_IMPORTED_ENTRY)
    return slim


def _names_match(stored: str, wanted: Reference) -> bool:
    """Whether a root entry's name is ``wanted``; linuxkit's untagged names are ':latest'."""
    if stored == str(wanted):  # the canonical spelling, as ocicache stores names
        return True
    if not stored or wanted.repository.rpartition("/")[2] not in stored:
        # Every spelling of a name holds the last component of its path as written, so
        # no other stored name is parsed: a lookup in 20,000 names parses one or two.
        return False
    return wanted in _name_answers_to(stored)


def _name_answers_to(stored: str) -> Tuple[Reference, ...]:
    """The references a stored name is (``_names_match`` as keys, so that many names are
    matched with many in linear time): itself, and for an untagged one ':latest'."""
    if not stored:
        return ()
    try:
        ref = Reference.parse(stored, default_tag="")
    except InvalidReferenceError:
        return ()
    if not ref.tag and ref.digest is None:
        return ref, ref.with_tag("latest")
    return (ref,)


def _keep_spelling(spellings: Mapping[Reference, Sequence[str]], name: str,
                   entry: Descriptor) -> Descriptor:
    """``entry``, named as the stored entry it replaces is spelled (``spellings``: the
    stored names each reference answers to). linuxkit stores
    ``host:port/repo`` and YAML references untagged (``util.ReferenceExpand`` in
    src/cmd/linuxkit/util/reference.go adds ``:latest`` only to a string without a colon)
    and looks names up by exact string, so renaming such an entry ``…:latest`` would
    hide it from linuxkit and make its next pull write a duplicate."""
    stored = spellings.get(Reference.parse(name), ())
    if not stored or name in stored:
        return entry
    return entry.named(stored[0])


_LINUXKIT_DIGEST_ARCH_NAME = re.compile(r"(.+@sha256:[0-9a-f]{64})-[a-z0-9_]+")


def _name_predicate(ref: RefLike) -> Callable[[str], bool]:
    """Whether a stored name is ``ref``. A string that is not a reference matches only a
    stored name spelled exactly so: linuxkit's pull of a digest reference with arch names
    writes ``<repo>@sha256:<hex>-<arch>`` (``Pull`` in src/cmd/linuxkit/cache/pull.go),
    which no reference grammar accepts but ``rm`` must still be able to remove."""
    try:
        wanted = Reference.parse(ref)
    except InvalidReferenceError:
        if not isinstance(ref, str):
            raise
        return lambda stored: stored == ref
    return lambda stored: _names_match(stored, wanted)


@_value_type
class ContentInfo:
    """A blob in the content store."""

    digest: Digest
    size: int
    updated: float


class ContentStore:
    """The cache's blobs as a content store: info, open, verified write, walk, delete.

    It never touches ``index.json``; blobs written here are unnamed until a name is
    written for them, and ``gc`` deletes them after its grace period if none is.
    """

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    def info(self, digest: DigestLike) -> ContentInfo:
        d = Digest.parse(digest)
        try:
            st = os.lstat(self._layout.blob_path(d))
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):  # a planted link is no blob
            raise NotFoundError(f"blob {d} is not in the cache {self._layout.root}")
        return ContentInfo(d, st.st_size, st.st_mtime)

    def open(self, digest: DigestLike) -> BinaryIO:
        return self._layout.open_blob(digest)

    def write(self, digest: DigestLike, stream: IO[bytes],
              size: Optional[int] = None) -> ContentInfo:
        d, _ = self._layout.write_blob(stream, Digest.parse(digest), size)
        return self.info(d)

    def walk(self) -> Iterator[ContentInfo]:
        for digest, _, st in self._layout.blob_files():
            if digest is not None:
                yield ContentInfo(digest, st.st_size, st.st_mtime)

    def delete(self, digest: DigestLike) -> None:
        """Delete a blob that no name reaches; a blob in use is refused."""
        d = Digest.parse(digest)
        with self._layout.deleting_blobs(), self._layout.lock():
            users = self._layout.reachable(self._layout.read_index().manifests).digests
            if d in users:
                raise OciCacheError(f"blob {d} is used by {users[d]}; remove that name first")
            if not self._layout.delete_blob(d):
                raise NotFoundError(f"blob {d} is not in the cache {self._layout.root}")


@_value_type
class ImageSummary:
    """One named image, as ``ls`` shows it."""

    name: str
    descriptor: Descriptor
    platforms: Tuple[str, ...]   # platforms whose image is complete in the cache
    size: int                    # bytes on disk of every blob the name reaches


class PullProgress:
    """Told what a pull downloads; the command line draws it. This one stays silent."""

    def begin(self, name: str, blobs: Sequence[Descriptor]) -> None:
        """A pull of ``name`` will fetch ``blobs`` (some may turn out to be present)."""

    def advance(self, digest: Digest, size: int) -> None:
        """``size`` more bytes of ``digest`` are in (negative when a download restarts)."""

    def end(self, name: str, descriptor: Descriptor) -> None:
        """The pull of ``name`` is complete."""

    def cached(self, name: str, descriptor: Descriptor) -> None:
        """``name`` was already complete in the cache: nothing was asked of the registry."""

    def copied(self, name: str, descriptor: Descriptor) -> None:
        """A copy wrote ``name`` (its destination), whose root is ``descriptor``."""


class _PullStopped(Exception):
    """Raised in a download worker, at its next piece, once the pull is stopping."""


class _ProgressAfterBegin:
    """A pull's progress, told ``begin`` before any ``advance``: the blobs of a pull are
    known once every manifest is in, but the first platforms' blobs download before
    that, and what they report meanwhile is held until ``begin``."""

    def __init__(self, progress: PullProgress) -> None:
        self._progress = progress
        self._guard = threading.Lock()
        self._held: Optional[List[Tuple[Digest, int]]] = []

    def begin(self, name: str, blobs: Sequence[Descriptor]) -> None:
        with self._guard:
            self._progress.begin(name, blobs)
            held, self._held = self._held or [], None
            for digest, size in held:
                self._progress.advance(digest, size)

    def advance(self, digest: Digest, size: int) -> None:
        with self._guard:
            if self._held is not None:
                self._held.append((digest, size))
                return
        self._progress.advance(digest, size)


def _registries_conf_tables(text: str) -> List[Tuple[str, Dict[str, Any]]]:
    """The ``[[table]]`` entries of a registries.conf: the TOML subset it uses (string and
    boolean values; arrays and other tables are skipped)."""
    tables: List[Tuple[str, Dict[str, Any]]] = []
    depth = 0
    for raw in text.splitlines():
        line = re.sub(r'\s+#.*$|^#.*$', "", raw).strip()
        if depth:  # inside a multi-line array
            depth += line.count("[") - line.count("]")
            continue
        header = re.fullmatch(r"\[\[\s*([\w.-]+)\s*\]\]", line)
        if header:
            tables.append((header.group(1), {}))
            continue
        if line.startswith("["):
            tables.append(("", {}))  # another kind of table: its keys are not ours
            continue
        pair = re.fullmatch(r'([\w-]+)\s*=\s*(.+)', line)
        if pair is None or not tables:
            continue
        key, value = pair.groups()
        if value.startswith("["):
            depth = value.count("[") - value.count("]")
        elif value[:1] in ('"', "'") and value[-1:] == value[:1]:
            tables[-1][1][key] = value[1:-1]
        elif value in ("true", "false"):
            tables[-1][1][key] = value == "true"
    return tables


def _registries_conf_mirrors() -> List[Tuple[str, str]]:
    """Mirrors of containers' registries.conf (``$CONTAINERS_REGISTRIES_CONF``, else the
    user's then the system's file): ``[[registry.mirror]]`` of registry prefixes."""
    explicit = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    candidates = [explicit] if explicit else [
        os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"),
                     "containers", "registries.conf"), "/etc/containers/registries.conf"]
    for path in candidates:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(MAX_MANIFEST_SIZE)
        except OSError:
            continue
        mirrors: List[Tuple[str, str]] = []
        registry = ""
        for table, values in _registries_conf_tables(text):
            if table == "registry":
                registry = str(values.get("prefix") or values.get("location") or "")
            elif table == "registry.mirror" and registry and "/" not in registry:
                location = str(values.get("location") or "").rstrip("/")
                if location:
                    scheme = "http" if values.get("insecure") else "https"
                    mirrors.append((_normalise_auth_key(registry), f"{scheme}://{location}"))
        return mirrors
    return []


def default_mirrors() -> List[Tuple[str, str]]:
    """Mirrors from ``$OCICACHE_MIRROR``, linuxkit's ``$LINUXKIT_MIRROR``, docker's
    ``/etc/docker/daemon.json`` ``registry-mirrors`` (which serve Docker Hub only) and
    containers' registries.conf, in that order of preference."""
    mirrors = []
    for variable in ("OCICACHE_MIRROR", "LINUXKIT_MIRROR"):
        for value in re.split(r"[\s,]+", os.environ.get(variable, "")):
            if value:
                mirrors.append(parse_mirror(value))
    return mirrors + _daemon_json_mirrors() + _registries_conf_mirrors()


def _daemon_json_mirrors() -> List[Tuple[str, str]]:
    """docker's ``registry-mirrors``; a file docker could not read is only a warning,
    since these mirrors are a preference and the registry itself still answers."""
    daemon = os.environ.get("OCICACHE_DOCKER_DAEMON_JSON", "/etc/docker/daemon.json")
    try:
        with open(daemon, "rb") as f:
            document = _parse_json(f.read(MAX_MANIFEST_SIZE), daemon)
    except FileNotFoundError:
        return []
    except (OSError, OciCacheError) as e:
        _log().warning("ignoring %s: %s", daemon, _one_line(str(e)))
        return []
    urls = document.get("registry-mirrors") if isinstance(document, dict) else None
    mirrors = []
    for url in urls if isinstance(urls, list) else []:
        try:
            mirrors.append(parse_mirror(f"{DEFAULT_REGISTRY}={url}"))
        except OciCacheError as e:
            _log().warning("ignoring a registry mirror of %s: %s", daemon, e)
    return mirrors


@_value_type
class _RootFacts:
    """What a root reaches, as ``ls`` shows it (see ``_SummaryMemo``)."""

    media_type: str                                    # what its blob is (read_document)
    size: int                                          # its blob's size
    blobs: Tuple[str, ...]                             # every blob reached ...
    sizes: Tuple[int, ...]                             # ... and its size
    platforms: Tuple[Tuple[str, Tuple[str, ...]], ...]  # platform, the blobs its image needs


# A platform as the memo writes it: none of the characters it separates fields with.
_MEMO_PLATFORM = re.compile(r"[A-Za-z0-9._+/-]{1,256}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class _SummaryMemo:
    """``ls``'s memo of what each root reaches (``_RootFacts``), kept in the cache as
    SUMMARIES_FILE and keyed by the root's digest. Blobs never change, so what a root
    reaches stays true whichever names point at it: only whether those blobs are still
    there is asked again, by every ``ls``. ``ls`` fills it for the roots it lacks
    (linuxkit's names too) and writes it back holding only the roots named then.

    Only a memo ocicache wrote is believed (``Layout.read_summaries``: a file of this
    user's or root's that no one else may write), and only in the shape it is written
    in; any other (corrupt, from another version, planted by a co-user) is ignored and
    rebuilt. A root is memo'd only when every document it reaches was read and every blob
    was there, so the blobs it names are what it reaches for as long as it exists: ``rm``
    believes that to know which of the blobs it frees another root still needs. verify,
    gc, pulls and names follow the documents. linuxkit, skopeo and umoci read only
    index.json, oci-layout and blobs.

    Columns, each a string split by spaces (json reads strings at C speed, and 20,000
    roots as lists cost as much as the rest of ``ls``): ``blobs`` and ``sizes``, each
    blob once however many roots share it; then per root its digest (``roots``), size,
    media type (a number in ``media``), the bytes of all it reaches (``totals``), the
    numbers of those blobs (``reached``, joined by commas), its platforms as ``ls``
    shows them (``shown``, "-" for none) and each with the blobs its image needs
    (``platforms``: ``platform=n,n;platform=n``, "-" for none). Last, the named entries of
    the index.json it was written beside, when it knows all their roots: the sha256 of
    those bytes (``index``, "" when not), each entry's name (``names``, joined by NULs)
    and its root's number (``entries``). ``ls`` of that same index.json then lists from
    the memo alone, decoding no index.json (``named_listing``). Names it cannot hold (one
    with a NUL, or too many bytes of them for ``read``) are left out, the sha256 then
    in ``unlisted``, so that ``ls`` of that index.json does not write the memo again.
    """

    VERSION = 3
    _COLUMNS = ("blobs", "sizes", "roots", "root_sizes", "kinds", "totals", "reached",
                "shown", "platforms")
    _NAMED = ("names", "entries")

    # All but the roots kept as text until asked for: split, they were 12 MB of 20,000
    # roots (and 40,000 blobs) that ls, at its peak then, reads once or never.
    _LAZY = ("blobs", "sizes", "root_sizes", "kinds", "totals", "reached", "shown",
             "platforms", "names", "entries")

    def __init__(self, columns: Dict[str, List[str]], media: List[str],
                 lazy: Optional[Dict[str, str]] = None) -> None:
        self._columns = columns
        self._lazy = lazy or {}
        self._media = media
        self._where: Optional[Dict[str, int]] = None   # root digest -> its place
        self._rows: Optional[Dict[str, Tuple[int, str, Tuple[str, ...], int]]] = None
        # What was learned of each root, as a row of numbers of the blobs learned (a
        # _RootFacts each: 11 MB of 20,000 roots, the first ls's peak): its media type,
        # size, the blobs it reaches ("n,n") and its platforms ("platform=n,n;...").
        self._learned: Dict[str, Tuple[str, int, str, str]] = {}
        self._learned_blobs: List[str] = []
        self._learned_sizes: List[int] = []
        self._learned_numbers: Dict[str, int] = {}  # blob -> its place in those lists
        self._index = ""  # the sha256 of the index.json whose named entries it holds
        self._beside = ""  # of the one it was written beside, holding its names or not

    @classmethod
    def read(cls, layout: "Layout") -> "_SummaryMemo":
        """The memo kept in ``layout``, or an empty one when it is not a trusted memo.

        Its bytes, their text and its columns are each dropped as the next is made: the
        memo of 20,000 roots is 6 MB, and ``ls`` holds nothing else then."""
        data, trusted = layout.read_summaries()
        empty = cls({}, [])
        if not trusted or not data or len(data) > MAX_SUMMARIES_SIZE:
            return empty
        try:
            text = data.decode()  # as written: UTF-8
            del data
            # json itself, not _parse_json: the shape is checked flat, and nothing nests.
            obj = json.loads(text)
        except (ValueError, RecursionError):
            return empty
        del text
        if not isinstance(obj, dict) or obj.get("version") != cls.VERSION:
            return empty
        media, index = obj.get("media"), obj.get("index")
        if not all(type(obj.get(name)) is str for name in (*cls._COLUMNS, *cls._NAMED)) or \
                type(media) is not list or not all(type(m) is str for m in media) or \
                not (index == "" or (type(index) is str and _SHA256_HEX.fullmatch(index))):
            return empty
        lazy = {name: obj.pop(name) for name in cls._LAZY}
        columns = {name: text.split(" ") if text else [] for name, text in (
            (name, obj.pop(name)) for name in cls._COLUMNS if name not in lazy)}
        lengths = {**{name: len(values) for name, values in columns.items()},
                   **{name: text.count(" ") + 1 if text else 0 for name, text in lazy.items()}}
        if lengths["sizes"] != lengths["blobs"] or \
                any(lengths[name] != lengths["roots"] for name in cls._COLUMNS[3:]) or \
                (lazy["names"].count("\0") + 1 if lazy["names"] else 0) != lengths["entries"]:
            return empty
        memo = cls(columns, media, lazy)
        unlisted = obj.get("unlisted", "")
        memo._index = index
        memo._beside = index or (unlisted if type(unlisted) is str and
                                 _SHA256_HEX.fullmatch(unlisted) else "")
        return memo

    def _column(self, name: str) -> List[str]:
        """The column ``name``, split the first time it is asked for (see _LAZY)."""
        if name in self._lazy:
            text = self._lazy.pop(name)
            self._columns[name] = text.split(" ") if text else []
        return self._columns.get(name, [])

    def _values(self, name: str) -> List[str]:
        """The column ``name``, split but not kept split when it is text (see _LAZY)."""
        text = self._lazy.get(name)
        if text is None:
            return self._columns.get(name, [])
        return text.split(" ") if text else []

    def _place(self, digest: str, size: int) -> int:
        """Where the root ``digest`` of ``size`` bytes is among the memo's; -1 if not."""
        if self._where is None:
            roots = self._columns.get("roots", [])
            self._where = dict(zip(roots, range(len(roots))))
        at = self._where.get(digest, -1)
        return at if at >= 0 and self._column("root_sizes")[at] == str(size) else -1

    def _pieces(self, name: str) -> Iterator[List[str]]:
        """The column ``name`` in order, a piece at a time: split from its text (none
        kept: 40,000 blobs split are 5 MB) unless it is split already."""
        text = self._lazy.get(name)
        if text is None:
            yield self._columns.get(name, [])
            return
        start = 0
        while text:
            end = text.find(" ", start + 65536)
            if end < 0:
                yield text[start:].split(" ")
                return
            yield text[start:end].split(" ")
            start = end + 1

    def complete(self, present: Set[str]) -> bool:
        """Whether every blob the memo names is in ``present``: then each root's
        ``listing`` holds as written."""
        return all(map(present.issuperset, self._pieces("blobs")))

    @property
    def names_blobs(self) -> bool:
        """Whether the memo read names any blob (one that does not is ``complete``
        whatever is there)."""
        return bool(self._lazy.get("blobs") or self._columns.get("blobs"))

    def learned_here(self, digest: str) -> bool:
        """Whether the root ``digest`` was learned from its documents since ``read``: what
        it reaches was all there then (see ``learn``)."""
        return digest in self._learned

    def _per_root(self) -> Optional[Tuple[List[int], List[str], List[Tuple[str, ...]],
                                          List[int]]]:
        """Each root's size, media type, platforms and size on disk as ``listing`` gives
        them; None when a column is not in the shape it is written in. Each column is
        checked whole and each value once (a loop per root costs as much as the rest of
        ``ls``)."""
        try:
            sizes = list(map(int, self._values("root_sizes")))
            totals = list(map(int, self._values("totals")))
        except ValueError:
            return None
        values = self._values("kinds")
        kinds = {k: self._media[int(k)] for k in set(values)
                 if k.isdecimal() and int(k) < len(self._media)}
        if len(kinds) != len(set(values)):
            return None
        media_types = list(map(kinds.__getitem__, values))
        values = self._values("shown")
        shown = {p: () if p == "-" else tuple(p.split(",")) for p in set(values)}
        if min(totals, default=0) < 0 or \
                not all(all(map(_MEMO_PLATFORM.fullmatch, p)) for p in shown.values()):
            return None
        return sizes, media_types, list(map(shown.__getitem__, values)), totals

    def listings(self) -> Dict[str, Tuple[int, str, Tuple[str, ...], int]]:
        """For each root the memo knows: its size, media type, platforms and size on disk
        as ``listing`` gives them (see ``_per_root``)."""
        if self._rows is None:
            per_root = self._per_root()
            self._rows = {} if per_root is None else \
                dict(zip(self._columns.get("roots", ()), zip(*per_root)))
        return self._rows

    @property
    def index(self) -> str:
        """The sha256 of the index.json whose named entries the memo holds ("" if none)."""
        return self._index

    @property
    def beside(self) -> str:
        """The sha256 of the index.json it was written beside ("" if unknown): ``index``,
        or that of one whose names were left out (``unlisted``: see ``to_bytes``)."""
        return self._beside

    def named_listing(self) -> Optional[Iterator[Tuple[str, str, str, Tuple[str, ...], int]]]:
        """The named entries of the index.json of ``index`` in its order, as ``ls`` lists
        them (name, digest, media type, platforms, size on disk) when every blob is there
        (see ``complete``); None when the memo does not hold them, or in a shape it is
        never written in. Checked whole before the first is given, as ``_per_root``."""
        names_text = self._lazy.pop("names", "")
        numbers_text = self._column("entries")
        roots = self._columns.get("roots", [])
        per_root = self._per_root() if self._index else None
        if per_root is None:
            return None
        try:
            names_text.encode()  # as written: no lone surrogate escaped into a name
        except UnicodeEncodeError:
            return None
        names = names_text.split("\0") if names_text else []
        del names_text
        if "" in names or not all(map(str.isdecimal, numbers_text)):
            return None
        numbers = list(map(int, numbers_text))
        if max(numbers, default=0) >= len(roots):
            return None
        _, kinds, shown, totals = per_root
        return ((name, roots[n], kinds[n], shown[n], totals[n])
                for name, n in zip(names, numbers))

    def listing(self, digest: str, size: int) -> Optional[Tuple[str, Tuple[str, ...], int]]:
        """The media type, platforms and size on disk of the root ``digest`` of ``size``
        bytes when all its blobs are there (see ``complete``); None when it is not known."""
        if digest in self._learned:
            facts = self._learned_facts(digest)
            return facts.media_type, tuple(p for p, _ in facts.platforms), sum(facts.sizes)
        row = self.listings().get(digest)
        return row[1:] if row is not None and row[0] == size else None

    def _numbers(self, text: str) -> Optional[List[int]]:
        """The blob numbers in ``text`` (joined by commas), or None when it is not such a
        list."""
        try:
            numbers = list(map(int, text.split(",")))
        except ValueError:
            return None
        if not (min(numbers) >= 0 and max(numbers) < len(self._column("blobs"))):
            return None
        return numbers

    def facts(self, digest: str, size: int) -> Optional[_RootFacts]:
        """What the memo says the root ``digest`` of ``size`` bytes reaches, or None when
        it does not know it, or says it in a shape it is never written in."""
        if digest in self._learned:  # of this size only: another entry may misstate it
            return self._learned_facts(digest) if self._learned[digest][1] == size else None
        listed = self.listing(digest, size)
        if listed is None:
            return None
        at = self._place(digest, size)
        numbers = self._numbers(self._column("reached")[at])
        try:
            sizes = [int(self._column("sizes")[n]) for n in numbers or ()]
        except ValueError:
            return None
        images = []
        field = self._column("platforms")[at]
        for platform_field in field.split(";") if field != "-" else ():
            platform, _, needed_text = platform_field.partition("=")
            needed = self._numbers(needed_text)
            if needed is None or not _MEMO_PLATFORM.fullmatch(platform):
                return None
            images.append((platform, tuple([self._column("blobs")[n] for n in needed])))
        if numbers is None or [p for p, _ in images] != list(listed[1]):
            return None
        return _RootFacts(listed[0], size, tuple([self._column("blobs")[n] for n in numbers]),
                          tuple(sizes), tuple(images))

    def reaching(self, entries: Iterable[Any], blobs: Iterable[str]
                 ) -> Tuple[Set[str], List[Any]]:
        """Which of ``blobs`` the root entries ``entries`` (index.json's, as decoded) reach
        by the memo, and the entries it does not know, whose documents must say."""
        known, unknown = [], []
        for raw in entries:
            _, digest, size = _raw_entry(raw)
            at = self._place(digest, size)
            if at < 0:
                unknown.append(raw)
            else:
                known.append(at)
        found = self.reached_by(known, blobs)
        return (set(), list(entries)) if found is None else (found, unknown)

    def reached_by(self, places: Iterable[int], blobs: Iterable[str]) -> Optional[Set[str]]:
        """Which of ``blobs`` the memo's roots at ``places`` (``_place``) reach; None when
        the memo does not say it as written (every document must say then)."""
        wanted = set(blobs)
        numbers: Dict[str, str] = {}  # the numbers of the wanted blobs
        count = 0  # of blobs
        for piece in self._pieces("blobs"):
            numbers.update((str(n), blob) for n, blob in enumerate(piece, count)
                           if blob in wanted)
            count += len(piece)
        reached = self._column("reached")
        known = [reached[at] for at in places]
        found: Set[str] = set()
        for start in range(0, len(known), 4096):  # a piece at a time: all at once, they
            numbers_reached = set(",".join(known[start:start + 4096]).split(","))  # were
            numbers_reached.discard("")  # 100,000 strings of 20,000 roots, rm's peak
            if not all(n.isdecimal() and int(n) < count for n in numbers_reached):
                return None  # not as written
            found.update(numbers_reached.intersection(numbers))
        return {numbers[n] for n in found}

    def stale(self, named: Mapping[str, int]) -> bool:
        """Whether the memo knows roots that are not in ``named`` (removed since)."""
        return any(digest not in named for digest in self._columns.get("roots", ()))

    @staticmethod
    def holds(facts: _RootFacts) -> bool:
        """Whether the memo can hold ``facts``: not a platform needing a blob the root
        does not reach, nor one written with the characters it separates fields with."""
        reached = set(facts.blobs)
        return bool(reached) and all(reached.issuperset(needed) and
                                     _MEMO_PLATFORM.fullmatch(platform)
                                     for platform, needed in facts.platforms)

    def learn(self, digest: str, facts: _RootFacts) -> None:
        """Remember ``facts`` of the root ``digest``, facts the memo ``holds``."""
        if not self.holds(facts):
            return

        def number(blob: str, size: int) -> str:
            self.string(blob)
            at = self._learned_numbers[blob]
            if self._learned_sizes[at] < 0:
                self._learned_sizes[at] = size
            return str(at)
        sizes = dict(zip(facts.blobs, facts.sizes))
        self._learned[digest] = (  # (one string of each media type, not one a root)
            sys.intern(facts.media_type), facts.size,
            ",".join(number(b, n) for b, n in sizes.items()),
            ";".join(f"{platform}=" + ",".join(number(b, sizes[b]) for b in needed)
                     for platform, needed in facts.platforms))

    def string(self, blob: str) -> str:
        """The one string of the digest ``blob`` the memo holds, however many roots reach
        it (it is numbered: the rows learned name it by its number)."""
        at = self._learned_numbers.get(blob)
        if at is None:
            at = self._learned_numbers[blob] = len(self._learned_blobs)
            self._learned_blobs.append(blob)
            self._learned_sizes.append(-1)  # until a root learned gives it
        return self._learned_blobs[at]

    def held(self, blob: str) -> str:
        """The memo's own string of the digest ``blob`` when it holds one, else ``blob``."""
        at = self._learned_numbers.get(blob)
        return blob if at is None else self._learned_blobs[at]

    def _learned_facts(self, digest: str) -> _RootFacts:
        media_type, size, reached, platforms = self._learned[digest]
        blobs, sizes = self._learned_blobs, self._learned_sizes
        numbers = list(map(int, reached.split(",")))
        images = []
        for field in platforms.split(";") if platforms else ():
            platform, _, needed = field.partition("=")
            images.append((platform, tuple([blobs[int(n)] for n in needed.split(",")
                                            if n])))
        return _RootFacts(media_type, size, tuple([blobs[n] for n in numbers]),
                          tuple([sizes[n] for n in numbers]), tuple(images))

    def learning(self, other: "_SummaryMemo") -> "_SummaryMemo":
        """This memo, having learned what ``other`` learned."""
        for digest in other._learned:
            self.learn(digest, other._learned_facts(digest))
        return self

    def encoded(self, keep: Mapping[str, int], index: str = "",
                named: Sequence[Tuple[str, str, int]] = ()) -> Iterator[bytes]:
        """The memo of the roots in ``keep`` (digest -> size) that it knows; and of
        ``named``, the named entries (name, digest, size) of the index.json whose sha256
        is ``index``, when it knows every one of their roots. In pieces, each made as it
        is given: written so, the memo is never held whole (7 MB of 20,000 roots, beside
        all that the first ls learned), nor a column's bytes."""
        numbers: Dict[str, int] = {}
        sizes: List[int] = []
        media: Dict[str, int] = {}
        # Each column's values joined 4,096 at a time: kept as 140,000 strings of 20,000
        # roots until encoded, they were the first ls's peak (15 MB).
        columns: Dict[str, List[str]] = {name: [] for name in self._COLUMNS[2:]}
        texts: Dict[str, List[str]] = {name: [] for name in self._COLUMNS[2:]}
        places: Dict[str, int] = {}  # root digest -> its place

        def join() -> None:
            for name, values in columns.items():
                texts[name].append(" ".join(values))
                values.clear()

        def number(blob: str, size: int) -> str:
            if blob not in numbers:
                numbers[blob] = len(sizes)
                sizes.append(size)
            return str(numbers[blob])

        for digest, size in sorted(keep.items()):
            facts = self.facts(digest, size)
            if facts is None or not self.holds(facts):
                continue
            reached = dict(zip(facts.blobs, facts.sizes))
            for name, value in (
                    ("roots", digest), ("root_sizes", str(size)),
                    ("kinds", str(media.setdefault(facts.media_type, len(media)))),
                    ("totals", str(sum(reached.values()))),
                    ("reached", ",".join(number(b, n) for b, n in reached.items())),
                    ("shown", ",".join(p for p, _ in facts.platforms) or "-"),
                    ("platforms", ";".join(
                        f"{platform}=" + ",".join(number(b, reached[b]) for b in needed)
                        for platform, needed in facts.platforms) or "-")):
                columns[name].append(value)
            places[digest] = len(places)
            if len(columns["roots"]) == 4096:
                join()
        if columns["roots"]:
            join()
        # The sha256 of an index.json whose names it cannot hold (a root not memo'd, a
        # name with a NUL, too many bytes of them): so that the next ls of it does not
        # write the memo again, as it does for an index.json it has not seen.
        unlisted = ""
        if not (index and all(digest in places and keep[digest] == size and name and
                              "\0" not in name for name, digest, size in named)):
            index, named, unlisted = "", (), index
        # Encoded a column at a time, each list and text dropped once its bytes are made:
        # all at once, they were 30 MB of 20,000 roots, the first ls's peak; and a
        # column's text a piece at a time (a string is escaped character by character).
        made = 0  # bytes

        def field(name: str, value: Any, more: Iterable[str] = ()) -> Iterator[bytes]:
            """The member ``name``: ``value``, a string followed by each of ``more`` after
            a space, never joined whole (the blobs of 20,000 roots are 3 MB of text); in
            pieces as made, a string escaped a piece at a time."""
            nonlocal made
            head = b"," if made else b"{"
            if type(value) is not str:
                pieces: Iterable[bytes] = [
                    head + _json_bytes({name: value}, separators=(",", ":"))[1:-1]]
            else:
                texts = itertools.chain([value], (" " + text for text in more))
                pieces = itertools.chain(
                    [head + _json_bytes(name) + b':"'],
                    (_json_bytes(text[start:start + 65536])[1:-1]
                     for text in texts for start in range(0, len(text), 65536)), [b'"'])
            for piece in pieces:
                made += len(piece)
                yield piece

        def spaced(name: str, texts: Iterable[str]) -> Iterator[bytes]:
            """The member ``name``: ``texts`` joined by spaces (see ``field``)."""
            texts = iter(texts)
            return field(name, next(texts, ""), texts)

        def batches(values: Iterable[str]) -> Iterator[str]:
            """``values`` joined by spaces 4,096 at a time."""
            values = iter(values)
            while True:
                batch = list(itertools.islice(values, 4096))
                if not batch:
                    return
                yield " ".join(batch)

        yield from field("version", self.VERSION)
        yield from field("media", list(media))
        yield from spaced("blobs", batches(numbers))
        numbers.clear()
        yield from spaced("sizes", batches(map(str, sizes)))
        for name in self._COLUMNS[2:]:
            yield from spaced(name, texts.pop(name))
        # The names last, and left out when with them the memo would be larger than
        # ``read`` reads: long names would otherwise cost every ls and rm its roots too.
        roots = made
        last = [*field("index", index), *field("names", "\0".join(n for n, _, _ in named)),
                *field("entries", " ".join(str(places[d]) for _, d, _ in named))]
        if made + len(unlisted or index) + 16 > MAX_SUMMARIES_SIZE:
            made = roots
            index, unlisted = "", unlisted or index
            last = [*field("index", ""), *field("names", ""), *field("entries", "")]
        yield from last
        yield from field("unlisted", unlisted)
        yield b"}"


# A blob this small costs a request's round trip and an fsync, not bandwidth or memory
# (one piece, hashed in the downloading thread): a pull of many of them waits on latency,
# so more go at once than ``jobs`` (ggcr, linuxkit's, fetches all of an image's at once).
_SMALL_BLOB_SIZE = COPY_BUFFER_SIZE
_SMALL_BLOB_JOBS = 16


class _Answer:
    """What a worker thread hands the thread waiting for it: a value or an error. A
    pull's workers use these rather than concurrent.futures, which imports logging:
    5 ms of a small pull."""

    def __init__(self) -> None:
        self.cancelled = False  # not to be worked on any more
        self._done = threading.Event()
        self._value: Any = None
        self._error: Optional[BaseException] = None

    def set(self, value: Any = None, error: Optional[BaseException] = None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


def _run_all(jobs: int, name: str, calls: Sequence[Callable[[], object]]) -> Iterator[None]:
    """Run ``calls`` on up to ``jobs`` daemon threads while the caller's body runs (a
    generator for ``contextlib.contextmanager``), in the order given; the first error
    raises once both end, and no call starts after it. A signal (SIGINT, SIGTERM) does
    not wait for the calls in flight: a stalled upload could take minutes, and the
    threads end with the process (concurrent.futures' threads are joined at its exit:
    a copy went on after SIGTERM until every transfer under way had ended)."""
    pending = collections.deque(calls)
    errors: List[BaseException] = []

    def work() -> None:
        while not errors:
            try:
                call = pending.popleft()
            except IndexError:
                return
            try:
                call()
            except BaseException as e:  # handed to the caller's thread below
                errors.append(e)

    workers = [threading.Thread(target=work, name=name, daemon=True)
               for _ in range(min(jobs, len(calls)))]
    for worker in workers:
        worker.start()
    try:
        try:
            yield
        except Exception:
            _join_all(workers)  # an error of the body waits for the calls in flight
            raise
        _join_all(workers)
    except BaseException as e:
        if not isinstance(e, Exception):  # a signal, in the body or in the wait after it
            pending.clear()  # none starts after it
        raise
    if errors:
        raise errors[0]


def _join_all(workers: Sequence[threading.Thread]) -> None:
    for worker in workers:
        while worker.is_alive():
            # In steps: a SIGINT the kernel hands to a worker thread is acted on only
            # when the main thread next wakes, and a join without end may not wake for
            # minutes.
            worker.join(0.1)


def _each_on_threads(jobs: int, name: str, calls: Sequence[Callable[[], object]]) -> None:
    """``calls`` run ``jobs`` at a time (``_run_all``), returned from once all are done."""
    with contextlib.contextmanager(_run_all)(jobs, name, calls):
        pass


class _ManifestFetcher:
    """The manifests and indexes of one repository, each asked for at most once: ``ahead``
    queues a request for one of ``jobs`` workers, ``result`` waits for its answer
    (queueing it if it was not queued ahead). A pull asks for all the children of an
    index at once, rather than one round trip after another. The workers are daemon
    threads, as ``_download``'s: an interrupted pull does not wait for their requests."""

    def __init__(self, registry: RegistryClient, ref: Reference, jobs: int,
                 transfers: Optional[threading.Semaphore] = None) -> None:
        self._registry = registry
        self._transfers = transfers  # shared with the blob downloads under way
        self._ref = ref
        self._jobs = jobs
        # A deque, not a queue.Queue: importing queue (and heapq) is 1 ms of a pull.
        self._queued: "collections.deque[Optional[Tuple[Digest, _Answer]]]" = \
            collections.deque()
        self._ready = threading.Condition()
        self._workers: List[threading.Thread] = []
        self._sent: Dict[Digest, _Answer] = {}

    def _next(self) -> Optional[Tuple[Digest, _Answer]]:
        with self._ready:
            self._ready.wait_for(lambda: self._queued)
            return self._queued.popleft()

    def _work(self) -> None:
        for digest, future in iter(self._next, None):
            with self._transfers or contextlib.nullcontext():
                # Checked once a transfer is free: the pull may have failed while this
                # waited for one, and nothing is asked for after it returned.
                if future.cancelled:
                    continue
                try:
                    ref = self._ref
                    data, _ = self._registry.get_manifest(
                        Reference(ref.registry, ref.repository, "", digest), what=f"pull {ref}")
                except BaseException as e:  # handed to the thread that waits for it
                    future.set(error=e)
                else:
                    future.set(data)

    def ahead(self, child: Descriptor) -> None:
        if child.digest in self._sent:
            return
        future = _Answer()
        self._sent[child.digest] = future
        self._put((child.digest, future))
        if len(self._workers) < self._jobs:
            worker = threading.Thread(target=self._work, name="ocicache-manifest", daemon=True)
            worker.start()
            self._workers.append(worker)

    def result(self, child: Descriptor) -> bytes:
        self.ahead(child)
        return self._sent[child.digest].result()  # type: ignore[no-any-return]

    def close(self) -> None:
        """What is still queued (after an error) is not sent; the workers end."""
        for future in self._sent.values():
            future.cancelled = True
        for _ in self._workers:
            self._put(None)

    def _put(self, item: Optional[Tuple[Digest, _Answer]]) -> None:
        with self._ready:
            self._queued.append(item)
            self._ready.notify()


class Provider(CacheProvider):
    """The cache in ``directory`` (default: ``default_cache_dir()``).

    ``mirrors`` are ``(registry or "*", URL)`` pairs (default: ``default_mirrors()``);
    ``options`` say how registries are reached; ``jobs`` blobs download at once. By
    default that is 4, and up to ``_SMALL_BLOB_JOBS`` while the blobs left are small
    (``_download``).
    """

    def __init__(self, directory: Optional[Union[str, "os.PathLike[str]"]] = None, *,
                 mirrors: Optional[Sequence[Tuple[str, str]]] = None,
                 options: Optional[TransportOptions] = None, jobs: Optional[int] = None,
                 progress: Optional[PullProgress] = None) -> None:
        self.layout = Layout(directory if directory is not None else default_cache_dir())
        self.registry = RegistryClient(_Transport(options or TransportOptions()),
                                       default_mirrors() if mirrors is None else mirrors)
        self.jobs = 4 if jobs is None else max(1, jobs)
        self.small_jobs = max(self.jobs, _SMALL_BLOB_JOBS) if jobs is None else self.jobs
        self.progress = progress or PullProgress()
        self._saved_locations: Optional[Dict[Tuple[str, Digest], List[str]]] = None

    @property
    def root(self) -> str:
        return self.layout.root

    def close(self) -> None:
        """Close the registry connections this cache keeps open."""
        self.registry.transport.close()

    def __enter__(self) -> "Provider":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- names ------------------------------------------------------------------------

    def find_descriptor(self, ref: RefLike) -> Optional[Descriptor]:
        """The root entry for ``ref``, or None: for a reference with a digest, an entry of
        that digest (the one of that name first); else the entry of that name. Its
        media type is what its blob is (``read_document``), whatever index.json says."""
        wanted = Reference.parse(ref)
        if wanted.digest is not None:
            # A digest is a promise: an entry whose name pins it but whose content is
            # another digest is never the answer.
            pinned = self.layout.index_entries(lambda _, digest: digest == str(wanted.digest))
            found = next((e for e in pinned if _names_match(e.name, wanted)),
                         pinned[0] if pinned else None)
        else:
            canonical, last = str(wanted), wanted.repository.rpartition("/")[2]
            found = next(iter(self.layout.index_entries(  # _names_match's quick tests, inline
                lambda name, _: name == canonical or (
                    last in name and _names_match(name, wanted)))), None)
        return self.layout.believed(found) if found is not None else None

    def _find_named(self, ref: RefLike) -> Descriptor:
        try:
            found = self.find_descriptor(ref)
        except InvalidReferenceError:
            # Not a reference, but perhaps a name linuxkit stored (see _name_predicate).
            matches = _name_predicate(ref)
            found = next(iter(self.layout.index_entries(lambda name, _: matches(name))), None)
            if found is None:
                raise
            return self.layout.believed(found)
        if found is None:
            raise NotFoundError(f"no image named {Reference.parse(ref)} in the cache {self.root}")
        return found

    def names(self) -> List[Descriptor]:
        """Every named root entry, in index order."""
        return self.layout.index_entries(lambda name, _: bool(name))

    def descriptor_write(self, ref: RefLike, descriptor: DescriptorLike) -> ImageSource:
        """Name ``descriptor`` (whose blob must be in the cache), replacing that name."""
        name = str(Reference.parse(ref))
        named = _as_descriptor(descriptor).named(name)
        self._write_names([(name, named)])
        return self.new_source(name, "", named)

    def _write_names(self, entries: Sequence[Tuple[str, Descriptor]]) -> List[Descriptor]:
        """One index update naming every entry, each labelled with the media type its
        blob has; refuses if any needs a missing blob, a descriptor (size, media type of
        a child, a digest the name pins) disagrees with its content, or one name is given
        to two images (an archive naming two alike). Returns the entries written."""
        chosen: Dict[Reference, Tuple[str, Descriptor]] = {}
        for name, descriptor in entries:
            _, other = chosen.setdefault(Reference.parse(name), (name, descriptor))
            if other.digest != descriptor.digest:
                raise OciCacheError(f"cannot name both {other.digest} and "
                                    f"{descriptor.digest} {_shorten(_one_line(name))}")
        entries = list(chosen.values())
        with self.layout.lock():
            entries = list(zip([name for name, _ in entries],
                               self.layout.believed_all([d for _, d in entries])))
            marked = self.layout.reachable([d for _, d in entries])
            problems = marked.missing + marked.unreadable
            if problems:
                raise NotFoundError(f"cannot name {entries[0][0]}: blob {problems[0]} "
                                    f"is not in the cache {self.root}")
            if marked.wrong:
                raise CorruptCacheError(f"cannot name {_shorten(entries[0][0])}: "
                                        f"{marked.wrong[0]}")

            # Every spelling of a name holds the last component of its path as written
            # (see _names_match): only names holding one of those are parsed.
            lasts = {ref.repository.rpartition("/")[2] for ref in chosen}

            def change(manifests: List[Any]) -> List[Any]:
                kept = []
                spellings: Dict[Reference, List[str]] = {}
                for raw in manifests:
                    name = _raw_entry(raw)[0]
                    answers = _name_answers_to(name) if any(
                        last in name for last in lasts) else ()
                    for ref in answers:
                        spellings.setdefault(ref, []).append(name)
                    if not any(ref in chosen for ref in answers):
                        kept.append(raw)
                return kept + [_keep_spelling(spellings, name, d).to_json()
                               for name, d in entries]

            self.layout.update_index_entries(change, f"cannot name {_shorten(entries[0][0])}")
            return [d for _, d in entries]

    def index_write(self, ref: RefLike, *descriptors: DescriptorLike) -> ImageSource:
        """Create, or merge into, the multi-platform index named ``ref``."""
        name = str(Reference.parse(ref))
        incoming = [self.layout.believed(_as_descriptor(d)) for d in descriptors]
        if not incoming:
            raise OciCacheError(f"cannot create index {name} without any manifests")
        for descriptor in incoming:
            if descriptor.is_index:
                raise OciCacheError(f"cannot write index {name}: {descriptor.digest} is itself "
                                    "an index; pass its children (get_content reads them)")
            if not self.layout.has_blob(descriptor.digest, descriptor.size):
                raise NotFoundError(f"cannot write index {name}: {descriptor.digest} is not "
                                    f"in the cache {self.root}")
        with self.layout.adding_blobs(), self.layout.lock():
            existing = self.find_descriptor(name)
            if existing is not None and not existing.is_index:
                raise OciCacheError(f"image named {name} already exists in cache and is not "
                                    "an index")
            if existing is None:
                index = Index(MEDIA_OCI_INDEX, tuple(incoming))
            else:
                index = merge_index(Index.from_json(self.layout.read_blob(existing.digest)),
                                    incoming)
            data = index.to_bytes()
            digest = self.layout.write_blob_bytes(data)
            return self.descriptor_write(name, Descriptor(MEDIA_OCI_INDEX, digest, len(data)))

    def image_load(self, stream: IO[bytes], name: RefLike = "") -> List[Descriptor]:
        """Load a tar stream (OCI layout, Docker 25+, classic or pre-1.10 ``docker save``;
        gzip, xz, bzip2 or zstd compressed or not).

        Every blob is verified; names are written in one index update at the end, so a
        failure leaves no name behind. Returns the root descriptors, one per name
        (unnamed roots are returned without a name and are not added to the index).
        ``name`` names the archive's image instead of the names it carries; of several
        images, the one whose bare tag (``org.opencontainers.image.ref.name``) is the
        tag of ``name``.
        """
        with self.layout.adding_blobs():
            images = _load_archive(stream, self.layout)
            if name:
                images = _name_image(images, Reference.parse(name))
            roots = self.layout.believed_all([_bounded_entry(i.descriptor) for i in images])
            # Sizes and child media types are the archive's word about its blobs (they
            # are inside its manifests): one that disagrees is refused; a root's label,
            # which is only index.json's, is corrected.
            wrong = self.layout.reachable(
                [r.with_annotations(ref_name=None, containerd_name=None) for r in roots]).wrong
            if wrong:
                raise InvalidArchiveError(f"archive's descriptor disagrees with its blob: "
                                          f"{wrong[0]}")
            named = [(image_name, root.named(image_name))
                     for image, root in zip(images, roots) for image_name in image.names]
            written = self._write_names(named) if named else []
        unnamed = [root.with_annotations(ref_name=None, containerd_name=None)
                   for image, root in zip(images, roots) if not image.names]
        return written + unnamed

    def remove(self, *refs: RefLike) -> List[Digest]:
        """Remove names, and the blobs no other name reaches; returns those blobs.

        Every name must exist, or nothing is removed. The work is the removed images':
        which of their blobs the other names still reach, the summary memo says for the
        roots it knows (``_SummaryMemo``: only one ocicache wrote, and only of roots whose
        every document it read), their documents for the others. linuxkit's ``cache rm``
        deletes every blob of the image, shared or not, breaking the names sharing them
        (reference/linuxkit-cache.md, 3.5); this never deletes a blob a name reaches.
        """
        return self._remove(refs, as_stored=False)[1]

    def _remove(self, refs: Sequence[RefLike], as_stored: bool
                ) -> Tuple[List[str], List[Digest]]:
        """``remove``, and the names removed; ``as_stored``: each of ``refs`` that is not a
        name spelled so in index.json is canonical_name'd first (as ``ocicache rm`` says
        it), with index.json read once."""
        with self.layout.deleting_blobs(), self.layout.lock():
            texts = [str(ref) for ref in refs]
            canonical = all(map(_is_canonical, texts))
            if as_stored and canonical:  # as stored or not, the same names
                refs = _as_stored(texts, set())
            scanned = self._remove_scanning(refs) if canonical or not as_stored else None
            if scanned is None:  # index.json decoded whole
                index = self.layout.index_object()  # once: written back, minus the names
                if as_stored and not canonical:
                    refs = _as_stored(texts, {
                        _raw_entry(raw)[0] for raw in index.get("manifests") or []})
                remaining: List[Any] = []
                found, removed = self._removing(refs, index.get("manifests") or [],
                                                lambda raw, _: remaining.append(raw))
                manifests: Union[List[Any], _EncodedEntries] = remaining
            else:
                index, found, removed, encoded, memo, known, places = scanned
                manifests = encoded
            for ref, hit in zip(refs, found):
                if not hit:  # a string that is no reference says so, unless rm took it
                    label = ref if as_stored else Reference.parse(ref)  # as stored
                    raise NotFoundError(f"no image named {label} in the cache {self.root}")
            before = self.layout.reachable(removed).digests
            if scanned is None:
                kept, unknown = _SummaryMemo.read(self.layout).reaching(
                    remaining, map(str, before))
                after = self.layout.reachable(map(self.layout.entry, unknown)).digests
            else:
                reached = memo.reached_by(known, map(str, before))
                kept = set() if reached is None else reached
                # (the memo not as written: every document says)
                after = self.layout.reachable(map(self.layout.entry, encoded.decoded(
                    None if reached is None else places))).digests
            deleted = [d for d in before if d not in after and str(d) not in kept and
                       self.layout.has_blob(d)]

            def delete() -> None:
                for digest in deleted:
                    self.layout.delete_blob(digest)

            # Names first, so no name points at a deleted blob; on a full disk the blobs
            # go first (a crash then leaves names that 'verify' reports and pull repairs).
            self.layout.write_index_object(index, manifests, on_full=delete)
            delete()
            return [str(ref) for ref in refs], deleted

    def _removing(self, refs: Sequence[RefLike], entries: Iterable[Any],
                  keep: Callable[[Any, Tuple[str, str, int]], None]
                  ) -> Tuple[List[bool], List[Descriptor]]:
        """Which of ``refs`` name any of the root ``entries`` (as decoded), and those
        entries parsed; each other entry given to ``keep`` (with its ``_raw_entry``)."""
        wanted = [_name_predicate(ref) for ref in refs]
        removed: List[Any] = []
        found = [False] * len(wanted)
        for raw in entries:
            said = _raw_entry(raw)
            name = said[0]
            hits = [matches(name) for matches in wanted] if name else []
            if any(hits):
                removed.append(raw)
                found = [a or b for a, b in zip(found, hits)]
            else:
                keep(raw, said)
        return found, list(map(self.layout.entry, removed))

    def _remove_scanning(self, refs: Sequence[RefLike]) -> Optional[Tuple[
            Dict[str, Any], List[bool], List[Descriptor], _EncodedEntries, "_SummaryMemo",
            List[int], List[Any]]]:
        """``_remove``'s reading of index.json an entry at a time (``_IndexScan``), each
        kept entry encoded as it is read and asked of the memo then: index.json's head,
        which of ``refs`` were found, the entries removed, those kept, the memo, its
        places of the kept roots it knows (``_place``) and the kept entries it does not.
        None when index.json is not one to read so (then it is decoded whole)."""
        try:
            scan = self.layout.index_scan()
        except _UnusualIndex:
            return None
        memo = _SummaryMemo.read(self.layout)
        known: List[int] = []
        unknown: List[int] = []  # where among the kept (decoded again when asked)
        encoded = _EncodedEntries()

        def keep(raw: Any, said: Tuple[str, str, int]) -> None:
            at = memo._place(said[1], said[2])
            if at < 0:
                unknown.append(len(encoded))
            else:
                known.append(at)
            encoded.append(raw)
        try:
            found, removed = self._removing(refs, scan.entries(), keep)
        except (_UnusualIndex, InvalidReferenceError):  # said as index_object's reader says
            return None
        return scan.head, found, removed, encoded, memo, known, unknown

    def clean(self) -> int:
        """Remove every name and blob; returns the number of blobs deleted."""
        with self.layout.deleting_blobs(), self.layout.lock():
            count = 0

            def delete() -> None:
                nonlocal count
                for digest, _, _ in self.layout.blob_files():
                    if digest is not None and self.layout.delete_blob(digest):
                        count += 1

            # Written, not updated: it empties a cache whose index.json cannot be read.
            self.layout.replace_index(_EMPTY_INDEX_BYTES, on_full=delete)  # see remove()
            delete()
            return count

    def gc(self, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS,
           dry_run: bool = False) -> GcReport:
        return self.layout.gc(grace_seconds, dry_run)

    def verify(self, repair: bool = False) -> VerifyReport:
        return self.layout.verify(repair)

    # -- images -----------------------------------------------------------------------

    def resolve(self, ref: RefLike, architecture: str = "") -> Tuple[Descriptor, Descriptor]:
        """The root entry of ``ref`` and its image manifest for the platform."""
        root = self._find_named(ref)
        if not root.is_index:
            if architecture:
                self._check_platform(root, Platform.parse(architecture))
            return root, root
        index = Index.from_json(self.layout.read_blob(root.digest), what=f"index of {root.name}")
        wanted = Platform.parse(architecture)
        child = select_platform(self._children(index), wanted) or \
            self._select_unlabelled(index, wanted, explicit=bool(architecture))
        if child is None:
            have = ", ".join(str(c.platform) for c in index.manifests
                             if c.platform is not None and not c.is_attestation) or "none"
            if index.annotations.get(_ANNOTATION_SUBSET_OF):
                raise PlatformNotFoundError(
                    f"image {root.name or Reference.parse(ref)}: the cache holds only {have} "
                    f"of it; pull it with --platform {wanted}")
            raise PlatformNotFoundError(
                f"image {root.name or Reference.parse(ref)} has no {wanted}; it has {have}")
        self._require_pulled(root.name or str(Reference.parse(ref)), child)
        return root, child

    def _select_unlabelled(self, index: Index, wanted: Platform,
                           explicit: bool) -> Optional[Descriptor]:
        """An image child without ``platform`` (go-containerregistry's
        ``layout.AppendImage``, crane) chosen by its config's platform, as skopeo does; the
        only child of an index is also what no explicit platform selects."""
        chosen = select_platform(self._labelled_by_config(index), wanted)
        if chosen is not None:
            return next(c for c in index.manifests if c.digest == chosen.digest)
        images = [c for c in index.manifests if not c.is_attestation]
        if not explicit and len(images) == 1 and images[0].platform is None and \
                images[0].media_type in IMAGE_MEDIA_TYPES:
            return images[0]
        return None

    def _labelled_by_config(self, index: Index) -> List[Descriptor]:
        """The image children without ``platform``, given the one their config declares."""
        labelled = []
        for child in index.manifests:
            if child.platform is not None or child.media_type not in IMAGE_MEDIA_TYPES:
                continue
            try:
                config = _load_json_object(
                    self.layout.read_blob(self.manifest(child).config.digest), "config")
                labelled.append(_replace(child, platform=Platform.from_json(config)))
            except OciCacheError:
                continue  # not an image config (an artifact) or not in the cache
        return labelled

    def _children(self, index: Index) -> List[Descriptor]:
        """An index's children as platforms are chosen from: one labelled as anything
        but an image is asked what it is (it may be one); one labelled as an image is
        read as a manifest when it is used, which checks that label."""
        return [c if c.media_type in IMAGE_MEDIA_TYPES else self.layout.believed(c)
                for c in index.manifests]

    def _require_pulled(self, name: str, child: Descriptor) -> None:
        """An index names every platform, but a pull fetches only the ones asked for."""
        if not self.layout.has_blob(child.digest, child.size):
            raise NotFoundError(f"image {name} has {child.platform}, but that platform is not "
                                f"in the cache {self.root}: pull --platform {child.platform} "
                                f"{name} first")

    def _check_platform(self, root: Descriptor, wanted: Platform) -> None:
        """A single-manifest image serves only the platform its config declares."""
        config = _load_json_object(self.layout.read_blob(self.manifest(root).config.digest),
                                   f"config of {root.name}")
        declared = _replace(root, platform=Platform.from_json(config))
        if select_platform([declared], wanted) is None:
            raise PlatformNotFoundError(
                f"image {root.name} has no {wanted}; it is {declared.platform}")

    def manifest(self, descriptor: Descriptor) -> Manifest:
        return Manifest.from_json(self.layout.read_blob(descriptor.digest),
                                  what=f"manifest {descriptor.digest}")

    def image_in_cache(self, ref: RefLike, trusted_ref: str = "",
                       architecture: str = "") -> bool:
        """True when the image for the platform is complete in the cache (no network)."""
        return self._complete_root(ref, architecture) is not None

    def _complete_root(self, ref: RefLike, architecture: str) -> Optional[Descriptor]:
        """The root entry of ``ref`` if its image for the platform (each platform of a
        comma list) is complete, else None."""
        root = None
        for platform in _platform_list(architecture):
            try:
                root, image = self.resolve(ref, str(Platform.parse(platform)))
                manifest = self.manifest(image)
                self.layout.read_blob(manifest.config.digest)  # small: its digest is checked
            except (NotFoundError, CorruptCacheError):
                return None
            if not all(self.layout.has_blob(b.digest, b.size) for b in manifest.blobs()
                       if not _is_foreign(b)):
                return None
        return root

    def summaries(self) -> List[ImageSummary]:
        """Every name with the platforms complete in the cache and its size on disk."""
        out = []
        for raw, _, _, media_type, platforms, size in self._listing():
            entry = self.layout.entry(raw)
            descriptor = entry if media_type == entry.media_type else \
                _replace(entry, media_type=media_type)
            out.append(ImageSummary(entry.name, descriptor, platforms, size))
        return out

    def _listing(self, raw_entries: bool = True
                 ) -> Iterator[Tuple[Any, str, str, str, Tuple[str, ...], int]]:
        """Every named root entry of index.json as decoded (None without
        ``raw_entries``), with its name, digest, media type, complete platforms and size
        on disk, in index order; no entry is kept once given (20,000 of them parsed are
        15 MB). Without ``raw_entries``, from the memo alone when it holds the named
        entries of this very index.json (the same bytes: ``_SummaryMemo.named_listing``).

        What each root reaches comes from the summary memo (``_SummaryMemo``) when it
        knows the root, else from its documents, and is then remembered; whether the
        memo's blobs are there comes from one listing of the blob directories, so ``ls``
        of 20,000 names opens no manifest it has seen before, and parses no entry the
        memo knows."""
        memo = _SummaryMemo.read(self.layout)
        # No listing of the blobs when the memo names none (the first ls): what a root's
        # documents say is then what is there, and 40,000 names listed were 7.6 MB of
        # the first ls's peak, held beside all it learned.
        listed = self.layout.blob_names() if memo.names_blobs else set()
        complete = memo.complete(listed)
        if complete and not raw_entries and memo.index and \
                memo.index == self.layout.index_digest():
            from_memo = memo.named_listing()  # of these very bytes: none decoded
            if from_memo is not None:
                del listed
                for name, digest, media_type, platforms, size in from_memo:
                    yield None, name, digest, media_type, platforms, size
                return
        present: Optional[Set[str]] = listed if memo.names_blobs else None
        del listed
        rows = memo.listings() if complete else {}
        memo_index = memo.beside
        if rows:  # index.json is decoded without these beside it (14 MB of 20,000 names);
            memo, present = _SummaryMemo({}, []), None  # read again if a root needs them
        digests: List[str] = []
        entries = self.layout.index_object(digests).get("manifests") or []
        entries.reverse()
        named: Dict[str, int] = {}
        once: Dict[Tuple[str, ...], Tuple[str, ...]] = {}  # each given once
        # The named entries in order while each root is known (then the memo holds them).
        in_order: Optional[List[Tuple[str, str, int]]] = []
        learned = False
        while entries:
            raw = entries.pop()
            name, digest, size = _raw_entry(raw)
            if not name:
                continue
            if in_order is not None:
                in_order.append((name, digest, size))
            row = rows.get(digest)
            if row is not None and row[0] == size:
                named[digest] = size
                yield raw, name, digest, row[1], row[2], row[3]
                continue
            facts = memo.facts(digest, size)
            known = facts is not None
            # Found as things are now (read now, or learned so), every blob it names is
            # there (``_summary_facts`` leaves out what is not); the memo's are asked.
            found_now = facts is None or memo.learned_here(digest)
            if facts is None:
                entry = self.layout.entry(raw)
                facts, exact = self._summary_facts(entry, memo.string)
                # Learned only when the memo can hold it: else each ls learned it again,
                # and wrote the memo for it.
                known = exact and memo.holds(facts)
                if known:
                    memo.learn(digest, facts)
                    learned = True
                    # Its one string then, the memo's (20,000 decoded were 2.4 MB).
                    digest = memo.held(digest)
                    if in_order:
                        in_order[-1] = (name, digest, size)
                else:
                    in_order = None
            if known or digest not in named:  # not the size an entry misstates: it was
                named[digest] = size          # memo'd as the root's, relearned by each ls
            if found_now:
                size_on_disk = sum(facts.sizes)
                shown = tuple(p for p, _ in facts.platforms)
            else:
                if present is None:
                    present = self.layout.blob_names()
                size_on_disk = sum(facts.sizes) if present.issuperset(facts.blobs) else \
                    sum(n for blob, n in zip(facts.blobs, facts.sizes) if blob in present)
                shown = tuple(p for p, needed in facts.platforms
                              if present.issuperset(needed))
            yield (raw, name, digest, facts.media_type, once.setdefault(shown, shown),
                   size_on_disk)
        # Rewritten when it learned, when a blob it names is gone (a name removed), and
        # when index.json changed: then the next ls lists from it alone again.
        changed = in_order is not None and digests[-1] != memo_index
        present = None  # not held while the memo is written
        if (learned or changed) and rows:
            memo = _SummaryMemo.read(self.layout).learning(memo)
        if learned or changed or (not complete and memo.stale(named)):
            self.layout.write_summaries(memo.encoded(
                named, "" if in_order is None else digests[-1], in_order or ()))

    def _summary_facts(self, entry: Descriptor, string_of: Callable[[str], str]
                       ) -> Tuple["_RootFacts", bool]:
        """What ``entry`` reaches, from its documents (the blobs there, with their sizes,
        and each platform image's blobs; one whose blobs are not all there with the size
        its manifest gives is left out); and whether that is the whole truth about the
        root for as long as its blob exists: every document read, nothing missing or
        disagreeing, so that the memo may keep it. Each digest is given as the one
        string ``string_of`` gives of it: learning 20,000 roots sharing layers held
        200,000 strings of 40,000 digests, 23 MB."""
        def string(digest: Digest) -> str:
            return string_of(str(digest))

        believed = self.layout.believed(entry)
        marked = self.layout.reachable([believed])
        sizes = {string(d): self.layout.blob_size(d) for d in marked.digests}
        # Whether the walk met every blob there, not whether they are there now: a child
        # of an index that arrived after the walk passed it (a concurrent pull) was not
        # followed, and what it links to is not among the blobs the walk found.
        exact = not (marked.missing or marked.unreadable or marked.wrong or marked.absent) \
            and None not in sizes.values()
        read: Dict[Digest, Manifest] = {}  # a single manifest's is read for its platform

        def manifest(descriptor: Descriptor) -> Manifest:
            if descriptor.digest not in read:
                read[descriptor.digest] = self.manifest(descriptor)
            return read[descriptor.digest]

        images, readable = self._platform_images(believed, manifest)
        platforms = []
        for child in images:
            try:
                manifest_of_child = manifest(child)
            except OciCacheError:
                exact = False
                continue
            blobs = [b for b in manifest_of_child.blobs() if not _is_foreign(b)]
            if all(self.layout.has_blob(b.digest, b.size) for b in blobs):
                platforms.append((sys.intern(str(child.platform)),  # one string of each
                                  (string(child.digest), *(string(b.digest) for b in blobs))))
            else:
                exact = False
        reached = {digest: size for digest, size in sizes.items() if size is not None}
        return _RootFacts(believed.media_type, entry.size, tuple(reached),
                          tuple(reached.values()), tuple(platforms)), exact and readable

    def _platform_images(self, root: Descriptor, manifest: Callable[[Descriptor], Manifest]
                         ) -> Tuple[List[Descriptor], bool]:
        """The platform images of ``root`` (a single manifest's platform from its config),
        and whether the documents saying so could be read."""
        try:
            if root.is_index:
                index = Index.from_json(self.layout.read_blob(root.digest))
                images = [c for c in index.manifests
                          if c.platform is not None and not c.is_attestation]
                images += [c for c in self._labelled_by_config(index) if _is_real_platform(c)]
            else:
                config = _load_json_object(
                    self.layout.read_blob(manifest(root).config.digest), "config")
                images = [_replace(root, platform=Platform.from_json(config))]
        except NotFoundError:
            return [], False
        except OciCacheError as e:
            _log().warning("%s: %s", _printable(root.name), _one_line(str(e)))
            return [], False
        return images, True

    def new_source(self, ref: RefLike, architecture: str = "",
                   descriptor: Optional[Descriptor] = None) -> ImageSource:
        """An ImageSource for ``ref``; nothing is read until a method is called."""
        return _CacheSource(self, Reference.parse(ref), architecture, descriptor)

    def get_content(self, digest: DigestLike) -> BinaryIO:
        """The blob's bytes as stored (the caller verifies them if it needs to)."""
        return self.layout.open_blob(digest)

    def store(self) -> ContentStore:
        return ContentStore(self.layout)

    # -- registry -------------------------------------------------------------------

    def image_pull(self, ref: RefLike, trusted_ref: str = "", architecture: str = "",
                   always_pull: bool = False, arch_tags: bool = False) -> ImageSource:
        """Make ``ref`` complete in the cache for the platform (``"all"``: every one).

        An image already complete makes no request unless ``always_pull``. Only the
        platform's child (and its attestations) is downloaded from an index, only
        blobs missing or failing their digest check, each verified; the name is written
        last, on the part of the index the cache holds (``_root_to_name``). A digest
        reference is pulled whole.
        """
        wanted = Reference.parse(ref)
        name = str(wanted)
        # A digest names the registry's whole index, so the cache holds all of it (see
        # _root_to_name); a tag may name the part of an index that was pulled.
        whole = ALL_PLATFORMS if wanted.digest is not None else architecture
        cached = self._complete(wanted, whole)
        if cached is not None and always_pull:
            cached = self._unmoved(wanted, cached)
        if cached is not None:
            tags = self._arch_tag_names(  # asked for now, perhaps not when it was pulled
                wanted, cached, {d.digest for d in self._images(cached, architecture)}) \
                if arch_tags and cached.is_index else []
            if tags:
                with self.layout.adding_blobs():
                    self._write_names(tags)
            self.progress.cached(name, cached)
            return self.new_source(name, architecture, cached)
        with self.layout.adding_blobs():
            root_data, root = self.registry.get_manifest(wanted)
            if root.is_index and whole != architecture:  # the platforms asked for must be there
                _chosen_children(wanted, Index.from_json(root_data, what=f"index of {wanted}"),
                                 architecture)
            progress = _ProgressAfterBegin(self.progress)

            def own_blobs(manifest: Optional[Manifest]) -> List[Descriptor]:
                """What the cache must hold of ``manifest``, the largest first."""
                return sorted((blob for blob in manifest.blobs() if not _is_foreign(blob)),
                              key=lambda b: -b.size) if manifest is not None else []

            def found(child: Descriptor, data: bytes, manifest: Manifest) -> None:
                add([child], {child.digest: data})  # written while the blobs download
                add(own_blobs(manifest), {})

            # Every blob this pull relies on is checked, and fetched again if corrupt: a
            # pull that asks the registry anyway (always_pull, or an incomplete image)
            # must not keep a damaged blob another name already had. Each platform's
            # manifest is written, and its blobs start downloading, as soon as it is in.
            transfers = threading.Semaphore(self.small_jobs)  # manifests' and blobs'
            with self._downloading(wanted, lambda digest: True, progress.advance,
                                   transfers) as add:
                if whole == ALL_PLATFORMS and root.is_index:  # named as it is: written too
                    add([root], {root.digest: root_data})
                manifests, loose = self._pull_plan(
                    wanted, root_data, root, whole if root.is_index else architecture,
                    found, transfers)
                blobs: Dict[Digest, Descriptor] = {blob.digest: blob for blob in loose}
                for _, _, manifest in manifests:
                    for blob in own_blobs(manifest):
                        blobs.setdefault(blob.digest, blob)
                progress.begin(name, list(blobs.values()))
                add([descriptor for descriptor, _, _ in manifests],  # nested indexes, a single
                    {descriptor.digest: data for descriptor, data, _ in manifests})  # manifest
                add(sorted(blobs.values(), key=lambda b: -b.size), {})
            self.layout.sync_blob_directories()  # outside the lock: naming re-syncs, cheaply
            with self.layout.lock():  # what the cache holds cannot change until it is named
                named = self._root_to_name(root_data, root, whole == ALL_PLATFORMS)
                names = [(name, named.named(name))]
                if arch_tags and root.is_index:
                    names += self._arch_tag_names(
                        wanted, named, {descriptor.digest for descriptor, _, _ in manifests},
                        Index.from_json(root_data).manifests)
                self._write_names(names)
            self._save_locations()
        self.progress.end(name, named)
        return self.new_source(name, architecture, named.named(name))

    def pull_referrers(self, ref: RefLike, architecture: str = "") -> List[Descriptor]:
        """Bring what refers to the cached ``ref`` (signatures, SBOMs: its referrers in
        its registry) into the cache, beside it: the referrers of its root (the
        registry's index, also when the cache holds a part of it) and of each platform's
        image the cache holds for ``architecture``. They are kept as the registry's
        fallback tag keeps them: each subject's referrers listed in an OCI index named
        ``<repository>:sha256-<hex of the subject>`` (entries already named so are
        kept), so gc keeps them while that name exists, ``rm`` removes them, and
        ``push`` of that name recreates the tag. Referrers of referrers are not
        followed. Returns the names written; nothing is named until every referrer is
        complete, and a referrer whose ``subject`` is not the image is an error."""
        wanted = Reference.parse(ref)
        root = self._find_named(wanted)
        subjects = [Digest.parse(self._subset_of(root) or str(root.digest))]
        if root.is_index:
            subjects += [c.digest for c in self._images(root.named(str(wanted)), architecture)
                         if c.digest not in subjects]
        written = []
        with self.layout.adding_blobs():
            plans = [p for p in (self._referrers_plan(wanted, s) for s in subjects) if p]
            for plan in plans:
                with self._manifests_written(plan.manifests):  # while the blobs download
                    self._download(plan.source, plan.blobs)
            with self.layout.lock():
                names = []
                for plan in plans:
                    name = str(Reference(wanted.registry, wanted.repository,
                                         referrers_tag(plan.source.digest or "")))
                    entries = list(Index.from_json(plan.data).manifests)
                    held = [e for e, _, _ in self._held_referrers(Reference.parse(name))]
                    entries = [*held, *(e for e in entries
                                        if e.digest not in {h.digest for h in held})]
                    data = _bounded_referrers(Index(MEDIA_OCI_INDEX, tuple(entries)).to_bytes(),
                                              f"the index of {name}")
                    digest = self.layout.write_blob_bytes(data)
                    names.append((name, Descriptor(MEDIA_OCI_INDEX, digest, len(data)).named(name)))
                written = self._write_names(names)
            self._save_locations()
        for plan in plans:
            _log().info("pulled %d referrers of %s", len(plan.manifests), plan.source)
        return written

    def _held_referrers(self, name: Reference, subject_tag: str = ""
                        ) -> List[Tuple[Descriptor, bytes, Manifest]]:
        """What the cache's referrers name ``name`` (``<repository>:sha256-<hex>``, as
        ``pull_referrers`` writes it) lists that refers to the image its tag (or
        ``subject_tag``) names: each entry the cache holds that is a manifest whose own
        ``subject`` has that fallback tag, with its bytes. The name is only a claim (a
        co-user of a shared cache, or an image tagged ``sha256-<hex>``, can name anything
        so): an entry of another image, an index, or no manifest at all is left out with
        a warning, so that sbom never prints, nor copy and push carry, another image's
        documents as this one's."""
        tag = subject_tag or name.tag
        root = self.find_descriptor(name)
        if root is None or not root.is_index or referrers_tag(root.digest) == tag:
            return []  # the last: the image itself, tagged by its digest (a mirror's name)
        held: List[Tuple[Descriptor, bytes, Manifest]] = []
        for entry in Index.from_json(self.layout.read_blob(root.digest),
                                     what=f"index of {name}").manifests:
            if not self.layout.has_blob(entry.digest):
                continue
            what = f"referrer {entry.digest} in {name}"
            try:
                data = self.layout.read_blob(entry.digest)
                _, its_subject = referrer_descriptor(data, entry.media_type, what)
                kind, document = read_document(data, entry.media_type, what)
            except OciCacheError as e:
                _log().warning("leaving out %s: %s", what, _one_line(str(e)))
                continue
            if its_subject is None or referrers_tag(its_subject.digest) != tag or \
                    not isinstance(document, Manifest):
                _log().warning("leaving out %s: it is not a manifest referring to %s", what,
                               tag.replace("-", ":", 1))
                continue
            held.append((_replace(entry, media_type=kind), data, document))
        return held

    def referrer_sboms(self, ref: RefLike, subjects: Sequence[Digest]) -> List[BinaryIO]:
        """The SBOMs (SPDX, CycloneDX) among the referrers of ``subjects`` that the cache
        holds under ``<repository>:sha256-<hex>`` (``pull_referrers``): each layer of an
        SBOM media type (``SBOM_MEDIA_TYPES``) as stored, and the predicate of each
        in-toto statement (plain, or in a DSSE envelope as cosign attaches it) whose
        predicate type is an SBOM's (``SBOM_PREDICATE_TYPES``)."""
        import base64
        wanted = Reference.parse(ref)
        documents: List[BinaryIO] = []
        for subject in dict.fromkeys(subjects):
            for referrer, _, manifest in self._held_referrers(Reference(
                    wanted.registry, wanted.repository, referrers_tag(subject))):
                for layer in manifest.layers:
                    what = f"layer {layer.digest} of referrer {referrer.digest}"
                    if layer.media_type in SBOM_MEDIA_TYPES:
                        documents.append(self._checked_blob(layer, what))
                        continue
                    if layer.media_type not in (MEDIA_IN_TOTO, MEDIA_DSSE_ENVELOPE):
                        continue
                    data = self.layout.read_blob(layer.digest, MAX_STATEMENT_SIZE)
                    if layer.media_type == MEDIA_DSSE_ENVELOPE:
                        payload = _load_json_object(data, what).get("payload")
                        try:
                            data = base64.b64decode(str(payload), validate=True)
                        except ValueError:
                            raise OciCacheError(f"{what}: its DSSE payload is not base64") \
                                from None
                    statement = _load_json_object(data, f"in-toto statement in {what}")
                    if statement.get("predicateType") not in SBOM_PREDICATE_TYPES:
                        continue
                    try:
                        text = data.decode()
                    except UnicodeDecodeError:
                        raise OciCacheError(f"in-toto statement in {what} is not UTF-8") from None
                    documents.append(io.BytesIO(_raw_json_member(text, "predicate").encode()))
        return documents

    def _checked_blob(self, blob: Descriptor, what: str) -> BinaryIO:
        """``blob`` open at its start once its bytes (read through, in pieces) hash to its
        digest and are its size: a document printed as it is stored, as sbom prints a
        referrer's SBOM layer, is one the cache verified, as read_blob's are."""
        f = self.layout.open_blob(blob.digest)
        try:
            hasher, size = blob.digest.hasher(), 0
            for chunk in iter(lambda: f.read(COPY_BUFFER_SIZE), b""):
                hasher.update(chunk)
                size += len(chunk)
            if hasher.hexdigest() != blob.digest.hex or size != blob.size:
                raise CorruptCacheError(f"{what} is corrupt in the cache ({size} bytes hashing "
                                        f"to {blob.digest.algorithm}:{hasher.hexdigest()}); "
                                        "run 'ocicache verify --repair', then pull --referrers "
                                        "again")
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f

    def _referrers_plan(self, ref: Reference, subject: Digest) -> Optional["_CopyPlan"]:
        """The referrers of ``subject`` in ``ref``'s repository, fetched (each manifest
        checked: its digest, its size, its ``subject``) but no blob: a plan whose root is
        the index listing them, as the fallback tag does; None when there are none.
        Referrers that are indexes are left out, with a warning (their children would
        need a pull of their own)."""
        pinned = Reference(ref.registry, ref.repository, "", subject)
        listed, source = self.registry.referrers(pinned)
        kept: List[Descriptor] = []
        manifests: List[Tuple[Descriptor, bytes, Optional[Manifest]]] = []
        for entry in listed:
            if entry.media_type in INDEX_MEDIA_TYPES:
                _log().warning("not pulling referrer %s of %s: it is an index", entry.digest,
                               pinned)
                continue
            data, served = self.registry.get_manifest(
                Reference(ref.registry, ref.repository, "", entry.digest),
                what=f"pull referrer {entry.digest} of {pinned}")
            where = f"the fallback tag {source}" if source != "api" else "the referrers API"
            if len(data) != entry.size:
                raise RegistryError(f"{pinned.name}: {where} lists referrer {entry.digest} "
                                    f"of {entry.size} bytes, but it has {len(data)}")
            descriptor, its_subject = referrer_descriptor(data, served.media_type,
                                                          f"referrer {entry.digest}")
            if its_subject is None or its_subject.digest != subject:
                raise RegistryError(
                    f"{pinned.name}: {where} lists {entry.digest} as a referrer of {subject}, "
                    f"but its subject is {its_subject.digest if its_subject else 'missing'}")
            kind, document = read_document(data, served.media_type, f"referrer {entry.digest}")
            if not isinstance(document, Manifest):
                _log().warning("not pulling referrer %s of %s: it is %s", entry.digest,
                               pinned, kind or "no manifest")
                continue
            kept.append(_replace(descriptor, media_type=kind))
            manifests.append((kept[-1], data, document))
        if not kept:
            return None
        data = _bounded_referrers(Index(MEDIA_OCI_INDEX, tuple(kept)).to_bytes(),
                                  f"the list of the referrers of {pinned}")
        root = Descriptor(MEDIA_OCI_INDEX, Digest.from_bytes(data), len(data))
        return _CopyPlan(pinned, root, data, tuple((d, m) for d, m, _ in manifests),
                         _copied_blobs(manifests, []))

    def _unmoved(self, wanted: Reference, cached: Descriptor) -> Optional[Descriptor]:
        """``cached`` when the registry still serves it for ``wanted`` (asked with HEAD,
        which Docker Hub's rate limit does not count) and every blob it relies on passes
        its check; else None, and the pull asks again with GET (a corrupt blob is deleted
        here, so that pull fetches it)."""
        current = self.registry.manifest_digest(wanted)
        if current is None or str(current.digest) not in (str(cached.digest),
                                                          self._subset_of(cached)):
            return None
        checked = self.layout.reachable([cached]).digests
        damaged = [d for d in checked if self.layout.discard_if_corrupt(d)]
        return None if damaged else cached

    def _root_to_name(self, data: bytes, root: Descriptor, whole: bool) -> Descriptor:
        """The root a pull names, its blob written: the registry's own index or manifest
        when the cache holds every child it lists, else an index of the children the cache
        holds (registry order, attestations of those only), annotated as a part of the
        registry's index (``_ANNOTATION_SUBSET_OF``).

        An index must not list what the cache lacks: linuxkit's ``ValidateImage``
        (src/cmd/linuxkit/cache/pull.go) counts a platform as present when the index
        lists it, so ``linuxkit build --arch arm64`` after a pull of amd64 alone would
        skip its own pull and build without the image.
        """
        if not whole and root.is_index:
            index = Index.from_json(data, what=f"index {root.digest}")
            images = {str(c.digest) for c in index.manifests if not c.is_attestation
                      and c.media_type in IMAGE_MEDIA_TYPES and self._holds(c)}
            kept = tuple(c for c in index.manifests if str(c.digest) in images or (
                c.is_attestation and c.media_type in IMAGE_MEDIA_TYPES and self._holds(c)
                and c.annotations.get(ANNOTATION_REFERENCE_DIGEST) in images))
            if len(kept) < len(index.manifests):
                annotations = {**index.annotations, _ANNOTATION_SUBSET_OF: str(root.digest)}
                part = _replace(index, manifests=kept, annotations=annotations).to_bytes()
                return Descriptor(root.media_type, self.layout.write_blob_bytes(part), len(part))
        self.layout.discard_if_corrupt(root.digest)
        self.layout.write_blob_bytes(data, root.digest)
        return root

    def _holds(self, descriptor: Descriptor) -> bool:
        """Whether the manifest and every blob it needs are in the cache."""
        try:
            manifest = self.manifest(descriptor)
        except OciCacheError:
            return False
        return all(self.layout.has_blob(b.digest, b.size) for b in manifest.blobs()
                   if not _is_foreign(b))

    def _subset_of(self, root: Descriptor) -> str:
        """The registry index that ``root`` lists a part of (see ``_root_to_name``), or ""."""
        if not root.is_index or not self.layout.has_blob(root.digest):
            return ""
        try:
            index = Index.from_json(self.layout.read_blob(root.digest), what="index")
        except OciCacheError:  # verify and reachable() report it
            return ""
        return str(index.annotations.get(_ANNOTATION_SUBSET_OF, ""))

    def _arch_tag_names(self, ref: Reference, root: Descriptor, pulled: Set[Digest],
                        children: Sequence[Descriptor] = ()) -> List[Tuple[str, Descriptor]]:
        """``<name>-<arch>`` for each pulled image child of the index ``root`` (or of
        ``children``, the registry's index), with linuxkit's suffixes (``_arch_tags``).
        linuxkit's cache pull names only the children of an index, and only for a tag."""
        if not ref.tag or not root.is_index:
            return []
        if not children:
            children = Index.from_json(self.layout.read_blob(root.digest),
                                       what=f"index of {ref}").manifests
        base = Reference(ref.registry, ref.repository, ref.tag)
        return [(f"{base}-{suffix}", child.named(f"{base}-{suffix}"))
                for child, suffix in _arch_tags(children) if child.digest in pulled]

    def _images(self, root: Descriptor, architecture: str) -> List[Descriptor]:
        """The image manifests of a complete root that a pull for ``architecture`` needs,
        each with its platform (a single manifest's from its config)."""
        if not root.is_index:
            config = _load_json_object(self.layout.read_blob(self.manifest(root).config.digest),
                                       f"config of {root.name}")
            return [_replace(root, platform=Platform.from_json(config))]
        if architecture != ALL_PLATFORMS:
            return [self.resolve(root.name, p)[1] for p in _platform_list(architecture)]
        index = Index.from_json(self.layout.read_blob(root.digest), what=f"index of {root.name}")
        return [c for c in index.manifests if c.platform is not None
                and not c.is_attestation and c.media_type in IMAGE_MEDIA_TYPES]

    def _complete(self, ref: Reference, architecture: str) -> Optional[Descriptor]:
        """The name's root entry if it is complete for the platform, else None; without
        any network, and reading index.json once for one platform (it may be large)."""
        if architecture != ALL_PLATFORMS:
            return self._complete_root(ref, architecture)
        root = self.find_descriptor(ref)
        if root is None or self._subset_of(root):
            return None
        marked = self.layout.reachable([root])
        complete = not marked.missing and not marked.unreadable and \
            all(self.layout.has_blob(d) for d in marked.digests)
        return self._find_named(ref) if complete else None

    def _pull_plan(self, ref: Reference, data: bytes, root: Descriptor, architecture: str,
                   found: Callable[[Descriptor, bytes, Manifest], None] = lambda *_: None,
                   transfers: Optional[threading.Semaphore] = None
                   ) -> Tuple[List[Tuple[Descriptor, bytes, Optional[Manifest]]], List[Descriptor]]:
        """The manifests a pull needs, fetched and parsed (None for a nested index), children
        before the index that lists them, and the other blobs an index lists; no name is
        written. ``found`` is told of each child (its descriptor, bytes and manifest) as
        soon as it is parsed, while the others may still be on the way; each request
        holds one of ``transfers``."""
        if root.is_index:
            index = Index.from_json(data, what=f"index of {ref}")
            if architecture == ALL_PLATFORMS:
                return self._plan_everything(ref, index, found, transfers)
            chosen = _chosen_children(ref, index, architecture)
            plan: List[Tuple[Descriptor, bytes, Optional[Manifest]]] = []
            with self._manifest_fetcher(ref, transfers) as fetch:
                for child in chosen:
                    fetch.ahead(child)
                for child in chosen:
                    child_data = fetch.result(child)
                    manifest = Manifest.from_json(child_data,
                                                  what=f"manifest {child.digest} of {ref}")
                    found(child, child_data, manifest)
                    plan.append((child, child_data, manifest))
            return plan, []
        manifest = Manifest.from_json(data, what=f"manifest of {ref}")
        if self.layout.has_blob(manifest.config.digest, manifest.config.size) and \
                not self.layout.discard_if_corrupt(manifest.config.digest):
            config_data = self.layout.read_blob(manifest.config.digest)
        else:
            config_data = self.registry.get_blob_bytes(ref, manifest.config)
        declared = Platform.from_json(_load_json_object(config_data, f"config of {ref}"))
        probe = _replace(root, platform=declared)
        if architecture not in ("", ALL_PLATFORMS):
            for wanted in map(Platform.parse, _platform_list(architecture)):
                if select_platform([probe], wanted) is None:
                    raise PlatformNotFoundError(f"image {ref} has no {wanted}; it is {declared}")
        elif architecture == "" and select_platform([probe], Platform.host()) is None:
            _log().warning("image %s is %s, not this host's %s", ref, declared, Platform.host())
        self.layout.write_blob_bytes(config_data, manifest.config.digest)
        return [(probe, data, manifest)], []

    def _plan_everything(self, ref: Reference, index: Index,
                         found: Callable[[Descriptor, bytes, Manifest], None] = lambda *_: None,
                         transfers: Optional[threading.Semaphore] = None
                         ) -> Tuple[List[Tuple[Descriptor, bytes, Optional[Manifest]]],
                                    List[Descriptor]]:
        """Every child of an index, as linuxkit's pull writes them (ggcr's
        ``layout.WriteIndex``): images with or without a platform, attestations, nested
        indexes (descended into, to ``_MAX_INDEX_DEPTH``) and other blobs."""
        plan: List[Tuple[Descriptor, bytes, Optional[Manifest]]] = []
        loose: Dict[Digest, Descriptor] = {}
        seen: set[Digest] = set()

        def walk(listed: Index, depth: int, fetch: _ManifestFetcher) -> None:
            for child in listed.manifests:
                if child.digest not in seen and \
                        child.media_type in INDEX_MEDIA_TYPES | IMAGE_MEDIA_TYPES:
                    fetch.ahead(child)
            for child in listed.manifests:
                if child.digest in seen:
                    continue
                seen.add(child.digest)
                if child.media_type not in INDEX_MEDIA_TYPES | IMAGE_MEDIA_TYPES:
                    loose[child.digest] = child
                    continue
                data = fetch.result(child)
                what = f"{'index' if child.is_index else 'manifest'} {child.digest} of {ref}"
                if not child.is_index:
                    manifest = Manifest.from_json(data, what=what)
                    found(child, data, manifest)
                    plan.append((child, data, manifest))
                elif depth >= _MAX_INDEX_DEPTH:
                    raise OciCacheError(f"image {ref} nests indexes more than "
                                        f"{_MAX_INDEX_DEPTH} deep")
                else:
                    walk(Index.from_json(data, what=what), depth + 1, fetch)
                    plan.append((child, data, None))

        with self._manifest_fetcher(ref, transfers) as fetcher:
            walk(index, 1, fetcher)
        if not any(manifest is not None for _, _, manifest in plan):
            raise PlatformNotFoundError(f"image {ref} is an index without images")
        return plan, list(loose.values())

    @contextlib.contextmanager
    def _manifests_written(self, manifests: Sequence[Tuple[Descriptor, bytes]]
                           ) -> Iterator[None]:
        """Write each manifest's blob (a corrupt copy replaced), ``jobs`` at a time, while
        the body runs (a pull's downloads): each waits for an fsync, and an index of many
        platforms has many. Done when the body is, or the body's error is raised."""
        def write(descriptor: Descriptor, data: bytes) -> None:
            self.layout.discard_if_corrupt(descriptor.digest)
            self.layout.write_blob_bytes(data, descriptor.digest)

        yield from _run_all(self.jobs, "ocicache-write",
                            [functools.partial(write, d, data) for d, data in manifests])

    @contextlib.contextmanager
    def _manifest_fetcher(self, ref: Reference, transfers: Optional[threading.Semaphore] = None
                          ) -> Iterator[_ManifestFetcher]:
        """A ``_ManifestFetcher`` for ``ref``'s repository, as many requests at a time as
        small blobs (manifests are small: each is a round trip), each holding one of
        ``transfers`` when given."""
        fetcher = _ManifestFetcher(self.registry, ref, self.small_jobs, transfers)
        try:
            yield fetcher
        finally:
            fetcher.close()

    def _download(self, ref: Reference, blobs: Sequence[Descriptor],
                  recheck: Iterable[Digest] = ()) -> None:
        """Fetch the blobs not yet present, ``jobs`` at a time, in the order given; those
        in ``recheck`` are hashed first, and fetched again if corrupt (``_downloading``)."""
        suspect = set(recheck)
        with self._downloading(ref, suspect.__contains__) as add:
            add(blobs, {})

    @contextlib.contextmanager
    def _downloading(self, ref: Reference, suspect: Callable[[Digest], bool] = lambda d: False,
                     advance_progress: Optional[Callable[[Digest, int], None]] = None,
                     transfers: Optional[threading.Semaphore] = None
                     ) -> Iterator[Callable[[Iterable[Descriptor], Mapping[Digest, bytes]], None]]:
        """Fetch the blobs handed to the function yielded, while the body runs and until
        every one is in: a pull hands each platform's blobs over as soon as its manifest
        arrives, so that they download while the other manifests are still on the way
        (one round trip after another, and the registry idle meanwhile). Present blobs
        for which ``suspect`` is true are hashed first (on the same workers), and fetched
        again if corrupt. Each digest is fetched once, in the order given (a pull gives
        the largest first), and a lot handed over while others wait is merged into them
        by size. A blob whose bytes are handed over with it (a manifest) is written by
        the same workers (each waits for an fsync), holding no transfer. ``transfers``
        (``small_jobs`` of them by default) is shared with the manifest requests under
        way meanwhile, so that they count among the requests a pull makes at once.

        The workers are daemon threads that stop at their next piece once anything
        fails or the caller is interrupted: a Ctrl-C does not wait for the layers in
        flight (a stalled one could take minutes), and whatever was received stays in
        the partial files that the next pull resumes from. An error of the body waits
        for the requests in flight, so that no blob is written after it.
        """
        advance_progress = advance_progress or self.progress.advance
        stop = threading.Event()
        pending: "collections.deque[Descriptor]" = collections.deque()  # largest first
        seen: Set[Digest] = set()
        queued: List[Descriptor] = []  # every blob a worker was given, for a full disk
        writes: Dict[Digest, bytes] = {}  # the bytes of those to be written, not fetched
        large_count = [0]  # of the queued blobs, those of more than a piece
        guard = threading.Condition()
        closed = [False]  # no more blobs will be handed over
        errors: List[BaseException] = []
        # ``small_jobs`` bounds the blobs whose bytes arrive at once, ``jobs`` the large
        # ones among them (bandwidth, memory); not those waiting for their fsync: a
        # worker lets go of its transfer before the commit, and another worker starts
        # receiving meanwhile (with 4 workers, a pull of 100 layers of 1 MiB spent much
        # of its time with every one of them in fsync).
        receiving = transfers or threading.Semaphore(self.small_jobs)
        large = threading.Semaphore(self.jobs)
        workers: List[threading.Thread] = []

        def take(large_ones: bool) -> Optional[Descriptor]:
            """The largest blob left, holding a transfer (and for a worker of
            ``large_ones``, a large one's), else the smallest if it is small; waits while
            none is left but more may come, or no transfer it needs is free. None once no
            blob is left for it, or the pull stops."""
            while not stop.is_set():
                with guard:
                    if not pending or not large_ones and pending[-1].size > _SMALL_BLOB_SIZE:
                        if closed[0]:
                            return None
                        guard.wait(0.1)  # woken by the next blobs handed over
                        continue
                if not receiving.acquire(timeout=0.1):
                    continue
                with guard:
                    if pending and (pending[0].size <= _SMALL_BLOB_SIZE or
                                    large_ones and large.acquire(blocking=False)):
                        return pending.popleft()
                    if pending and pending[-1].size <= _SMALL_BLOB_SIZE:
                        return pending.pop()
                receiving.release()
                if pending and large_ones and large.acquire(timeout=0.1):
                    large.release()  # one is free: taken again under the guard
            return None

        def advance(digest: Digest, size: int) -> None:
            if stop.is_set():
                raise _PullStopped()
            advance_progress(digest, size)

        def work(large_ones: bool) -> None:
            while not stop.is_set():
                blob = take(large_ones)
                if blob is None:
                    return
                held = [True]

                def received() -> None:
                    if held[0]:
                        held[0] = False
                        if blob.size > _SMALL_BLOB_SIZE:
                            large.release()
                        receiving.release()

                with guard:
                    data = writes.pop(blob.digest, None)
                try:
                    if data is not None:
                        received()
                        self.layout.discard_if_corrupt(blob.digest)
                        self.layout.write_blob_bytes(data, blob.digest)
                    elif suspect(blob.digest) and self.layout.has_blob(blob.digest, blob.size) \
                            and not self.layout.discard_if_corrupt(blob.digest):
                        self.layout._touch(blob.digest)
                        advance_progress(blob.digest, blob.size)
                    else:
                        self.registry.download_blob(ref, blob, self.layout,
                                                    functools.partial(advance, blob.digest),
                                                    received)
                except _PullStopped:
                    return
                except BaseException as e:  # handed to the caller's thread below
                    errors.append(e)
                    stop.set()
                    return
                finally:
                    received()

        def add(blobs: Iterable[Descriptor], data: Mapping[Digest, bytes]) -> None:
            new = []
            for blob in blobs:
                if blob.digest in seen:
                    continue
                seen.add(blob.digest)
                if blob.digest in data:
                    new.append(blob)
                elif not suspect(blob.digest) and self.layout.has_blob(blob.digest, blob.size):
                    self.layout._touch(blob.digest)
                    advance_progress(blob.digest, blob.size)
                else:
                    new.append(blob)
            if not new:
                return
            with guard:
                queued.extend(new)
                large_count[0] += sum(1 for b in new if b.size > _SMALL_BLOB_SIZE)
                writes.update((blob.digest, data[blob.digest]) for blob in new
                              if blob.digest in data)
                if pending:  # merged by size into what is left (stable: the order given)
                    new = sorted([*pending, *new], key=lambda b: -b.size)
                    pending.clear()
                pending.extend(new)
                guard.notify_all()
            # As many workers as transfers, and ``jobs`` more while large blobs are left:
            # a large blob's fsync is long enough for another to arrive meanwhile. Large
            # ones go to 2 * jobs of them only: each thread's malloc arena keeps the
            # pieces it received (20 threads taking turns added 17 MiB to a pull's peak).
            while len(workers) < min(self.small_jobs, len(queued)) + \
                    min(self.jobs, large_count[0]):
                worker = threading.Thread(target=work, args=(len(workers) < 2 * self.jobs,),
                                          name="ocicache-pull", daemon=True)
                worker.start()
                workers.append(worker)

        def wait() -> None:
            with guard:
                closed[0] = True
                guard.notify_all()
            _join_all(workers)

        try:
            yield add
            wait()
        except Exception:
            stop.set()
            wait()  # what is in flight ends at its next piece
            raise
        except BaseException:  # Ctrl-C: a partial file is a prefix of the blob at any time
            stop.set()
            raise
        if errors:
            if isinstance(errors[0], _DiskFullError):
                # Resuming needs the space the partial files hold: on a full disk they go.
                for blob in queued:
                    self.layout.discard_partial(blob.digest)
            raise errors[0]

    def is_published(self, ref: RefLike) -> bool:
        """Whether the registry serves exactly the root this cache holds for ``ref``
        (with credentials, unlike linuxkit's anonymous check)."""
        root = self._find_named(ref)
        try:
            wanted = Reference.parse(ref)
        except InvalidReferenceError:
            # linuxkit's "<repo>@sha256:<hex>-<arch>": published if the repository serves
            # the manifest the name holds
            match = _LINUXKIT_DIGEST_ARCH_NAME.fullmatch(str(ref))
            try:
                base = Reference.parse(match.group(1) if match else "")
            except InvalidReferenceError:
                return False
            wanted = Reference(base.registry, base.repository, "", root.digest)
        try:
            remote = self.registry.manifest_digest(wanted)
            if remote is None:  # the registry does not say with HEAD: ask with GET
                _, remote = self.registry.get_manifest(wanted, what=f"look up {wanted}")
        except RegistryError as e:
            if e.status == 404 or {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"} & set(e.codes):
                return False
            raise
        return remote.digest == root.digest or str(remote.digest) == self._subset_of(root)

    def image_in_registry(self, ref: RefLike, trusted_ref: str = "",
                          architecture: str = "") -> bool:
        """Whether the registry has ``ref`` for the platform. "Not found" is False;
        every other failure (authentication, network, 5xx after retries) raises."""
        wanted_ref = Reference.parse(ref)
        try:
            # Only the digest is asked for (HEAD, outside Docker Hub's rate limit) when
            # the cache holds what it names; GET otherwise.
            head = self.registry.manifest_digest(wanted_ref)
            if head is not None and self.layout.has_blob(head.digest):
                data = self.layout.read_blob(head.digest)
                media_type = _load_json_object(data, f"manifest of {wanted_ref}").get(
                    "mediaType")
                root = _replace(head, media_type=str(media_type or head.media_type))
            else:
                data, root = self.registry.get_manifest(wanted_ref,
                                                        what=f"look up {wanted_ref}")
        except RegistryError as e:
            if e.status == 404 or {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"} & set(e.codes):
                return False
            raise
        wanted = [Platform.parse(p) for p in _platform_list(architecture)]  # each of a list
        if root.is_index:
            children = Index.from_json(data).manifests
            return all(select_platform(children, w) is not None for w in wanted)
        manifest = Manifest.from_json(data)
        config_data = self.layout.read_blob(manifest.config.digest) \
            if self.layout.has_blob(manifest.config.digest) else \
            self.registry.get_blob_bytes(wanted_ref, manifest.config)
        config = _load_json_object(config_data, f"config of {wanted_ref}")
        probe = _replace(root, platform=Platform.from_json(config))
        return all(select_platform([probe], w) is not None for w in wanted)

    def remote_digest(self, ref: RefLike, architecture: str = "") -> Descriptor:
        """What ``ref`` names in its registry now (``RegistryClient.digest``: a HEAD).
        With ``architecture``, the image of that platform: the index's child for it
        (one GET of the index, by the digest the HEAD gave), or the single manifest
        itself when its config declares that platform; else PlatformNotFoundError
        naming what there is. The cache is neither read nor written."""
        wanted_ref = Reference.parse(ref)
        wanted = Platform.parse(architecture) if architecture else None
        root = self.registry.digest(wanted_ref)
        if wanted is None:
            return root
        pinned = Reference(wanted_ref.registry, wanted_ref.repository, wanted_ref.tag,
                           root.digest)
        data, root = self.registry.get_manifest(pinned, what=f"look up {wanted_ref}")
        if root.is_index:
            return _select_child(wanted_ref, Index.from_json(data), architecture)
        manifest = Manifest.from_json(data, what=f"manifest of {wanted_ref}")
        config = _load_json_object(self.registry.get_blob_bytes(pinned, manifest.config),
                                   f"config of {wanted_ref}")
        declared = _replace(root, platform=Platform.from_json(config))
        if select_platform([declared], wanted) is None:
            raise PlatformNotFoundError(
                f"image {wanted_ref} has no {wanted}; it is {declared.platform}")
        return declared

    def referrers(self, ref: RefLike, artifact_type: str = "", architecture: str = ""
                  ) -> "ReferrerList":
        """What refers to ``ref`` in its registry (``RegistryClient.referrers``: the
        referrers API, else the fallback tag): of the manifest or index the name
        resolves to, or with ``architecture`` of that platform's image (an index's
        child). Only referrers of ``artifact_type`` when it is given. The cache is
        neither read nor written."""
        wanted = Reference.parse(ref)
        subject = self.remote_digest(wanted, architecture)
        pinned = Reference(wanted.registry, wanted.repository, "", subject.digest)
        listed, source = self.registry.referrers(pinned, artifact_type)
        return ReferrerList(pinned, subject, tuple(listed), source)

    def push(self, name: RefLike, remote_name: RefLike = "", with_manifest: bool = False,
             override: bool = False) -> None:
        """Push a cached image or index to a registry, as linuxkit's cache push does.

        Without ``override`` an existing remote tag is left alone. With it, the same
        digest is skipped, a remote index is merged (local first), and a remote single
        manifest is replaced. Blobs already there cost one HEAD; blobs in another
        repository of the same registry are mounted; manifests go up children first
        and the tag last, so a failed push never moves the tag.
        ``with_manifest`` also tags each platform ``<remote>-<arch>``.
        """
        local = Reference.parse(name)
        remote = Reference.parse(remote_name) if remote_name else local
        root = self._find_named(local)
        endpoint = self.registry.endpoint(remote, use_mirrors=False)
        tag = remote.tag or str(remote.digest)
        # A list of referrers (pull --referrers names them so) is added to, never replaced;
        # an index tagged after its own digest is a mirror's (regclient's) image.
        listing = root.is_index and remote.digest is None and is_referrers_tag(remote.tag) \
            and remote.tag != referrers_tag(root.digest)
        override = override or listing
        # Whether the tag exists; a 403 here (Artifactory's answer for a missing tag)
        # is taken as "absent", and the upload's own answer decides.
        existing = self.registry.remote_manifest(endpoint, tag, "pull,push",
                                                 denied_is_absent=True)
        if existing is not None and existing[1].digest == root.digest:
            _log().info("%s is already in the registry", remote)
            self._list_referrer(endpoint, remote, existing[0], existing[1].media_type, None)
            return
        if existing is not None and not override:
            _log().info("%s exists in the registry; not pushing (push --override replaces "
                        "or merges it)", remote)
            return
        data = self.layout.read_blob(root.digest)
        children: List[Descriptor] = []
        if root.is_index:
            index = Index.from_json(data, what=f"index of {local}")
            if index.annotations.get(_ANNOTATION_SUBSET_OF):
                held = ", ".join(str(c.platform) for c in index.manifests
                                 if c.platform is not None and not c.is_attestation)
                raise NotFoundError(f"cannot push {local}: the cache holds only {held} of "
                                    f"{index.annotations[_ANNOTATION_SUBSET_OF]}; pull it with "
                                    "--all-platforms first")
            if listing:  # only what refers to the image the tag names goes up
                mine = tuple(e for e, _, _ in self._held_referrers(local, remote.tag))
                if index.manifests and not mine:
                    raise OciCacheError(
                        f"cannot push {local} as {remote}: a tag {remote.tag} lists the "
                        f"referrers of {remote.tag.replace('-', ':', 1)}, and {local} holds "
                        "none of them")
                index = _replace(index, manifests=mine)
                data = index.to_bytes()
            children = list(index.manifests)
            if existing is not None and listing:
                what = f"{endpoint.host}'s fallback tag {endpoint.repository}:{tag}"
                parse_referrers(existing[0], what)  # else says what it is, and is left alone
                there = Index.from_json(existing[0], what=what)
                merged = _replace(there, manifests=(*there.manifests, *(
                    c for c in index.manifests
                    if c.digest not in {d.digest for d in there.manifests})))
                if len(merged.manifests) > MAX_REFERRERS:  # which no reader would take
                    raise OciCacheError(f"cannot push {local}: {what} would list "
                                        f"{len(merged.manifests)} referrers, more than "
                                        f"{MAX_REFERRERS}")
            elif existing is not None and existing[1].is_index:
                merged = merge_remote_index(index, Index.from_json(existing[0]))
            else:
                merged = without_dangling_attestations(index)
            if merged != index:
                data = merged.to_bytes()
            if listing:
                _bounded_referrers(data, f"the referrers list {remote}")
            remote_children = {c.digest for c in Index.from_json(existing[0]).manifests} \
                if existing is not None and (existing[1].is_index or listing) else set()
            to_push = [c for c in merged.manifests if c.digest not in remote_children]
        else:
            to_push = [root]
        self._push_manifests(local, endpoint, to_push)
        media_type = str(_load_json_object(data, f"index of {local}").get("mediaType") or
                         root.media_type)  # the body's own type: root entries may differ
        headers = self.registry.put_manifest(endpoint, tag, data, media_type)
        _log().info("pushed %s as %s", local, remote)
        self._list_referrer(endpoint, remote, data, media_type, headers)
        if with_manifest and root.is_index and remote.tag:
            for child, suffix in _arch_tags(children):
                if self.layout.has_blob(child.digest):
                    if child.platform is not None and suffix != child.platform.architecture:
                        _log().info("%s: tagging %s as %s-%s, since another platform has "
                                    "%s-%s", remote, child.platform, remote.tag, suffix,
                                    remote.tag, child.platform.architecture)
                    self.registry.put_manifest(endpoint, f"{remote.tag}-{suffix}",
                                               self.layout.read_blob(child.digest),
                                               self.layout.believed(child).media_type)

    def _list_referrer(self, endpoint: _Endpoint, remote: Reference, data: bytes,
                       media_type: str, headers: Optional[_Headers]) -> None:
        """After a manifest with a ``subject`` went up: list it in the subject's fallback
        tag, unless the registry keeps referrers itself, which it says with the
        ``OCI-Subject`` header of the PUT (``headers``; None when nothing was put, and
        the referrers API is asked instead)."""
        descriptor, subject = referrer_descriptor(data, media_type, f"manifest of {remote}")
        if subject is None:
            return
        if headers is not None and _lists_subject(headers, subject.digest):
            return
        if headers is None:
            _, source = self.registry.referrers(
                Reference(remote.registry, remote.repository, "", subject.digest))
            if source == "api":
                return
        if self.registry.add_referrer(endpoint, subject.digest, descriptor):
            _log().info("listed %s in %s:%s, the referrers of %s (the registry has no "
                        "referrers API)", descriptor.digest, remote.name,
                        referrers_tag(subject.digest), subject.digest)

    def _push_manifests(self, local: Reference, endpoint: _Endpoint,
                        manifests: Sequence[Descriptor]) -> None:
        """Upload the blobs of each manifest, then the manifests by digest."""
        parsed = []
        for descriptor in map(self.layout.believed, manifests):  # sent as what they are
            if not self.layout.has_blob(descriptor.digest):
                raise NotFoundError(
                    f"cannot push {local}: {descriptor.platform or 'a child'} "
                    f"({descriptor.digest}) is not in the cache; pull it with --all-platforms")
            parsed.append((descriptor, self.manifest(descriptor)))
        blobs: Dict[Digest, Descriptor] = {}
        for _, manifest in parsed:
            for blob in manifest.blobs():
                if _is_foreign(blob):  # non-distributable: clients fetch it from its urls
                    _log().warning("not uploading foreign layer %s of %s (non-distributable; "
                                   "its urls: %s)", blob.digest, local,
                                   ", ".join(blob.urls) or "none")
                    continue
                if not self.layout.has_blob(blob.digest, blob.size):
                    raise NotFoundError(f"cannot push {local}: blob {blob.digest} is not "
                                        "complete in the cache; pull the image again")
                blobs.setdefault(blob.digest, blob)
        sources = [local.repository] if local.registry == endpoint.registry and \
            local.repository != endpoint.repository else []
        ordered = sorted(blobs.values(), key=lambda b: -b.size)
        self._recall_locations()
        try:
            _each_on_threads(self.jobs, "ocicache-push", [
                functools.partial(self.registry.upload_blob, endpoint, blob, self.layout,
                                  sources) for blob in ordered])
        except Exception:
            self._save_locations()  # not after a signal: see _copy_to_registry
            raise
        self._save_locations()
        for descriptor, _ in parsed:
            self.registry.put_manifest(endpoint, str(descriptor.digest),
                                       self.layout.read_blob(descriptor.digest),
                                       descriptor.media_type)

    # -- copy -------------------------------------------------------------------------

    def copy(self, source: str, destination: str, architecture: str = "",
             all_tags: bool = False, referrers: bool = False) -> List[Tuple[str, Descriptor]]:
        """Copy an image from ``source`` to ``destination``, as ``skopeo copy`` does;
        returns each destination name with the root it now holds.

        Sources: a registry name (``docker://`` optional), ``cache:NAME`` or
        ``oci:DIR[:NAME]`` (an OCI layout's image of that ``ref.name``, its only image
        without one; read as untrusted, ``_layout_plan``) or ``oci-archive:FILE[:NAME]``
        (``_archive_plan``).
        Destinations: a registry name, ``oci:DIR[:TAG]`` (an OCI layout directory: a
        new one, or one to add the image to, keeping its other images; its index.json is
        replaced in one rename) or ``oci-archive:FILE[:TAG]``. ``architecture`` "" or
        ``"all"`` copies every platform and keeps the digest; a platform or comma list writes an index of just
        those platforms and their attestations. ``all_tags`` copies every tag of the
        source repository. Blobs go through the cache's disk (resumable, never whole in
        memory), are mounted from the source repository within one registry, ``jobs``
        at a time; tags are written after everything else, so a failed copy leaves none.
        ``referrers`` also copies what refers to each image and platform copied
        (``_copy_referrers``).
        """
        kind = next((k for k in ("oci", "oci-archive") if source.startswith(f"{k}:")), "")
        if kind:  # NAME is any name the layout gives, a tag or more
            src_kind, (src, _, src_name) = kind, source[len(kind) + 1:].partition(":")
            if not src:
                raise OciCacheError(f"{source!r}: name a path, as in {kind}:PATH[:NAME]")
        else:
            src_kind, src, _ = parse_copy_location(source)
        dst_kind, dst, dst_tag = parse_copy_location(destination)
        if src_kind not in ("registry", "cache", "oci", "oci-archive"):
            raise OciCacheError(f"copy from {source}: a source is a registry name, "
                                "cache:NAME, oci:DIR[:NAME] or oci-archive:FILE[:NAME]")
        if dst_kind == "cache":
            raise OciCacheError(f"copy to {destination}: use 'pull' to copy into the cache")
        if architecture not in ("", ALL_PLATFORMS):
            _platform_list(architecture)  # a bad list fails before any request
        if kind and (all_tags or referrers):
            raise OciCacheError(f"copy from {source}: --all-tags and --referrers copy from "
                                "a registry or the cache, not from a layout")
        if dst_kind in ("oci", "oci-archive") and kind:
            self._layout_outside_cache(dst, dst_kind == "oci-archive")
        if kind:
            with self.layout.adding_blobs():  # staged here, hashed, until copied on
                plan = self._layout_plan(src, src_name, architecture) if kind == "oci" else \
                    self._archive_plan(src, src_name, architecture)
                return self._copy([plan.source], src_kind, dst_kind, dst, dst_tag,
                                  architecture, False, plans=[plan])
        sources = [Reference.parse(src)]
        if all_tags:
            if src_kind != "registry" or sources[0].digest is not None:
                raise OciCacheError(f"copy --all-tags needs a registry repository, not {source}")
            if dst_kind == "registry" and (dst_tag or Reference.parse(dst).digest is not None):
                raise OciCacheError(f"copy --all-tags writes each tag: name the destination "
                                    f"repository without a tag, not {destination}")
            if dst_kind != "registry" and dst_tag:
                raise OciCacheError(f"copy --all-tags names each image by its tag: leave "
                                    f":{dst_tag} out of {destination}")
            base = sources[0]
            sources = [Reference(base.registry, base.repository, tag)
                       for tag in self.registry.list_tags(base)]
            if not sources:
                raise NotFoundError(f"{base.name} has no tags")
        if dst_kind in ("oci", "oci-archive"):
            self._layout_outside_cache(dst, dst_kind == "oci-archive")  # before any request
        with self.layout.adding_blobs():  # what is staged here is not gc's until copied
            return self._copy(sources, src_kind, dst_kind, dst, dst_tag, architecture,
                              all_tags, referrers)

    def _copy(self, sources: Sequence[Reference], src_kind: str, dst_kind: str, dst: str,
              dst_tag: str, architecture: str, all_tags: bool, referrers: bool = False,
              plans: Sequence["_CopyPlan"] = ()) -> List[Tuple[str, Descriptor]]:
        """Copy ``sources`` (of ``src_kind``) to ``dst``; ``plans`` are the sources' plans
        when they are made already (a layout's, staged in the cache)."""
        items: List[Tuple[Reference, str, _CopyPlan]] = []
        for number, ref in enumerate(sources):
            if dst_kind == "registry":
                target = Reference.parse(dst) if not all_tags else Reference(
                    Reference.parse(dst).registry, Reference.parse(dst).repository, ref.tag)
                name = str(target)
            else:
                name = dst_tag or ref.tag or "latest"
            plan = plans[number] if plans else self._cache_plan(ref, architecture) \
                if src_kind == "cache" else self._registry_plan(ref, architecture)
            items.append((ref, name, plan))
        extra = self._referrer_items(items, src_kind, dst_kind) if referrers else []
        if dst_kind == "registry":
            self._copy_to_registry(items, src_kind == "registry")
            self._copy_referrers(extra, src_kind == "registry")
        else:
            self._copy_to_layout([*items, *extra], src_kind == "registry", dst,
                                 dst_kind == "oci-archive", {name for _, name, _ in extra})
        return [(name, plan.root) for _, name, plan in items]

    def _referrer_items(self, items: Sequence[Tuple[Reference, str, "_CopyPlan"]],
                        src_kind: str, dst_kind: str
                        ) -> List[Tuple[Reference, str, "_CopyPlan"]]:
        """What ``copy --referrers`` adds: for each image copied, the referrers of its
        root and of each platform's manifest, a plan per subject whose root is the index
        of them (the fallback tag's form), named ``sha256-<hex>`` in a layout and in
        DST's repository. From a registry they are listed and fetched there
        (``_referrers_plan``); from the cache, they are what ``pull --referrers`` named
        ``<repository>:sha256-<hex>``."""
        extra = []
        for ref, name, plan in items:
            target = Reference.parse(name) if dst_kind == "registry" else None
            subjects = [plan.root.digest, *(d.digest for d, _ in plan.manifests)]
            for subject in dict.fromkeys(subjects):
                tag = referrers_tag(subject)
                if src_kind == "registry":
                    found = self._referrers_plan(ref, subject)
                else:
                    found = self._held_plan(Reference(ref.registry, ref.repository, tag))
                if found is not None:
                    extra.append((found.source, tag if target is None else
                                  str(Reference(target.registry, target.repository, tag)), found))
        return extra

    def _held_plan(self, name: Reference) -> Optional["_CopyPlan"]:
        """What copy --referrers takes from the cache's referrers name ``name``: a plan
        whose root is an index of the referrers it holds of the image its tag names
        (``_held_referrers``), each complete; None when there are none."""
        held = self._held_referrers(name)
        for entry, _, _ in held:
            if not self._holds(entry):
                raise NotFoundError(f"cannot copy {name}: referrer {entry.digest} is not "
                                    "complete in the cache; pull it again")
        if not held:
            return None
        data = Index(MEDIA_OCI_INDEX, tuple(e for e, _, _ in held)).to_bytes()
        return _CopyPlan(name, Descriptor(MEDIA_OCI_INDEX, Digest.from_bytes(data), len(data)),
                         data, tuple((e, d) for e, d, _ in held), _copied_blobs(held, []))

    def _copy_referrers(self, items: Sequence[Tuple[Reference, str, "_CopyPlan"]],
                        from_registry: bool) -> None:
        """Referrers into a registry, after the images they refer to: blobs, then each
        referrer by digest, listed in its subject's fallback tag (read, added to, put
        back) unless the PUT's ``OCI-Subject`` says the registry lists it itself."""
        for ref, name, plan in items:
            target = Reference.parse(name)
            endpoint = self.registry.endpoint(target, use_mirrors=False)
            mounts = [ref.repository] if ref.registry == target.registry and \
                ref.repository != target.repository else []
            for blob in plan.blobs:
                self._copy_blob(ref if from_registry else None, endpoint, blob, mounts)
            for descriptor, data in plan.manifests:
                headers = self.registry.put_manifest(endpoint, str(descriptor.digest), data,
                                                     descriptor.media_type)
                referrer, subject = referrer_descriptor(data, descriptor.media_type)
                if subject is not None and not _lists_subject(headers, subject.digest):
                    self.registry.add_referrer(endpoint, subject.digest, referrer)
            _log().info("copied %d referrers of %s to %s", len(plan.manifests), ref, target.name)

    def _filtered(self, ref: Reference, data: bytes, root: Descriptor, architecture: str
                  ) -> Tuple[bytes, Descriptor, List[Descriptor]]:
        """The index a copy of ``architecture`` writes, and the children it keeps: the
        index as it is (same digest) for every platform or when the list keeps every
        child, else an index of the chosen children and their attestations."""
        index = Index.from_json(data, what=f"index of {ref}")
        if architecture in ("", ALL_PLATFORMS):
            return data, root, list(index.manifests)
        chosen = _chosen_children(ref, index, architecture)
        if len(chosen) == len(index.manifests) and \
                _ANNOTATION_SUBSET_OF not in index.annotations:  # the cache's own part
            return data, root, chosen
        annotations = {k: v for k, v in index.annotations.items() if k != _ANNOTATION_SUBSET_OF}
        part = _replace(index, manifests=tuple(chosen), annotations=annotations).to_bytes()
        return part, Descriptor(root.media_type, Digest.from_bytes(part), len(part)), chosen

    def _registry_plan(self, ref: Reference, architecture: str) -> "_CopyPlan":
        """What a copy of ``ref`` from its registry writes; manifests fetched, no blob."""
        data, root = self.registry.get_manifest(ref, what=f"copy {ref}")
        if not root.is_index:
            manifests, loose = self._pull_plan(ref, data, root, architecture or ALL_PLATFORMS)
            return _CopyPlan(ref, root, data, (), _copied_blobs(manifests, loose))
        if architecture in ("", ALL_PLATFORMS):
            manifests, loose = self._plan_everything(ref, Index.from_json(
                data, what=f"index of {ref}"))
        else:
            manifests, loose = self._pull_plan(ref, data, root, architecture)
        data, root, _ = self._filtered(ref, data, root, architecture)
        return _CopyPlan(ref, root, data, tuple((d, m) for d, m, _ in manifests),
                         _copied_blobs(manifests, loose))

    def _cache_plan(self, ref: Reference, architecture: str) -> "_CopyPlan":
        """What a copy of the cache's ``ref`` writes; every blob must be in the cache."""
        return self._held_root_plan(ref, self._find_named(ref), architecture)

    def _held_root_plan(self, ref: Reference, root: Descriptor, architecture: str
                        ) -> "_CopyPlan":
        """What a copy of ``root`` (the image ``ref``, in the cache) writes."""
        data = self.layout.read_blob(root.digest)
        root = Descriptor(root.media_type, root.digest, root.size)
        if not root.is_index:
            if architecture not in ("", ALL_PLATFORMS):
                for platform in _platform_list(architecture):
                    self._check_platform(root.named(str(ref)), Platform.parse(platform))
            if not self._holds(root):
                raise NotFoundError(f"cannot copy {ref}: it is not complete in the cache; "
                                    "pull it again")
            plan = [(root, data, self.manifest(root))]
            return _CopyPlan(ref, root, data, (), _copied_blobs(plan, []))
        index = Index.from_json(data, what=f"index of {ref}")
        if architecture in ("", ALL_PLATFORMS) and index.annotations.get(_ANNOTATION_SUBSET_OF):
            held = ", ".join(str(c.platform) for c in index.manifests
                             if c.platform is not None and not c.is_attestation)
            raise NotFoundError(f"cannot copy all of {ref}: the cache holds only {held}; "
                                "copy with --platform, or pull it with --all-platforms first")
        try:
            data, root, chosen = self._filtered(ref, data, root, architecture)
        except PlatformNotFoundError as e:
            if not index.annotations.get(_ANNOTATION_SUBSET_OF):
                raise
            held = ", ".join(str(c.platform) for c in index.manifests
                             if c.platform is not None and not c.is_attestation)
            raise PlatformNotFoundError(f"image {ref}: the cache holds only {held} of it; "
                                        f"pull it with --platform {architecture}") from e
        children: List[Tuple[Descriptor, bytes, Optional[Manifest]]] = []
        for child in map(self.layout.believed, chosen):
            if child.media_type not in IMAGE_MEDIA_TYPES or not self._holds(child):
                raise NotFoundError(f"cannot copy {ref}: {child.platform or 'a child'} "
                                    f"({child.digest}) is not complete in the cache; pull "
                                    "it first")
            children.append((child, self.layout.read_blob(child.digest), self.manifest(child)))
        return _CopyPlan(ref, root, data, tuple((d, m) for d, m, _ in children),
                         _copied_blobs(children, []))

    def _layout_plan(self, path: str, name: str, architecture: str) -> "_CopyPlan":
        """What a copy of the image ``name`` of the OCI layout directory ``path`` (its
        only image when ``name`` is "") writes. The layout is another's, carried across
        an air gap: its index.json is bounded, nothing in it is reached through a link,
        and every document and blob the copy needs goes into the cache hashed as it is
        read (``write_blob``), so what is copied on is what the index's digests say.
        The copy then goes as a copy from the cache does."""
        target = os.path.abspath(path)
        where = f"the layout {path}"
        try:
            directory = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise OciCacheError(f"cannot copy from {where}: {e.strerror or e}") from None
        with contextlib.ExitStack() as stack:
            stack.callback(os.close, directory)
            entry = _layout_entry(_read_layout_index(target, directory), name, where,
                                  f"oci:{path}")
            ref = _layout_source_reference(entry, name)
            label = entry.annotations.get(ANNOTATION_REF_NAME) or str(entry.digest)
            folders: Dict[str, int] = {}

            def stage(blob: Descriptor, document: bool) -> None:
                """``blob`` from the layout into the cache, hashed; a document at most
                ``MAX_MANIFEST_SIZE`` bytes, as every reader takes it."""
                if document and blob.size > MAX_MANIFEST_SIZE:
                    raise OciCacheError(f"cannot copy {label!r} from {where}: {blob.digest} is "
                                        f"{blob.size} bytes, more than a manifest may be")
                if self.layout.has_blob(blob.digest, blob.size):
                    return
                path_in = os.path.join(target, _blob_name(blob.digest))
                try:
                    if not folders:
                        folders[""] = _open_directory("blobs", directory,
                                                      os.path.join(target, "blobs"))
                        stack.callback(os.close, folders[""])
                    if blob.digest.algorithm not in folders:
                        folders[blob.digest.algorithm] = _open_directory(
                            blob.digest.algorithm, folders[""],
                            os.path.join(target, "blobs", blob.digest.algorithm))
                        stack.callback(os.close, folders[blob.digest.algorithm])
                    fd = _open_regular(blob.digest.hex, os.O_RDONLY,
                                       folders[blob.digest.algorithm], path_in)
                    with os.fdopen(fd, "rb") as f:
                        self.layout.write_blob(f, blob.digest, blob.size)
                except FileNotFoundError:
                    raise NotFoundError(f"cannot copy {label!r} from {where}: it lacks "
                                        f"{blob.digest}") from None
                except OciCacheError as e:
                    raise type(e)(f"cannot copy {label!r} from {where}: "
                                  f"{str(e).replace('its cache', 'a layout')}") from None

            root = Descriptor(entry.media_type, entry.digest, entry.size)
            stage(root, True)
            root = self.layout.believed(root)
            if root.is_index:
                data = self.layout.read_blob(root.digest)
                _, _, chosen = self._filtered(ref, data, root, architecture)
                for child in chosen:
                    stage(child, True)
                images = [c for c in map(self.layout.believed, chosen)
                          if c.media_type in IMAGE_MEDIA_TYPES]
            else:
                images = [root]
            for image in images:
                for blob in self.manifest(image).blobs():
                    if not _is_foreign(blob):
                        stage(blob, False)
        return self._held_root_plan(ref, root, architecture)

    def _archive_plan(self, path: str, name: str, architecture: str) -> "_CopyPlan":
        """What a copy of the image ``name`` of the OCI archive ``path`` writes (its only
        image when ``name`` is ""): the archive read once as ``import`` reads one (every
        blob hashed into the cache, links and odd members refused, bounded), then copied
        on as from the cache."""
        where = f"the archive {path}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise OciCacheError(f"cannot copy from {where}: {e.strerror or e}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OciCacheError(f"cannot copy from {where}: it is not a regular file")
            os.set_blocking(f.fileno(), True)
            contents = _read_archive(f, self.layout)
        if "index.json" not in contents.metadata:
            raise InvalidArchiveError(f"{where} is not an OCI archive: it has no index.json")
        try:
            index = Index.from_json(contents.metadata["index.json"], what=f"{where}'s index.json")
        except OciCacheError as e:
            raise InvalidArchiveError(str(e)) from None
        entry = _layout_entry(index, name, where, f"oci-archive:{path}")
        _check_archive_roots([entry], contents, self.layout)
        root = self.layout.believed(Descriptor(entry.media_type, entry.digest, entry.size))
        return self._held_root_plan(_layout_source_reference(entry, name), root, architecture)

    def _copy_to_registry(self, items: Sequence[Tuple[Reference, str, "_CopyPlan"]],
                          from_registry: bool) -> None:
        """Blobs of every image first, then manifests by digest, then the tags."""
        work = []
        for ref, name, plan in items:
            target = Reference.parse(name)
            if target.digest is not None and target.digest != plan.root.digest:
                raise OciCacheError(f"copy {ref} to {name}: the copy is {plan.root.digest}")
            endpoint = self.registry.endpoint(target, use_mirrors=False)
            mounts = [ref.repository] if ref.registry == target.registry and \
                ref.repository != target.repository else []
            work += [(ref if from_registry else None, endpoint, blob, mounts)
                     for blob in plan.blobs]
        work.sort(key=lambda w: -w[2].size)
        self.progress.begin(f"copy {items[0][0]}" if len(items) == 1 else
                            f"copy {len(items)} images", list({w[2].digest: w[2]
                                                               for w in work}.values()))
        self._recall_locations()
        try:  # after a failure, the blobs not started are not sent
            _each_on_threads(self.jobs, "ocicache-copy",
                             [functools.partial(self._copy_blob, *w) for w in work])
        except Exception:
            # What a failed run learnt helps the next; not after a signal (SIGTERM, Ctrl-C):
            # the save waits for the cache's lock, which another process may hold for
            # minutes, and what is learnt is only a hint.
            self._save_locations()
            raise
        self._save_locations()
        for ref, name, plan in items:
            target = Reference.parse(name)
            endpoint = self.registry.endpoint(target, use_mirrors=False)
            for descriptor, data in plan.manifests:
                self.registry.put_manifest(endpoint, str(descriptor.digest), data,
                                           descriptor.media_type)
            self.registry.put_manifest(endpoint, str(plan.root.digest), plan.data,
                                       plan.root.media_type)
        for ref, name, plan in items:  # last: a copy that failed before this leaves no tag
            target = Reference.parse(name)
            if target.tag and target.digest is None:
                self.registry.put_manifest(self.registry.endpoint(target, use_mirrors=False),
                                           target.tag, plan.data, plan.root.media_type)
            self.progress.copied(name, plan.root)

    def _copy_blob(self, source: Optional[Reference], endpoint: _Endpoint, blob: Descriptor,
                   mounts: Sequence[str]) -> None:
        """Make ``blob`` present at ``endpoint``: one already there or mountable from
        ``mounts`` is not downloaded; the rest go through the cache (``download_blob``
        resumes) and up with ``upload_blob``."""
        if not self.layout.has_blob(blob.digest, blob.size):
            if source is None:
                raise NotFoundError(f"blob {blob.digest} is not in the cache {self.root}")
            if self._at_destination(endpoint, blob, mounts):
                self.progress.advance(blob.digest, blob.size)
                return
            self.registry.download_blob(source, blob, self.layout,
                                        functools.partial(self.progress.advance, blob.digest))
            self.registry.upload_blob(endpoint, blob, self.layout, mounts)
            return
        self.registry.upload_blob(endpoint, blob, self.layout, mounts)
        self.progress.advance(blob.digest, blob.size)

    def _at_destination(self, endpoint: _Endpoint, blob: Descriptor,
                        mounts: Sequence[str]) -> bool:
        """Whether ``blob`` is in the destination repository now, or was just mounted
        there: the checks ``upload_blob`` makes, before a download it would need."""
        what = f"copy blob {blob.digest} to {endpoint.host}/{endpoint.repository}"
        response = self.registry.request(endpoint, "HEAD", f"blobs/{blob.digest}",
                                         "pull,push", ok=(200, 404), what=what)
        response.close()
        if response.status == 200:
            return True
        with self.registry._guard:  # and where this or an earlier run saw it
            seen = self.registry._locations.get((endpoint.host, blob.digest), [])
        for source in [s for s in dict.fromkeys([*mounts, *seen]) if s != endpoint.repository]:
            response = self.registry.request(
                endpoint, "POST", f"blobs/uploads/?mount={blob.digest}&from={source}",
                "pull,push", ok=(201, 202), what=what,
                extra_scopes=[f"repository:{source}:pull"])
            response.close()
            if response.status == 201:
                self.registry._remember(endpoint, blob.digest)
                return True
            if response.headers.get("Location"):  # an upload opened instead: not used
                self.registry._cancel(endpoint, response)
        return False

    def _copy_to_layout(self, items: Sequence[Tuple[Reference, str, "_CopyPlan"]],
                        from_registry: bool, path: str, archive: bool,
                        referrers: Optional[Set[str]] = None) -> None:
        """A new OCI layout directory or archive at ``path``, written under a temporary
        name and renamed when complete; each root named by its tag (``ref.name``, as
        skopeo's ``oci:DIR:TAG`` reads it) and its full name (containerd's). The names
        in ``referrers`` are referrers indexes, merged with an existing layout's."""
        blobs: Dict[Digest, Descriptor] = {}
        for _, _, plan in items:
            for blob in plan.blobs:
                blobs.setdefault(blob.digest, blob)
        if from_registry:
            for ref, _, plan in items:
                self.progress.begin(f"copy {ref}", plan.blobs)
                self._download(ref, plan.blobs)
            self._save_locations()
        else:  # the cache's blobs: nothing to fetch, but the timing starts here
            self.progress.begin(f"copy {items[0][0]}", list(blobs.values()))
        documents: Dict[Digest, bytes] = {}
        for _, _, plan in items:
            documents.update((d.digest, data) for d, data in plan.manifests)
            documents[plan.root.digest] = plan.data
        # A name with a slash is a whole reference already (sync names each image of
        # many repositories so); a tag is the source repository's.
        entries = tuple(_replace(plan.root, annotations={
            ANNOTATION_REF_NAME: name,
            ANNOTATION_CONTAINERD_NAME: name if "/" in name else
            str(Reference(ref.registry, ref.repository, name))})
            for ref, name, plan in items)
        target = self._layout_outside_cache(path, archive)
        if not archive and os.path.isdir(target):
            _add_to_layout(target, self.layout, blobs.values(), documents, entries, referrers)
        else:
            self._write_new_layout(target, archive, blobs, documents, entries)
        for _, name, plan in items:
            self.progress.copied(f"{'oci-archive' if archive else 'oci'}:{path}:{name}",
                                 plan.root)

    def _write_new_layout(self, target: str, archive: bool, blobs: Mapping[Digest, Descriptor],
                          documents: Mapping[Digest, bytes], entries: Sequence[Descriptor]
                          ) -> None:
        """A new layout directory or archive at ``target``, under a temporary name until
        it is complete; a directory is filled as an existing one is added to (through
        its descriptors: a link planted in it meanwhile is never followed)."""
        parent, base = os.path.split(target)
        temp = os.path.join(parent, _temporary_name(f".{base}"))  # the umask's mode, as export
        if archive:
            fd = os.open(temp, _NEW_FILE | os.O_CLOEXEC, _CREATE_MODE)
        else:
            os.mkdir(temp)
        try:
            if archive:
                with os.fdopen(fd, "wb") as out:
                    tar = _TarWriter(out)
                    tar.add_bytes("oci-layout", _OCI_LAYOUT_BYTES)
                    tar.add_directory("blobs")
                    for algorithm in sorted({d.algorithm for d in [*blobs, *documents]}):
                        tar.add_directory(f"blobs/{algorithm}")
                    checks = _BlobChecks(self.layout)
                    for blob in blobs.values():
                        tar.add_blob(self.layout, blob, _blob_name(blob.digest), checks)
                    for digest, data in documents.items():
                        tar.add_bytes(_blob_name(digest), data)
                    tar.add_bytes("index.json", Index(MEDIA_OCI_INDEX, tuple(entries)).to_bytes())
                    tar.close()
                    checks.save()
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temp, target)
            else:
                _add_to_layout(temp, self.layout, blobs.values(), documents, entries)
                os.rename(temp, target)
        except BaseException:
            if archive:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            else:
                import shutil
                shutil.rmtree(temp, ignore_errors=True)
            raise

    def _layout_outside_cache(self, path: str, archive: bool) -> str:
        """``_layout_target``, refusing the cache's own directory and anything in it: its
        index.json is the cache's, written under its lock, and gc owns the rest."""
        target = _layout_target(path, archive)
        _refuse_in_cache(path, self.root, "to add an image to the cache, pull it")
        return target

    def _platform_subset(self, ref: Reference, architecture: str
                         ) -> Tuple[Descriptor, List[Descriptor], Dict[Digest, bytes]]:
        """For an OCI tar of a platform list: its root, the blobs from the cache, and the
        documents made here (the filtered index)."""
        plan = self._cache_plan(ref, architecture)
        documents = {plan.root.digest: plan.data}
        listed = [d for d, _ in plan.manifests if d.digest != plan.root.digest]
        return plan.root, [*plan.blobs, *listed], documents

    def _read_locations(self) -> Dict[Tuple[str, Digest], List[str]]:
        """The blob locations earlier runs saved; none when the file is absent or bad (a
        hint never stops a pull or push)."""
        path = os.path.join(self.root, _LOCATIONS_FILE)
        try:
            with self.layout._root_directory() as directory:
                fd = _open_regular(_LOCATIONS_FILE, os.O_RDONLY, directory, path)
            with os.fdopen(fd, "rb") as f:
                data = f.read(_MAX_LOCATIONS * 512 + 1)
        except FileNotFoundError:
            return {}
        except (OSError, OciCacheError) as e:
            _log().debug("not reading the blob locations in %s: %s", path, e)
            return {}
        return _parse_locations(data) if len(data) <= _MAX_LOCATIONS * 512 else {}

    def _recall_locations(self) -> None:
        """Give the registry client, once, the places earlier runs saw blobs in, so that
        an upload mounts from them (``upload_blob`` tries them after ``mount_from``)."""
        if self._saved_locations is not None:
            return
        self._saved_locations = self._read_locations()
        with self.registry._guard:
            for key, repositories in self._saved_locations.items():
                current = self.registry._locations.setdefault(key, [])
                current[:0] = [r for r in repositories if r not in current]

    def _save_locations(self) -> None:
        """Add what this process learnt about blob locations to the cache's file, merged
        under the lock with what other processes wrote meanwhile."""
        with self.registry._guard:
            learnt = {key: repositories[-_MAX_MOUNT_SOURCES:] for key, repositories
                      in self.registry._locations.items()}
        known = self._saved_locations or {}
        new = {key: r for key, r in learnt.items() if known.get(key) != r}
        if not new:
            return
        try:
            with self.layout.lock():
                merged = _merged_locations(self._read_locations(), new)
                with self.layout._root_directory() as directory:
                    _write_file_atomically(directory, _LOCATIONS_FILE, _locations_bytes(merged),
                                           durable=False)  # a hint: checked when used
        except (OSError, OciCacheError) as e:  # a read-only or full cache: only a hint lost
            _log().debug("not saving the blob locations in %s: %s", self.root, e)
            return
        self._saved_locations = merged

    # -- sync -------------------------------------------------------------------------

    def sync(self, spec: Union[str, Mapping[str, Any], "SyncSpec"], dry_run: bool = False
             ) -> List["SyncResult"]:
        """Mirror what a sync file names (a path, its JSON as a dict, or a ``SyncSpec``)
        into its target,
        as ``skopeo sync`` does; one ``SyncResult`` per image, in the file's order.

        Each tag's digest is asked of the source and of the target with HEAD (of a
        layout target, its index.json), ``jobs`` tags at a time: an image the target
        already holds is not copied, and costs no blob request. The rest are copied,
        one image at a time with
        ``copy``'s machinery, so that an image's tag is written only once everything
        it needs is there (an interrupted sync leaves none half-copied, and the next
        run sends only what is missing). An image that fails is reported and the
        others still copied. ``dry_run`` asks the same questions and writes nothing.
        """
        if isinstance(spec, str):
            spec = read_sync_file(spec)
        elif not isinstance(spec, SyncSpec):
            spec = parse_sync_spec(spec)
        directory = spec.target[len("oci:"):] if spec.target.startswith("oci:") else ""
        held: Dict[str, Digest] = {}
        if directory:
            target = self._layout_outside_cache(directory, False)  # before any request
            if os.path.isdir(target):
                held = {e.annotations[ANNOTATION_REF_NAME]: e.digest
                        for e in _read_layout_index(target).manifests
                        if ANNOTATION_REF_NAME in e.annotations}
        slots: List[Union[SyncResult, Tuple[SyncSource, str]]] = []
        for source in spec.sources:
            try:
                tags = list(source.tags) or self._sync_listed(source)
            except OciCacheError as e:
                slots.append(SyncResult(source.repository.name, spec.target, "failed",
                                        error=_one_line(str(e))))
                continue
            slots += [(source, tag) for tag in tags]
        # A mirror that changed little costs round trips, not bytes: the questions go
        # out together, the copies one image at a time.
        asked = [slot for slot in slots if not isinstance(slot, SyncResult)]
        checked: Dict[int, Tuple[SyncResult, Optional[Reference]]] = {}
        into = spec.target

        def check(i: int, source: SyncSource, tag: str) -> None:
            checked[i] = self._sync_check(source, tag, into, directory, held, dry_run)

        _each_on_threads(self.jobs, "ocicache-sync", [functools.partial(check, i, *slot)
                                                      for i, slot in enumerate(asked)])
        answers = iter([checked[i] for i in range(len(asked))])
        results: List[SyncResult] = []
        for slot in slots:
            if isinstance(slot, SyncResult):
                results.append(slot)
                continue
            result, pinned = next(answers)
            if pinned is not None and not dry_run:
                result = self._sync_copy(result, pinned, slot[0].platforms, directory)
            results.append(result)
        return results

    def _sync_listed(self, source: "SyncSource") -> List[str]:
        """The tags of ``source``'s repository that its regex or range selects."""
        chosen = source.select(self.registry.list_tags(source.repository))
        if not chosen:
            _log().warning("%s: no tag matches %s", source.repository.name,
                           source.pattern or source.semver)
        return chosen

    def _sync_check(self, source: "SyncSource", tag: str, target: str, directory: str,
                    held: Mapping[str, Digest], dry_run: bool
                    ) -> Tuple["SyncResult", Optional[Reference]]:
        """Whether the target holds what a copy of ``tag`` would write: ``unchanged`` or
        ``failed`` as they are, else ``would copy`` and the source pinned by digest."""
        ref = Reference(source.repository.registry, source.repository.repository, tag)
        name = str(ref)  # a layout names each image by its whole source name
        destination = None if directory else \
            Reference.parse(f"{target}/{ref.repository}:{tag}")
        where = f"oci:{directory}:{name}" if destination is None else str(destination)
        try:
            found = self.registry.digest(ref)
            pinned = Reference(ref.registry, ref.repository, tag, found.digest)
            current = held.get(name) if destination is None else \
                self._target_digest(destination, "pull" if dry_run else "pull,push")
            want = found.digest
            if current != want and source.platforms != ALL_PLATFORMS:
                data, root = self.registry.get_manifest(pinned, what=f"sync {ref}")
                if root.is_index:  # the filtered index is what the target would hold
                    want = self._filtered(pinned, data, root, source.platforms)[1].digest
        except OciCacheError as e:
            return SyncResult(name, where, "failed", error=_one_line(str(e))), None
        if current == want and destination is None and not _layout_holds(directory, want):
            current = None  # listed, but not all there: copied again, which mends it
        if current == want:
            return SyncResult(name, where, "unchanged", str(want)), None
        return SyncResult(name, where, "would copy", str(want)), pinned

    def _sync_copy(self, planned: "SyncResult", pinned: Reference, platforms: str,
                   directory: str) -> "SyncResult":
        """Copy ``pinned`` to where ``planned`` says, with ``copy``'s machinery."""
        try:
            with self.layout.adding_blobs():
                copied = self._copy([pinned], "registry", "oci" if directory else "registry",
                                    directory or planned.target,
                                    planned.source if directory else "", platforms, False)
        except (OciCacheError, OSError) as e:
            message = str(e) if isinstance(e, OciCacheError) else \
                f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
            return _replace(planned, status="failed", digest="", error=_one_line(message))
        return _replace(planned, status="copied", digest=str(copied[0][1].digest))

    def _target_digest(self, target: Reference, actions: str) -> Optional[Digest]:
        """The digest ``target``'s tag has in its registry now (HEAD; GET only when the
        HEAD does not say), or None when it has none."""
        endpoint = self.registry.endpoint(target, use_mirrors=False)
        response = self.registry.request(endpoint, "HEAD", f"manifests/{target.tag}", actions,
                                         headers={"Accept": MANIFEST_ACCEPT}, ok=(200, 404),
                                         what=f"look up {target}")
        response.close()
        if response.status == 404:
            return None
        with contextlib.suppress(InvalidDigestError):
            return Digest.parse(response.headers.get("Docker-Content-Digest", "").strip())
        existing = self.registry.remote_manifest(endpoint, target.tag, actions)
        return existing[1].digest if existing is not None else None


@_value_type
class ReferrerList:
    """The referrers of one manifest: ``subject`` (pinned by digest) and its
    descriptor, the referrers' descriptors, and ``source``: ``"api"`` (the registry's
    referrers API) or the fallback tag they were read from (``sha256-<hex>``)."""

    name: Reference
    subject: Descriptor
    referrers: Tuple[Descriptor, ...]
    source: str

    def to_json(self) -> Dict[str, Any]:
        return {"name": str(self.name), "subject": self.subject.to_json(),
                "source": self.source, "referrers": [r.to_json() for r in self.referrers]}


@_value_type
class _CopyPlan:
    """What a copy writes: the root's bytes, its child manifests (bytes as served), the
    other blobs."""

    source: Reference
    root: Descriptor
    data: bytes
    manifests: Tuple[Tuple[Descriptor, bytes], ...]
    blobs: Tuple[Descriptor, ...]


def _copied_blobs(manifests: Iterable[Tuple[Descriptor, bytes, Optional[Manifest]]],
                  loose: Iterable[Descriptor]) -> Tuple[Descriptor, ...]:
    """The blobs (not manifests) a copy moves, each once; foreign layers stay behind."""
    blobs: Dict[Digest, Descriptor] = {blob.digest: blob for blob in loose}
    for _, _, manifest in manifests:
        for blob in manifest.blobs() if manifest is not None else ():
            if not _is_foreign(blob):
                blobs.setdefault(blob.digest, blob)
    return tuple(blobs.values())


def _layout_entry(index: Index, name: str, where: str, source: str) -> Descriptor:
    """The root a layout's (or archive's) ``index`` names ``name`` in ``ref.name``, its
    only root when ``name`` is ""; else an error listing the names there are."""
    entries = [e for e in index.manifests
               if not name or e.annotations.get(ANNOTATION_REF_NAME) == name]
    if len(entries) == 1:
        return entries[0]
    if name and entries:
        raise OciCacheError(f"{where} names {len(entries)} images {name!r}; copy one of "
                            "them by its own name")
    named = sorted({e.annotations.get(ANNOTATION_REF_NAME, "") for e in index.manifests} - {""})
    found = f"no image named {name!r}" if name else \
        f"{len(entries)} images" if entries else "no image"
    raise NotFoundError(f"{where} has {found}; name one of: "
                        f"{_shorten(_one_line(', '.join(named)), 240) or 'none'} "
                        f"(as {source}:NAME)")


def _layout_source_reference(entry: Descriptor, name: str) -> Reference:
    """The name a copy from a layout gives the image its ``entry`` names: the whole
    reference the layout's annotations give (containerd's, or a ref.name that is one,
    as sync writes), else the tag ``name`` of a repository called ``oci-layout``."""
    for given in (entry.annotations.get(ANNOTATION_CONTAINERD_NAME, ""),
                  entry.annotations.get(ANNOTATION_REF_NAME, "")):
        if "/" in given:
            with contextlib.suppress(OciCacheError):
                ref = Reference.parse(given)
                return Reference(ref.registry, ref.repository, ref.tag if ref.digest is None
                                 else "latest")
    tag = entry.annotations.get(ANNOTATION_REF_NAME, "") or name
    return Reference("localhost", "oci-layout", tag if re.fullmatch(_TAG, tag) else "latest")


def _refuse_in_cache(path: str, cache: str, advice: str) -> None:
    """An error when ``path`` (a link resolved) is the cache directory ``cache`` or in
    it: the cache's files are written only by its own code, under its lock."""
    root, real = os.path.realpath(cache), os.path.realpath(path)
    if real == root or real.startswith(os.path.join(root, "")):
        raise OciCacheError(f"cannot write {path}: it is {'' if real == root else 'in '}the "
                            f"cache {cache}; {advice}")


def _layout_target(path: str, archive: bool) -> str:
    """The absolute path a copy writes its layout or archive to, when it may: in an
    existing directory; a layout directory that exists (or an empty directory) is added
    to; an archive never replaces anything but a regular file (the rename would replace
    a device or FIFO, as ``docker save -o /dev/null`` once replaced root's /dev/null)."""
    try:
        if b"\x00" in os.fsencode(path):
            raise OciCacheError(f"cannot write {path!r}: a path has no NUL character")
    except UnicodeEncodeError:
        raise OciCacheError(f"cannot write {path!r}: it has a lone surrogate, which no file "
                            "name here can hold") from None
    target = os.path.abspath(path)
    if not os.path.isdir(os.path.dirname(target)):
        raise OciCacheError(f"cannot write {path}: {os.path.dirname(target)} is not a directory")
    try:
        existing = os.lstat(target)
    except FileNotFoundError:
        return target
    if not archive:
        if not os.path.isdir(target):  # a link to a directory is the user's to name
            raise OciCacheError(f"{path} exists and is not a directory; copy writes or adds "
                                "to an OCI layout directory")
        try:
            names = os.listdir(target)
            marker = os.lstat(os.path.join(target, "oci-layout")) if names else None
        except FileNotFoundError:
            marker = None
        if names and (marker is None or not stat.S_ISREG(marker.st_mode)):
            raise OciCacheError(f"{path} is a directory that is not an OCI layout (it has no "
                                "oci-layout file); copy adds only to a layout or an empty "
                                "directory")
        return target
    if not stat.S_ISREG(existing.st_mode):
        raise OciCacheError(f"cannot write {path}: it is not a regular file (an archive "
                            "replaces a file; to standard output: export --format oci -o -)")
    return target


def _add_to_layout(target: str, cache: Layout, blobs: Iterable[Descriptor],
                   documents: Mapping[Digest, bytes], entries: Sequence[Descriptor],
                   referrers: Optional[Set[str]] = None) -> None:
    """Add images to the existing OCI layout directory ``target`` (or an empty one):
    each blob and document it lacks written beside its final name, fsynced and renamed,
    then ``index.json`` replaced in one rename, with every entry of another name kept
    and the entries named as ``entries`` are replaced. An entry named in ``referrers``
    is a referrers index (``sha256-<hex>``): merged with the one the layout names so
    (``_merged_layout_referrers``), as a registry's fallback tag is, not replaced. An
    ``flock`` of the directory keeps two ocicache processes from losing each other's
    entries; a directory that is a cache (it has a ``.lock``: ocicache's or linuxkit's)
    is written under the cache's own locks too, as an import into it is."""
    with contextlib.ExitStack() as stack:
        directory = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, directory)
        # Any user of the directory can hold it: the wait is said and bounded, as for the cache
        _wait_for_lock(directory, functools.partial(_try_flock, directory, fcntl.LOCK_EX),
                       f"the lock on the layout {target}")
        try:
            is_cache = stat.S_ISREG(os.stat(".lock", dir_fd=directory,
                                            follow_symlinks=False).st_mode)
        except FileNotFoundError:
            is_cache = False
        if is_cache:  # its writers take .lock, not the directory: so does this copy
            other = Layout(target)
            stack.enter_context(other.adding_blobs())
            stack.enter_context(other.lock())
        index = _read_layout_index(target, directory)
        if referrers:
            documents = dict(documents)
            entries = [_merged_layout_referrers(target, directory, index, entry, documents)
                       if entry.annotations.get(ANNOTATION_REF_NAME) in referrers else entry
                       for entry in entries]
        if not _layout_marker_is_good(directory):
            # First: an empty directory is a layout (with no image yet) before a blob is
            # in it, so that a copy that fails part-way is taken up again, not refused as
            # "not a layout"; and one whose marker another replaced is readable again
            # (skopeo rewrites it too).
            _write_file_atomically(directory, "oci-layout", _OCI_LAYOUT_BYTES)
        with contextlib.suppress(FileExistsError):
            os.mkdir("blobs", dir_fd=directory)
        folders: Dict[str, int] = {}
        blobs_fd = _open_directory("blobs", directory, os.path.join(target, "blobs"))
        stack.callback(os.close, blobs_fd)
        if not is_cache:  # a cache's are its gc's to remove (after their grace period)
            _remove_dead_temporaries(directory, _LAYOUT_ROOT_TEMPORARY)
        sources: List[Tuple[Digest, int, Callable[[], IO[bytes]]]] = [
            (b.digest, b.size, functools.partial(cache.open_blob, b.digest)) for b in blobs]
        sources += [(d, len(data), functools.partial(io.BytesIO, data))
                    for d, data in documents.items()]
        for digest, size, opener in sources:
            if digest.algorithm not in folders:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(digest.algorithm, dir_fd=blobs_fd)
                folders[digest.algorithm] = _open_directory(
                    digest.algorithm, blobs_fd, os.path.join(target, "blobs", digest.algorithm))
                stack.callback(os.close, folders[digest.algorithm])
                if not is_cache:
                    _remove_dead_temporaries(folders[digest.algorithm], _LAYOUT_BLOB_TEMPORARY)
            _add_layout_blob(folders[digest.algorithm], digest, size, opener,
                             os.path.join(target, _blob_name(digest)))
        for fd in [blobs_fd, *folders.values()]:  # the renames are durable before the index
            os.fsync(fd)
        names = {e.annotations[ANNOTATION_REF_NAME] for e in entries}
        kept = [m for m in index.manifests if m.annotations.get(ANNOTATION_REF_NAME) not in names]
        updated = _replace(index, manifests=(*kept, *entries)).to_bytes()
        if len(updated) > MAX_INDEX_SIZE:
            raise OciCacheError(f"adding to {target} would grow its index.json past "
                                f"{MAX_INDEX_SIZE} bytes")
        _write_file_atomically(directory, "index.json", updated)  # last: now it is visible


# The temporary files _add_to_layout writes in a layout (_temporary_name's form): the root's
# and the blob directories'.
_LAYOUT_ROOT_TEMPORARY = r"\.(?:index\.json|oci-layout)\.tmp-[0-9a-f]{16}"
_LAYOUT_BLOB_TEMPORARY = r"\.(?:[0-9a-f]{64}|[0-9a-f]{128})\.tmp-[0-9a-f]{16}"


def _remove_dead_temporaries(folder: int, pattern: str) -> None:
    """Unlink the temporary files of ours a killed copy left in a layout's directory
    ``folder`` (a SIGKILL or a crash runs no cleanup). Called under the layout's flock,
    which every ocicache writing in a layout holds while its temporary files exist: one
    found then is no other's file in progress. A link or a directory so named is left."""
    for entry in os.scandir(folder):
        if re.fullmatch(pattern, entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.name, dir_fd=folder)


def _merged_layout_referrers(target: str, directory: int, index: Index, entry: Descriptor,
                             documents: Dict[Digest, bytes]) -> Descriptor:
    """``entry``, a referrers index about to be named in the layout ``target``, merged
    with the one of its name there: every entry listed there kept, as written, the new
    ones added after them, bounded as a fallback tag is (``MAX_REFERRERS`` entries,
    ``MAX_MANIFEST_SIZE`` bytes). The merged index goes into ``documents``, to be
    written as a blob of its own; a name with nothing readable behind it (a blob gone,
    or not its digest's content) has nothing to keep."""
    name = entry.annotations[ANNOTATION_REF_NAME]
    there = [m for m in index.manifests if m.annotations.get(ANNOTATION_REF_NAME) == name]
    existing = _layout_document(directory, there[-1].digest) if there else None
    if existing is None:
        return entry
    what = f"the referrers index {name} of {target}"
    listed = parse_referrers(existing, what)  # else says what it is, and is left alone
    added = [d for d in parse_referrers(documents[entry.digest], what)
             if d.digest not in {e.digest for e in listed}]
    if not added:
        return _replace(entry, digest=there[-1].digest, size=len(existing))
    if len(listed) + len(added) > MAX_REFERRERS:  # which no reader would take
        raise OciCacheError(f"{what} would list {len(listed) + len(added)} referrers, more "
                            f"than {MAX_REFERRERS}")
    obj = _load_json_object(existing, what)
    obj["manifests"] = [*obj["manifests"], *(d.to_json() for d in added)]
    obj.setdefault("mediaType", MEDIA_OCI_INDEX)
    data = _bounded_referrers(_json_bytes(obj, separators=(",", ":")), what)
    digest = Digest.from_bytes(data)
    documents[digest] = data
    return _replace(entry, digest=digest, size=len(data))


def _layout_document(directory: int, digest: Digest) -> Optional[bytes]:
    """The document ``digest`` names in the layout open as ``directory``, read through
    its descriptors (never a link) and hashed; None when it is absent, larger than
    ``MAX_MANIFEST_SIZE`` or not that content."""
    with contextlib.ExitStack() as stack:
        try:
            blobs = _open_directory("blobs", directory)
            stack.callback(os.close, blobs)
            folder = _open_directory(digest.algorithm, blobs)
            stack.callback(os.close, folder)
            fd = _open_regular(digest.hex, os.O_RDONLY, folder)
        except (OSError, OciCacheError):
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_MANIFEST_SIZE + 1)
    if len(data) > MAX_MANIFEST_SIZE or Digest.from_bytes(data, digest.algorithm) != digest:
        return None
    return data


def _layout_marker_is_good(directory: int) -> bool:
    """Whether the layout open as ``directory`` has a regular ``oci-layout`` file of
    version 1.0.0, the one every reader accepts."""
    try:
        fd = _open_regular("oci-layout", os.O_RDONLY, directory)
        with os.fdopen(fd, "rb") as f:
            marker = json.loads(f.read(4096))
    except (OSError, OciCacheError, ValueError, RecursionError):
        return False
    return isinstance(marker, dict) and marker.get("imageLayoutVersion") == "1.0.0"


def _read_layout_index(target: str, directory: Optional[int] = None) -> Index:
    """The index.json of the layout directory ``target`` (an empty index if it has
    none), never read through a link, at most ``MAX_INDEX_SIZE`` bytes."""
    where = os.path.join(target, "index.json")
    try:
        fd = _open_regular("index.json" if directory is not None else where, os.O_RDONLY,
                           directory, where)
    except FileNotFoundError:
        return Index(MEDIA_OCI_INDEX, ())
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_INDEX_SIZE + 1)
    if len(data) > MAX_INDEX_SIZE:
        raise OciCacheError(f"{where} is larger than {MAX_INDEX_SIZE} bytes")
    try:
        return Index.from_json(data, what=where)
    except OciCacheError as e:  # a bad descriptor's message does not say where it is
        if where in str(e):
            raise
        raise OciCacheError(f"{where}: {e}") from None


def _layout_holds(target: str, root: Digest) -> bool:
    """Whether the layout directory ``target`` holds all of the image ``root``, as its
    index.json says (whoever else writes there may have removed or replaced a blob):
    every manifest and index read and hashed, every other blob a regular file of its
    size (a layer is not read again). Never through a link."""
    with contextlib.ExitStack() as stack:
        try:
            blobs = _open_directory(os.path.join(target, "blobs"))
            stack.callback(os.close, blobs)
            folders: Dict[str, int] = {}

            def folder(digest: Digest) -> int:
                if digest.algorithm not in folders:
                    folders[digest.algorithm] = _open_directory(digest.algorithm, blobs)
                    stack.callback(os.close, folders[digest.algorithm])
                return folders[digest.algorithm]

            pending, seen = [root], set()
            while pending:
                digest = pending.pop()
                seen.add(digest)
                fd = _open_regular(digest.hex, os.O_RDONLY, folder(digest))
                with os.fdopen(fd, "rb") as f:
                    data = f.read(MAX_MANIFEST_SIZE + 1)
                if Digest.from_bytes(data, digest.algorithm) != digest:
                    return False
                _, document = read_document(data, str(digest))
                children = document.manifests if isinstance(document, Index) else ()
                for child in children:
                    if child.media_type in DOCUMENT_MEDIA_TYPES:
                        pending += [child.digest] if child.digest not in seen else []
                    elif not _layout_has_file(folder(child.digest), child):
                        return False
                if isinstance(document, Manifest) and not all(
                        _layout_has_file(folder(b.digest), b) for b in document.blobs()
                        if not _is_foreign(b)):
                    return False
        except (OSError, OciCacheError):
            return False
    return True


def _layout_has_file(folder: int, blob: Descriptor) -> bool:
    found = os.stat(blob.digest.hex, dir_fd=folder, follow_symlinks=False)
    return stat.S_ISREG(found.st_mode) and found.st_size == blob.size


def _add_layout_blob(folder: int, digest: Digest, size: int,
                     opener: Callable[[], IO[bytes]], where: str) -> None:
    """``digest``'s file in a layout's ``blobs/ALGORITHM`` directory, unless a regular
    file of that name holding that content (``size`` bytes, hashed) is there (an
    earlier copy's; one of another size is not read, however large); written under
    a temporary name, hashed as it goes, fsynced, then renamed over whatever else has
    the name (another's file of other content, a link, a FIFO: never read nor followed)."""
    try:
        found = os.stat(digest.hex, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        found = None
    if found is not None and stat.S_ISDIR(found.st_mode):
        raise OciCacheError(f"{where} is a directory, not a blob; remove it")
    if found is not None and stat.S_ISREG(found.st_mode) and found.st_size == size and (
            _known_layout_blob(digest, found) or _holds_digest(folder, digest, where)):
        return
    fd, temp = _create_temporary(folder, f".{digest.hex}")
    try:
        hasher = digest.hasher()
        with os.fdopen(fd, "wb") as out, opener() as source:
            for piece in iter(lambda: source.read(COPY_BUFFER_SIZE), b""):
                hasher.update(piece)
                out.write(piece)
            out.flush()
            os.fsync(out.fileno())
            inode = os.fstat(out.fileno()).st_ino
        if hasher.hexdigest() != digest.hex:
            raise DigestMismatchError(f"{where}: the cache's copy of {digest} has other content")
        os.replace(temp, digest.hex, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=folder)
        raise
    with contextlib.suppress(OSError):
        renamed = os.stat(digest.hex, dir_fd=folder, follow_symlinks=False)
        if renamed.st_ino == inode:  # still ours: no one swapped it in between
            _remember_layout_blob(digest, renamed)


# The layout blob files this process wrote or hashed, by device and inode, with their
# size and times: one not changed since (a write or a rename changes its ctime) is not
# read again, so a sync of many images that share a layer hashes it once, not per image.
_LAYOUT_BLOBS_SEEN: Dict[Tuple[int, int], Tuple[Digest, _FileIdentity]] = {}
_LAYOUT_BLOBS_GUARD = threading.Lock()


def _remember_layout_blob(digest: Digest, found: os.stat_result) -> None:
    with _LAYOUT_BLOBS_GUARD:
        _LAYOUT_BLOBS_SEEN[(found.st_dev, found.st_ino)] = (digest, _file_identity(found))


def _known_layout_blob(digest: Digest, found: os.stat_result) -> bool:
    with _LAYOUT_BLOBS_GUARD:
        known = _LAYOUT_BLOBS_SEEN.get((found.st_dev, found.st_ino))
    return known == (digest, _file_identity(found))


def _holds_digest(folder: int, digest: Digest, where: str) -> bool:
    """Whether the file ``digest`` names in ``folder`` hashes to it: a layout's other
    users may have put anything under a blob's name, and its index would vouch for it."""
    try:
        fd = _open_regular(digest.hex, os.O_RDONLY, folder, where)
    except (OSError, OciCacheError):  # gone, or swapped for a link: written anew
        return False
    hasher = digest.hasher()
    with os.fdopen(fd, "rb") as f:
        before = os.fstat(f.fileno())
        for piece in iter(lambda: f.read(COPY_BUFFER_SIZE), b""):
            hasher.update(piece)
        if hasher.hexdigest() != digest.hex:
            return False
        if os.fstat(f.fileno()) == before:  # not written to while it was hashed
            _remember_layout_blob(digest, before)
    return True


def parse_copy_location(text: str) -> Tuple[str, str, str]:
    """A copy source or destination as (kind, target, tag): ``registry`` (a name;
    ``docker://`` optional), ``cache`` (``cache:NAME``), ``oci`` (``oci:DIR[:TAG]``)
    or ``oci-archive`` (``oci-archive:FILE[:TAG]``)."""
    for kind in ("oci-archive", "oci"):
        if text.startswith(f"{kind}:"):
            path, _, tag = text[len(kind) + 1:].partition(":")
            if not path or path == "-":
                raise OciCacheError(f"{text!r}: name a path, as in {kind}:DIR[:TAG] "
                                    "(to standard output: export --format oci -o -)")
            if tag and not re.fullmatch(_TAG, tag):
                raise OciCacheError(f"{text!r}: {tag!r} is not a valid tag")
            return kind, path, tag
    if text.startswith("cache:"):
        return "cache", str(Reference.parse(text[len("cache:"):])), ""
    name = text[len("docker://"):] if text.startswith("docker://") else text
    ref = Reference.parse(name)
    given = ":" in name.split("@")[0].rsplit("/", 1)[-1]  # not the tag "latest" parse adds
    return "registry", str(ref), ref.tag if given else ""


# Where blobs were last seen (skopeo's blob-info cache): a push or copy to a registry
# mounts a blob from a repository of that registry an earlier run saw it in, instead of
# uploading it. A hint only: what the file says is checked, a bad file is ignored.
# The file is _LOCATIONS_FILE, named with the cache's other files.
_MAX_LOCATIONS = 10_000       # digests remembered; the least recently seen go first
_MAX_MOUNT_SOURCES = 3        # repositories per digest and registry, the newest kept


def _parse_locations(data: bytes) -> Dict[Tuple[str, Digest], List[str]]:
    """The locations in a file's bytes; anything not a valid host, digest and
    repository is skipped (a repository goes into a mount URL's query)."""
    try:
        obj = json.loads(data)
    except ValueError:
        return {}
    found: Dict[Tuple[str, Digest], List[str]] = {}
    rows = obj.get("locations") if isinstance(obj, dict) else None
    for row in rows if isinstance(rows, list) else ():
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                and isinstance(row[1], str) and isinstance(row[2], list)):
            continue
        try:
            digest = Digest.parse(row[1])
        except InvalidDigestError:
            continue
        repositories = [r for r in row[2] if isinstance(r, str) and re.fullmatch(_PATH, r)]
        if re.fullmatch(_DOMAIN, row[0]) and repositories:
            found[(row[0], digest)] = repositories[-_MAX_MOUNT_SOURCES:]
    return found


def _merged_locations(older: Mapping[Tuple[str, Digest], List[str]],
                      newer: Mapping[Tuple[str, Digest], List[str]]
                      ) -> Dict[Tuple[str, Digest], List[str]]:
    """``older`` updated with ``newer``: a digest seen again moves to the end (the most
    recent), its newest repositories last; bounded by ``_MAX_LOCATIONS``."""
    merged = dict(older)
    for key, repositories in newer.items():
        seen = [r for r in merged.pop(key, []) if r not in repositories] + list(repositories)
        merged[key] = seen[-_MAX_MOUNT_SOURCES:]
    return dict(list(merged.items())[-_MAX_LOCATIONS:])


def _locations_bytes(locations: Mapping[Tuple[str, Digest], List[str]]) -> bytes:
    return _json_bytes({"locations": [[host, str(digest), repositories] for
                                      (host, digest), repositories in locations.items()]},
                       separators=(",", ":"))


# -- sync files -----------------------------------------------------------------------
# ``ocicache sync FILE``: the file names one target and the source repositories to
# mirror into it, each with its tags (a list, a regular expression, or a semver range)
# and platforms. Read and checked here as data, before any request: each mistake is one
# line naming the field.

_SYNC_KEYS = frozenset({"target", "platforms", "images"})
_SYNC_IMAGE_KEYS = frozenset({"source", "tags", "platforms"})
_MAX_SYNC_FILE = 1024 * 1024
_MAX_SYNC_IMAGES = 1000
_MAX_SYNC_TAGS = 1000          # tags one source may list or match
_MAX_TAG_PATTERN = 256         # characters of a tag regex
_MAX_PATTERN_REPEATS = 3       # unbounded (or wide) repeats in one tag regex
_MAX_PATTERN_OPTIONALS = 8     # optional parts (a?, a{2,3}) in one: each doubles the work


@_value_type
class SyncSource:
    """One source repository of a sync file and the tags and platforms it copies:
    exactly one of ``tags`` (exact names), ``pattern`` (a regex each tag must match
    whole) or ``semver`` (a range, see ``semver_matches``). ``platforms`` is "all" or
    a comma list, as copy's ``architecture``."""

    repository: Reference
    tags: Tuple[str, ...] = ()
    pattern: str = ""
    semver: str = ""
    platforms: str = ALL_PLATFORMS

    def select(self, listed: Sequence[str]) -> List[str]:
        """The tags of ``listed`` (the repository's) this source copies: by name, or by
        version for a range (registries list in no order one could rely on); more than
        ``_MAX_SYNC_TAGS`` is an error."""
        if self.pattern:
            compiled = re.compile(self.pattern)
            chosen = sorted(t for t in listed if compiled.fullmatch(t))
        else:
            chosen = sorted((t for t in listed if semver_matches(self.semver, t)),
                            key=lambda t: (_semver_key(*(_semver_parse(t) or ((), ""))), t))
        if len(chosen) > _MAX_SYNC_TAGS:
            raise OciCacheError(f"{self.repository.name}: {len(chosen)} tags match "
                                f"{self.pattern or self.semver!r}, more than "
                                f"{_MAX_SYNC_TAGS}; narrow the filter")
        return chosen


@_value_type
class SyncSpec:
    """A sync file: its ``target`` (``oci:DIR`` or a registry prefix such as
    ``127.0.0.1:5000/mirror``) and its sources, in the file's order."""

    target: str
    sources: Tuple[SyncSource, ...]


@_value_type
class SyncResult:
    """What sync did with one image: ``status`` is ``copied``, ``unchanged``,
    ``would copy`` (a dry run) or ``failed`` (then ``error`` says why); ``digest`` is
    what the target holds, or would."""

    source: str
    target: str
    status: str
    digest: str = ""
    error: str = ""

    def to_json(self) -> Dict[str, str]:
        out = {"source": self.source, "target": self.target, "status": self.status}
        if self.digest:
            out["digest"] = self.digest
        if self.error:
            out["error"] = self.error
        return out


def read_sync_file(path: str) -> SyncSpec:
    """The sync file at ``path`` (``-``: standard input), checked (``parse_sync_spec``)."""
    what = "standard input" if path == "-" else path
    if path == "-":
        data = sys.stdin.buffer.read(_MAX_SYNC_FILE + 1)
    else:
        with open(path, "rb") as f:
            data = f.read(_MAX_SYNC_FILE + 1)
    if len(data) > _MAX_SYNC_FILE:
        raise InvalidSyncFileError(f"{what}: larger than {_MAX_SYNC_FILE} bytes")
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise InvalidSyncFileError(f"{what}: not JSON: {_one_line(str(e))}") from None
    except RecursionError:  # a file of brackets: refused as other bad JSON is
        raise InvalidSyncFileError(f"{what}: not JSON: nested too deeply") from None
    return parse_sync_spec(obj, what)


def parse_sync_spec(obj: Any, what: str = "sync file") -> SyncSpec:
    """A sync file's JSON as a ``SyncSpec``; ``InvalidSyncFileError`` naming the first
    bad field (``what`` begins the message): unknown keys, a source that is not a
    repository or is listed twice, tags that are neither a list nor one of ``regex`` /
    ``semver``, a regex that could take exponential time, a bad range or platform, a
    target that is neither ``oci:DIR`` nor a registry prefix."""

    def fail(field: str, problem: str) -> InvalidSyncFileError:
        return InvalidSyncFileError(f"{what}: {field}: {problem}")

    if not isinstance(obj, dict):
        raise InvalidSyncFileError(f"{what}: not a JSON object with 'target' and 'images'")
    for key in obj:
        if key not in _SYNC_KEYS:
            raise fail(key, f"unknown key (known: {', '.join(sorted(_SYNC_KEYS))})")
    target = _sync_target(obj.get("target"), fail)
    default = _sync_platforms(obj.get("platforms", ALL_PLATFORMS), "platforms", fail)
    images = obj.get("images")
    if not isinstance(images, list) or not images:
        raise fail("images", "missing or not a non-empty list of {\"source\": ..., "
                             "\"tags\": ...} objects")
    if len(images) > _MAX_SYNC_IMAGES:
        raise fail("images", f"{len(images)} entries; at most {_MAX_SYNC_IMAGES}")
    sources: List[SyncSource] = []
    seen: Dict[str, str] = {}
    destinations: Dict[str, str] = {}
    for number, image in enumerate(images):
        field = f"images[{number}]"
        if not isinstance(image, dict):
            raise fail(field, "not an object with 'source' and 'tags'")
        for key in image:
            if key not in _SYNC_IMAGE_KEYS:
                raise fail(f"{field}.{key}",
                           f"unknown key (known: {', '.join(sorted(_SYNC_IMAGE_KEYS))})")
        repository = _sync_repository(image.get("source"), f"{field}.source", fail)
        if repository.name in seen:
            raise fail(f"{field}.source", f"{repository.name} is listed already, in "
                                          f"{seen[repository.name]}; list it once")
        seen[repository.name] = field
        # A registry target keeps the repository's path, not its registry: two sources
        # of one path would overwrite each other's tags, back and forth at every run.
        mirrored = f"{target}/{repository.repository}"
        if not target.startswith("oci:") and mirrored == repository.name:
            raise fail(f"{field}.source", f"{repository.name} would be mirrored onto itself "
                                          f"(the target is {target}); name another prefix")
        if not target.startswith("oci:") and mirrored in destinations:
            raise fail(f"{field}.source", f"{repository.name} would be mirrored to "
                                          f"{mirrored}, as {destinations[mirrored]} is; "
                                          "list one")
        destinations[mirrored] = field
        platforms = default if "platforms" not in image else \
            _sync_platforms(image["platforms"], f"{field}.platforms", fail)
        sources.append(_sync_tags(repository, image.get("tags"), platforms, f"{field}.tags",
                                  fail))
    return SyncSpec(target, tuple(sources))


def _sync_target(value: Any, fail: Callable[[str, str], InvalidSyncFileError]) -> str:
    """``oci:DIR``, or a registry prefix (an explicit host, an optional path) as given."""
    if not isinstance(value, str) or not value:
        raise fail("target", "missing; a registry prefix such as '127.0.0.1:5000/mirror', "
                             "or 'oci:DIR' for an OCI layout directory")
    if value.startswith("oci-archive:"):
        raise fail("target", "an archive cannot be added to image by image; use oci:DIR "
                             "(and tar it for the crossing)")
    if value.startswith("oci:"):
        if not value[len("oci:"):]:
            raise fail("target", "name a directory, as in oci:DIR")
        if re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]", value):
            # each image is reported on a line that names the target
            raise fail("target", f"{value!r}: DIR has a control character, a line "
                                 "separator or a lone surrogate")
        if ":" in value[len("oci:"):]:
            raise fail("target", f"{value!r}: oci:DIR takes no :TAG (each image is named by "
                                 "its source name) and DIR no colon")
        return value
    prefix = value[len("docker://"):] if value.startswith("docker://") else value
    host = prefix.split("/", 1)[0]
    if not re.fullmatch(rf"{_DOMAIN}(?:/{_PATH})?", prefix) or not (
            "." in host or ":" in host or host == "localhost"):
        raise fail("target", f"{value!r} is not a registry prefix (host[:port][/path], the "
                             "host with a dot or port, as 127.0.0.1:5000/mirror) nor oci:DIR")
    return prefix


def _sync_repository(value: Any, field: str,
                     fail: Callable[[str, str], InvalidSyncFileError]) -> Reference:
    if not isinstance(value, str) or not value:
        raise fail(field, "missing; a repository such as docker.io/library/alpine")
    name = value[len("docker://"):] if value.startswith("docker://") else value
    try:
        ref = Reference.parse(name)
    except InvalidReferenceError as e:
        raise fail(field, str(e)) from None
    if "@" in name or ":" in name.rsplit("/", 1)[-1]:
        raise fail(field, f"{value!r} names a tag or digest; name the repository and list "
                          "the tags in 'tags'")
    return ref


def _sync_platforms(value: Any, field: str,
                    fail: Callable[[str, str], InvalidSyncFileError]) -> str:
    """``all``, or the comma list a list of platforms makes (each checked)."""
    if value == ALL_PLATFORMS:
        return ALL_PLATFORMS
    if not isinstance(value, list) or not value or \
            not all(isinstance(p, str) and p and "," not in p for p in value):
        raise fail(field, 'not "all" nor a non-empty list of platforms such as '
                          '["linux/amd64", "linux/arm64/v8"]')
    try:
        return ",".join(_platform_list(",".join(value)))
    except InvalidPlatformError as e:
        raise fail(field, str(e)) from None


def _sync_tags(repository: Reference, value: Any, platforms: str, field: str,
               fail: Callable[[str, str], InvalidSyncFileError]) -> SyncSource:
    if isinstance(value, list):
        if not value or len(value) > _MAX_SYNC_TAGS:
            raise fail(field, f"a list of 1 to {_MAX_SYNC_TAGS} tags")
        for tag in value:
            if not isinstance(tag, str) or not re.fullmatch(_TAG, tag):
                raise fail(field, f"{tag!r} is not a valid tag")
        return SyncSource(repository, tags=tuple(dict.fromkeys(value)), platforms=platforms)
    if not isinstance(value, dict) or len(value) != 1 or \
            not set(value) <= {"regex", "semver"}:
        raise fail(field, 'a list of tags, {"regex": "..."} or {"semver": "..."}')
    kind, text = next(iter(value.items()))
    if not isinstance(text, str) or not text:
        raise fail(f"{field}.{kind}", "not a non-empty string")
    try:
        if kind == "regex":
            _check_tag_pattern(text)
            return SyncSource(repository, pattern=text, platforms=platforms)
        _semver_range(text)
    except InvalidSyncFileError as e:
        raise fail(f"{field}.{kind}", str(e)) from None
    return SyncSource(repository, semver=text, platforms=platforms)


def _check_tag_pattern(pattern: str) -> None:
    """Refuse a tag regex that could take exponential time on a 128-character tag: a
    repeat of varying width inside a repeat (``(a+)+``, ``(a?){40}``), alternation
    inside a repeat (``(a|ab)*``), back-references, more than ``_MAX_PATTERN_REPEATS``
    unbounded or wide (``.{0,99}``) repeats, more than ``_MAX_PATTERN_OPTIONALS``
    optional parts, or more than ``_MAX_TAG_PATTERN`` characters. Matching is
    ``fullmatch``: anchored at both ends."""
    if len(pattern) > _MAX_TAG_PATTERN:
        raise InvalidSyncFileError(f"longer than {_MAX_TAG_PATTERN} characters")
    try:
        re.compile(pattern)
    except re.error as e:
        raise InvalidSyncFileError(f"bad regex {pattern!r}: {e}") from None
    parser: Any = getattr(re, "_parser", None) or importlib.import_module("sre_parse")
    repeats = optionals = 0

    def walk(items: Any, repeated: bool) -> None:
        nonlocal repeats, optionals
        for op, argument in items:
            name = str(op)
            if name in ("GROUPREF", "GROUPREF_EXISTS"):
                raise InvalidSyncFileError(f"regex {pattern!r}: back-references are not "
                                           "accepted")
            if name.endswith("_REPEAT"):
                low, high, inner = argument
                many = high > 1
                # Inside a repeat, any choice of width multiplies: (a?){40} is as
                # exponential as (a+)+. Outside, each choice multiplies the ways to
                # split a tag: a bounded but wide repeat (.{0,99}) as an unbounded
                # one, an optional part (a?) by two.
                if high > low and repeated:
                    raise InvalidSyncFileError(f"regex {pattern!r} repeats a repeat (as "
                                               "(a+)+ or (a?){9}), which can take "
                                               "exponential time")
                repeats += high - low > 1
                optionals += high - low == 1
                walk(inner, repeated or many)
            elif name == "BRANCH":
                if repeated:
                    raise InvalidSyncFileError(f"regex {pattern!r} repeats an alternation "
                                               "(as (a|ab)*), which can take exponential "
                                               "time; use a character class")
                for branch in argument[1]:
                    walk(branch, repeated)
            elif name == "SUBPATTERN":
                walk(argument[-1], repeated)
            elif name in ("ASSERT", "ASSERT_NOT"):
                walk(argument[1], repeated)
            elif name == "ATOMIC_GROUP":
                walk(argument, repeated)

    walk(parser.parse(pattern), False)
    if repeats > _MAX_PATTERN_REPEATS:
        raise InvalidSyncFileError(f"regex {pattern!r} has {repeats} unbounded (or wide) "
                                   f"repeats; at most {_MAX_PATTERN_REPEATS}")
    if optionals > _MAX_PATTERN_OPTIONALS:
        raise InvalidSyncFileError(f"regex {pattern!r} has {optionals} optional parts; at "
                                   f"most {_MAX_PATTERN_OPTIONALS}")


# Semver ranges: comparator sets joined by "||", each a space-separated list of
# comparators that must all hold: ">=1.2", ">1.2.3", "<2", "<=2.1", "=1.4.2" (or
# "1.4.2"), "~1.2" (>=1.2.0 <1.3.0), "^1.2" (>=1.2.0 <2.0.0; ^0.2 is <0.3.0). A version
# has 1 to 3 numbers (no leading zeros, "v" allowed); a partial one stands for its
# range (">1.2" is >=1.3.0, "<=1.2" is <1.3.0, "1.2" is >=1.2.0 <1.3.0). Tags parse the
# same way; a tag with a pre-release ("1.3.0-rc.1", "1.25.3-alpine") matches only a
# set that names a pre-release of the same MAJOR.MINOR.PATCH, as npm's semver does.
_SEMVER_NUMBER = r"(?:0|[1-9][0-9]{0,8})"
_SEMVER_PRERELEASE = r"[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*"
_SEMVER = re.compile(rf"v?({_SEMVER_NUMBER})(?:\.({_SEMVER_NUMBER})(?:\.({_SEMVER_NUMBER})"
                     rf"(?:-({_SEMVER_PRERELEASE}))?)?)?")
_SEMVER_COMPARATOR = re.compile(r"(>=|<=|>|<|=|\^|~)?(.*)")
_MAX_SEMVER_RANGE = 256

_SemverKey = Tuple[int, int, int, int, Tuple[Tuple[int, Any], ...]]


def _semver_parse(text: str) -> Optional[Tuple[Tuple[int, ...], str]]:
    """The numbers given (1 to 3) and the pre-release of a version, or None."""
    match = _SEMVER.fullmatch(text)
    if match is None:
        return None
    return tuple(int(n) for n in match.groups()[:3] if n is not None), match.group(4) or ""


def _semver_key(numbers: Tuple[int, ...], prerelease: str) -> _SemverKey:
    """A key that orders versions as semver 2.0 does: a release after its pre-releases,
    numeric identifiers numerically and before alphanumeric ones."""
    full = (*numbers, 0, 0)[:3]
    if not prerelease:
        return (full[0], full[1], full[2], 1, ())
    parts = tuple((0, int(p)) if p.isdigit() else (1, p) for p in prerelease.split("."))
    return (full[0], full[1], full[2], 0, parts)


def _semver_range(text: str) -> List[List[Tuple[str, _SemverKey]]]:
    """A range as sets of (operator, key) comparators, each set a conjunction; a
    pre-release comparator's key carries its pre-release. InvalidSyncFileError names
    the bad part."""
    if len(text) > _MAX_SEMVER_RANGE:
        raise InvalidSyncFileError(f"longer than {_MAX_SEMVER_RANGE} characters")
    sets: List[List[Tuple[str, _SemverKey]]] = []
    for alternative in text.split("||"):
        comparators: List[Tuple[str, _SemverKey]] = []
        for token in alternative.split():
            match = _SEMVER_COMPARATOR.fullmatch(token)
            parsed = _semver_parse(match.group(2)) if match else None
            if match is None or parsed is None:
                raise InvalidSyncFileError(
                    f"bad semver range {text!r}: {token!r} is not a comparator (an operator "
                    ">=, >, <=, <, =, ~ or ^, then a version of 1 to 3 numbers, as in "
                    "'>=1.2 <2')")
            comparators += _semver_comparators(match.group(1) or "=", *parsed)
        if not comparators:
            raise InvalidSyncFileError(f"bad semver range {text!r}: an empty alternative")
        sets.append(comparators)
    return sets


def _semver_comparators(op: str, numbers: Tuple[int, ...], prerelease: str
                        ) -> List[Tuple[str, _SemverKey]]:
    """One comparator as plain comparators of full versions (a partial version and
    ``~``/``^`` stand for ranges)."""
    given = len(numbers)
    full = (*numbers, 0, 0)[:3]
    low = _semver_key(full, prerelease)

    def bump(position: int) -> _SemverKey:
        raised = [*full[:position], full[position] + 1, 0, 0][:3]
        return _semver_key(tuple(raised), "")

    upper = bump(given - 1)
    if op == "~":
        return [(">=", low), ("<", bump(0 if given == 1 else 1))]
    if op == "^":
        first = next((i for i, n in enumerate(full[:given]) if n), given - 1)
        return [(">=", low), ("<", bump(first))]
    if given == 3:
        return [(op, low)]
    return {"=": [(">=", low), ("<", upper)], ">=": [(">=", low)], ">": [(">=", upper)],
            "<": [("<", low)], "<=": [("<", upper)]}[op]


def semver_matches(text: str, tag: str) -> bool:
    """Whether ``tag`` is a version within the semver range ``text`` (see above)."""
    parsed = _semver_parse(tag)
    if parsed is None:
        return False
    key = _semver_key(*parsed)
    compare = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
               "=": operator.eq}
    for comparators in _semver_range(text):
        if not all(compare[op](key, bound) for op, bound in comparators):
            continue
        if not parsed[1] or any(bound[4] and bound[:3] == key[:3] for _, bound in comparators):
            return True
    return False


class _CacheSource(ImageSource):
    """An image in a Provider, resolved by name and platform each time it is read."""

    def __init__(self, provider: Provider, ref: Reference, architecture: str,
                 descriptor: Optional[Descriptor]) -> None:
        self._provider = provider
        self._ref = ref
        self._architecture = architecture
        self._descriptor = descriptor

    def descriptor(self) -> Optional[Descriptor]:
        return self._descriptor

    def config(self) -> Dict[str, Any]:
        _, image = self._provider.resolve(self._ref, self._architecture)
        manifest = self._provider.manifest(image)
        config = _load_json_object(self._provider.layout.read_blob(manifest.config.digest),
                                   f"config of {self._ref}")
        inner = config.get("config") or {}
        return dict(inner) if isinstance(inner, dict) else {}

    def _image(self) -> Tuple[Descriptor, Descriptor, Manifest]:
        if self._architecture == ALL_PLATFORMS or "," in self._architecture:
            raise OciCacheError(f"{self._ref}: this needs one platform; "
                                f"{self._architecture!r} is only for an OCI tar")
        root, image = self._provider.resolve(self._ref, self._architecture)
        return root, image, self._provider.manifest(image)

    def _check_layers(self, manifest: Manifest) -> None:
        """Fail before streaming when a layer is missing (exports copy layers' bytes)."""
        layout = self._provider.layout
        for layer in manifest.layers:
            if _is_foreign(layer) and not layout.has_blob(layer.digest):
                continue  # named in the error if an export needs it
            if not layout.has_blob(layer.digest, layer.size):
                raise NotFoundError(f"layer {layer.digest} of {self._ref} is not complete in "
                                    f"the cache {layout.root}; pull the image again")

    def _check_container_image(self, manifest: Manifest) -> None:
        """A file system or a docker tar needs a container image: an image config type,
        with ``rootfs`` (docker load, podman and skopeo refuse anything else, and an OCI
        artifact's layers, under an empty or other config, are no file systems)."""
        config = manifest.config
        data = self._provider.layout.read_blob(config.digest)
        try:
            rootfs = _load_json_object(data, "config").get("rootfs")
        except OciCacheError:  # not JSON, or not an object: not an image config
            rootfs = None
        if config.media_type not in (MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG) or \
                not isinstance(rootfs, dict):
            without = "" if isinstance(rootfs, dict) else " without rootfs"
            raise OciCacheError(
                f"{self._ref} is not a container image (an artifact: its config is "
                f"{_shorten(_one_line(config.media_type))}{without}); export it with "
                "--format oci")

    def _filesystem_writer(self) -> Callable[[BinaryIO], None]:
        _, _, manifest = self._image()
        self._check_container_image(manifest)
        self._check_layers(manifest)
        layout = self._provider.layout
        for layer in manifest.layers:
            if _is_foreign(layer) and not layout.has_blob(layer.digest):
                raise _foreign_layer_error(layer)
            if layer.media_type.endswith("+zstd"):  # only flattening decompresses
                _zstd_decoder(f"layer {layer.digest} of {self._ref}")
        opened: Dict[Digest, Tuple[int, int, int]] = {}  # each read of a layer reads one file
        openers = [functools.partial(_open_layer, layout, layer, opened)
                   for layer in manifest.layers]

        layers = list({layer.digest: layer for layer in manifest.layers})
        names = [str(layer.digest) for layer in manifest.layers]

        def produce(out: BinaryIO) -> None:
            # A layer whose content carries no check of its own (uncompressed, zstd) has
            # its digest checked by a second reader beside the flattening, so a corrupt
            # one that still reads as a tar fails the export too. A gzip layer's CRC-32
            # covers every byte it inflates to, what this export writes, and a failed
            # read is traced to its blob below: hashing it as well would cost a full
            # sha256 pass of the most common layers for nothing. Every read of a layer
            # (two passes, the check) reads one file: one renamed over it meanwhile fails
            # the export (_same_blob), or what was checked would not be what is written.
            problems: Dict[Digest, str] = {}
            replaced: List[OciCacheError] = []
            checks = _BlobChecks(layout)

            def problem_of(digest: Digest) -> str:
                try:
                    return layout.blob_problem(digest)
                except OSError as e:
                    return f"it cannot be read: {e.strerror or e}"

            def check() -> None:
                for digest in layers:  # each the file the flattening reads (_same_blob)
                    try:
                        with layout.open_blob(digest) as blob:
                            before = _same_blob(blob, digest, opened)
                            if blob.read(2) != b"\x1f\x8b" and checks.needed(digest, before):
                                started = time.time_ns()
                                problems[digest] = _content_problem_at(blob.fileno(), digest)
                                if not problems[digest]:
                                    checks.passed(digest, before, os.fstat(blob.fileno()),
                                                  started)
                    except CorruptCacheError as e:  # replaced: what was read is unchecked
                        replaced.append(e)
                    except (OSError, OciCacheError):
                        problems[digest] = problem_of(digest)

            checker = threading.Thread(target=check, name="ocicache-export-hash", daemon=True)
            checker.start()
            failure: Optional[OciCacheError] = None
            try:
                _Flattener(openers, out, names).run()
            except OciCacheError as e:
                failure = e
            checker.join()
            failure = failure or (replaced[0] if replaced else None)
            if failure is not None:  # traced to a corrupt layer, if one is
                problems.update((d, problem_of(d)) for d in layers if d not in problems)
            for digest in layers:
                if problems.get(digest):
                    reading = f"; reading it: {failure}" if failure is not None else ""
                    raise CorruptCacheError(
                        f"cannot export {self._ref}: layer {digest} is corrupt "
                        f"({problems[digest]}{reading}); run 'ocicache verify --repair', "
                        "then pull the image again")
            if failure is not None:
                raise failure
            checks.save()

        return self._naming_corruption(produce)

    def _naming_corruption(self, produce: Callable[[BinaryIO], None]
                           ) -> Callable[[BinaryIO], None]:
        """``produce``, with a corrupt blob's error naming the image exported."""
        def named(out: BinaryIO) -> None:
            try:
                produce(out)
            except CorruptCacheError as e:
                message = str(e)
                if not message.startswith("cannot export"):
                    raise CorruptCacheError(f"cannot export {self._ref}: {message}") from None
                raise
        return named

    def _save_name(self, override_name: str) -> Reference:
        return Reference.parse(override_name) if override_name else self._ref

    def tar_reader(self) -> BinaryIO:
        return _produced(self.writer(FORMAT_FILESYSTEM))

    def v1_tar_reader(self, override_name: str = "") -> BinaryIO:
        return _produced(self.writer(FORMAT_DOCKER, override_name))

    def oci_tar_reader(self, override_name: str = "") -> BinaryIO:
        return _produced(self.writer(FORMAT_OCI, override_name))

    def writer(self, export_format: str, override_name: str = "") -> Callable[[BinaryIO], None]:
        """A function writing the export as a tar to a stream; the checks (name, platform,
        every blob present) are made now, before anything is written. The readers run it
        in a thread behind a pipe; the command line writes straight into its file."""
        if export_format == FORMAT_FILESYSTEM:
            return self._filesystem_writer()
        if export_format == FORMAT_DOCKER:
            return self._docker_writer(override_name)
        if export_format == FORMAT_OCI:
            return self._oci_writer(override_name)
        raise OciCacheError(f"unknown export format {export_format!r}")

    def _docker_writer(self, override_name: str) -> Callable[[BinaryIO], None]:
        """Docker 25's hybrid: an OCI layout plus manifest.json and repositories."""
        name = self._save_name(override_name)
        _, image, manifest = self._image()
        self._check_container_image(manifest)
        self._check_layers(manifest)
        layout = self._provider.layout
        tagged = Reference(name.registry, name.repository, name.tag) if name.tag else None
        annotations = {ANNOTATION_CONTAINERD_NAME: str(name)}
        if name.tag:
            annotations[ANNOTATION_REF_NAME] = name.tag
        layers = list({layer.digest: layer for layer in manifest.layers}.values())
        docker_manifest = [{
            "Config": _blob_name(manifest.config.digest),
            "RepoTags": [tagged.familiar] if tagged else [],
            "Layers": [_blob_name(layer.digest) for layer in manifest.layers]}]
        root = Descriptor(image.media_type, image.digest, image.size, annotations,
                          image.platform)

        def produce(out: BinaryIO) -> None:
            archive = _TarWriter(out)
            archive.add_bytes("oci-layout", _OCI_LAYOUT_BYTES)
            archive.add_directory("blobs")
            archive.add_directory("blobs/sha256")
            checks = _BlobChecks(layout)
            for blob in [manifest.config, *layers, image]:
                archive.add_blob(layout, blob, _blob_name(blob.digest), checks)
            archive.add_bytes("index.json", Index(MEDIA_OCI_INDEX, (root,)).to_bytes())
            archive.add_bytes("manifest.json", json.dumps(docker_manifest).encode())
            if tagged is not None and manifest.layers:
                repository = tagged.familiar.rsplit(":", 1)[0]
                top = manifest.layers[-1].digest.hex
                archive.add_bytes("repositories",
                                  json.dumps({repository: {tagged.tag: top}}).encode())
            archive.close()
            checks.save()

        return self._naming_corruption(produce)

    def _oci_writer(self, override_name: str) -> Callable[[BinaryIO], None]:
        """An OCI layout tar of one platform, or of the whole index for ``"all"``."""
        name = str(self._save_name(override_name))
        layout = self._provider.layout
        extra: Dict[Digest, bytes] = {}  # a filtered index, made here and not in the cache
        if self._architecture == ALL_PLATFORMS:
            root = self._provider._find_named(self._ref)
            marked = layout.reachable([root])
            incomplete = [d for d in marked.digests if not layout.has_blob(d)]
            if incomplete or marked.unreadable:
                raise NotFoundError(
                    f"{self._ref} is not complete in the cache: {len(incomplete)} blobs are "
                    "missing (pull it with --all-platforms first)")
            top = Descriptor(root.media_type, root.digest, root.size)
            blobs = [Descriptor("", d, layout.blob_size(d) or 0)
                     for d in marked.digests if d != root.digest] + [top]
        elif "," in self._architecture:
            top, blobs, extra = self._provider._platform_subset(self._ref, self._architecture)
        else:
            _, image, manifest = self._image()
            self._check_layers(manifest)
            top = Descriptor(image.media_type, image.digest, image.size,
                             platform=image.platform)
            unique = {b.digest: b for b in manifest.blobs()}
            blobs = [*unique.values(), top]
        root_entry = top.named(name)

        def produce(out: BinaryIO) -> None:
            archive = _TarWriter(out)
            archive.add_bytes("oci-layout", _OCI_LAYOUT_BYTES)
            archive.add_directory("blobs")
            for algorithm in sorted({b.digest.algorithm for b in blobs}):
                archive.add_directory(f"blobs/{algorithm}")
            checks = _BlobChecks(layout)
            for blob in blobs:
                archive.add_blob(layout, blob, _blob_name(blob.digest), checks)
            for digest, data in extra.items():
                archive.add_bytes(_blob_name(digest), data)
            archive.add_bytes("index.json", Index(MEDIA_OCI_INDEX, (root_entry,)).to_bytes())
            archive.close()
            checks.save()

        return self._naming_corruption(produce)

    def sboms(self) -> List[BinaryIO]:
        """The SPDX predicates of this platform's BuildKit attestation, as in the blob,
        then the SBOMs attached to the image as referrers that ``pull --referrers``
        brought into the cache (``Provider.referrer_sboms``)."""
        root = self._provider._find_named(self._ref)
        subjects = [root.digest]
        if self._provider._subset_of(root):
            subjects.append(Digest.parse(self._provider._subset_of(root)))
        documents = self._buildkit_sboms(root, subjects) if root.is_index else []
        return [*documents, *self._provider.referrer_sboms(self._ref, subjects)]

    def _buildkit_sboms(self, root: Descriptor, subjects: List[Digest]) -> List[BinaryIO]:
        """The SPDX predicates of the BuildKit attestation of this platform's image
        in the index ``root``; the image's digest is added to ``subjects``."""
        layout = self._provider.layout
        index = Index.from_json(layout.read_blob(root.digest), what=f"index of {self._ref}")
        wanted = Platform.parse(self._architecture)
        image = select_platform(self._provider._children(index), wanted)
        if image is None:
            raise PlatformNotFoundError(f"no manifest found for {self._ref} platform {wanted}")
        self._provider._require_pulled(root.name, image)
        subjects.append(image.digest)
        attestations = [c for c in index.attestations_for(image.digest)
                        if c.annotations.get(ANNOTATION_REFERENCE_TYPE) == "attestation-manifest"]
        if len(attestations) > 1:
            raise OciCacheError(f"multiple attestation manifests found for {self._ref} "
                                f"platform {wanted}")
        if not attestations:
            return []
        self._provider._require_pulled(root.name, _replace(attestations[0],
                                                           platform=image.platform))
        documents = []
        for layer in self._provider.manifest(attestations[0]).layers:
            if layer.media_type != MEDIA_IN_TOTO or \
                    layer.annotations.get(ANNOTATION_PREDICATE_TYPE) != SPDX_PREDICATE_TYPE:
                continue
            data = layout.read_blob(layer.digest, MAX_STATEMENT_SIZE)
            statement = _load_json_object(data, f"in-toto statement {layer.digest}")
            if statement.get("predicateType") != SPDX_PREDICATE_TYPE:
                raise OciCacheError(f"unexpected predicate type {statement.get('predicateType')!r}"
                                    f" in {layer.digest}")
            try:
                text = data.decode()
            except UnicodeDecodeError:
                raise OciCacheError(f"in-toto statement {layer.digest} of {self._ref} is not "
                                    f"UTF-8 (it is {json.detect_encoding(data)}); JSON "
                                    "documents must be UTF-8") from None
            documents.append(io.BytesIO(_raw_json_member(text, "predicate").encode()))
        return documents  # type: ignore[return-value]


def _raw_json_member(text: str, key: str) -> str:
    """The text of a top-level member of ``text``, a JSON object as ``_parse_json`` took
    it (a byte order mark skipped), exactly as written; of a member written twice, the
    last, whose value json (and Go's encoding/json) decoded: the first was printed, and
    a statement checked as one SPDX document printed another."""
    text = text[1:] if text.startswith("\ufeff") else text
    found: Optional[Tuple[int, int]] = None
    position = _past_space(text, 0)
    if not text.startswith("{", position):
        raise OciCacheError("an in-toto statement must be a JSON object")
    position += 1
    while True:
        position = _past_space(text, position)
        if not text.startswith('"', position):
            break
        member, position = json.decoder.scanstring(text, position + 1)  # type: ignore[attr-defined]
        start = _past_space(text, _past_space(text, position) + 1)  # past the ":"
        _, end = _JSON_DECODER.raw_decode(text, start)
        if member == key:
            found = start, end
        position = _past_space(text, end)
        if text.startswith(",", position):
            position += 1
    if found is None:
        raise OciCacheError(f"the in-toto statement has no {key!r}")
    return text[found[0]:found[1]]


# =====================================================================================
# Package resolver
#
# linuxkit's ``@pkg:<path>`` templates: the canonical tag of the linuxkit package in
# a directory, from its build.yml (``org``, ``image``) and the git tree hash of the
# directory at HEAD, with ``-dirty`` when it has uncommitted changes.
# =====================================================================================

_PACKAGE_PREFIX = "@pkg:"


def package_resolver(base_dir: str) -> PackageResolver:
    """A resolver for templates in a file under ``base_dir``: ``@pkg:<path>`` becomes the
    package's canonical tag, other strings are returned unchanged, and ``@`` followed by
    anything else is an error."""

    def resolve(value: str) -> str:
        if not value.startswith("@"):
            return value
        if not value.startswith(_PACKAGE_PREFIX):
            raise OciCacheError(f"unknown template {_shorten(value)!r}: only "
                                f"{_PACKAGE_PREFIX}<path> is supported")
        relative = value[len(_PACKAGE_PREFIX):].lstrip("/")
        return package_tag(os.path.join(base_dir, relative))

    return resolve


def resolve_templates(obj: Any, resolver: PackageResolver) -> Any:
    """``obj`` with every string (keys included) of a JSON-like structure resolved."""
    if isinstance(obj, str):
        return resolver(obj)
    if isinstance(obj, dict):
        return {resolve_templates(k, resolver): resolve_templates(v, resolver)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(resolve_templates(v, resolver) for v in obj)
    return obj


def _build_yml_fields(path: str) -> Dict[str, str]:
    """The top-level scalar fields of a build.yml (the subset of YAML packages use)."""
    fields: Dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            match = re.match(r"^([A-Za-z_][\w-]*)\s*:\s*(.*?)\s*$", line)
            if match is None:
                continue
            value = match.group(2)
            if value[:1] in ("'", '"'):
                value = value[1:value.find(value[0], 1)] if value.find(value[0], 1) > 0 else value
            else:
                value = re.sub(r"\s+#.*$", "", value)
            fields[match.group(1)] = value
    return fields


def _git(directory: str, *args: str) -> str:
    try:
        result = _subprocess.run(["git", "-C", directory, *args], capture_output=True,
                                timeout=60)
    except FileNotFoundError:
        raise OciCacheError("resolving a package needs git, which is not on PATH") from None
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise OciCacheError(f"git {args[0]} in {directory} failed: "
                            f"{message[-1] if message else result.returncode}")
    return result.stdout.decode().strip()


def package_tag(directory: str) -> str:
    """The canonical tag of the linuxkit package in ``directory``."""
    build_yml = os.path.join(directory, "build.yml")
    if not os.path.isfile(build_yml):
        raise NotFoundError(f"no packages found: {build_yml} does not exist")
    fields = _build_yml_fields(build_yml)
    org = fields.get("org") or "linuxkit"
    image = fields.get("image") or os.path.basename(os.path.abspath(directory))
    top = _git(directory, "rev-parse", "--show-toplevel")
    relative = os.path.relpath(os.path.realpath(directory), os.path.realpath(top))
    spec = "HEAD^{tree}" if relative == "." else f"HEAD:{relative}"
    try:
        tree = _git(top, "rev-parse", spec)
    except OciCacheError:
        raise OciCacheError(f"package {directory} has no committed content in git") from None
    dirty = _git(top, "status", "--porcelain", "--untracked-files=all", "--", relative)
    return canonical_name(f"{org}/{image}:{tree}{'-dirty' if dirty else ''}")


# =====================================================================================
# Command line
#
# ``python3 ocicache.py [global flags] COMMAND ...``. Errors are one line on stderr,
# ``ocicache: error: ...``, with exit status 1 (2 for usage). ``--json`` output is
# stable for scripts. Progress goes to stderr, and only on a terminal.
# =====================================================================================

def _terminal_width(out: IO[str]) -> int:
    """The columns of the terminal ``out`` is, asked at each redraw since it may have been
    resized (SIGWINCH); 80 when it does not say."""
    try:
        return os.get_terminal_size(out.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80


def _fit(line: str, width: int) -> str:
    """``line`` cut to the terminal: a line that wraps moves the cursor down a row that
    redrawing in place does not know about, and every redraw scrolls. The last column
    stays free, as some terminals wrap as soon as it is written."""
    return line[:max(width - 1, 1)]


def _status(label: str, choices: Sequence[str], width: int) -> str:
    """``label: figures`` on one terminal line, the label shortened at its start, with
    the first of the ``choices`` of figures (each shorter than the one before) that fits."""
    figures = next((f for f in choices if len(f) < width), choices[-1])
    room = max(width - 1, 1) - len(figures) - 2
    if len(label) > room:
        label = "..." + label[len(label) - room + 3:] if room > 3 else ""
    return _fit(f"{label}: {figures}" if label else figures, width)


class _ProgressReader:
    """Counts bytes read through it and redraws one status line on a terminal."""

    def __init__(self, stream: IO[bytes], label: str, total: int, out: IO[str]) -> None:
        self._stream = stream
        self._label = label
        self._total = total
        self._out = out
        self._done = 0
        self._started = time.monotonic()
        self._drawn = 0.0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self._done += len(data)
        now = time.monotonic()
        if now - self._drawn >= 0.2 or not data:
            self._drawn = now
            rate = self._done / max(now - self._started, 1e-6)
            total = f" / {_human_size(self._total)}" if self._total else ""
            figures = f"{_human_size(self._done)}{total}"
            line = _status(self._label, (f"{figures} ({_human_size(int(rate))}/s)", figures),
                           _terminal_width(self._out))
            self._out.write(f"\r{line}\x1b[K")
            self._out.flush()
        return data

    def finish(self) -> None:
        self._out.write("\r\x1b[K")
        self._out.flush()


class _LineProgress(PullProgress):
    """One line per image, for logs and pipes."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._started = 0.0
        self._bytes = 0

    def begin(self, name: str, blobs: Sequence[Descriptor]) -> None:
        self._started, self._bytes = time.monotonic(), sum(b.size for b in blobs)

    def end(self, name: str, descriptor: Descriptor) -> None:
        self._finished("pulled", name, descriptor)

    def copied(self, name: str, descriptor: Descriptor) -> None:
        self._finished("copied", name, descriptor)

    def _finished(self, verb: str, name: str, descriptor: Descriptor) -> None:
        seconds = time.monotonic() - self._started
        self._out.write(f"{verb} {name} {descriptor.digest} ({_human_size(self._bytes)} of "
                        f"blobs, {seconds:.1f}s)\n")
        self._out.flush()

    def cached(self, name: str, descriptor: Descriptor) -> None:
        self._out.write(f"{name} {descriptor.digest} is already in the cache\n")
        self._out.flush()


class _TerminalProgress(_LineProgress):
    """Per-layer and total bytes, rate and ETA, redrawn in place on a terminal."""

    def __init__(self, out: IO[str]) -> None:
        super().__init__(out)
        self._lock = threading.Lock()
        self._sizes: Dict[Digest, int] = {}
        self._done: Dict[Digest, int] = {}
        self._started = 0.0
        self._drawn_lines = 0
        self._drawn_width = 0  # the longest line drawn in the block now on screen
        self._last_draw = 0.0
        self._name = ""

    def begin(self, name: str, blobs: Sequence[Descriptor]) -> None:
        with self._lock:
            self._name = name
            self._sizes = {b.digest: b.size for b in blobs}
            self._done = {b.digest: 0 for b in blobs}
            self._started = time.monotonic()
            self._drawn_lines = self._drawn_width = 0

    def advance(self, digest: Digest, size: int) -> None:
        with self._lock:
            if digest in self._done:
                self._done[digest] += size
            now = time.monotonic()
            if now - self._last_draw >= 0.1:
                self._last_draw = now
                self._draw(now)

    def _finished(self, verb: str, name: str, descriptor: Descriptor) -> None:
        with self._lock:
            if self._sizes:
                self._draw(time.monotonic())
            self._out.write(f"{verb} {name} {descriptor.digest}\n")
            self._out.flush()
            self._drawn_lines = 0
            self._sizes, self._done = {}, {}  # the next image of a copy draws no stale block

    def _draw(self, now: float) -> None:
        total, done = sum(self._sizes.values()), sum(self._done.values())
        elapsed = max(now - self._started, 1e-6)
        rate = done / elapsed
        eta = f"{(total - done) / rate:.0f}s" if rate > 0 and done < total else "-"
        width = _terminal_width(self._out)
        if self._drawn_width >= width:
            # Narrowed since the last draw: a terminal that re-wraps its lines has moved
            # them, so the block is left as it is and a new one drawn below it.
            self._drawn_lines = 0
        lines = [_fit(f"  {d.hex[:12]}  {_human_size(self._done[d])} / {_human_size(size)}",
                      width)
                 for d, size in self._sizes.items() if 0 < self._done[d] < size][:8]
        amounts = f"{_human_size(done)} / {_human_size(total)}"
        lines.append(_status(self._name, (f"{amounts} {_human_size(int(rate))}/s ETA {eta}",
                                          f"{amounts} ETA {eta}",
                                          f"{done * 100 // max(total, 1)}% ETA {eta}"), width))
        up = f"\x1b[{self._drawn_lines}F" if self._drawn_lines else ""
        self._out.write(up + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
        self._out.flush()
        self._drawn_lines = len(lines)
        self._drawn_width = max(len(line) for line in lines)


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return number


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {value!r}") from None
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"seconds must be 0 or more, not {value}")
    return seconds


def _named_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Optional[str]:
    """The command ``argv`` names after ``parser``'s own options, when each of those is
    spelled whole (``--cache DIR``, ``--jobs=4``, ``-q``); None when unsure (help, an
    abbreviation, an option it does not know): then every command is built."""
    options = parser._option_string_actions
    at = 0
    while at < len(argv):
        token = argv[at]
        if not token.startswith("-"):
            return token
        action = options.get(token.partition("=")[0])
        if action is None or isinstance(action, (argparse._HelpAction,
                                                 argparse._VersionAction)):
            return None
        if action.nargs == 0 and "=" not in token:
            at += 1
        elif action.nargs is None:
            at += 1 if "=" in token else 2
        else:
            return None
    return None


def _build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The command line's parser; with ``argv``, only the command it names is built (18
    commands' parsers are 1.5 ms of every start), which parses it as the whole would."""
    # Made here, not at module level: importing ocicache does not import argparse.
    class _Parser(argparse.ArgumentParser):
        """argparse with one-line usage errors (exit 2), as every other error."""

        # A command's arguments are added when that command is parsed or its help
        # shown: a run builds one command's, not sixteen (a few ms of each start).
        _define: Optional[Callable[[argparse.ArgumentParser], None]] = None

        def arguments(self, define: Callable[[argparse.ArgumentParser], None]) -> None:
            self._define = define

        def _defined(self) -> None:
            define, self._define = self._define, None
            if define is not None:
                define(self)

        def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
            self._defined()
            return super().parse_known_args(*args, **kwargs)

        def format_usage(self) -> str:
            self._defined()
            return super().format_usage()

        def format_help(self) -> str:
            self._defined()
            return super().format_help()

        def error(self, message: str) -> "NoReturn":  # type: ignore[override]
            self.exit(2, f"ocicache: error: {message} (see '{self.prog} --help')\n")

    parser = _Parser(
        prog="ocicache",
        description="An OCI image cache and registry client: pull, push, import, export, "
                    "inspect and clean images in a local OCI image layout (the layout "
                    "linuxkit uses).",
        epilog="Names are canonicalised: 'alpine' means docker.io/library/alpine:latest. "
               "Run 'ocicache COMMAND --help' for a command's options.")
    parser.add_argument("--cache", metavar="DIR", default=None,
                        help="cache directory (default: $OCICACHE_DIR, else "
                             "${XDG_CACHE_HOME:-~/.cache}/ocicache)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    noise.add_argument("-v", "--verbose", action="store_true", help="print more detail")
    parser.add_argument("--mirror", metavar="[REGISTRY=]URL", action="append", default=[],
                        help="pull through this mirror (repeatable; no REGISTRY= means every "
                             "registry); also $OCICACHE_MIRROR and $LINUXKIT_MIRROR")
    parser.add_argument("--insecure-registry", metavar="HOST[:PORT]", action="append",
                        default=[], help="allow plain HTTP and unverified TLS for this registry "
                                         "(loopback registries are always allowed HTTP)")
    parser.add_argument("--ca-file", metavar="PEM", action="append", default=[],
                        help="trust the CA certificates in this file too (repeatable)")
    parser.add_argument("--jobs", metavar="N", type=_positive, default=None,
                        help="blobs to download at once (default 4, and up to "
                             f"{_SMALL_BLOB_JOBS} while those left are small)")
    parser.add_argument("--version", action="version", version=f"ocicache {__version__}")
    only = _named_command(parser, argv) if argv is not None else None

    class _Unbuilt(_Parser):
        """A command other than the one named: never parsed, so never made."""

        def __init__(self) -> None:  # nothing of a parser is made
            pass

        def arguments(self, define: Callable[[argparse.ArgumentParser], None]) -> None:
            pass

    class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
        def add_parser(self, name: str, **kwargs: Any) -> Any:
            if only is not None and name != only:
                return _Unbuilt()
            return super().add_parser(name, **kwargs)

    parser.register("action", "parsers", _Commands)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    p = commands.add_parser("pull", help="pull images from registries into the cache",
                            description="Pull each NAME for the platform (default: the host). "
                                        "An image already complete in the cache makes no "
                                        "request; only missing blobs are downloaded, and "
                                        "every byte is verified.")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("names", metavar="NAME", nargs="+")
        which = p.add_mutually_exclusive_group()
        which.add_argument("--platform", metavar="P[,P...]", default="",
                           help="os/arch[/variant], e.g. linux/arm64, or a comma list, e.g. "
                                "linux/amd64,linux/arm64 (default: the host)")
        which.add_argument("--all-platforms", action="store_true",
                           help="pull every platform of a multi-platform image")
        p.add_argument("--always", action="store_true",
                       help="ask the registry even when the image is in the cache (follows a "
                            "moved tag)")
        p.add_argument("--arch-tags", action="store_true",
                       help="also name each platform <NAME>-<arch>, as linuxkit cache pull does")
        p.add_argument("--referrers", action="store_true",
                       help="also pull what refers to the image in its registry (signatures, "
                            "SBOMs), each subject's named <repository>:sha256-<hex>, as the "
                            "registry's fallback tag")
        p.set_defaults(run=_cmd_pull)

    p = commands.add_parser("push", help="push an image from the cache to a registry",
                            description="Push NAME (an image or a multi-platform index) to "
                                        "its registry, or as --remote-name. Blobs the "
                                        "registry has are not sent again; the tag is "
                                        "written last.")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", metavar="NAME")
        p.add_argument("--remote-name", metavar="R", default="",
                       help="push under this name instead")
        p.add_argument("--with-arch-tags", action="store_true",
                       help="also tag each platform <R>-<arch>, as linuxkit cache push does")
        p.add_argument("--override", action="store_true",
                       help="push even when the remote tag exists: a remote index is merged "
                            "(local first), a remote single manifest replaced")
        p.set_defaults(run=_cmd_push)

    p = commands.add_parser("ls", help="list the named images",
                            description="List every named image: name, root digest, the "
                                        "platforms complete in the cache, and size on disk.")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print a JSON array (stable for scripts)")
        p.set_defaults(run=_cmd_ls)

    p = commands.add_parser("inspect", help="print an image's manifest or config",
                            description="Print the root index or manifest of NAME as JSON; "
                                        "with --platform, that platform's manifest; with "
                                        "--config, its image config; with --raw, "
                                        "the bytes as stored instead of indented.")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", metavar="NAME")
        p.add_argument("--platform", metavar="P", default=None,
                       help="os/arch[/variant], e.g. linux/arm64 (default for --config: the host)")
        p.add_argument("--config", action="store_true", help="print the image config instead")
        p.add_argument("--raw", action="store_true",
                       help="print the document's bytes as stored (its digest is theirs)")
        p.set_defaults(run=_cmd_inspect)

    p = commands.add_parser("import", help="load an image archive",
                            description="Load a tar archive into the cache: an OCI layout "
                                        "(docker buildx --output type=oci, skopeo "
                                        "oci-archive:), or a docker save tar (any Docker "
                                        "version), compressed with gzip, xz, bzip2 or "
                                        "zstd or not. '-' reads standard input. Prints "
                                        "the names loaded.")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", metavar="FILE|-")
        p.add_argument("--name", metavar="NAME", default="",
                       help="the name for the archive's image (for archives that name it only "
                            "by a bare tag, or not at all); of several images, the one whose "
                            "tag is NAME's tag")
        p.set_defaults(run=_cmd_import)

    p = commands.add_parser("export", help="write an image as a tar archive",
                            description="Write NAME as a tar: 'oci' (an OCI layout, for skopeo "
                                        "oci-archive: and containerd), 'docker' (for docker "
                                        "load and podman load), or 'filesystem' (the "
                                        "flattened root filesystem). The file appears only "
                                        "when complete.")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", metavar="NAME")
        p.add_argument("--format", choices=(FORMAT_OCI, FORMAT_DOCKER, FORMAT_FILESYSTEM),
                       required=True)
        p.add_argument("-o", "--output", metavar="FILE|-", required=True,
                       help="where to write ('-' for standard output); an existing file is replaced")
        p.add_argument("--platform", metavar="P[,P...]", default="",
                       help="os/arch[/variant] (default: the host); 'all' writes the whole index, "
                            "a comma list an index of those platforms and their attestations "
                            "(oci only)")
        p.add_argument("--name", metavar="N", default="", dest="save_name",
                       help="the name to record in the tar (oci, docker)")
        p.set_defaults(run=_cmd_export)

    p = commands.add_parser("sbom", help="print the SBOMs attached to an image",
                            description="Print the SPDX documents of the BuildKit attestation "
                                        "attached to NAME's image for the platform, then the "
                                        "SPDX and CycloneDX SBOMs attached to the image or "
                                        "its index as referrers (pull --referrers brings "
                                        "them into the cache), each as stored, followed by "
                                        "a newline; nothing if it has none.")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", metavar="NAME")
        p.add_argument("--platform", metavar="P", default="", help="os/arch[/variant] (default: host)")
        p.set_defaults(run=_cmd_sbom)

    p = commands.add_parser("rm", help="remove names and the blobs only they use",
                            description="Remove each NAME; blobs that another name still "
                                        "uses are kept. Every NAME must exist, or nothing "
                                        "is removed.")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("names", metavar="NAME", nargs="+")
        p.add_argument("--published-only", action="store_true",
                       help="remove only names whose registry serves the same digest")
        p.set_defaults(run=_cmd_rm)

    p = commands.add_parser("clean", help="remove every name and blob",
                            description="Empty the cache: every name and every blob. With "
                                        "--published-only, only the names whose registry "
                                        "serves the same digest (and the blobs only they "
                                        "use).")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("--published-only", action="store_true",
                       help="remove only what can be pulled again as it is")
        p.set_defaults(run=_cmd_clean)

    p = commands.add_parser("gc", help="delete blobs no name uses",
                            description="Delete blobs that no name reaches and stale "
                                        "temporary files, except those younger than the "
                                        "grace period (a concurrent pull may not have "
                                        "named them yet).")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
        p.add_argument("--grace", metavar="SECONDS", type=_seconds, default=DEFAULT_GC_GRACE_SECONDS,
                       help=f"keep blobs younger than this (default {DEFAULT_GC_GRACE_SECONDS:.0f})")
        p.set_defaults(run=_cmd_gc)

    p = commands.add_parser("verify", help="re-hash every blob and check every name",
                            description="Re-hash every blob and check that every name "
                                        "reaches complete content that agrees with its "
                                        "descriptors (sizes, media types, pinned digests). "
                                        "Each problem names the images needing the blob. "
                                        "Exits 1 if anything is corrupt, missing or wrong.")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repair", action="store_true",
                       help="delete corrupt blobs, so that the next pull fetches them again")
        p.set_defaults(run=_cmd_verify)

    # Registry operations: they ask the registry itself (never a mirror) and leave the
    # cache alone.
    p = commands.add_parser("tags", help="list the tags of a repository in its registry",
                            description="Print every tag of NAME's repository, one a line, "
                                        "in the registry's order (NAME's own tag, if any, "
                                        "is ignored). Every page is fetched (the Link "
                                        "header), but only from the registry's own host; "
                                        "entries that are not tags are left out.",
                            epilog="example: ocicache tags ghcr.io/linuxkit/init")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", metavar="NAME")
        p.add_argument("--json", action="store_true",
                       help='print {"name": ..., "tags": [...]} (stable for scripts)')
        p.set_defaults(run=_cmd_tags)

    p = commands.add_parser("digest", help="print the digest a name has in its registry",
                            description="Print the digest NAME has in its registry now, "
                                        "asked with HEAD (Docker Hub does not count a HEAD "
                                        "against its pull rate limit); with --platform, "
                                        "the digest of that platform's image. The cache "
                                        "is not used.",
                            epilog="example: ocicache digest alpine:3.20 --platform linux/arm64")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", metavar="NAME")
        p.add_argument("--platform", metavar="P", default="",
                       help="os/arch[/variant]: the digest of that platform's image (of an "
                            "index, its child) instead of the root's")
        p.add_argument("--json", action="store_true",
                       help="print the descriptor (name, digest, mediaType, size, platform)")
        p.set_defaults(run=_cmd_digest)

    p = commands.add_parser("referrers", help="list what refers to an image in its registry "
                                              "(signatures, SBOMs, attestations)",
                            description="Print the referrers of NAME (OCI 1.1: manifests "
                                        "whose 'subject' is NAME's manifest or index), one "
                                        "a line: digest, artifact type, size. The "
                                        "registry's referrers API is asked (every page); a "
                                        "registry without it (distribution 2, Docker Hub, "
                                        "GHCR) is read through the fallback tag "
                                        "sha256-<hex> that oras, regclient and cosign "
                                        "write. NAME may be a tag or a digest; for a "
                                        "multi-platform image the referrers of the index "
                                        "are listed, and --platform lists those of one "
                                        "platform's image instead. The cache is not used.",
                            epilog="example: ocicache referrers --artifact-type "
                                   "application/spdx+json ghcr.io/o/app:1")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", metavar="NAME")
        p.add_argument("--artifact-type", metavar="TYPE", default="",
                       help="only referrers of this artifact type, e.g. "
                            "application/vnd.dev.sigstore.bundle.v0.3+json")
        p.add_argument("--platform", metavar="P", default="",
                       help="os/arch[/variant]: the referrers of that platform's image (an "
                            "index's child) instead of the index's")
        p.add_argument("--json", action="store_true",
                       help='print {"name", "subject", "source", "referrers": [descriptors]}, '
                            'source being "api" or the fallback tag read')
        p.set_defaults(run=_cmd_referrers)

    p = commands.add_parser("login", help="check and store credentials for a registry",
                            description="Check a user name and password against REGISTRY "
                                        "(a request to its /v2/ with them, through its "
                                        "token server if it has one), then store them "
                                        "where docker does: the credential helper "
                                        "config.json names for it (credHelpers, "
                                        "credsStore), else 'auths' in "
                                        "$DOCKER_CONFIG/config.json (default "
                                        "~/.docker/config.json), written with mode 0600. "
                                        "Nothing is stored if the check fails. Without "
                                        "--password-stdin or -p, the password is asked "
                                        "for on the terminal.",
                            epilog="example: echo \"$TOKEN\" | ocicache login ghcr.io -u "
                                   "me --password-stdin")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("registry", metavar="REGISTRY",
                       help="host[:port], e.g. ghcr.io or localhost:5000 (docker.io: Docker Hub)")
        p.add_argument("-u", "--username", metavar="USER", default="",
                       help="the user name (asked for on a terminal when left out)")
        secret = p.add_mutually_exclusive_group()
        secret.add_argument("--password-stdin", action="store_true",
                            help="read the password from standard input (its last newline "
                                 "is dropped)")
        secret.add_argument("-p", "--password", metavar="PASSWORD", default=None,
                            help="the password itself: other users can see it in the process "
                                 "list, so prefer --password-stdin")
        p.set_defaults(run=_cmd_login)

    p = commands.add_parser("logout", help="remove the stored credentials for a registry",
                            description="Remove the credentials docker keeps for REGISTRY: "
                                        "from the credential helper config.json names for "
                                        "it, and from 'auths' in $DOCKER_CONFIG/config.json "
                                        "(other files, such as podman's auth.json, are left "
                                        "alone). Not being logged in is not an error.",
                            epilog="example: ocicache logout ghcr.io")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("registry", metavar="REGISTRY",
                       help="host[:port], e.g. ghcr.io or localhost:5000 (docker.io: Docker Hub)")
        p.set_defaults(run=_cmd_logout)

    p = commands.add_parser("copy", help="copy an image between registries, the cache and "
                                         "OCI layouts",
                            description="Copy SRC to DST. SRC: a registry name "
                                        "('docker://' optional), cache:NAME, "
                                        "oci:DIR[:NAME] (an OCI layout, every blob hashed "
                                        "as it is read) or oci-archive:FILE[:NAME]. DST: a "
                                        "registry name, oci:DIR[:TAG] (an OCI layout "
                                        "directory, new or one to add to: its other "
                                        "images are kept) or oci-archive:FILE[:TAG]. Every "
                                        "platform is copied and the digest kept unless "
                                        "--platform filters it: then DST gets an index of "
                                        "those platforms and their attestations. Blobs "
                                        "already at DST are not sent, blobs of another "
                                        "repository of the same registry are mounted, the "
                                        "rest stream through the cache (an interrupted "
                                        "copy resumes). Tags are written last: a failed "
                                        "copy leaves none; a layout appears only when "
                                        "complete.",
                            epilog="example: ocicache copy --platform linux/amd64,linux/arm64 "
                                   "ghcr.io/o/app:1 registry.example.com/app:1")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("source", metavar="SRC")
        p.add_argument("destination", metavar="DST")
        which = p.add_mutually_exclusive_group()
        which.add_argument("--platform", metavar="P[,P...]", default="",
                           help="copy only these platforms, e.g. linux/amd64,linux/arm64")
        which.add_argument("--all-platforms", action="store_true",
                           help="copy every platform (the default), keeping the digest")
        p.add_argument("--all-tags", action="store_true",
                       help="copy every tag of SRC's repository (DST: a repository, or a layout "
                            "holding each tag)")
        p.add_argument("--referrers", action="store_true",
                       help="also copy what refers to each image (signatures, SBOMs): into a "
                            "registry's referrers list or fallback tag sha256-<hex>, or a "
                            "layout's index named sha256-<hex>")
        p.add_argument("--jobs", metavar="N", type=_positive, default=argparse.SUPPRESS,
                       help="blobs to copy at once (default: the global --jobs, 4)")
        p.add_argument("--json", action="store_true",
                       help='print {"source": ..., "destination": ..., "images": [{"name", '
                            '"digest", "mediaType", "size"}]}')
        p.set_defaults(run=_cmd_copy)

    p = commands.add_parser("sync", help="mirror the repositories a file lists into a "
                                         "registry or an OCI layout",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description=_SYNC_HELP,
                            epilog="example: ocicache sync --dry-run mirror.json")

    @p.arguments
    def _(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", metavar="FILE", help="the sync file (JSON; - for standard input)")
        p.add_argument("--dry-run", action="store_true",
                       help="say what would be copied; write nothing, send no blob")
        p.add_argument("--json", action="store_true",
                       help='print {"target": ..., "dryRun": ..., "images": [{"source", '
                            '"target", "status", "digest", "error"}]}')
        p.add_argument("--jobs", metavar="N", type=_positive, default=argparse.SUPPRESS,
                       help="blobs to copy at once (default: the global --jobs, 4)")
        p.set_defaults(run=_cmd_sync)
    if only is not None and only not in commands.choices:
        return _build_parser()  # not a command: argparse says so, listing them all
    return parser


_SYNC_HELP = """\
Copy the images FILE lists into its target, tag by tag, as 'skopeo sync' does. Each
tag's digest is asked of the source and the target with HEAD: an image the target
holds already is left alone (no blob is sent or fetched); the others are copied as
'copy' does, each image's tag written last, so an interrupted sync leaves nothing
half-copied and the next run sends only what is missing. One line per image:
copied, unchanged, would copy (--dry-run) or failed; exit status 1 if any failed,
after the others were copied.

FILE is a JSON object:
  target     a registry prefix ("127.0.0.1:5000/mirror": an image docker.io/library/
             alpine:3.20 goes to 127.0.0.1:5000/mirror/library/alpine:3.20), or
             "oci:DIR", an OCI layout directory (new, or one to add to) naming each
             image by its whole source name, for carrying across an air gap
  platforms  "all" (the default: digests kept) or a list, as ["linux/amd64"]
  images     a list of {"source": REPOSITORY, "tags": TAGS, "platforms": ...}, where
             TAGS is a list of tags, {"regex": "..."} (each tag must match whole), or
             {"semver": "RANGE"}. A RANGE is comparators that must all hold (">=1.2
             <2"), alternatives joined by "||"; operators >=, >, <=, <, = (or none), ~
             (~1.2: >=1.2.0 <1.3.0) and ^ (^1.2: <2.0.0; ^0.2: <0.3.0), versions of 1
             to 3 numbers with an optional "v"; a partial version stands for its range
             (">1.2" is >=1.3.0). Tags that are not versions never match; a
             pre-release (1.3.0-rc.1) only if the range names one of the same version.

Example:
  {"target": "127.0.0.1:5000/mirror", "platforms": ["linux/amd64", "linux/arm64"],
   "images": [{"source": "docker.io/library/alpine", "tags": ["3.19", "3.20"]},
              {"source": "ghcr.io/linuxkit/init", "tags": {"regex": "v1\\\\.[0-9]+"}},
              {"source": "quay.io/o/app", "tags": {"semver": ">=1.2 <2"},
               "platforms": "all"}]}"""


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message)


def _cmd_pull(provider: Provider, args: argparse.Namespace) -> int:
    architecture = ALL_PLATFORMS if args.all_platforms else args.platform
    if args.platform:
        _platform_list(args.platform)
    for name in [Reference.parse(name) for name in args.names]:
        source = provider.image_pull(name, "", architecture, args.always, args.arch_tags)
        root = source.descriptor()
        if root is not None:  # as import does: stdout names what is now in the cache
            _say(args, f"{name} {root.digest}")
        if args.referrers:
            for referrers in provider.pull_referrers(name, architecture):
                _say(args, f"{referrers.name} {referrers.digest}")
    return 0


def _cmd_push(provider: Provider, args: argparse.Namespace) -> int:
    provider.push(args.name, args.remote_name, args.with_arch_tags, args.override)
    return 0


def _cmd_ls(provider: Provider, args: argparse.Namespace) -> int:
    listing = provider._listing(raw_entries=False)
    write = sys.stdout.write
    if args.json:
        # An image a line, as json.dumps writes each (indent= takes the pure-Python
        # encoder: a second for 20,000 names), its strings by json's C encoder and each
        # media type and platform list encoded once; written in pieces as they come.
        encode = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
        encoded: Dict[Any, str] = {}

        def once(value: Any) -> str:
            if value not in encoded:
                encoded[value] = encode(value) if isinstance(value, str) else \
                    "[" + ", ".join(map(encode, value)) + "]"
            return encoded[value]
        lines = [f'{{"name": {encode(name)}, "digest": {encode(digest)}, "mediaType": '
                 f'{once(media_type)}, "platforms": {once(platforms)}, "size": {size}}}'
                 for _, name, digest, media_type, platforms, size in listing]
        write("[\n" if lines else "[]\n")
        for start in range(0, len(lines), 4096):
            write(",\n".join(lines[start:start + 4096]) +
                  (",\n" if start + 4096 < len(lines) else "\n]\n"))
        return 0
    # Each row held as listed, its digest cut and its size written out only as it is
    # written (20,000 of those strings were 2.4 MB of the first ls's peak).
    rows = [(name if name.isprintable() and name.strip(" ") == name else _printable(name),
             digest, platforms, size) for _, name, digest, _, platforms, size in listing]

    def shown(platforms: Tuple[str, ...]) -> str:
        return ",".join(platforms) or "-"
    widths = [max([len("NAME"), *(len(row[0]) for row in rows)]),
              max([len("DIGEST"), *(min(19, len(row[1])) for row in rows)]),
              max([len("PLATFORMS"), *(len(shown(row[2])) for row in rows)])]
    write(f"{'NAME'.ljust(widths[0])}  {'DIGEST'.ljust(widths[1])}  "
          f"{'PLATFORMS'.ljust(widths[2])}  SIZE\n")
    for start in range(0, len(rows), 4096):  # written in pieces: never a second copy
        write("".join(f"{name.ljust(widths[0])}  {digest[:19].ljust(widths[1])}  "
                      f"{shown(platforms).ljust(widths[2])}  {_human_size(size)}\n"
                      for name, digest, platforms, size in rows[start:start + 4096]))
    return 0


def _cmd_inspect(provider: Provider, args: argparse.Namespace) -> int:
    if args.platform is None and not args.config:
        descriptor = provider.resolve(args.name)[0]
    else:
        descriptor = provider.resolve(args.name, args.platform or "")[1]
    data = provider.layout.read_blob(descriptor.digest)
    if args.config:
        data = provider.layout.read_blob(provider.manifest(descriptor).config.digest)
    if args.raw:
        sys.stdout.buffer.write(data)
        return 0
    what = f"config of {args.name}" if args.config else f"manifest of {args.name}"
    sys.stdout.buffer.write(_json_bytes(_parse_json(data, what), indent=2) + b"\n")
    return 0


def _cmd_import(provider: Provider, args: argparse.Namespace) -> int:
    show = not args.quiet and sys.stderr.isatty()
    with contextlib.ExitStack() as stack:
        if args.file == "-":
            raw: IO[bytes] = sys.stdin.buffer
            total = 0
        else:
            raw = stack.enter_context(open(args.file, "rb"))
            total = os.fstat(raw.fileno()).st_size
        stream: Any = _ProgressReader(raw, f"importing {args.file}", total, sys.stderr) \
            if show else raw
        try:
            loaded = provider.image_load(stream, args.name)
        finally:
            if show:
                stream.finish()
    for descriptor in loaded:
        if descriptor.name:
            _say(args, f"{descriptor.name} {descriptor.digest}")
        else:
            print(f"ocicache: warning: the archive does not name {descriptor.digest}; it "
                  "was loaded but nothing was named (name it with import --name NAME)",
                  file=sys.stderr)
    return 0


def _cmd_export(provider: Provider, args: argparse.Namespace) -> int:
    if (args.platform == ALL_PLATFORMS or "," in args.platform) and args.format != "oci":
        raise OciCacheError(f"--platform {args.platform} needs --format oci")
    if "," in args.platform:
        _platform_list(args.platform)
    source = provider.new_source(args.name, args.platform)
    if not isinstance(source, _CacheSource):
        raise AssertionError("a Provider makes _CacheSource objects")
    write = source.writer(args.format, args.save_name)
    if args.output == "-":
        write(sys.stdout.buffer)
        return 0
    _refuse_in_cache(args.output, provider.root, "export to a file outside it")
    _write_output(args.output, write)  # main() raises a signal as an exception: see there
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt, so that what
    a command was writing is cleaned up."""


_signals_received: List[int] = []  # by _terminate_as_exception's handler, in order


@contextlib.contextmanager
def _terminate_as_exception(ending: bool = False) -> Iterator[None]:
    """SIGTERM raised as _Terminated and SIGINT as KeyboardInterrupt, each recorded in
    ``_signals_received`` before it is raised: a handler run while the main thread is in
    a finalizer (a generator closed or a stream collected as its last reference goes)
    raises there, where Python prints "Exception ignored" and goes on, and the export
    finished as if no signal had come. ``_raise_if_signalled`` raises it again, so the
    report of it ignored is not printed: the error stays one line; before export's
    rename, and as the body ends (any other command exited 0 having been signalled).

    With ``ending`` (the process's own command), once a signal came both are ignored
    from the end of the body on, rather than their handlers put back: all that is left
    is one line printed and the exit, and a second Ctrl-C there printed a traceback
    (in the line's printing, or in Python's shutdown), a second SIGTERM ended the
    process with -15. One in the body's cleanup is still raised: it may be stuck."""
    import signal

    def terminated(signum: int, frame: Any) -> NoReturn:
        _signals_received.append(signum)
        raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def unraisable(report: Any) -> None:
        if not (_signals_received and
                isinstance(report.exc_value, (_Terminated, KeyboardInterrupt))):
            hook(report)

    if threading.current_thread() is not threading.main_thread():
        yield  # main() called from a thread: signals are the main thread's business
        return
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored stays ignored
            previous[signum] = signal.signal(signum, terminated)
    del _signals_received[:]
    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
        _raise_if_signalled()  # a command does not end as if no signal had come
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if ending and _signals_received else handler)
        sys.unraisablehook = hook
        del _signals_received[:]


def _raise_if_signalled() -> None:
    """Raise the first signal ``_terminate_as_exception`` recorded, if one came."""
    import signal
    if _signals_received:
        raise _Terminated() if _signals_received[0] == signal.SIGTERM else \
            KeyboardInterrupt()


def _resolve_output(path: str) -> str:
    """``path`` with its links resolved as the kernel lets this process follow them
    (``fs.protected_symlinks``): a link in a sticky, world-writable directory such as
    /tmp is followed only if it is this user's or the directory owner's. realpath()
    follows every link, so a link another user planted at ``/tmp/out.tar`` made root's
    export replace any file it named."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    current, followed = os.sep, 0
    while parts:
        part = parts.pop(0)
        candidate = os.path.join(current, part)
        try:
            info = os.lstat(candidate)
        except OSError:  # missing (a new file), or not to be looked into: as it is
            return os.path.join(candidate, *parts)
        if not stat.S_ISLNK(info.st_mode):
            current = candidate
            continue
        parent = os.stat(current)
        if parent.st_mode & stat.S_ISVTX and parent.st_mode & stat.S_IWOTH and \
                info.st_uid not in (os.geteuid(), parent.st_uid):
            raise OciCacheError(f"cannot write {path}: {candidate} is a link of another "
                                f"user's (uid {info.st_uid}) in the shared directory "
                                f"{current}; remove it, or write elsewhere")
        followed += 1
        if followed > 40:
            raise OciCacheError(f"cannot write {path}: too many levels of symbolic links")
        target = os.readlink(candidate)
        parts = [p for p in target.split(os.sep) if p] + parts
        if target.startswith(os.sep):
            current = os.sep
    return os.path.normpath(current)


def _write_output(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write an export to ``path`` without ever replacing what is there unless it is a
    regular file: a device or a FIFO (or a link to one) is written into as it is, as
    docker/cli does since ``docker save -o /dev/null`` replaced root's /dev/null. A
    regular file, or a new one, is written beside itself and renamed over (a link
    stays a link: its target is replaced); an existing file keeps its mode, a new one
    gets the umask's."""
    target = _resolve_output(path)
    try:
        existing: Optional[os.stat_result] = os.stat(target)
    except FileNotFoundError:
        existing = None
    frees = "free space there, or export to another file"
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise OciCacheError(f"cannot write {path}: it is a directory")
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        try:
            with open(os.open(target, os.O_WRONLY | os.O_CLOEXEC), "wb",
                      buffering=COPY_BUFFER_SIZE) as out:
                write(out)
        except OSError as e:
            if not _is_write_error(e):
                raise
            raise _disk_error(path, e, frees) from None
        return
    directory = os.open(os.path.dirname(target), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # Named before it exists, so that a signal however soon after removes it.
        temp = _temporary_name(f".{os.path.basename(target)}")
        try:
            fd = os.open(temp, _NEW_FILE, _CREATE_MODE, dir_fd=directory)
            with os.fdopen(fd, "wb", buffering=COPY_BUFFER_SIZE) as out:
                write(out)
                if existing is not None:
                    os.fchmod(out.fileno(), stat.S_IMODE(existing.st_mode))
            _raise_if_signalled()  # one whose exception a finalizer swallowed
            os.replace(temp, os.path.basename(target), src_dir_fd=directory,
                       dst_dir_fd=directory)
        except BaseException as e:
            if not isinstance(e, FileExistsError):  # that one is not ours
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=directory)
            if isinstance(e, OSError) and _is_write_error(e):
                raise _disk_error(path, e, frees) from None
            raise
    finally:
        os.close(directory)


def _cmd_sbom(provider: Provider, args: argparse.Namespace) -> int:
    import shutil
    for document in provider.new_source(args.name, args.platform).sboms():
        with document:  # in pieces: a referrer's SBOM layer may be of any size
            shutil.copyfileobj(document, sys.stdout.buffer, COPY_BUFFER_SIZE)
        sys.stdout.buffer.write(b"\n")
    return 0


def _published(provider: Provider, args: argparse.Namespace,
               names: Iterable[str]) -> Tuple[List[str], List[str]]:
    """The names whose registry serves the same digest, and those that could not be
    checked; every other name is said to be kept. One registry that refuses or cannot
    be reached does not stop the others being asked."""
    chosen, unchecked = [], []
    for name in names:
        try:
            published = provider.is_published(name)
        except OciCacheError as e:
            print(f"ocicache: warning: keeping {name}: cannot check it: {_one_line(str(e))}",
                  file=sys.stderr)
            unchecked.append(name)
            continue
        if published:
            chosen.append(name)
        else:
            _say(args, f"keeping {name}: its registry does not serve this digest")
    return chosen, unchecked


def _is_canonical(name: str) -> bool:
    try:
        return canonical_name(name) == name
    except InvalidReferenceError:
        return False


def _as_stored(names: Sequence[str], stored: Set[str]) -> List[str]:
    """Each of ``names`` as ``rm`` takes it: spelled as given when index.json (whose
    names are ``stored``) holds it so, else canonical; once each."""
    return list(dict.fromkeys(n if n in stored else canonical_name(n) for n in names))


def _cmd_rm(provider: Provider, args: argparse.Namespace) -> int:
    unchecked: List[str] = []
    if args.published_only:
        stored = set(provider.layout.index_names())
        names = _as_stored(args.names, stored)
        for name in names:  # every name must exist before anything is removed; by name
            # only, so that a name whose pinned digest lies (verify reports it) can be
            matches = _name_predicate(name)  # removed
            if not any(matches(s) for s in stored if s):
                raise NotFoundError(f"no image named {name} in the cache {provider.root}")
        names, unchecked = _published(provider, args, names)
        deleted = provider.remove(*names) if names else []
    else:
        names, deleted = provider._remove(args.names, as_stored=True)
    for name in names:
        _say(args, f"removed {name}")
    _say(args, f"{len(deleted)} blobs deleted")
    if unchecked:
        print(f"ocicache: error: {len(unchecked)} names could not be checked against their "
              "registries and were kept", file=sys.stderr)
        return 1
    return 0


def _cmd_clean(provider: Provider, args: argparse.Namespace) -> int:
    if not args.published_only:
        count = provider.clean()
        _say(args, f"cache {provider.root} emptied ({count} blobs deleted)")
        return 0
    names = [d.name for d in provider.names() if "/" in d.name]  # not skopeo's bare tags
    if not names:
        return 0
    return _cmd_rm(provider, argparse.Namespace(**{**vars(args), "names": names}))


def _cmd_gc(provider: Provider, args: argparse.Namespace) -> int:
    report = provider.gc(args.grace, args.dry_run)
    if args.verbose:
        for name, size in report.deleted:
            print(f"{'would delete' if args.dry_run else 'deleted'} {name} ({size} bytes)")
    verb = "would free" if args.dry_run else "freed"
    _say(args, f"{verb} {_human_size(report.freed_bytes)} in {len(report.deleted)} files; "
               f"{report.kept_young} unused blobs kept inside the grace period")
    return 0


def _cmd_verify(provider: Provider, args: argparse.Namespace) -> int:
    report = provider.verify(args.repair)
    for kind, problems in (("corrupt", report.corrupt), ("missing", report.missing),
                           ("wrong", report.wrong), ("deleted", report.repaired)):
        for problem in problems:
            print(f"{kind}: {problem}")
    if report.ok:
        _say(args, f"ok: {report.checked} blobs verified")
        return 0
    repairable = any(not p.startswith("/") for p in report.corrupt)  # not stray files
    advice = "; pull the images named to fetch them again" if report.repaired else \
        ("; 'ocicache verify --repair' deletes the corrupt blobs" if repairable else "")
    print(f"ocicache: error: {len(report.corrupt)} corrupt, {len(report.missing)} missing and "
          f"{len(report.wrong)} wrong in {provider.root}{advice}", file=sys.stderr)
    return 1


def _cmd_tags(provider: Provider, args: argparse.Namespace) -> int:
    tags = provider.registry.list_tags(args.name)
    if args.json:
        json.dump({"name": Reference.parse(args.name).name, "tags": tags}, sys.stdout, indent=2)
        print()
        return 0
    for tag in tags:
        print(tag)
    return 0


def _cmd_digest(provider: Provider, args: argparse.Namespace) -> int:
    descriptor = provider.remote_digest(args.name, args.platform)
    if args.json:
        json.dump({"name": str(Reference.parse(args.name)), **descriptor.to_json()},
                  sys.stdout, indent=2)
        print()
        return 0
    print(descriptor.digest)
    return 0


def _cmd_referrers(provider: Provider, args: argparse.Namespace) -> int:
    found = provider.referrers(args.name, args.artifact_type, args.platform)
    if args.json:
        json.dump(found.to_json(), sys.stdout, indent=2)
        print()
        return 0
    for referrer in found.referrers:
        print(f"{referrer.digest} {_one_field(referrer.artifact_type or referrer.media_type)} "
              f"{referrer.size}")
    return 0


_FIELD_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


def _one_field(text: str, limit: int = 255) -> str:
    """A registry's string as one field of a line split at spaces: whitespace, control
    and non-ASCII characters (and ``%``) percent-encoded, at most ``limit`` characters
    shown (a media type has 255 at most, RFC 6838); --json has it as it is."""
    import urllib.parse
    return _shorten(urllib.parse.quote(text, safe=_FIELD_SAFE, errors="backslashreplace"), limit)


_MAX_PASSWORD_INPUT = 64 * 1024  # a token from standard input; more is a mistake


def _cmd_login(provider: Provider, args: argparse.Namespace) -> int:
    registry = _login_registry(args.registry)  # a bad name stops before any prompt
    username, terminal = args.username, sys.stdin.isatty()
    if args.password is not None:
        print("ocicache: warning: a password given with -p can be read by other users in "
              "the process list and stays in the shell's history; use --password-stdin",
              file=sys.stderr)
        password = args.password
    elif args.password_stdin:
        if not username:
            raise OciCacheError("--password-stdin needs the user name too: give it with -u")
        data = sys.stdin.buffer.read(_MAX_PASSWORD_INPUT + 1)
        if len(data) > _MAX_PASSWORD_INPUT:
            raise OciCacheError(f"standard input holds more than {_MAX_PASSWORD_INPUT} bytes; "
                                "it should hold the password alone")
        try:
            password = data.decode()
        except UnicodeDecodeError:
            raise OciCacheError("the password on standard input is not UTF-8") from None
        password = password[:-1] if password.endswith("\n") else password
        password = password[:-1] if password.endswith("\r") else password
    elif terminal:
        import getpass
        try:
            username = username or input("Username: ")
            password = getpass.getpass("Password: ")
        except EOFError:
            raise OciCacheError("no user name or password was typed") from None
    else:
        raise OciCacheError("no password: standard input is not a terminal to ask on; pipe "
                            "it in with --password-stdin")
    if not username:
        raise OciCacheError("no user name: give it with -u")
    where = provider.registry.login(registry, username, password)
    _say(args, f"logged in to {registry} as {username}; credentials stored in {where}")
    return 0


def _cmd_logout(provider: Provider, args: argparse.Namespace) -> int:
    registry = _login_registry(args.registry)
    erased = erase_credentials(registry)
    for where in erased:
        _say(args, f"removed the credentials for {registry} from {where}")
    if not erased:
        _say(args, f"not logged in to {registry}")
    return 0


def _cmd_copy(provider: Provider, args: argparse.Namespace) -> int:
    if args.jobs is not None:
        provider.jobs = args.jobs
    copied = provider.copy(args.source, args.destination,
                           ALL_PLATFORMS if args.all_platforms else args.platform, args.all_tags,
                           args.referrers)
    if args.json:
        json.dump({"source": args.source, "destination": args.destination,
                   "images": [{"name": name, **root.to_json()} for name, root in copied]},
                  sys.stdout, indent=2)
        print()
        return 0
    for name, root in copied:
        _say(args, f"{name} {root.digest}")
    return 0


def _cmd_sync(provider: Provider, args: argparse.Namespace) -> int:
    if args.jobs is not None:
        provider.jobs = args.jobs
    spec = read_sync_file(args.file)
    results = provider.sync(spec, args.dry_run)
    failed = [r for r in results if r.status == "failed"]
    if args.json:
        json.dump({"target": spec.target, "dryRun": args.dry_run,
                   "images": [r.to_json() for r in results]}, sys.stdout, indent=2)
        print()
    else:
        for result in results:
            detail = f": {result.error}" if result.error else f" {result.digest}"
            if result.status == "failed" or not args.quiet:
                print(f"{result.status} {result.source} -> {result.target}{detail}")
    if failed:
        print(f"ocicache: error: {len(failed)} of {len(results)} images failed; a later "
              "sync copies only what is missing", file=sys.stderr)
        return 1
    return 0


def _configure_logging(logger: logging.Logger, level: str) -> None:
    """The command line's logging (main() has _log() apply it): one line per message."""

    # Made here, not at module level: importing ocicache does not import logging.
    class _MessageFormatter(logging.Formatter):
        """Plain lines for information; ``ocicache: warning: ...`` for warnings."""

        def format(self, record: logging.LogRecord) -> str:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                return f"ocicache: {record.levelname.lower()}: {message}"
            return message

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MessageFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def _raise_malloc_thresholds() -> None:
    """Make glibc's malloc keep streamed pieces in the heap.

    By default glibc maps every block over 128 KiB afresh and gives freed memory back
    to the kernel once 128 KiB of it sits at the top of the heap, so streaming 256 KiB
    pieces can cost a new mapping, page faults and all, for nearly every piece:
    flattening 1 GiB took 1.2-1.7 s instead of 0.6-0.9 s, depending on where earlier
    blocks happened to lie. Freeing one mapped block raises both thresholds to its size
    (glibc's dynamic threshold); 16 MiB of calloc'd memory is never touched, so this
    costs two system calls. Other allocators just see a short-lived allocation. Only
    the command line does this: a library leaves its host's allocator alone.
    """
    bytes(16 * 1024 * 1024)


def _spare_the_collector() -> None:
    """Move every object alive now out of the cyclic garbage collector's reach.

    A process ends with full collections that visit every object it holds, the
    module's own code and every module imported: 8-13 ms of every command, a tenth of a
    small pull (``python3 -c 'import ocicache'``: 45 ms, 37 ms with this; os._exit, which
    skips all of the ending, 36 ms). Frozen objects are never collected, so only the
    command line does this, at its start (the collections of a long run skip them too)
    and at its end: a library's host keeps its collector as it was."""
    import gc
    gc.freeze()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    global _log_setup
    _raise_malloc_thresholds()
    if argv is None:
        _spare_the_collector()
    args = _build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    _log_setup = functools.partial(
        _configure_logging, level="ERROR" if args.quiet else "DEBUG" if args.verbose else "INFO")
    try:
        if args.quiet:
            progress = PullProgress()
        elif sys.stderr.isatty():
            progress = _TerminalProgress(sys.stderr)
        else:
            progress = _LineProgress(sys.stderr)
        # Only registry commands read mirror settings: a bad one does not break 'ls'.
        mirrors = [parse_mirror(m) for m in args.mirror] + default_mirrors() \
            if args.command in ("pull", "push", "rm", "clean", "copy", "sync") else []
        options = TransportOptions(insecure_registries=tuple(args.insecure_registry),
                                   ca_files=tuple(args.ca_file))
        with _terminate_as_exception(ending=argv is None), Provider(
                args.cache, mirrors=mirrors, options=options, jobs=args.jobs,
                progress=progress) as provider:
            return int(args.run(provider, args))
    except OciCacheError as e:
        message = str(e)
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            return 1
        where = f": {e.filename}" if e.filename else ""
        message = f"{e.strerror or e}{where}"
    except (KeyboardInterrupt, _Terminated) as e:  # SIGINT, SIGTERM
        message = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
        if args.command == "pull":
            message += ("; what was downloaded is kept in the cache, and the next pull "
                        "resumes from it")
        elif args.command in ("copy", "sync"):
            message += (f"; no image was tagged half-copied, and the next {args.command} "
                        "sends only what is missing")
    finally:
        _log_setup = None
        if argv is None:
            _spare_the_collector()
    print(f"ocicache: error: {_one_line(message)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
