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
import contextlib
import errno
import functools
import importlib
import io
import operator
import os
import re
import stat
import sys
import threading
import time
import zlib
from types import MappingProxyType
from typing import (IO, TYPE_CHECKING, Any, BinaryIO, Callable, Dict, Iterable, Iterator,
                    List, Mapping, NoReturn, Optional, Sequence, Set, Tuple, Type, TypeVar,
                    Union)

__version__ = "0.1.0"

__all__ = [
    # errors
    "OciCacheError", "InvalidReferenceError", "InvalidDigestError",
    "DigestMismatchError", "NotFoundError", "PlatformNotFoundError", "RegistryError",
    "AuthenticationError", "InvalidArchiveError", "InvalidPlatformError", "CorruptCacheError",
    # value types and the pure logic over them
    "Digest", "Reference", "Platform", "Descriptor", "Index", "Manifest",
    "canonical_name", "select_platform", "merge_index",
    "without_dangling_attestations", "merge_remote_index",
    # the disk
    "Layout", "ContentStore", "ContentInfo", "GcReport", "VerifyReport",
    # registries
    "Challenge", "Credentials", "parse_challenges", "find_credentials", "TransportOptions",
    "RegistryClient", "PullProgress", "parse_mirror", "default_mirrors",
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
    import http.client
    import json
    import logging
    import platform as _platform_module
    import tarfile
    import tempfile
else:
    argparse = _LazyModule("argparse")
    fcntl = _LazyModule("fcntl")
    hashlib = _LazyModule("hashlib")
    json = _LazyModule("json")
    logging = _LazyModule("logging")
    _platform_module = _LazyModule("platform")
    tarfile = _LazyModule("tarfile")
    tempfile = _LazyModule("tempfile")
_http_client = _LazyModule("http.client")
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
ALL_PLATFORMS = "all"
FORMAT_OCI, FORMAT_DOCKER, FORMAT_FILESYSTEM = "oci", "docker", "filesystem"

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_STATEMENT_SIZE = 64 * 1024 * 1024
COPY_BUFFER_SIZE = 1024 * 1024
# Compressed input is read, and decompressed data passes through Python (zlib -> tar
# reader -> writer), in pieces of this size. Measured on flattening 1 GiB: 256 KiB was
# fastest; 128 KiB cost 15% more in calls, and from 512 KiB on nearly every piece was
# a fresh mmap, page faults and all, 2.5 times slower.
_STREAM_CHUNK_SIZE = 256 * 1024
DEFAULT_GC_GRACE_SECONDS = 3600.0
_TEMP_MARK = ".tmp-"


# main() leaves the command line's logging setup here, and _log() applies it when
# something is first logged: a command that logs nothing never imports logging.
_log_setup: Optional[Callable[[logging.Logger], None]] = None


def _log() -> logging.Logger:
    """The "ocicache" logger, looked up when something is logged."""
    global _log_setup
    logger = logging.getLogger("ocicache")
    setup, _log_setup = _log_setup, None
    if setup is not None:
        setup(logger)
    return logger


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
        return cls(algorithm, hexpart)

    @classmethod
    def from_bytes(cls, data: bytes, algorithm: str = "sha256") -> "Digest":
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> "hashlib._Hash":
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


_CONTROL_CHARACTERS = r"[\x00-\x1f\x7f-\x9f]+"


def _one_line(text: str) -> str:
    """``text`` safe for one line of a terminal: control characters become spaces."""
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
        return cls.parse(_platform_module.machine() or "amd64")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Platform":
        return cls(str(data.get("os", "")), str(data.get("architecture", "")),
                   str(data.get("variant", "")), str(data.get("os.version", "")),
                   tuple(data.get("os.features") or ()))

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

_DESCRIPTOR_KEYS = ("mediaType", "size", "digest", "data", "urls", "annotations",
                    "platform", "artifactType")


def _freeze(mapping: Optional[Mapping[str, Any]]) -> Mapping[str, Any]:
    if mapping is not None and not isinstance(mapping, Mapping):
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
            return cls(
                media_type=str(data.get("mediaType", "")),
                digest=Digest.parse(data.get("digest", "")),
                size=data.get("size", -1),
                annotations=annotations,
                platform=Platform.from_json(platform) if isinstance(platform, dict) else None,
                urls=tuple(data.get("urls") or ()),
                artifact_type=str(data.get("artifactType", "")),
                data=str(data.get("data", "")),
                extra={k: v for k, v in data.items() if k not in _DESCRIPTOR_KEYS},
            )
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


_SURROGATE_ESCAPE = rb"\\u[dD][89a-fA-F]"


def _parse_json(data: Union[bytes, str], what: str,
                error: Type[OciCacheError] = OciCacheError) -> Any:
    """``data`` decoded as JSON, or ``error`` naming ``what``.

    Every document that comes from outside goes through here, so that nesting deeper
    than the interpreter's recursion limit and escaped lone surrogates (which decode but
    can never be written back as UTF-8) are refused like any other bad JSON."""
    raw = data.encode(errors="surrogatepass") if isinstance(data, str) else data
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise error(f"{what} is not valid JSON: {_shorten(_one_line(str(e)))}") from None
    if re.search(_SURROGATE_ESCAPE, raw):
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


def _load_json_object(data: bytes, what: str) -> Dict[str, Any]:
    obj = _parse_json(data, what)
    if not isinstance(obj, dict):
        raise OciCacheError(f"{what} is not a JSON object")
    return obj


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


# =====================================================================================
# Layout
#
# The cache on disk: ``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>`` and ``.lock``.
# Blobs are written to a temporary file beside their final name, verified, fsynced and
# renamed; ``index.json`` is replaced atomically under an exclusive ``flock`` that is
# reentrant within a process and safe across threads. Names are written last, after a
# check (under the lock) that every blob they need is present, so no name ever points
# at missing content, whatever runs at the same time.
# =====================================================================================

_OCI_LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'
_EMPTY_INDEX_BYTES = (
    b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",'
    b'"manifests":[]}')
_INDEX_INDENT = 3  # linuxkit's indent; its tests read index.json with jq, not by bytes


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class _DirectoryLock:
    """An exclusive ``flock`` on one file, shared by every thread of this process.

    One instance per lock file per process (see ``_lock_for``): a thread that holds it
    may take it again; other threads of the process wait on the ``RLock``; other
    processes wait on the ``flock``.
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
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
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
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)


_LOCKS: Dict[str, _DirectoryLock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(path: str) -> _DirectoryLock:
    key = os.path.realpath(path)
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


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomically(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, and rename over it."""
    directory, base = os.path.split(path)
    fd, temp = tempfile.mkstemp(prefix=f".{base}{_TEMP_MARK}", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_directory(directory)


class _Reachable:
    def __init__(self, digests: Mapping[Digest, str], missing: Tuple[str, ...],
                 unreadable: Tuple[str, ...]) -> None:
        self.digests = digests          # digest -> the name that reaches it
        self.missing = missing
        self.unreadable = unreadable


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
    """What ``verify`` found: ``ok`` when nothing is corrupt or missing."""

    checked: int
    corrupt: Tuple[str, ...]          # "<digest>: <why>"
    missing: Tuple[str, ...]          # "<digest> (needed by <name>)"

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing


class Layout:
    """An OCI image layout directory used as a cache. Creates it when missing."""

    def __init__(self, root: Union[str, "os.PathLike[str]"]) -> None:
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.index_path = os.path.join(self.root, "index.json")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise OciCacheError(f"cannot create cache directory {self.root}: "
                                f"{e.strerror or e}") from None
        self.blobs_dir = os.path.join(self.root, "blobs")
        self._lock = _lock_for(os.path.join(self.root, ".lock"))
        if not os.path.exists(self.index_path):
            with self.lock():
                if not os.path.exists(self.index_path):
                    _write_file_atomically(os.path.join(self.root, "oci-layout"),
                                           _OCI_LAYOUT_BYTES)
                    _write_file_atomically(self.index_path, _EMPTY_INDEX_BYTES)
        os.makedirs(os.path.join(self.blobs_dir, "sha256"), exist_ok=True)

    def lock(self) -> "contextlib.AbstractContextManager[None]":
        """The cache's exclusive lock; reentrant, thread-safe and across processes."""
        try:
            return self._lock.hold()
        except OSError as e:
            raise OciCacheError(f"cannot lock cache {self.root}: {e.strerror or e}") from None

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
        fd = os.open(self.blobs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    # -- blobs ------------------------------------------------------------------------

    def blob_path(self, digest: Union[str, Digest]) -> str:
        d = Digest.parse(digest)
        return os.path.join(self.root, "blobs", d.algorithm, d.hex)

    def has_blob(self, digest: Union[str, Digest], size: Optional[int] = None) -> bool:
        """True when the blob file exists (with ``size`` bytes, when given)."""
        try:
            st = os.stat(self.blob_path(digest))
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and (size is None or size < 0 or st.st_size == size)

    def open_blob(self, digest: Union[str, Digest]) -> BinaryIO:
        path = self.blob_path(digest)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the cache {self.root}") from None

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
            return expected, os.path.getsize(self.blob_path(expected))
        algorithm = expected.algorithm if expected is not None else algorithm
        directory = os.path.join(self.root, "blobs", algorithm)
        os.makedirs(directory, exist_ok=True)
        prefix = (expected.hex if expected is not None else "blob") + _TEMP_MARK
        fd, temp = tempfile.mkstemp(prefix=prefix, dir=directory)
        try:
            hasher = hashlib.new(algorithm)
            written = 0
            with os.fdopen(fd, "wb") as out:
                while True:
                    chunk = stream.read(COPY_BUFFER_SIZE)
                    if not chunk:
                        break
                    hasher.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
                    if size is not None and size >= 0 and written > size:
                        raise DigestMismatchError(
                            f"blob {expected or 'content'} is longer than its declared "
                            f"size {size}")
                if size is not None and size >= 0 and written != size:
                    raise DigestMismatchError(
                        f"blob {expected or 'content'}: got {written} bytes, expected {size}")
                actual = Digest(algorithm, hasher.hexdigest())
                if expected is not None and actual != expected:
                    raise DigestMismatchError(
                        f"content does not match its digest: expected {expected}, got {actual}")
                out.flush()
                os.fchmod(out.fileno(), 0o644 & ~_UMASK)
                os.fsync(out.fileno())
            os.replace(temp, self.blob_path(actual))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        _fsync_directory(directory)
        return actual, written

    def write_blob_bytes(self, data: bytes, digest: Optional[Union[str, Digest]] = None) -> Digest:
        return self.write_blob(io.BytesIO(data), digest, len(data))[0]

    def _touch(self, digest: Digest) -> None:
        with contextlib.suppress(OSError):  # a shared cache may hold other users' blobs
            os.utime(self.blob_path(digest))

    def blob_files(self) -> Iterator[Tuple[Optional[Digest], str, os.stat_result]]:
        """Every file under ``blobs/``: (digest or None for temporary files, path, stat)."""
        blobs = os.path.join(self.root, "blobs")
        with contextlib.suppress(FileNotFoundError):
            for algorithm in sorted(os.listdir(blobs)):
                directory = os.path.join(blobs, algorithm)
                if algorithm not in _DIGEST_HEX_LENGTHS or not os.path.isdir(directory):
                    continue
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

    # -- index.json -------------------------------------------------------------------

    def read_index(self) -> Index:
        try:
            with open(self.index_path, "rb") as f:
                data = f.read(64 * MAX_MANIFEST_SIZE)
        except FileNotFoundError:
            raise CorruptCacheError(f"{self.index_path} is missing") from None
        try:
            return Index.from_json(data, what=self.index_path)
        except OciCacheError as e:
            raise CorruptCacheError(f"invalid image cache: {e}") from None

    def update_index(self, change: Callable[[List[Descriptor]], List[Descriptor]]) -> None:
        """Apply ``change`` to the root entries under the lock, then replace index.json."""
        with self.lock():
            index = self.read_index()
            manifests = change(list(index.manifests))
            new = _replace(index, manifests=tuple(manifests),
                                      media_type=index.media_type or MEDIA_OCI_INDEX)
            _write_file_atomically(self.index_path,
                                   _json_bytes(new.to_json(), indent=_INDEX_INDENT))

    # -- reachability, gc, verify -----------------------------------------------------

    def parse_blob(self, descriptor: Descriptor) -> Union[Index, Manifest, None]:
        """The index or manifest a descriptor points at; None for other blobs."""
        if descriptor.media_type and descriptor.media_type not in (
                INDEX_MEDIA_TYPES | IMAGE_MEDIA_TYPES):
            return None
        what = f"blob {descriptor.digest}"
        obj = _load_json_object(self.read_blob(descriptor.digest), what)
        media_type = obj.get("mediaType") or descriptor.media_type
        if not isinstance(media_type, str):
            raise OciCacheError(f"{what}: mediaType is not a string")
        if media_type in INDEX_MEDIA_TYPES or (not media_type and "manifests" in obj):
            return Index.from_json(obj, what)
        if media_type in IMAGE_MEDIA_TYPES or (not media_type and "config" in obj):
            return Manifest.from_json(obj, what)
        return None

    def reachable(self, roots: Iterable[Descriptor]) -> "_Reachable":
        """Digests reachable from ``roots`` (with the name that reaches each), and problems.

        A missing root, or a present manifest whose config or layers are missing, is
        ``missing``; a missing child of an index is not (pulls fetch one platform).
        A blob that cannot be parsed as the manifest or index it should be is
        ``unreadable``.
        """
        seen: Dict[Digest, str] = {}
        missing: List[str] = []
        unreadable: List[str] = []
        # Names come from index.json and archives: made safe for the one-line messages.
        stack = [(root, _shorten(_one_line(root.name)) or str(root.digest), True)
                 for root in roots]
        while stack:
            descriptor, owner, required = stack.pop()
            if descriptor.digest in seen:
                continue
            seen[descriptor.digest] = owner
            if not self.has_blob(descriptor.digest):
                if required and not _is_foreign(descriptor):
                    missing.append(f"{descriptor.digest} (needed by {owner})")
                continue
            try:
                parsed = self.parse_blob(descriptor)
            except OciCacheError as e:
                unreadable.append(f"{descriptor.digest} (needed by {owner}): {e}")
                continue
            if isinstance(parsed, Index):
                stack.extend((child, owner, False) for child in parsed.manifests)
            elif isinstance(parsed, Manifest):
                stack.extend((blob, owner, True) for blob in parsed.blobs())
                if parsed.subject is not None:
                    stack.append((parsed.subject, owner, False))
        return _Reachable(seen, tuple(missing), tuple(unreadable))

    def gc(self, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS,
           dry_run: bool = False) -> GcReport:
        """Delete blobs no name reaches, and stale temporary files, older than the grace."""
        with self.deleting_blobs(), self.lock():
            marked = self.reachable(self.read_index().manifests)
            if marked.unreadable:
                raise CorruptCacheError(
                    f"gc stopped: cannot read {marked.unreadable[0]}; run 'ocicache verify'")
            deadline = time.time() - grace_seconds
            deleted: List[Tuple[str, int]] = []
            young = 0
            for digest, path, st in self.blob_files():
                if digest is not None and digest in marked.digests:
                    continue
                if st.st_mtime > deadline:
                    young += 1
                    continue
                deleted.append((str(digest) if digest else os.path.basename(path), st.st_size))
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            return GcReport(tuple(deleted), young, len(marked.digests))

    def verify(self) -> VerifyReport:
        """Re-hash every blob and check that every name reaches complete content."""
        corrupt: List[str] = []
        checked = 0
        for digest, path, st in self.blob_files():
            if digest is None:
                if _TEMP_MARK not in os.path.basename(path):
                    corrupt.append(f"{path}: not named by a valid digest")
                continue
            checked += 1
            if not stat.S_ISREG(st.st_mode):
                corrupt.append(f"{digest}: not a regular file")
                continue
            hasher = digest.hasher()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(COPY_BUFFER_SIZE), b""):
                    hasher.update(chunk)
            if hasher.hexdigest() != digest.hex:
                corrupt.append(f"{digest}: content hashes to {digest.algorithm}:"
                               f"{hasher.hexdigest()}")
        marked = self.reachable(self.read_index().manifests)
        return VerifyReport(checked, tuple(corrupt), marked.missing + marked.unreadable)


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
    """A username and secret for one registry. ``repr`` never shows a secret."""

    username: str = ""
    password: str = _field(default="", repr=False)
    identity_token: str = _field(default="", repr=False)
    registry_token: str = _field(default="", repr=False)

    def basic_header(self) -> str:
        import base64
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


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


def _run_credential_helper(helper: str, server: str) -> Optional[Credentials]:
    program = f"docker-credential-{helper}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
        raise OciCacheError(f"invalid credential helper name {helper!r}")
    try:
        status, stdout, stderr = _run_bounded([program, "get"], server.encode(),
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
    if username == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username, secret)


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
            raise OciCacheError(f"credentials file {where}: an 'auth' value is not "
                                "base64 of user:password") from None
    if entry.get("identitytoken"):
        return Credentials(username, identity_token=str(entry["identitytoken"]))
    if entry.get("registrytoken"):
        return Credentials(username, registry_token=str(entry["registrytoken"]))
    if username == "<token>":
        return Credentials(identity_token=password)
    return Credentials(username, password) if username or password else None


def find_credentials(registry: str, repository: str = "") -> Optional[Credentials]:
    """Credentials for ``registry`` (a host[:port], ``docker.io`` for Docker Hub).

    Each auth file in turn: its ``credHelpers`` for the host, its ``auths`` (the most
    specific key wins), then its ``credsStore``. None means anonymous.
    """
    keys = _auth_lookup_keys(registry, repository)
    server = DOCKER_HUB_AUTH_KEY if registry == DEFAULT_REGISTRY else registry
    for path in _auth_files():
        config = _read_auth_file(path)
        if config is None:
            continue
        helpers = config.get("credHelpers") or {}
        if isinstance(helpers, dict):
            for key, helper in helpers.items():
                if _normalise_auth_key(key) == registry and isinstance(helper, str):
                    return _run_credential_helper(helper, server)
        auths = config.get("auths") or {}
        if isinstance(auths, dict):
            normalised = {_normalise_auth_key(k): v for k, v in auths.items()}
            for key in keys:
                credentials = _credentials_from_entry(normalised.get(key), path)
                if credentials is not None:
                    return credentials
        store = config.get("credsStore")
        if isinstance(store, str) and store:
            return _run_credential_helper(store, server)
    return None


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


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.find("]")]
    if name == "localhost":  # not "*.localhost": a resolver may send those anywhere
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _retry_after(value: Optional[str], limit: float) -> Optional[float]:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,9}", value):
        return min(float(value), limit)
    import email.utils
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return min(max(when - time.time(), 0.0), limit)


@_value_type(frozen=False)
class TransportOptions:
    """How to reach registries. Tests and the command line fill it in."""

    insecure_registries: Tuple[str, ...] = ()
    ca_files: Tuple[str, ...] = ()
    certs_d_roots: Tuple[str, ...] = _field(default_factory=lambda: _certs_d_roots())
    timeout: float = 60.0
    attempts: int = 5
    backoff: float = 0.5
    max_retry_after: float = 60.0
    # One request costs a registry less than many (distribution saves its hash state
    # after every PATCH; pushing 512 MiB cost it 2.9 s of CPU in chunks, 2.3 s whole),
    # and docker and skopeo send whole blobs too; Quay refuses single uploads near 20 GB.
    chunked_upload_threshold: int = 8 * 1024 * 1024 * 1024
    upload_chunk_size: int = 16 * 1024 * 1024


Body = Union[None, bytes, Callable[[], io.RawIOBase], Callable[[], IO[bytes]]]
"""A request body: bytes, or a function opening a fresh stream for each attempt."""


class _Response:
    """A response whose body is read by the caller (``read``) or whole (``body``)."""

    def __init__(self, raw: "http.client.HTTPResponse", url: str,
                 connection: "http.client.HTTPConnection", timeout: float) -> None:
        self.raw = raw
        self.status = raw.status
        self.headers = raw.headers
        self.url = url
        self.timeout = timeout
        self._connection = connection

    def read(self, n: int = -1) -> bytes:
        return self.raw.read(n)

    def body(self, limit: int = MAX_MANIFEST_SIZE) -> bytes:
        """The whole body, at most ``limit`` bytes, within ``timeout`` seconds in all: a
        server trickling a byte at a time gets no longer than one that is silent."""
        deadline = time.monotonic() + self.timeout
        data = bytearray()
        while len(data) <= limit:
            chunk = self.raw.read1(min(COPY_BUFFER_SIZE, limit + 1 - len(data)))
            if not chunk:
                if self.raw.length:  # the connection ended before Content-Length
                    raise _http_client.IncompleteRead(bytes(data), self.raw.length)
                return bytes(data)
            data += chunk
            if time.monotonic() > deadline:
                raise TimeoutError(f"its answer took longer than {self.timeout:.0f}s to arrive")
        self.close(reuse=False)
        raise OciCacheError(f"{self.url} answered with more than {limit} bytes")

    def close(self, reuse: bool = True) -> None:
        if reuse and not self.raw.isclosed():
            # Read what is left to keep the connection, but not without end.
            with contextlib.suppress(OSError, _http_client.HTTPException):
                drained = 0
                while drained <= COPY_BUFFER_SIZE:
                    chunk = self.raw.read(64 * 1024)
                    if not chunk:
                        break
                    drained += len(chunk)
                else:
                    reuse = False
        if not reuse or self.raw.will_close:
            self._connection.close()


class _Transport:
    """Sends requests; connections are kept per thread and per scheme://host."""

    def __init__(self, options: TransportOptions) -> None:
        self.options = options
        self._local = threading.local()
        self._schemes: Dict[str, str] = {}
        self._not_before: Dict[str, float] = {}
        self._guard = threading.Lock()
        self._contexts: Dict[Tuple[str, bool], Any] = {}
        self._open: List["http.client.HTTPConnection"] = []

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
                    try:
                        if name.endswith(".crt"):
                            context.load_verify_locations(cafile=path)
                        elif name.endswith(".cert"):
                            context.load_cert_chain(path, path[:-len(".cert")] + ".key")
                    except (OSError, ssl.SSLError) as e:
                        raise OciCacheError(f"cannot load {path}: {e}") from None
            self._contexts[key] = context
            return context

    def _connection(self, scheme: str, host: str) -> "http.client.HTTPConnection":
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        connection = pool.get((scheme, host))
        if connection is None:
            proxy = self._proxy_for(scheme, host)
            timeout = self.options.timeout
            if scheme == "https":
                verify = host not in self.options.insecure_registries
                context = self._ssl_context(host, verify)
                if proxy:
                    connection = _http_client.HTTPSConnection(proxy, timeout=timeout,
                                                             context=context)
                    connection.set_tunnel(host)
                else:
                    connection = _http_client.HTTPSConnection(host, timeout=timeout,
                                                             context=context)
            else:
                connection = _http_client.HTTPConnection(proxy or host, timeout=timeout)
            connection.blocksize = COPY_BUFFER_SIZE  # the size of each send of a body
            pool[(scheme, host)] = connection
            with self._guard:
                self._open.append(connection)
        return connection

    def close(self) -> None:
        """Close every connection, whichever thread opened it."""
        with self._guard:
            connections, self._open = self._open, []
        for connection in connections:
            connection.close()

    def _drop(self, scheme: str, host: str) -> None:
        pool = getattr(self._local, "pool", {})
        connection = pool.pop((scheme, host), None)
        if connection is not None:
            connection.close()

    @staticmethod
    def _proxy_for(scheme: str, host: str) -> str:
        import urllib.request
        if urllib.request.proxy_bypass(host.rsplit(":", 1)[0]) or _is_loopback(host):
            return ""
        proxy = urllib.request.getproxies().get(scheme, "")
        return re.sub(r"^[a-z]+://", "", proxy).rstrip("/")

    def _may_use_http(self, host: str) -> bool:
        return _is_loopback(host) or host in self.options.insecure_registries

    def scheme(self, host: str) -> str:
        """https; loopback and insecure registries are tried with plain HTTP first."""
        return self._schemes.get(host, "http" if self._may_use_http(host) else "https")

    def request(self, method: str, url: str, headers: Optional[Mapping[str, str]] = None,
                body: Body = None, retry: bool = True, redirects: int = 5) -> _Response:
        """Send one request, retrying what is worth retrying and following redirects.

        ``url`` is ``https://host/path``; for a host that turned out to speak plain
        HTTP the scheme is switched. ``Authorization`` is sent only to the URL's own
        host: a redirect elsewhere (a CDN, S3) goes without it.
        """
        import urllib.parse
        headers = dict(headers or {})
        attempt = 0
        while True:
            parts = urllib.parse.urlsplit(url)
            host = parts.netloc
            scheme = self.scheme(host) if parts.scheme == "https" else parts.scheme
            probing = scheme == "http" and parts.scheme == "https" and host not in self._schemes
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            self._wait_for_host(host)
            try:
                try:
                    response = self._send(scheme, host, method, path, headers, body)
                except (OSError, _http_client.HTTPException) as first:
                    self._drop(scheme, host)
                    if not probing:
                        raise
                    # No HTTP answer: maybe a TLS server, maybe a fault. Only a TLS
                    # handshake decides it; otherwise the first error stands.
                    try:
                        response = self._send("https", host, method, path, headers, body)
                    except (OSError, _http_client.HTTPException) as second:
                        self._drop("https", host)
                        raise second if _is_certificate_error(second) else first
                    self._schemes[host] = scheme = "https"
                    probing = False
            except (OSError, _http_client.HTTPException) as e:
                attempt += 1
                # Nothing listening is rarely fixed by waiting: one more try, not five.
                limit = 2 if isinstance(e, ConnectionRefusedError) else self.options.attempts
                if not retry or attempt >= limit or _is_certificate_error(e):
                    raise _connection_error(host, e) from None
                self._back_off(host, attempt, None)
                continue
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
                    urllib.parse.urlsplit(target).port  # a bad port raises here
                except ValueError:
                    raise RegistryError(f"{host} redirected to an invalid URL "
                                        f"{_shorten(_one_line(location))!r}",
                                        response.status) from None
                moved = urllib.parse.urlsplit(target)
                if moved.netloc != host or (scheme == "https" and moved.scheme != "https"):
                    # Elsewhere, or the same host in clear text: no secret follows.
                    if body and response.status in (307, 308):
                        # The body may hold a secret (a token POST): it never goes elsewhere.
                        raise RegistryError(f"{host} redirected a {method} with a body to "
                                            "another host or to plain HTTP; refusing",
                                            response.status)
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                if response.status == 303:
                    method, body = "GET", None
                url, redirects = target, redirects - 1
                continue
            if response.status in _RETRY_STATUSES and retry and \
                    attempt + 1 < self.options.attempts:
                attempt += 1
                wait = _retry_after(response.headers.get("Retry-After"),
                                    self.options.max_retry_after)
                response.close()
                self._back_off(host, attempt, wait)
                continue
            return response

    def _send(self, scheme: str, host: str, method: str, path: str,
              headers: Mapping[str, str], body: Body) -> _Response:
        for fresh in (False, True):
            connection = self._connection(scheme, host)
            opened = body() if callable(body) else None
            try:
                connection.request(method, path, body=opened or body,  # type: ignore[arg-type]
                                   headers=dict(headers))
                raw = connection.getresponse()
            except (ConnectionResetError, BrokenPipeError, _http_client.RemoteDisconnected,
                    _http_client.CannotSendRequest):
                # A kept-alive connection the server had closed: one fresh try.
                self._drop(scheme, host)
                if fresh:
                    raise
                continue
            finally:
                if opened is not None:
                    opened.close()
            if method == "HEAD":
                raw.length = 0
            return _Response(raw, f"{scheme}://{host}{path}", connection, self.options.timeout)
        raise AssertionError("unreachable")

    def _wait_for_host(self, host: str) -> None:
        with self._guard:
            delay = self._not_before.get(host, 0.0) - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _back_off(self, host: str, attempt: int, wait: Optional[float]) -> None:
        import random
        if wait is None:
            wait = self.options.backoff * (2 ** (attempt - 1)) * (0.5 + random.random())
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


class _HashingThread:
    """A digest computed by a thread of its own, a couple of pieces behind what is
    written: hashlib lets go of the GIL, so hashing a blob overlaps receiving and
    writing it (on a gigabyte, each costs about half a second)."""

    def __init__(self, algorithm: str) -> None:
        import queue
        self._algorithm = algorithm
        self._hasher = hashlib.new(algorithm)
        self._error: Optional[BaseException] = None
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
        self._pieces.put(piece)

    def reset(self) -> None:
        """Start a new digest."""
        self._pieces.join()
        self._hasher = hashlib.new(self._algorithm)

    def hexdigest(self) -> str:
        self._pieces.join()
        if self._error is not None:
            raise self._error
        return self._hasher.hexdigest()

    def __enter__(self) -> "_HashingThread":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._pieces.put(None)
        self._thread.join()


def _speaks_tls(response: _Response) -> bool:
    """Whether a 400 is a TLS server's answer to plain HTTP (Go says so in the body)."""
    try:
        text = response.body(4096)
    except (OciCacheError, OSError, _http_client.HTTPException):
        text = b""
    response.close(reuse=False)
    # Go's answer, and nginx's
    return b"HTTP request to an HTTPS server" in text or b"sent to HTTPS port" in text


def _is_certificate_error(error: BaseException) -> bool:
    import ssl
    return isinstance(error, ssl.SSLCertVerificationError) or \
        "CERTIFICATE_VERIFY_FAILED" in str(error)


def _connection_error(host: str, error: BaseException) -> OciCacheError:
    if _is_certificate_error(error):
        return OciCacheError(f"cannot verify the TLS certificate of {host}: "
                             f"{getattr(error, 'verify_message', '') or error}; "
                             "pass its CA with --ca-file or put it in certs.d")
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return OciCacheError(f"cannot reach {host}: {_shorten(_one_line(reason), 200)}")


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
_PARTIAL_SUFFIX = _TEMP_MARK + "partial"


def _user_agent() -> str:
    return f"ocicache/{__version__} python/{_platform_module.python_version()}"


def parse_mirror(value: str) -> Tuple[str, str]:
    """``[registry=]URL`` -> (registry or "*", URL without trailing slash)."""
    registry, sep, url = value.partition("=")
    if not sep:
        registry, url = "*", value
    if not re.match(r"^https?://[^/]", url):
        raise OciCacheError(f"mirror {value!r} must start with http:// or https://")
    registry = _normalise_auth_key(registry) if registry != "*" else registry
    return registry, url.rstrip("/")


def _registry_error(what: str, host: str, response: _Response) -> RegistryError:
    """One line: ``<what>: <host> answered <status> <CODE>: <message>``."""
    codes: List[str] = []
    detail = ""
    try:
        body = response.body(64 * 1024)
        errors = _parse_json(body, "error").get("errors") or []
        for error in errors[:3] if isinstance(errors, list) else []:
            if isinstance(error, dict):
                codes.append(str(error.get("code", "")))
                detail = detail or str(error.get("message", ""))
    except (AttributeError, OciCacheError, OSError, _http_client.HTTPException):
        pass
    finally:
        response.close(reuse=False)
    status = response.status
    text = f"{what}: {host} answered {status} {_http_client.responses.get(status, '')}".rstrip()
    if codes:
        text = f"{what}: {host} answered {status} {codes[0]}"
    if detail:
        text += f": {_shorten(detail, 200)}"
    if status == 429:
        limits = [f"{h}={response.headers[h]}" for h in ("ratelimit-limit", "ratelimit-remaining")
                  if response.headers.get(h)]
        if limits:
            text += f" ({', '.join(limits)})"
    text = _one_line(text)
    if status in (401, 403):
        return AuthenticationError(text, status, codes)
    return RegistryError(text, status, codes)


def _with_query(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


class _FileSlice(io.RawIOBase):
    """``length`` bytes of a file from ``offset``: one chunk of a chunked upload."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        super().__init__()
        self._file = open(path, "rb")
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

    def __init__(self, base: str, host: str, repository: str, registry: str) -> None:
        self.base = base                # https://host[:port][/prefix]
        self.host = host
        self.repository = repository
        self.registry = registry        # the registry the credentials belong to


class RegistryClient:
    """The distribution API client shared by pulls and pushes."""

    def __init__(self, transport: Optional[_Transport] = None,
                 mirrors: Sequence[Tuple[str, str]] = ()) -> None:
        self.transport = transport or _Transport(TransportOptions())
        self.mirrors = list(mirrors)
        self._tokens: Dict[Tuple[str, str, Tuple[str, ...]], Tuple[str, float]] = {}
        self._challenges: Dict[str, Challenge] = {}
        self._credentials: Dict[Tuple[str, str], Optional[Credentials]] = {}
        self._locations: Dict[Tuple[str, Digest], List[str]] = {}  # blob -> repositories
        self._guard = threading.Lock()

    # -- endpoints and authentication -------------------------------------------------

    def endpoint(self, ref: Reference, use_mirrors: bool = True) -> _Endpoint:
        if use_mirrors:
            chosen = [url for registry, url in self.mirrors if registry == ref.registry] + \
                [url for registry, url in self.mirrors if registry == "*"]
            for url in chosen[:1]:  # the registry's own mirror, else one for every registry
                import urllib.parse
                parts = urllib.parse.urlsplit(url)
                prefix = parts.path.strip("/")
                repository = f"{prefix}/{ref.repository}" if prefix else ref.repository
                base = f"{parts.scheme}://{parts.netloc}"
                return _Endpoint(base, parts.netloc, repository, parts.netloc)
        host = ref.api_host
        return _Endpoint(f"https://{host}", host, ref.repository, ref.registry)

    def _credentials_for(self, endpoint: _Endpoint) -> Optional[Credentials]:
        key = (endpoint.registry, endpoint.repository)
        with self._guard:
            if key in self._credentials:
                return self._credentials[key]
        credentials = find_credentials(endpoint.registry, endpoint.repository)
        with self._guard:
            self._credentials[key] = credentials
        return credentials

    def _authorization(self, endpoint: _Endpoint, scopes: Sequence[str],
                       challenge: Optional[Challenge]) -> Optional[str]:
        challenge = challenge or self._challenges.get(endpoint.host)
        if challenge is None:
            return None
        credentials = self._credentials_for(endpoint)
        if challenge.scheme == "basic":
            if credentials is None or not (credentials.username or credentials.password):
                return None
            return credentials.basic_header()
        if challenge.scheme != "bearer":
            return None
        if credentials is not None and credentials.registry_token:
            return f"Bearer {credentials.registry_token}"
        token = self._token(endpoint, challenge, scopes, credentials)
        return f"Bearer {token}"

    def _token(self, endpoint: _Endpoint, challenge: Challenge, scopes: Sequence[str],
               credentials: Optional[Credentials]) -> str:
        import urllib.parse
        realm = challenge.params.get("realm", "")
        service = challenge.params.get("service", "")
        realm_parts = urllib.parse.urlsplit(realm)
        if realm_parts.scheme not in ("http", "https") or not realm_parts.netloc:
            raise AuthenticationError(f"{endpoint.host} names an invalid token realm "
                                      f"{_shorten(_one_line(realm))!r}")
        registry_scheme = self.transport.scheme(endpoint.host) if not \
            endpoint.base.startswith("http://") else "http"
        if realm_parts.scheme == "http" and registry_scheme == "https" and \
                not _is_loopback(realm_parts.netloc):
            raise AuthenticationError(f"{endpoint.host} sends credentials to a plain-http "
                                      f"token realm {_shorten(_one_line(realm))}; refusing")
        wanted = tuple(sorted(set(scopes) | ({challenge.params["scope"]}
                                             if challenge.params.get("scope") else set())))
        key = (realm, service, wanted)
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
            response = self.transport.request("POST", realm, headers, form)
        else:
            if credentials is not None and (credentials.username or credentials.password):
                headers["Authorization"] = credentials.basic_header()
            separator = "&" if realm_parts.query else "?"
            url = realm + (separator + urllib.parse.urlencode(query) if query else "")
            response = self.transport.request("GET", url, headers)
        if response.status != 200:
            raise _registry_error(f"token for {endpoint.repository}", realm_parts.netloc,
                                  response)
        try:
            data = response.body(1024 * 1024)
        except (OSError, _http_client.HTTPException) as e:
            response.close(reuse=False)
            raise _connection_error(realm_parts.netloc, e) from None
        try:
            answer = _parse_json(data, "token")
            token = str(answer.get("token") or answer.get("access_token") or "")
            expires = float(answer.get("expires_in") or 60)
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
                extra_scopes: Sequence[str] = (), retry: bool = True) -> _Response:
        """An authenticated request to ``/v2/<repository>/<path>`` (or ``url``, an upload
        location); a status outside ``ok`` raises with the registry's error."""
        import urllib.parse
        url = url or f"{endpoint.base}/v2/{endpoint.repository}/{path}"
        scopes = [f"repository:{endpoint.repository}:{actions}", *extra_scopes]
        challenge: Optional[Challenge] = None
        accepted = set(ok)
        for attempt in range(3):
            request_headers = {"User-Agent": _user_agent(), **(headers or {})}
            authorization = self._authorization(endpoint, scopes, challenge)
            if authorization and urllib.parse.urlsplit(url).netloc == endpoint.host:
                request_headers["Authorization"] = authorization  # never to another host
            response = self.transport.request(method, url, request_headers, body, retry)
            if response.status == 401 and attempt < 2:
                offered = parse_challenges(response.headers.get("WWW-Authenticate", ""))
                usable = [c for c in offered if c.scheme in ("bearer", "basic")]
                if usable and (authorization is None or
                               usable[0].params.get("error") == "insufficient_scope"):
                    response.close()
                    challenge = usable[0]
                    with self._guard:
                        self._challenges[endpoint.host] = challenge
                    continue
            if response.status in accepted:
                return response
            raise _registry_error(what or f"{method} {endpoint.repository}/{path or url}",
                                  endpoint.host, response)
        raise AssertionError("unreachable")

    # -- manifests and blobs ----------------------------------------------------------

    def _fetch_small(self, endpoint: _Endpoint, path: str, headers: Mapping[str, str],
                     what: str, check: Callable[[bytes, _Response], None]
                     ) -> Tuple[bytes, _Response]:
        """GET a small body whole; a body cut short, reset or failing ``check`` (its
        digest) is fetched again, like a failed request."""
        failures = 0
        while True:
            response = self.request(endpoint, "GET", path, headers=headers, what=what)
            try:
                data = response.body(MAX_MANIFEST_SIZE)
                response.close()
                check(data, response)
                return data, response
            except (OSError, _http_client.HTTPException, DigestMismatchError) as e:
                response.close(reuse=False)
                failures += 1
                if failures >= self.transport.options.attempts:
                    if isinstance(e, OciCacheError):
                        raise
                    raise _connection_error(endpoint.host, e) from None
                self.transport._back_off(endpoint.host, failures, None)

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

    def remote_manifest(self, endpoint: _Endpoint, reference: str,
                        actions: str = "pull") -> Optional[Tuple[bytes, Descriptor]]:
        """The manifest under ``reference`` at ``endpoint``, or None when there is none."""
        response = self.request(endpoint, "GET", f"manifests/{reference}", actions,
                                headers={"Accept": MANIFEST_ACCEPT}, ok=(200, 404),
                                what=f"look up {endpoint.repository}:{reference}")
        if response.status == 404:
            response.close()
            return None
        try:
            data = response.body(MAX_MANIFEST_SIZE)
        except (OSError, _http_client.HTTPException) as e:
            response.close(reuse=False)
            raise _connection_error(endpoint.host, e) from None
        response.close()
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        obj = _parse_json(data, f"{endpoint.host}'s manifest {endpoint.repository}:{reference}")
        if isinstance(obj, dict) and isinstance(obj.get("mediaType"), str):
            media_type = obj["mediaType"] or media_type
        return data, Descriptor(media_type, Digest.from_bytes(data), len(data))

    def put_manifest(self, endpoint: _Endpoint, reference: str, data: bytes,
                     media_type: str) -> None:
        response = self.request(endpoint, "PUT", f"manifests/{reference}", "pull,push",
                                headers={"Content-Type": media_type}, body=data, ok=(201, 200),
                                what=f"push {endpoint.host}/{endpoint.repository}:{reference}")
        response.close()

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
        for source in [s for s in sources if s != endpoint.repository]:
            response = self.request(
                endpoint, "POST", f"blobs/uploads/?mount={descriptor.digest}&from={source}",
                "pull,push", ok=(201, 202), what=what,
                extra_scopes=[f"repository:{source}:pull"])
            location = response.headers.get("Location", "")
            response.close()
            if response.status == 201:
                self._remember(endpoint, descriptor.digest)
                return "mounted"
            if location:  # the registry opened an ordinary upload instead: cancel it
                with contextlib.suppress(OciCacheError):
                    self.request(endpoint, "DELETE", "", "pull,push", ok=(204, 404, 405),
                                 url=self._absolute(endpoint, location)).close()
        failures = 0
        chunked = descriptor.size > self.transport.options.chunked_upload_threshold
        while True:
            try:
                self._upload(endpoint, descriptor, layout, chunked, what)
                self._remember(endpoint, descriptor.digest)
                return "uploaded"
            except RegistryError as e:
                if isinstance(e, AuthenticationError):
                    raise
                failures += 1
                if not chunked and 400 <= e.status < 500:
                    chunked = True  # a registry that refuses monolithic uploads
                elif failures >= self.transport.options.attempts or e.status < 500:
                    raise
            except OciCacheError:
                failures += 1
                if failures >= self.transport.options.attempts:
                    raise

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
            urllib.parse.urlsplit(url).port  # a bad port raises here
        except ValueError:
            raise RegistryError(f"{endpoint.host} gave an invalid upload location "
                                f"{_shorten(_one_line(location))!r}") from None
        return url

    def _upload(self, endpoint: _Endpoint, descriptor: Descriptor, layout: Layout,
                chunked: bool, what: str) -> None:
        """One upload session: POST, then one PUT, or PATCH chunks and a closing PUT."""
        import urllib.parse
        response = self.request(endpoint, "POST", "blobs/uploads/", "pull,push", ok=(202,),
                                what=what, retry=False)
        response.close()
        location = self._absolute(endpoint, response.headers.get("Location", ""))
        announced = response.headers.get("OCI-Chunk-Min-Length") or ""
        minimum = int(announced) if re.fullmatch(r"[0-9]{1,12}", announced) else 0
        path = layout.blob_path(descriptor.digest)
        digest = urllib.parse.quote(str(descriptor.digest), safe="")
        if not chunked:
            response = self.request(
                endpoint, "PUT", "", "pull,push", url=_with_query(location, f"digest={digest}"),
                headers={"Content-Type": "application/octet-stream",
                         "Content-Length": str(descriptor.size)},
                body=lambda: open(path, "rb"), ok=(201, 204), what=what, retry=False)
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
                body=functools.partial(_FileSlice, path, offset, length), ok=(201, 202, 204),
                what=what, retry=False)
            response.close()
            location = self._absolute(endpoint, response.headers.get("Location") or location)
            offset += length
        response = self.request(endpoint, "PUT", "", "pull,push",
                                url=_with_query(location, f"digest={digest}"),
                                headers={"Content-Length": "0"}, body=b"", ok=(201, 204),
                                what=what, retry=False)
        response.close()

    def download_blob(self, ref: Reference, descriptor: Descriptor, layout: Layout,
                      progress: Callable[[int], None] = lambda n: None) -> None:
        """Stream a blob into the cache, verified, resuming a partial file with Range."""
        if layout.has_blob(descriptor.digest, descriptor.size):
            layout._touch(descriptor.digest)
            progress(descriptor.size)
            return
        endpoint = self.endpoint(ref)
        partial = layout.blob_path(descriptor.digest) + _PARTIAL_SUFFIX
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another process may be fetching the same blob
            if layout.has_blob(descriptor.digest, descriptor.size):
                progress(descriptor.size)
                return
            with _HashingThread(descriptor.digest.algorithm) as hasher:
                self._fetch_into(endpoint, descriptor, fd, progress, hasher)
            self._remember(endpoint, descriptor.digest)
            os.fchmod(fd, 0o644 & ~_UMASK)
            os.fsync(fd)
            os.replace(partial, layout.blob_path(descriptor.digest))
            _fsync_directory(os.path.dirname(partial))
        finally:
            os.close(fd)

    def _fetch_into(self, endpoint: _Endpoint, descriptor: Descriptor, fd: int,
                    progress: Callable[[int], None], hasher: "_HashingThread") -> None:
        what = f"blob {descriptor.digest} of {endpoint.repository}"
        restarts = 0
        failures = 0
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
                                        headers=headers, what=f"pull {what}", ok=(200, 206))
                if response.status == 200 and have:
                    os.ftruncate(fd, 0)  # the server ignored Range: start over
                    progress(-have)
                    hasher.reset()
                    have = 0
                os.lseek(fd, have, os.SEEK_SET)
                stall = _StallWatch(self.transport.options.timeout)
                try:
                    while have < descriptor.size:
                        # read1: what has arrived, so a reset loses nothing already received
                        chunk = response.raw.read1(min(COPY_BUFFER_SIZE, descriptor.size - have))
                        if not chunk:
                            break
                        os.write(fd, chunk)
                        hasher.update(chunk)
                        have += len(chunk)
                        progress(len(chunk))
                        stall.arrived(len(chunk))
                    response.close(reuse=have >= descriptor.size)
                except (OSError, _http_client.HTTPException) as e:
                    response.close(reuse=False)
                    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise OciCacheError(f"cannot write {what}: {e.strerror}") from None
                    failures += 1
                    if failures >= self.transport.options.attempts:
                        raise _connection_error(endpoint.host, e) from None
                    continue  # resume with Range from what we have
                if have < descriptor.size:
                    failures += 1
                    if failures >= self.transport.options.attempts:
                        raise OciCacheError(f"pull {what}: {endpoint.host} ended the body at "
                                            f"{have} of {descriptor.size} bytes")
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
# ``oci-archive:``), Docker 25+ ``docker save`` (OCI layout plus ``manifest.json``) and
# classic ``docker save`` (``manifest.json`` plus per-layer directories), optionally
# gzip-compressed as a whole. The stream is read once, in any entry order. Nothing in
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

    def resolve(self, path: str) -> Tuple[Digest, int]:
        """The content of a file path (stored as a blob now), following links."""
        seen = set()
        current = _archive_path(path)
        while current in self.links:
            if current in seen:
                raise InvalidArchiveError(f"archive entry {path!r} is a link loop")
            seen.add(current)
            current = self.links[current]
        if current in self.small:
            data = self.small.pop(current)
            self.files[current] = (self.layout.write_blob_bytes(data), len(data))
        if current not in self.files:
            raise InvalidArchiveError(f"archive refers to {path!r}, which it does not contain")
        return self.files[current]


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


class _GunzipReader:
    """Decompresses a gzip stream (members may be concatenated); a cut-off end raises.

    tarfile's own gzip reading takes a truncated stream for a short one; this does not.
    Output is bounded per step, so a small input that expands enormously stays cheap.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._in_member = False
        self._pending = b""
        self._buffer = b""
        self._position = 0
        self._finished = False

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

    def _inflate(self) -> Optional[bytes]:
        """The next piece of output; None at the end of the stream."""
        while not self._finished:
            chunk, self._pending = self._pending or self._stream.read(_STREAM_CHUNK_SIZE), b""
            if not chunk:
                if self._in_member:
                    raise InvalidArchiveError("truncated archive: the gzip stream ends early")
                self._finished = True
                break
            if not self._in_member:
                chunk = chunk.lstrip(b"\0")  # zero padding after a member is allowed
                if not chunk:
                    continue
                self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._in_member = True
            try:
                output = self._decompressor.decompress(chunk, _STREAM_CHUNK_SIZE)
            except zlib.error as e:
                raise InvalidArchiveError(f"corrupt gzip stream: {e}") from None
            if self._decompressor.eof:
                self._in_member = False
                self._pending = self._decompressor.unused_data
            else:
                self._pending = self._decompressor.unconsumed_tail
            if output:
                return output
        return None

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "_GunzipReader":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _decompressed(stream: IO[bytes]) -> IO[bytes]:
    """The archive stream, gunzipped when it is gzip; other streams pass unchanged."""
    head = stream.read(2)
    rest: IO[bytes] = _PrefixedReader(head, stream)  # type: ignore[assignment]
    return _GunzipReader(rest) if head == b"\x1f\x8b" else rest  # type: ignore[return-value]


# -- reading layers -------------------------------------------------------------------
#
# Flattening reads every byte of every layer, and tarfile's stream mode copies each
# byte several times through its own buffer on the way. _TarStream walks a layer's
# members with tarfile's header parser (TarInfo.frombuf) and hands data on in the
# pieces the decompressor makes. Extended headers are applied as tarfile applies them:
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


class _TarStream:
    """The members of a tar stream; ``read`` reads the current member's data (a sparse
    file's holes read as zeros)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._read1 = getattr(stream, "read1", stream.read)
        self._data_left = 0     # of the current member, as stored
        self._skip_left = 0     # its data and padding: what lies before the next header
        self._regions: List[Tuple[int, int]] = []  # a sparse member's data, reversed
        self._position = self._real_size = 0       # in a sparse member's real content
        self._sparse = False

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        global_headers: Dict[str, str] = {}
        headers: Dict[str, str] = {}
        names: Dict[str, str] = {}  # GNU long names: path, linkpath
        sparse_map: List[int] = []  # GNU sparse 0.0: offsets and sizes, in turn
        extended = global_size = 0  # bytes of extended headers kept in memory
        while True:
            self._skip(self._skip_left)
            block = self._exact(tarfile.BLOCKSIZE, end_allowed=True)
            if not block.strip(b"\0"):
                return  # a zero block, or nothing: the end of the archive
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise InvalidArchiveError(f"layer has an invalid tar header: {e}") from None
            padded = -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if info.type in _EXTENDED_TYPES:
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
                else:
                    key = "path" if info.type == tarfile.GNUTYPE_LONGNAME else "linkpath"
                    names[key] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            headers = {**global_headers, **headers}
            self._apply(info, headers, names)
            self._data_left = info.size if info.isreg() or \
                info.type not in tarfile.SUPPORTED_TYPES else 0
            self._skip_left = -(-self._data_left // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            self._sparse = False
            if info.type == tarfile.GNUTYPE_SPARSE:
                self._old_gnu_sparse(info, block)
            elif "GNU.sparse.major" in headers or "GNU.sparse.map" in headers or sparse_map:
                self._pax_sparse(info, headers, sparse_map)
            headers, names, sparse_map, extended = {}, {}, [], global_size
            yield info

    @staticmethod
    def _apply(info: tarfile.TarInfo, headers: Dict[str, str], names: Dict[str, str]) -> None:
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
        if info.size < 0:
            raise InvalidArchiveError(f"layer entry {_shorten(info.name)!r} has a bad size")
        for what, text in (("name", info.name), ("link target", info.linkname)):
            # A NUL cuts a name in two for every C extractor: one entry would be written
            # as another. PATH_MAX: no longer path can be made, and a deep one would
            # cost its depth squared in parent directories.
            if _NAME_CONTROLS.search(text):
                raise InvalidArchiveError(f"layer entry {_shorten(info.name)!r} has a control "
                                          f"character in its {what}")
            if len(text.encode("utf-8", "surrogateescape")) > _MAX_LAYER_PATH:
                raise InvalidArchiveError(f"layer entry {_shorten(info.name)!r} has a {what} "
                                          f"longer than {_MAX_LAYER_PATH} bytes")
        info.pax_headers = headers

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

    def _raw(self, n: int = -1, exact: bool = False) -> bytes:
        n = self._data_left if n < 0 else min(n, self._data_left)
        if n <= 0:
            return b""
        chunk = self._exact(n) if exact else self._read1(n)
        if not chunk:
            raise InvalidArchiveError("layer ends inside an entry")
        self._data_left -= len(chunk)
        self._skip_left -= len(chunk)
        return chunk

    def _exact(self, size: int, end_allowed: bool = False) -> bytes:
        parts, left = [], size
        while left:
            chunk = self._read1(left)
            if not chunk:
                if end_allowed and left == size:
                    return b""
                raise InvalidArchiveError("layer ends inside an entry")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def _skip(self, size: int) -> None:
        while size:
            chunk = self._read1(min(size, _STREAM_CHUNK_SIZE))
            if not chunk:
                raise InvalidArchiveError("layer ends inside an entry")
            size -= len(chunk)
        self._data_left = self._skip_left = 0
        self._sparse = False


def _read_archive(stream: IO[bytes], layout: Layout) -> _ArchiveContents:
    """Read an archive once, storing its blobs (verified) and keeping small files."""
    contents = _ArchiveContents(layout)
    try:
        # "r|", not "r|*": only the whole-stream gzip is undone (by _GunzipReader, with
        # bounded output); tarfile must not inflate a compressed stream found inside.
        with tarfile.open(fileobj=_decompressed(stream), mode="r|",
                          bufsize=_STREAM_CHUNK_SIZE) as archive:
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
    """A root found in an archive: its descriptor and the names it should get."""

    def __init__(self, descriptor: Descriptor, names: Tuple[str, ...]) -> None:
        self.descriptor = descriptor
        self.names = names


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
    repo_tags = _repo_tags_by_config(contents)
    images = []
    for root in index.manifests:
        _check_archive_root(root, contents, layout)
        containerd_name = root.annotations.get(ANNOTATION_CONTAINERD_NAME, "")
        ref_name = root.annotations.get(ANNOTATION_REF_NAME, "")
        if containerd_name:
            names = _canonical_names([containerd_name], "index.json")
        elif any(c in ref_name for c in "/:@"):  # a full reference, not a bare tag
            names = _canonical_names([ref_name], "index.json")
        elif root.media_type in IMAGE_MEDIA_TYPES and repo_tags:
            config = Manifest.from_json(layout.read_blob(root.digest)).config.digest
            names = _canonical_names(repo_tags.get(config, []), "manifest.json")
        else:
            names = ()
        images.append(_LoadedImage(root, names))
    return images


def _check_archive_root(root: Descriptor, contents: _ArchiveContents, layout: Layout) -> None:
    """A root must be in the archive with its size; its manifests must be complete."""
    stored = {d for d, _ in contents.files.values()}
    if root.digest not in stored:
        raise InvalidArchiveError(f"archive's index.json names {root.digest}, "
                                  "which the archive does not contain")
    size = os.path.getsize(layout.blob_path(root.digest))
    if size != root.size:
        raise InvalidArchiveError(f"archive's index.json gives {root.digest} size "
                                  f"{root.size}, but the blob has {size} bytes")
    marked = layout.reachable([root])
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
        config = _load_json_object(layout.read_blob(config_digest), "image config")
        rootfs = config.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list):
            raise InvalidArchiveError("archive's image config has no rootfs.diff_ids list")
        if len(diff_ids) != len(entry["Layers"]):
            raise InvalidArchiveError(
                f"archive's manifest.json lists {len(entry['Layers'])} layers, but the "
                f"config has {len(diff_ids)} diff_ids")
        layers = [_docker_archive_layer(contents, layout, path, diff_id)
                  for path, diff_id in zip(entry["Layers"], diff_ids)]
        manifest = Manifest(MEDIA_OCI_MANIFEST,
                            Descriptor(MEDIA_OCI_CONFIG, config_digest, config_size),
                            tuple(layers))
        data = manifest.to_bytes()
        digest = layout.write_blob_bytes(data)
        repo_tags = entry.get("RepoTags") or []
        if not isinstance(repo_tags, list):
            raise InvalidArchiveError("archive's manifest.json has a bad RepoTags list")
        images.append(_LoadedImage(Descriptor(MEDIA_OCI_MANIFEST, digest, len(data)),
                                   _canonical_names(repo_tags, "manifest.json")))
    return images


def _docker_archive_layer(contents: _ArchiveContents, layout: Layout, path: Any,
                          diff_id: Any) -> Descriptor:
    """A classic archive's layer file, checked against the config's diff_id."""
    if not isinstance(path, str):
        raise InvalidArchiveError("archive's manifest.json has a layer that is not a path")
    digest, size = contents.resolve(path)
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
    hasher = hashlib.sha256()
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        for chunk in iter(lambda: stream.read(COPY_BUFFER_SIZE), b""):
            hasher.update(decompressor.decompress(chunk))
            while decompressor.eof and decompressor.unused_data:
                rest = decompressor.unused_data  # concatenated gzip members
                decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                hasher.update(decompressor.decompress(rest))
        hasher.update(decompressor.flush())
    except zlib.error as e:
        raise InvalidArchiveError(f"corrupt gzip layer: {e}") from None
    return Digest("sha256", hasher.hexdigest())


def _load_archive(stream: IO[bytes], layout: Layout) -> List[_LoadedImage]:
    """Store an archive's blobs (verified) and return its roots; names are not written."""
    contents = _read_archive(stream, layout)
    if "index.json" in contents.metadata:
        return _oci_archive_images(contents, layout)
    if "manifest.json" in contents.metadata:
        return _docker_archive_images(contents, layout)
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


def _tar_header(info: tarfile.TarInfo, xattrs: Mapping[str, str] = MappingProxyType({}),
                mtime: Union[int, float, str, None] = None) -> bytes:
    """A ustar header, after a PAX header with what ustar cannot hold. Names, link
    targets and attribute values keep their exact bytes (what is not UTF-8 too: no
    ``hdrcharset``, which GNU tar warns about); attributes are ``SCHILY.xattr.*``, which
    GNU tar, bsdtar and Go read. Nothing else a layer's PAX headers said is copied. A
    long name that is not UTF-8 goes in a GNU long-name record: in a PAX record bsdtar
    refuses it without hdrcharset, and GNU tar warns about hdrcharset."""
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


class _TarWriter:
    """Writes a PAX tar to a stream: headers by _tar_header, file bodies copied with
    ``os.sendfile`` when both ends are files (no trip through Python), else in 1 MiB
    chunks. tarfile's own stream writer cuts everything into 10 KiB records."""

    def __init__(self, out: Union[BinaryIO, "_WriteBehind"]) -> None:
        self._out = out

    def add(self, info: tarfile.TarInfo, data: Union[IO[bytes], _TarStream, None] = None,
            xattrs: Mapping[str, str] = MappingProxyType({}),
            mtime: Union[int, float, str, None] = None) -> None:
        self._out.write(_tar_header(info, xattrs, mtime))
        if data is None or not info.size:
            return
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

    def add_blob(self, layout: Layout, descriptor: Descriptor, name: str) -> None:
        if _is_foreign(descriptor) and not layout.has_blob(descriptor.digest):
            raise _foreign_layer_error(descriptor)
        with layout.open_blob(descriptor.digest) as blob:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = os.fstat(blob.fileno()).st_size, 0o644, 0
            if info.size != descriptor.size:
                raise CorruptCacheError(f"blob {descriptor.digest} has {info.size} bytes, not "
                                        f"{descriptor.size}; run 'ocicache verify'")
            self.add(info, blob)

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

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_reader(stream: IO[bytes], what: str) -> IO[bytes]:
    try:
        zstd = importlib.import_module("compression.zstd")  # the standard library of 3.14+
    except ImportError:
        raise OciCacheError(
            f"{what} is zstd-compressed; reading it needs Python 3.14 or newer "
            f"(compression.zstd), this is Python {_platform_module.python_version()}") from None
    return zstd.ZstdFile(stream)  # type: ignore[no-any-return]


def _open_layer(layout: Layout, descriptor: Descriptor) -> IO[bytes]:
    """A layer's uncompressed tar stream; gzip and zstd are recognised by their bytes."""
    blob = layout.open_blob(descriptor.digest)
    head = blob.read(4)
    blob.seek(0)
    if head[:2] == b"\x1f\x8b":
        return _GunzipReader(blob)  # type: ignore[return-value]
    if head == _ZSTD_MAGIC:
        return _zstd_reader(blob, f"layer {descriptor.digest}")
    return blob


# -- flattening -----------------------------------------------------------------------
#
# Layers are applied as containers/storage (podman, Docker) and umoci apply them: in
# order, each entry at the path it names resolved inside the root (a symlink on the way
# is followed, an absolute or ``..`` target never leaves the root; the last component
# is not followed), an entry already there replaced unless both are directories (then
# the new entry's metadata is taken), a hard link sharing its target's inode. The first
# pass reads every layer's headers into that tree, keeping for a file only where its
# content lies; the second reads the layers again and writes each surviving entry as
# its content goes by, parents first, the other names of an inode as hard links to it.
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
    or special file, which several names share when hard-linked."""

    # Kept small (a layer of 200,000 files holds 200,000 of them): what few inodes
    # need is in ``meta``.
    __slots__ = ("kind", "layer", "source", "meta", "children", "parent", "name", "emitted")

    def __init__(self, kind: bytes, layer: int, source: int,
                 parent: Optional["_Node"] = None) -> None:
        self.kind = kind
        self.layer = layer     # the last layer that put it at a name (-1: made implicitly)
        self.source = source   # its entry: layer << 32 | ordinal in the layer (-1: none)
        # a directory: its _DirectoryMeta; another inode: None, or a dict of a symlink's
        # "target", what a hard link's header changed, the "others" of its names
        self.meta: Any = None
        self.children: Optional[Dict[str, "_Node"]] = {} if kind == tarfile.DIRTYPE else None
        self.parent = parent   # a directory's from the start; a file's from placing it
        self.name = ""
        self.emitted = False   # a directory's


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
        existing = directory.children.get(base)
        if member.isdir():
            meta = (member.mode, member.uid, member.gid, _mtime(member), member.uname,
                    member.gname, _xattrs(member))
            if existing is not None and existing.children is not None:
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
        else:
            node = _Node(_KINDS.setdefault(member.type, member.type), layer, source)
            if member.issym():
                node.meta = {"target": member.linkname}
        directory.children[sys.intern(base)] = node

    def _is_symlink(self, parts: Sequence[str]) -> bool:
        holder = self._directory(parts[:-1], False, "/".join(parts)) if parts else None
        found = holder.children.get(parts[-1]) if holder and holder.children else None
        return found is not None and found.kind == tarfile.SYMTYPE

    def _link_target(self, member: tarfile.TarInfo) -> Optional[_Node]:
        parts = _clean_path(member.linkname)
        if not parts:
            return None
        directory = self._directory(parts[:-1], False, member.name)
        found = directory.children.get(parts[-1]) if directory and directory.children else None
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
                if not (literal and child.layer == layer or child_path in self._through):
                    del holder.children[name]
                elif child.children is not None:
                    pending.append((child, child_path))

    def schedule(self, layers: int) -> List[List[_Node]]:
        """Name every inode (a hard-linked one once, its other names kept aside) and
        list, per layer, the inodes whose entry is there, in entry order."""
        per_layer: List[List[_Node]] = [[] for _ in range(layers)]
        pending = [self.root]
        while pending:
            directory = pending.pop()
            assert directory.children is not None
            for name, child in directory.children.items():
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
                    per_layer[child.source >> 32].append(child)
        for nodes in per_layer:
            nodes.sort(key=operator.attrgetter("source"))
        return per_layer


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
        view = memoryview(piece)
        while view:
            view = view[os.write(self._fd, view):]

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

    def run(self) -> None:
        try:
            self._flatten()
        except InvalidArchiveError as e:
            if self._reading < len(self._names):
                raise InvalidArchiveError(f"{e} (layer {self._names[self._reading]})") from None
            raise

    def _flatten(self) -> None:
        for index in range(len(self._layers)):
            for ordinal, (member, _) in enumerate(self._members(index)):
                self._tree.apply(index, ordinal, member)
        schedule = self._tree.schedule(len(self._layers))
        with _WriteBehind(self._out) as out:
            archive = _TarWriter(out)
            for index, nodes in enumerate(schedule):
                if nodes:
                    self._emit_layer(archive, index, nodes)
            self._emit_the_rest(archive)
            archive.close()

    def _members(self, index: int) -> Iterator[Tuple[tarfile.TarInfo, _TarStream]]:
        self._reading = index
        with self._layers[index]() as stream:
            layer = _TarStream(stream)
            for member in layer:
                yield member, layer

    def _emit_layer(self, archive: _TarWriter, index: int, nodes: List[_Node]) -> None:
        waiting = iter(nodes)
        node = next(waiting)
        for ordinal, (member, layer) in enumerate(self._members(index)):
            if node.source & 0xFFFFFFFF != ordinal:
                continue
            if node.children is not None:
                self._directory_path(archive, node)
            else:
                self._emit_inode(archive, node, member, layer)
            following = next(waiting, None)
            if following is None:
                return  # the rest of this layer is hidden: not read again
            node = following

    def _emit_inode(self, archive: _TarWriter, node: _Node, member: tarfile.TarInfo,
                    layer: _TarStream) -> None:
        assert node.parent is not None
        parent = self._directory_path(archive, node.parent)
        path = f"{parent}/{node.name}" if parent else node.name
        info = tarfile.TarInfo(path)
        for field in ("mode", "uid", "gid", "uname", "gname", "devmajor", "devminor"):
            setattr(info, field, getattr(member, field))
        info.type = tarfile.REGTYPE if member.isreg() else member.type
        info.size = member.size if member.isreg() else 0  # only file data is copied
        info.linkname = member.linkname if member.issym() else ""
        mtime, xattrs = _mtime(member), _xattrs(member)
        meta = node.meta or {}
        for field in ("mode", "uid", "gid", "uname", "gname"):
            if field in meta:
                setattr(info, field, meta[field])
        mtime = meta.get("mtime", mtime)
        xattrs = {**xattrs, **meta.get("xattrs", {})}
        archive.add(info, layer if info.isreg() else None, xattrs, mtime)
        for directory, name in meta.get("others", ()):
            parent = self._directory_path(archive, directory)
            info.name = f"{parent}/{name}" if parent else name
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
                if child.children is not None:
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


def _arch_tag(platform: Platform) -> str:
    """The suffix of linuxkit's ``<name>-<arch>`` names; variants kept apart (arm-v7)."""
    p = platform.normalized()
    return f"{p.architecture}-{p.variant}" if p.variant else p.architecture


def _as_descriptor(value: DescriptorLike) -> Descriptor:
    return value if isinstance(value, Descriptor) else Descriptor.from_json(dict(value))


def _names_match(stored: str, wanted: Reference) -> bool:
    """Whether a root entry's name is ``wanted``; linuxkit's untagged names are ':latest'."""
    if not stored:
        return False
    try:
        ref = Reference.parse(stored, default_tag="")
    except InvalidReferenceError:
        return False
    if ref == wanted:
        return True
    return (not ref.tag and ref.digest is None and wanted.tag == "latest"
            and wanted.digest is None and ref.name == wanted.name)


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
            st = os.stat(self._layout.blob_path(d))
        except FileNotFoundError:
            raise NotFoundError(f"blob {d} is not in the cache {self._layout.root}") from None
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
            try:
                os.unlink(self._layout.blob_path(d))
            except FileNotFoundError:
                raise NotFoundError(f"blob {d} is not in the cache {self._layout.root}") from None


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


class Provider(CacheProvider):
    """The cache in ``directory`` (default: ``default_cache_dir()``).

    ``mirrors`` are ``(registry or "*", URL)`` pairs (default: ``default_mirrors()``);
    ``options`` say how registries are reached; ``jobs`` blobs download at once.
    """

    def __init__(self, directory: Optional[Union[str, "os.PathLike[str]"]] = None, *,
                 mirrors: Optional[Sequence[Tuple[str, str]]] = None,
                 options: Optional[TransportOptions] = None, jobs: int = 4,
                 progress: Optional[PullProgress] = None) -> None:
        self.layout = Layout(directory if directory is not None else default_cache_dir())
        self.registry = RegistryClient(_Transport(options or TransportOptions()),
                                       default_mirrors() if mirrors is None else mirrors)
        self.jobs = max(1, jobs)
        self.progress = progress or PullProgress()

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
        """The root entry for ``ref``: by digest if it has one, else by name; or None."""
        wanted = Reference.parse(ref)
        entries = self.layout.read_index().manifests
        if wanted.digest is not None:
            return next((e for e in entries if e.digest == wanted.digest), None)
        return next((e for e in entries if _names_match(e.name, wanted)), None)

    def _find_named(self, ref: RefLike) -> Descriptor:
        wanted = Reference.parse(ref)
        entries = self.layout.read_index().manifests
        for entry in entries:
            if _names_match(entry.name, wanted):
                return entry
        if wanted.digest is not None:
            for entry in entries:
                if entry.digest == wanted.digest:
                    return entry
        raise NotFoundError(f"no image named {wanted} in the cache {self.root}")

    def names(self) -> List[Descriptor]:
        """Every named root entry, in index order."""
        return [e for e in self.layout.read_index().manifests if e.name]

    def descriptor_write(self, ref: RefLike, descriptor: DescriptorLike) -> ImageSource:
        """Name ``descriptor`` (whose blob must be in the cache), replacing that name."""
        name = str(Reference.parse(ref))
        named = _as_descriptor(descriptor).named(name)
        self._write_names([(name, named)])
        return self.new_source(name, "", named)

    def _write_names(self, entries: Sequence[Tuple[str, Descriptor]]) -> None:
        """One index update naming every entry; refuses if any needs a missing blob."""
        with self.layout.lock():
            marked = self.layout.reachable([d for _, d in entries])
            problems = marked.missing + marked.unreadable
            if problems:
                raise NotFoundError(f"cannot name {entries[0][0]}: blob {problems[0]} "
                                    f"is not in the cache {self.root}")
            wanted = [Reference.parse(name) for name, _ in entries]

            def change(manifests: List[Descriptor]) -> List[Descriptor]:
                kept = [m for m in manifests if not any(_names_match(m.name, w) for w in wanted)]
                return kept + [d for _, d in entries]

            self.layout.update_index(change)

    def index_write(self, ref: RefLike, *descriptors: DescriptorLike) -> ImageSource:
        """Create, or merge into, the multi-platform index named ``ref``."""
        name = str(Reference.parse(ref))
        incoming = [_as_descriptor(d) for d in descriptors]
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

    def image_load(self, stream: IO[bytes]) -> List[Descriptor]:
        """Load a tar stream (OCI layout, Docker 25+ or classic ``docker save``).

        Every blob is verified; names are written in one index update at the end, so a
        failure leaves no name behind. Returns the root descriptors, one per name
        (unnamed roots are returned without a name and are not added to the index).
        """
        with self.layout.adding_blobs():
            images = _load_archive(stream, self.layout)
            named = [(name, image.descriptor.named(name))
                     for image in images for name in image.names]
            if named:
                self._write_names(named)
        unnamed = [i.descriptor.with_annotations(ref_name=None, containerd_name=None)
                   for i in images if not i.names]
        return [d for _, d in named] + unnamed

    def remove(self, *refs: RefLike) -> List[Digest]:
        """Remove names, and the blobs no other name reaches; returns those blobs.

        Every name must exist, or nothing is removed.
        """
        wanted = [Reference.parse(ref) for ref in refs]
        with self.layout.deleting_blobs(), self.layout.lock():
            entries = self.layout.read_index().manifests
            for ref in wanted:
                if not any(_names_match(e.name, ref) for e in entries):
                    raise NotFoundError(f"no image named {ref} in the cache {self.root}")
            removed = [e for e in entries if any(_names_match(e.name, w) for w in wanted)]
            remaining = [e for e in entries if e not in removed]
            self.layout.update_index(lambda _: remaining)
            before = self.layout.reachable(removed).digests
            after = self.layout.reachable(remaining).digests
            deleted = [d for d in before if d not in after and self.layout.has_blob(d)]
            for digest in deleted:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.layout.blob_path(digest))
            return deleted

    def clean(self) -> int:
        """Remove every name and blob; returns the number of blobs deleted."""
        with self.layout.deleting_blobs(), self.layout.lock():
            self.layout.update_index(lambda _: [])
            count = 0
            for digest, path, _ in self.layout.blob_files():
                if digest is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        count += 1
            return count

    def gc(self, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS,
           dry_run: bool = False) -> GcReport:
        return self.layout.gc(grace_seconds, dry_run)

    def verify(self) -> VerifyReport:
        return self.layout.verify()

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
        child = select_platform(index.manifests, wanted)
        if child is None:
            have = ", ".join(str(c.platform) for c in index.manifests
                             if c.platform is not None and not c.is_attestation) or "none"
            raise PlatformNotFoundError(
                f"image {root.name or Reference.parse(ref)} has no {wanted}; it has {have}")
        return root, child

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
        """The root entry of ``ref`` if its image for the platform is complete, else None."""
        try:
            root, image = self.resolve(ref, str(Platform.parse(architecture)))
            manifest = self.manifest(image)
        except (NotFoundError, CorruptCacheError):
            return None
        complete = all(self.layout.has_blob(b.digest, b.size) for b in manifest.blobs()
                       if not _is_foreign(b))
        return root if complete else None

    def summaries(self) -> List[ImageSummary]:
        """Every name with the platforms complete in the cache and its size on disk."""
        out = []
        for entry in self.names():
            reachable = self.layout.reachable([entry]).digests
            size = sum(os.path.getsize(self.layout.blob_path(d)) for d in reachable
                       if self.layout.has_blob(d))
            out.append(ImageSummary(entry.name, entry, tuple(self._platforms(entry)), size))
        return out

    def _platforms(self, root: Descriptor) -> List[str]:
        try:
            if root.is_index:
                index = Index.from_json(self.layout.read_blob(root.digest))
                images = [c for c in index.manifests
                          if c.platform is not None and not c.is_attestation]
            else:
                config = _load_json_object(
                    self.layout.read_blob(self.manifest(root).config.digest), "config")
                images = [_replace(root, platform=Platform.from_json(config))]
        except OciCacheError:
            return []
        complete = []
        for child in images:
            try:
                manifest = self.manifest(child)
            except OciCacheError:
                continue
            if all(self.layout.has_blob(b.digest, b.size) for b in manifest.blobs()
                   if not _is_foreign(b)):
                complete.append(str(child.platform))
        return complete

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
        missing blobs, each verified; the name is written last.
        """
        wanted = Reference.parse(ref)
        name = str(wanted)
        cached = None if always_pull else self._complete(wanted, architecture)
        if cached is not None:
            self.progress.cached(name, cached)
            return self.new_source(name, architecture, cached)
        with self.layout.adding_blobs():
            root_data, root = self.registry.get_manifest(wanted)
            manifests = self._pull_plan(wanted, root_data, root, architecture)
            blobs: Dict[Digest, Descriptor] = {}
            for _, _, manifest in manifests:
                for blob in manifest.blobs():
                    if not _is_foreign(blob):
                        blobs.setdefault(blob.digest, blob)
            self.progress.begin(name, list(blobs.values()))
            self._download(wanted, sorted(blobs.values(), key=lambda b: -b.size))
            for descriptor, data, _ in manifests:
                self.layout.write_blob_bytes(data, descriptor.digest)
            self.layout.write_blob_bytes(root_data, root.digest)
            names = [(name, root.named(name))]
            if arch_tags and wanted.tag:
                base = Reference(wanted.registry, wanted.repository, wanted.tag)
                for descriptor, _, _ in manifests:
                    if descriptor.platform is not None and not descriptor.is_attestation:
                        tag = f"{base}-{_arch_tag(descriptor.platform)}"
                        names.append((tag, descriptor.named(tag)))
            self._write_names(names)
        self.progress.end(name, root)
        return self.new_source(name, architecture, root.named(name))

    def _complete(self, ref: Reference, architecture: str) -> Optional[Descriptor]:
        """The name's root entry if it is complete for the platform, else None; without
        any network, and reading index.json once for one platform (it may be large)."""
        if architecture != ALL_PLATFORMS:
            return self._complete_root(ref, architecture)
        root = self.find_descriptor(ref)
        if root is None:
            return None
        marked = self.layout.reachable([root])
        complete = not marked.missing and not marked.unreadable and \
            all(self.layout.has_blob(d) for d in marked.digests)
        return self._find_named(ref) if complete else None

    def _pull_plan(self, ref: Reference, data: bytes, root: Descriptor,
                   architecture: str) -> List[Tuple[Descriptor, bytes, Manifest]]:
        """The image manifests a pull needs, fetched and parsed; no name is written."""
        if root.is_index:
            index = Index.from_json(data, what=f"index of {ref}")
            images = [c for c in index.manifests if c.platform is not None
                      and not c.is_attestation and c.media_type in IMAGE_MEDIA_TYPES]
            if architecture == ALL_PLATFORMS:
                chosen = images
                if not chosen:
                    raise PlatformNotFoundError(f"image {ref} is an index without images")
            else:
                wanted = Platform.parse(architecture)
                child = select_platform(images, wanted)
                if child is None:
                    have = ", ".join(str(c.platform) for c in images) or "no platforms"
                    raise PlatformNotFoundError(f"image {ref} has no {wanted}; it has {have}")
                chosen = [child]
            chosen += [a for c in chosen for a in index.attestations_for(c.digest)
                       if a.media_type in IMAGE_MEDIA_TYPES]
            plan = []
            for child in chosen:
                child_ref = Reference(ref.registry, ref.repository, "", child.digest)
                child_data, _ = self.registry.get_manifest(child_ref, what=f"pull {ref}")
                plan.append((child, child_data, Manifest.from_json(
                    child_data, what=f"manifest {child.digest} of {ref}")))
            return plan
        manifest = Manifest.from_json(data, what=f"manifest of {ref}")
        if self.layout.has_blob(manifest.config.digest, manifest.config.size):
            config_data = self.layout.read_blob(manifest.config.digest)
        else:
            config_data = self.registry.get_blob_bytes(ref, manifest.config)
        declared = Platform.from_json(_load_json_object(config_data, f"config of {ref}"))
        probe = _replace(root, platform=declared)
        if architecture not in ("", ALL_PLATFORMS):
            wanted = Platform.parse(architecture)
            if select_platform([probe], wanted) is None:
                raise PlatformNotFoundError(f"image {ref} has no {wanted}; it is {declared}")
        elif architecture == "" and select_platform([probe], Platform.host()) is None:
            _log().warning("image %s is %s, not this host's %s", ref, declared, Platform.host())
        self.layout.write_blob_bytes(config_data, manifest.config.digest)
        return [(probe, data, manifest)]

    def _download(self, ref: Reference, blobs: Sequence[Descriptor]) -> None:
        """Fetch the blobs not yet present, ``jobs`` at a time, largest first."""
        import concurrent.futures
        missing = [b for b in blobs if not self.layout.has_blob(b.digest, b.size)]
        for blob in blobs:
            if blob not in missing:
                self.layout._touch(blob.digest)
                self.progress.advance(blob.digest, blob.size)
        if not missing:
            return
        with concurrent.futures.ThreadPoolExecutor(self.jobs, "ocicache-pull") as pool:
            futures = [pool.submit(self.registry.download_blob, ref, blob, self.layout,
                                   functools.partial(self.progress.advance, blob.digest))
                       for blob in missing]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def is_published(self, ref: RefLike) -> bool:
        """Whether the registry serves exactly the root this cache holds for ``ref``
        (with credentials, unlike linuxkit's anonymous check)."""
        wanted = Reference.parse(ref)
        root = self._find_named(wanted)
        try:
            _, remote = self.registry.get_manifest(wanted, what=f"look up {wanted}")
        except RegistryError as e:
            if e.status == 404 or {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"} & set(e.codes):
                return False
            raise
        return remote.digest == root.digest

    def image_in_registry(self, ref: RefLike, trusted_ref: str = "",
                          architecture: str = "") -> bool:
        """Whether the registry has ``ref`` for the platform. "Not found" is False;
        every other failure (authentication, network, 5xx after retries) raises."""
        wanted_ref = Reference.parse(ref)
        try:
            data, root = self.registry.get_manifest(wanted_ref, what=f"look up {wanted_ref}")
        except RegistryError as e:
            if e.status == 404 or {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"} & set(e.codes):
                return False
            raise
        wanted = Platform.parse(architecture)
        if root.is_index:
            return select_platform(Index.from_json(data).manifests, wanted) is not None
        manifest = Manifest.from_json(data)
        config = _load_json_object(self.registry.get_blob_bytes(wanted_ref, manifest.config),
                                   f"config of {wanted_ref}")
        probe = _replace(root, platform=Platform.from_json(config))
        return select_platform([probe], wanted) is not None

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
        existing = self.registry.remote_manifest(endpoint, tag, "pull,push")
        if existing is not None and not override:
            _log().info("%s exists in the registry; not pushing (use override)", remote)
            return
        if existing is not None and existing[1].digest == root.digest:
            _log().info("%s is already in the registry", remote)
            return
        data = self.layout.read_blob(root.digest)
        children: List[Descriptor] = []
        if root.is_index:
            index = Index.from_json(data, what=f"index of {local}")
            children = list(index.manifests)
            if existing is not None and existing[1].is_index:
                merged = merge_remote_index(index, Index.from_json(existing[0]))
            else:
                merged = without_dangling_attestations(index)
            if merged != index:
                data = merged.to_bytes()
            remote_children = {c.digest for c in Index.from_json(existing[0]).manifests} \
                if existing is not None and existing[1].is_index else set()
            to_push = [c for c in merged.manifests if c.digest not in remote_children]
        else:
            to_push = [root]
        self._push_manifests(local, endpoint, to_push)
        media_type = str(_load_json_object(data, f"index of {local}").get("mediaType") or
                         root.media_type)  # the body's own type: root entries may differ
        self.registry.put_manifest(endpoint, tag, data, media_type)
        _log().info("pushed %s as %s", local, remote)
        if with_manifest and root.is_index and remote.tag:
            for child in children:
                if child.platform is not None and _is_real_platform(child) and \
                        self.layout.has_blob(child.digest):
                    child_tag = f"{remote.tag}-{_arch_tag(child.platform)}"
                    self.registry.put_manifest(endpoint, child_tag,
                                               self.layout.read_blob(child.digest),
                                               child.media_type)

    def _push_manifests(self, local: Reference, endpoint: _Endpoint,
                        manifests: Sequence[Descriptor]) -> None:
        """Upload the blobs of each manifest, then the manifests by digest."""
        import concurrent.futures
        parsed = []
        for descriptor in manifests:
            if not self.layout.has_blob(descriptor.digest):
                raise NotFoundError(
                    f"cannot push {local}: {descriptor.platform or 'a child'} "
                    f"({descriptor.digest}) is not in the cache; pull it with --all-platforms")
            parsed.append((descriptor, self.manifest(descriptor)))
        blobs: Dict[Digest, Descriptor] = {}
        for _, manifest in parsed:
            for blob in manifest.blobs():
                if _is_foreign(blob) and not self.layout.has_blob(blob.digest):
                    continue
                if not self.layout.has_blob(blob.digest, blob.size):
                    raise NotFoundError(f"cannot push {local}: blob {blob.digest} is not "
                                        "complete in the cache; pull the image again")
                blobs.setdefault(blob.digest, blob)
        sources = [local.repository] if local.registry == endpoint.registry and \
            local.repository != endpoint.repository else []
        ordered = sorted(blobs.values(), key=lambda b: -b.size)
        with concurrent.futures.ThreadPoolExecutor(self.jobs, "ocicache-push") as pool:
            for future in [pool.submit(self.registry.upload_blob, endpoint, blob, self.layout,
                                       sources) for blob in ordered]:
                future.result()
        for descriptor, _ in parsed:
            self.registry.put_manifest(endpoint, str(descriptor.digest),
                                       self.layout.read_blob(descriptor.digest),
                                       descriptor.media_type)


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
        if self._architecture == ALL_PLATFORMS:
            raise OciCacheError(f"{self._ref}: this needs one platform; '{ALL_PLATFORMS}' "
                                "is only for an OCI tar of the whole index")
        root, image = self._provider.resolve(self._ref, self._architecture)
        return root, image, self._provider.manifest(image)

    def _check_image(self, manifest: Manifest) -> None:
        """A file system or a docker tar needs a container image: an OCI artifact's
        layers (an empty or other config) are no file systems."""
        if manifest.config.media_type not in (MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG):
            raise OciCacheError(f"{self._ref} is not a container image: its config is "
                                f"{_shorten(manifest.config.media_type)!r}, not an image "
                                "config")

    def _check_layers(self, manifest: Manifest) -> None:
        """Fail before streaming when a layer is missing or cannot be decompressed here."""
        layout = self._provider.layout
        for layer in manifest.layers:
            if _is_foreign(layer) and not layout.has_blob(layer.digest):
                continue  # named in the error if an export needs it
            if not layout.has_blob(layer.digest, layer.size):
                raise NotFoundError(f"layer {layer.digest} of {self._ref} is not complete in "
                                    f"the cache {layout.root}; pull the image again")
            if layer.media_type.endswith("+zstd"):
                _zstd_reader(io.BytesIO(), f"layer {layer.digest} of {self._ref}")

    def _filesystem_writer(self) -> Callable[[BinaryIO], None]:
        _, _, manifest = self._image()
        self._check_image(manifest)
        self._check_layers(manifest)
        layout = self._provider.layout
        for layer in manifest.layers:
            if _is_foreign(layer) and not layout.has_blob(layer.digest):
                raise _foreign_layer_error(layer)
        openers = [functools.partial(_open_layer, layout, layer) for layer in manifest.layers]
        names = [str(layer.digest) for layer in manifest.layers]
        return lambda out: _Flattener(openers, out, names).run()

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
        self._check_image(manifest)
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
            for blob in [manifest.config, *layers, image]:
                archive.add_blob(layout, blob, _blob_name(blob.digest))
            archive.add_bytes("index.json", Index(MEDIA_OCI_INDEX, (root,)).to_bytes())
            archive.add_bytes("manifest.json", json.dumps(docker_manifest).encode())
            if tagged is not None and manifest.layers:
                repository = tagged.familiar.rsplit(":", 1)[0]
                top = manifest.layers[-1].digest.hex
                archive.add_bytes("repositories",
                                  json.dumps({repository: {tagged.tag: top}}).encode())
            archive.close()

        return produce

    def _oci_writer(self, override_name: str) -> Callable[[BinaryIO], None]:
        """An OCI layout tar of one platform, or of the whole index for ``"all"``."""
        name = str(self._save_name(override_name))
        layout = self._provider.layout
        if self._architecture == ALL_PLATFORMS:
            root = self._provider._find_named(self._ref)
            marked = layout.reachable([root])
            incomplete = [d for d in marked.digests if not layout.has_blob(d)]
            if incomplete or marked.unreadable:
                raise NotFoundError(
                    f"{self._ref} is not complete in the cache: {len(incomplete)} blobs are "
                    "missing (pull it with --all-platforms first)")
            top = Descriptor(root.media_type, root.digest, root.size)
            blobs = [Descriptor("", d, os.path.getsize(layout.blob_path(d)))
                     for d in marked.digests if d != root.digest] + [top]
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
            for blob in blobs:
                archive.add_blob(layout, blob, _blob_name(blob.digest))
            archive.add_bytes("index.json", Index(MEDIA_OCI_INDEX, (root_entry,)).to_bytes())
            archive.close()

        return produce

    def sboms(self) -> List[BinaryIO]:
        """The SPDX predicates of this platform's BuildKit attestation, as in the blob."""
        root = self._provider._find_named(self._ref)
        if not root.is_index:
            return []
        layout = self._provider.layout
        index = Index.from_json(layout.read_blob(root.digest), what=f"index of {self._ref}")
        wanted = Platform.parse(self._architecture)
        image = select_platform(index.manifests, wanted)
        if image is None:
            raise PlatformNotFoundError(f"no manifest found for {self._ref} platform {wanted}")
        attestations = [c for c in index.attestations_for(image.digest)
                        if c.annotations.get(ANNOTATION_REFERENCE_TYPE) == "attestation-manifest"]
        if len(attestations) > 1:
            raise OciCacheError(f"multiple attestation manifests found for {self._ref} "
                                f"platform {wanted}")
        if not attestations:
            return []
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
            documents.append(io.BytesIO(_raw_json_member(data.decode(), "predicate").encode()))
        return documents  # type: ignore[return-value]


def _raw_json_member(text: str, key: str) -> str:
    """The text of a top-level member of a JSON object exactly as written."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"[ \t\n\r]*")
    position = whitespace.match(text, 0).end()  # type: ignore[union-attr]
    if text[position:position + 1] != "{":
        raise OciCacheError("an in-toto statement must be a JSON object")
    position += 1
    while True:
        position = whitespace.match(text, position).end()  # type: ignore[union-attr]
        if text[position:position + 1] != '"':
            break
        member, position = json.decoder.scanstring(text, position + 1)  # type: ignore[attr-defined]
        position = whitespace.match(text, position).end() + 1  # type: ignore[union-attr]
        start = whitespace.match(text, position).end()  # type: ignore[union-attr]
        _, end = decoder.raw_decode(text, start)
        if member == key:
            return text[start:end]
        position = whitespace.match(text, end).end()  # type: ignore[union-attr]
        if text[position:position + 1] == ",":
            position += 1
    raise OciCacheError(f"the in-toto statement has no {key!r}")


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
            self._out.write(f"\r{self._label}: {_human_size(self._done)}{total} "
                            f"({_human_size(int(rate))}/s)\x1b[K")
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
        seconds = time.monotonic() - self._started
        self._out.write(f"pulled {name} {descriptor.digest} ({_human_size(self._bytes)} of "
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
        self._last_draw = 0.0
        self._name = ""

    def begin(self, name: str, blobs: Sequence[Descriptor]) -> None:
        with self._lock:
            self._name = name
            self._sizes = {b.digest: b.size for b in blobs}
            self._done = {b.digest: 0 for b in blobs}
            self._started = time.monotonic()
            self._drawn_lines = 0

    def advance(self, digest: Digest, size: int) -> None:
        with self._lock:
            if digest in self._done:
                self._done[digest] += size
            now = time.monotonic()
            if now - self._last_draw >= 0.1:
                self._last_draw = now
                self._draw(now)

    def end(self, name: str, descriptor: Descriptor) -> None:
        with self._lock:
            self._draw(time.monotonic())
            self._out.write(f"pulled {name} {descriptor.digest}\n")
            self._out.flush()
            self._drawn_lines = 0

    def _draw(self, now: float) -> None:
        total, done = sum(self._sizes.values()), sum(self._done.values())
        elapsed = max(now - self._started, 1e-6)
        rate = done / elapsed
        eta = f"{(total - done) / rate:.0f}s" if rate > 0 and done < total else "-"
        lines = [f"  {d.hex[:12]}  {_human_size(self._done[d])} / {_human_size(size)}"
                 for d, size in self._sizes.items() if 0 < self._done[d] < size][:8]
        lines.append(f"{self._name}: {_human_size(done)} / {_human_size(total)} "
                     f"{_human_size(int(rate))}/s ETA {eta}")
        up = f"\x1b[{self._drawn_lines}F" if self._drawn_lines else ""
        self._out.write(up + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
        self._out.flush()
        self._drawn_lines = len(lines)


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


def _build_parser() -> argparse.ArgumentParser:
    # Made here, not at module level: importing ocicache does not import argparse.
    class _Parser(argparse.ArgumentParser):
        """argparse with one-line usage errors (exit 2), as every other error."""

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
    parser.add_argument("--jobs", metavar="N", type=_positive, default=4,
                        help="blobs to download at once (default 4)")
    parser.add_argument("--version", action="version", version=f"ocicache {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    p = commands.add_parser("pull", help="pull images from registries into the cache",
                            description="Pull each NAME for the platform (default: the host). "
                                        "An image already complete in the cache makes no "
                                        "request; only missing blobs are downloaded, and "
                                        "every byte is verified.")
    p.add_argument("names", metavar="NAME", nargs="+")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--platform", metavar="P", default="",
                       help="os/arch[/variant], e.g. linux/arm64 (default: the host)")
    which.add_argument("--all-platforms", action="store_true",
                       help="pull every platform of a multi-platform image")
    p.add_argument("--always", action="store_true",
                   help="ask the registry even when the image is in the cache (follows a "
                        "moved tag)")
    p.add_argument("--arch-tags", action="store_true",
                   help="also name each platform <NAME>-<arch>, as linuxkit cache pull does")
    p.set_defaults(run=_cmd_pull)

    p = commands.add_parser("push", help="push an image from the cache to a registry",
                            description="Push NAME (an image or a multi-platform index) to "
                                        "its registry, or as --remote-name. Blobs the "
                                        "registry has are not sent again; the tag is "
                                        "written last.")
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
    p.add_argument("--json", action="store_true", help="print a JSON array (stable for scripts)")
    p.set_defaults(run=_cmd_ls)

    p = commands.add_parser("inspect", help="print an image's manifest or config",
                            description="Print the root index or manifest of NAME as JSON; "
                                        "with --platform, that platform's manifest; with "
                                        "--config, its image config.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--platform", metavar="P", default=None,
                   help="os/arch[/variant], e.g. linux/arm64 (default for --config: the host)")
    p.add_argument("--config", action="store_true", help="print the image config instead")
    p.set_defaults(run=_cmd_inspect)

    p = commands.add_parser("import", help="load an image archive",
                            description="Load a tar archive into the cache: an OCI layout "
                                        "(docker buildx --output type=oci, skopeo "
                                        "oci-archive:), or a docker save tar (any Docker "
                                        "version), optionally gzip-compressed. '-' reads "
                                        "standard input. Prints the names loaded.")
    p.add_argument("file", metavar="FILE|-")
    p.set_defaults(run=_cmd_import)

    p = commands.add_parser("export", help="write an image as a tar archive",
                            description="Write NAME as a tar: 'oci' (an OCI layout, for skopeo "
                                        "oci-archive: and containerd), 'docker' (for docker "
                                        "load and podman load), or 'filesystem' (the "
                                        "flattened root filesystem). The file appears only "
                                        "when complete.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--format", choices=(FORMAT_OCI, FORMAT_DOCKER, FORMAT_FILESYSTEM),
                   required=True)
    p.add_argument("-o", "--output", metavar="FILE|-", required=True,
                   help="where to write ('-' for standard output); an existing file is replaced")
    p.add_argument("--platform", metavar="P", default="",
                   help="os/arch[/variant] (default: the host); 'all' writes the whole index "
                        "(oci only)")
    p.add_argument("--name", metavar="N", default="", dest="save_name",
                   help="the name to record in the tar (oci, docker)")
    p.set_defaults(run=_cmd_export)

    p = commands.add_parser("sbom", help="print the SPDX SBOMs attached to an image",
                            description="Print the SPDX documents of the BuildKit attestation "
                                        "attached to NAME's image for the platform, each as "
                                        "stored, followed by a newline; nothing if it has "
                                        "none.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--platform", metavar="P", default="", help="os/arch[/variant] (default: host)")
    p.set_defaults(run=_cmd_sbom)

    p = commands.add_parser("rm", help="remove names and the blobs only they use",
                            description="Remove each NAME; blobs that another name still "
                                        "uses are kept. Every NAME must exist, or nothing "
                                        "is removed.")
    p.add_argument("names", metavar="NAME", nargs="+")
    p.add_argument("--published-only", action="store_true",
                   help="remove only names whose registry serves the same digest")
    p.set_defaults(run=_cmd_rm)

    p = commands.add_parser("clean", help="remove every name and blob",
                            description="Empty the cache: every name and every blob. With "
                                        "--published-only, only the names whose registry "
                                        "serves the same digest (and the blobs only they "
                                        "use).")
    p.add_argument("--published-only", action="store_true",
                   help="remove only what can be pulled again as it is")
    p.set_defaults(run=_cmd_clean)

    p = commands.add_parser("gc", help="delete blobs no name uses",
                            description="Delete blobs that no name reaches and stale "
                                        "temporary files, except those younger than the "
                                        "grace period (a concurrent pull may not have "
                                        "named them yet).")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("--grace", metavar="SECONDS", type=_seconds, default=DEFAULT_GC_GRACE_SECONDS,
                   help=f"keep blobs younger than this (default {DEFAULT_GC_GRACE_SECONDS:.0f})")
    p.set_defaults(run=_cmd_gc)

    p = commands.add_parser("verify", help="re-hash every blob and check every name",
                            description="Re-hash every blob and check that every name "
                                        "reaches complete content. Exits 1 if anything is "
                                        "corrupt or missing.")
    p.set_defaults(run=_cmd_verify)
    return parser


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message)


def _cmd_pull(provider: Provider, args: argparse.Namespace) -> int:
    architecture = ALL_PLATFORMS if args.all_platforms else args.platform
    if args.platform:
        Platform.parse(args.platform)
    for name in [Reference.parse(name) for name in args.names]:
        provider.image_pull(name, "", architecture, args.always, args.arch_tags)
    return 0


def _cmd_push(provider: Provider, args: argparse.Namespace) -> int:
    provider.push(args.name, args.remote_name, args.with_arch_tags, args.override)
    return 0


def _cmd_ls(provider: Provider, args: argparse.Namespace) -> int:
    summaries = provider.summaries()
    if args.json:
        json.dump([{"name": s.name, "digest": str(s.descriptor.digest),
                    "mediaType": s.descriptor.media_type, "platforms": list(s.platforms),
                    "size": s.size} for s in summaries], sys.stdout, indent=2)
        print()
        return 0
    rows = [(s.name, str(s.descriptor.digest)[:19], ",".join(s.platforms) or "-",
             _human_size(s.size)) for s in summaries]
    header = ("NAME", "DIGEST", "PLATFORMS", "SIZE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    return 0


def _cmd_inspect(provider: Provider, args: argparse.Namespace) -> int:
    if args.platform is None and not args.config:
        descriptor = provider.resolve(args.name)[0]
    else:
        descriptor = provider.resolve(args.name, args.platform or "")[1]
    data = provider.layout.read_blob(descriptor.digest)
    if args.config:
        data = provider.layout.read_blob(provider.manifest(descriptor).config.digest)
    what = f"config of {args.name}" if args.config else f"manifest of {args.name}"
    json.dump(_parse_json(data, what), sys.stdout, indent=2, ensure_ascii=False)
    print()
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
            loaded = provider.image_load(stream)
        finally:
            if show:
                stream.finish()
    for descriptor in loaded:
        if descriptor.name:
            _say(args, f"{descriptor.name} {descriptor.digest}")
        else:
            print(f"ocicache: warning: the archive does not name {descriptor.digest}; "
                  "nothing was named (use a tar with io.containerd.image.name or RepoTags)",
                  file=sys.stderr)
    return 0


def _cmd_export(provider: Provider, args: argparse.Namespace) -> int:
    if args.platform == ALL_PLATFORMS and args.format != "oci":
        raise OciCacheError("--platform all needs --format oci")
    source = provider.new_source(args.name, args.platform)
    if not isinstance(source, _CacheSource):
        raise AssertionError("a Provider makes _CacheSource objects")
    write = source.writer(args.format, args.save_name)
    if args.output == "-":
        write(sys.stdout.buffer)
        return 0
    directory = os.path.dirname(os.path.abspath(args.output))
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(args.output)}{_TEMP_MARK}",
                                dir=directory)
    try:
        with os.fdopen(fd, "wb", buffering=COPY_BUFFER_SIZE) as out:
            write(out)
            os.fchmod(out.fileno(), 0o644 & ~_UMASK)
        os.replace(temp, args.output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return 0


def _cmd_sbom(provider: Provider, args: argparse.Namespace) -> int:
    for document in provider.new_source(args.name, args.platform).sboms():
        sys.stdout.buffer.write(document.read() + b"\n")
    return 0


def _published(provider: Provider, args: argparse.Namespace,
               names: Iterable[str]) -> List[str]:
    """The names whose registry serves the same digest; the others are named as kept."""
    chosen = []
    for name in names:
        if provider.is_published(name):
            chosen.append(name)
        else:
            _say(args, f"keeping {name}: its registry does not serve this digest")
    return chosen


def _cmd_rm(provider: Provider, args: argparse.Namespace) -> int:
    names = list(dict.fromkeys(canonical_name(n) for n in args.names))
    for name in names:
        provider._find_named(name)  # every name must exist before anything is removed
    if args.published_only:
        names = _published(provider, args, names)
    deleted = provider.remove(*names) if names else []
    for name in names:
        _say(args, f"removed {name}")
    _say(args, f"{len(deleted)} blobs deleted")
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
    report = provider.verify()
    for problem in report.corrupt:
        print(f"corrupt: {problem}")
    for problem in report.missing:
        print(f"missing: {problem}")
    if report.ok:
        _say(args, f"ok: {report.checked} blobs verified")
        return 0
    print(f"ocicache: error: {len(report.corrupt)} corrupt and {len(report.missing)} missing "
          f"blobs in {provider.root}", file=sys.stderr)
    return 1


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    global _log_setup
    _raise_malloc_thresholds()
    args = _build_parser().parse_args(argv)
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
            if args.command in ("pull", "push", "rm", "clean") else []
        options = TransportOptions(insecure_registries=tuple(args.insecure_registry),
                                   ca_files=tuple(args.ca_file))
        with Provider(args.cache, mirrors=mirrors, options=options, jobs=args.jobs,
                      progress=progress) as provider:
            return int(args.run(provider, args))
    except OciCacheError as e:
        message = str(e)
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            return 1
        where = f": {e.filename}" if e.filename else ""
        message = f"{e.strerror or e}{where}"
    except KeyboardInterrupt:
        message = "interrupted"
    finally:
        _log_setup = None
    print(f"ocicache: error: {_one_line(message)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
