#!/usr/bin/env python3
"""Tests for ocicache: one TestCase per section of the module, in the module's order.

Run with ``make test`` (or ``python3 test_ocicache.py``, ``python3 -m unittest``, pytest).
Integration tests use real tools as independent judges: skopeo, umoci (and, later,
podman and docker-registry). Without a tool they skip with the reason; with
``OCICACHE_REQUIRE_INTEGRATION=1`` (CI) a missing tool fails the test instead.
Every test image is built here, from deterministic bytes. Nothing leaves loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unittest
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import ocicache as oc

HERE = os.path.dirname(os.path.abspath(__file__))
OCICACHE = os.path.join(HERE, "ocicache.py")
REQUIRE_INTEGRATION = os.environ.get("OCICACHE_REQUIRE_INTEGRATION") == "1"


def require_tool(test: unittest.TestCase, name: str) -> str:
    """The tool's path; skip (or, under OCICACHE_REQUIRE_INTEGRATION=1, fail) without it."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}")
                                  else None)
    if path is None:
        message = f"{name} is not installed (make deps installs it)"
        if REQUIRE_INTEGRATION:
            test.fail(message)
        test.skipTest(message)
    return path


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# -------------------------------------------------------------------------------------
# Building test images: deterministic tars, layers, configs, manifests and layouts
# -------------------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_bytes(entries: Iterable[Tuple[str, Any]]) -> bytes:
    """A tar of (name, bytes) regular files, or (name, tar_member(...)) entries."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in entries:
            if isinstance(data, tuple):
                info, payload = data
                archive.addfile(info, io.BytesIO(payload) if info.isreg() else None)
                continue
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
               linkname: str = "") -> Tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime, info.size = kind, linkname, 0, len(data)
    return info, data


@dataclasses.dataclass
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256(self.data)

    def descriptor(self, **extra: Any) -> Dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data),
                **extra}


@dataclasses.dataclass
class TestImage:
    """An image's blobs: layers, config, manifest; ``blobs`` lists them all."""

    manifest: Blob
    config: Blob
    layers: List[Blob]
    platform: Dict[str, str]

    @property
    def blobs(self) -> List[Blob]:
        return [*self.layers, self.config, self.manifest]

    def descriptor(self, **extra: Any) -> Dict[str, Any]:
        return self.manifest.descriptor(platform=dict(self.platform), **extra)


def make_image(seed: str, architecture: str = "amd64", variant: str = "",
               layer_files: Sequence[Dict[str, bytes]] = (), gzip_layers: bool = True,
               docker_types: bool = False) -> TestImage:
    """A small image whose content depends only on its arguments."""
    files = list(layer_files) or [{f"etc/{seed}": f"{seed} {architecture}\n".encode()}]
    layers, diff_ids = [], []
    for files_of_layer in files:
        raw = tar_bytes(sorted(files_of_layer.items()))
        diff_ids.append(sha256(raw))
        if gzip_layers:
            layers.append(Blob(oc.MEDIA_DOCKER_LAYER_GZIP if docker_types else
                               oc.MEDIA_OCI_LAYER_GZIP, gzip.compress(raw, mtime=0)))
        else:
            layers.append(Blob(oc.MEDIA_OCI_LAYER, raw))
    platform = {"architecture": architecture, "os": "linux"}
    if variant:
        platform["variant"] = variant
    config = Blob(oc.MEDIA_DOCKER_CONFIG if docker_types else oc.MEDIA_OCI_CONFIG,
                  json.dumps({**platform, "config": {"Env": [f"SEED={seed}"]},
                              "rootfs": {"type": "layers", "diff_ids": diff_ids}},
                             sort_keys=True).encode())
    manifest_type = oc.MEDIA_DOCKER_MANIFEST if docker_types else oc.MEDIA_OCI_MANIFEST
    manifest = Blob(manifest_type, json.dumps({
        "schemaVersion": 2, "mediaType": manifest_type, "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers]}).encode())
    return TestImage(manifest, config, layers, platform)


def make_attestation(image: TestImage, spdx: bool = True) -> Tuple[Blob, List[Blob], Dict[str, Any]]:
    """A BuildKit-style attestation manifest for ``image``: (manifest, blobs, index entry)."""
    statement = Blob(oc.MEDIA_IN_TOTO, json.dumps({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://spdx.dev/Document",
        "subject": [{"digest": {"sha256": image.manifest.digest.split(":")[1]}}],
        "predicate": {"spdxVersion": "SPDX-2.3", "name": image.manifest.digest}}).encode())
    config = Blob(oc.MEDIA_OCI_CONFIG, b'{"architecture":"unknown","os":"unknown"}')
    manifest = Blob(oc.MEDIA_OCI_MANIFEST, json.dumps({
        "schemaVersion": 2, "mediaType": oc.MEDIA_OCI_MANIFEST, "config": config.descriptor(),
        "layers": [statement.descriptor(annotations={
            "in-toto.io/predicate-type": "https://spdx.dev/Document"})]}).encode())
    entry = manifest.descriptor(
        platform={"architecture": "unknown", "os": "unknown"},
        annotations={oc.ANNOTATION_REFERENCE_TYPE: "attestation-manifest",
                     oc.ANNOTATION_REFERENCE_DIGEST: image.manifest.digest})
    return manifest, [statement, config, manifest], entry


def make_index(entries: Sequence[Dict[str, Any]], docker_list: bool = False) -> Blob:
    media_type = oc.MEDIA_DOCKER_LIST if docker_list else oc.MEDIA_OCI_INDEX
    return Blob(media_type, json.dumps({"schemaVersion": 2, "mediaType": media_type,
                                        "manifests": list(entries)}).encode())


def oci_archive(roots: Sequence[Tuple[Dict[str, Any], Dict[str, str]]],
                blobs: Iterable[Blob], extra: Sequence[Tuple[str, Any]] = (),
                index_last: bool = True) -> bytes:
    """An OCI layout tar: ``roots`` are (descriptor, annotations) pairs for index.json."""
    unique: Dict[str, Blob] = {}
    for blob in blobs:
        unique.setdefault(blob.digest, blob)
    index = json.dumps({"schemaVersion": 2, "mediaType": oc.MEDIA_OCI_INDEX, "manifests": [
        {**descriptor, "annotations": annotations} for descriptor, annotations in roots]})
    entries: List[Tuple[str, Any]] = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    blob_entries = [(f"blobs/sha256/{b.digest.split(':')[1]}", b.data) for b in unique.values()]
    if index_last:
        entries += blob_entries + [("index.json", index.encode())]
    else:
        entries += [("index.json", index.encode())] + blob_entries
    return tar_bytes(entries + list(extra))


def write_layout(directory: str, roots: Sequence[Tuple[Dict[str, Any], str]],
                 blobs: Iterable[Blob]) -> None:
    """An OCI layout directory as skopeo expects: ``ref.name`` holds the name given."""
    os.makedirs(os.path.join(directory, "blobs", "sha256"), exist_ok=True)
    for blob in blobs:
        with open(os.path.join(directory, "blobs", "sha256", blob.digest.split(":")[1]), "wb") as f:
            f.write(blob.data)
    with open(os.path.join(directory, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(directory, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {**d, "annotations": {oc.ANNOTATION_REF_NAME: name}} for d, name in roots]}, f)


def named(name: str) -> Dict[str, str]:
    return {oc.ANNOTATION_CONTAINERD_NAME: name, oc.ANNOTATION_REF_NAME: name}


class CacheTestCase(unittest.TestCase):
    """A fresh temporary directory per test, with a cache inside it."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="ocicache-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.cache_dir = os.path.join(self.tmp, "cache")
        self.cache = oc.Provider(self.cache_dir)

    def path(self, *parts: str) -> str:
        return os.path.join(self.tmp, *parts)

    def load(self, archive: bytes) -> List[oc.Descriptor]:
        return self.cache.image_load(io.BytesIO(archive))

    def load_image(self, name: str, image: TestImage) -> oc.Descriptor:
        (descriptor,) = self.load(oci_archive([(image.manifest.descriptor(), named(name))],
                                              image.blobs))
        return descriptor

    def cli(self, *args: str, stdin: Optional[bytes] = None,
            cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, OCICACHE, "--cache", self.cache_dir, *args],
                              input=stdin, capture_output=True, cwd=cwd or self.tmp,
                              timeout=300)

    def assert_one_line_error(self, result: subprocess.CompletedProcess, *fragments: str,
                              status: int = 1) -> str:
        stderr = result.stderr.decode()
        self.assertEqual(result.returncode, status, stderr)
        lines = stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, f"want one line, got: {stderr!r}")
        self.assertTrue(lines[0].startswith("ocicache: error: "), lines[0])
        for fragment in fragments:
            self.assertIn(fragment, lines[0])
        return lines[0]

    def index_names(self) -> List[str]:
        with open(os.path.join(self.cache_dir, "index.json")) as f:
            return [m.get("annotations", {}).get(oc.ANNOTATION_REF_NAME, "")
                    for m in json.load(f)["manifests"]]

    def temp_files(self) -> List[str]:
        found = []
        for directory, _, files in os.walk(os.path.join(self.cache_dir, "blobs")):
            found += [f for f in files if oc._TEMP_MARK in f]
        return found

    def skopeo(self, *args: str) -> str:
        skopeo = require_tool(self, "skopeo")
        result = subprocess.run([skopeo, "--insecure-policy", *args], capture_output=True,
                                timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        return result.stdout.decode()


# =====================================================================================
# Errors
# =====================================================================================

class TestErrors(unittest.TestCase):
    def test_every_error_is_an_ocicache_error(self) -> None:
        for name in oc.__all__:
            value = getattr(oc, name)
            if isinstance(value, type) and issubclass(value, Exception):
                self.assertTrue(issubclass(value, oc.OciCacheError), name)

    def test_registry_error_carries_status_and_codes(self) -> None:
        error = oc.AuthenticationError("denied", 401, ["UNAUTHORIZED"])
        self.assertIsInstance(error, oc.RegistryError)
        self.assertEqual((error.status, error.codes), (401, ("UNAUTHORIZED",)))


# =====================================================================================
# Digest
# =====================================================================================

class TestDigest(unittest.TestCase):
    def test_valid(self) -> None:
        for value in ["sha256:" + "a" * 64, "sha512:" + "0" * 128]:
            self.assertEqual(str(oc.Digest.parse(value)), value)
        digest = oc.Digest.from_bytes(b"abc")
        self.assertEqual(str(digest), sha256(b"abc"))
        self.assertIs(oc.Digest.parse(digest), digest)

    def test_invalid(self) -> None:
        for value in ["sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha256:" + "a" * 65,
                      "sha512:" + "a" * 64, "md5:" + "a" * 32, "sha384:" + "a" * 96,
                      "a" * 64, "", "sha256:", "sha256:../../etc/passwd",
                      "sha256:" + "g" * 64, "SHA256:" + "a" * 64, "sha256:" + "a" * 63 + "\n"]:
            with self.assertRaises(oc.InvalidDigestError, msg=value):
                oc.Digest.parse(value)
        with self.assertRaises(oc.InvalidDigestError):
            oc.Digest.parse(123)  # type: ignore[arg-type]


# =====================================================================================
# Reference: the distribution grammar, with distribution's own test vectors
# =====================================================================================

F64, F128 = "f" * 64, "f" * 128


def ok(domain: str = "", repository: str = "", tag: str = "", digest: str = "") -> Dict[str, str]:
    return {"domain": domain, "repository": repository, "tag": tag, "digest": digest}


# From distribution/reference reference_test.go (TestReferenceParse). "repository" is
# the path without the domain, as written. Errors are distribution's error names.
REFERENCE_VECTORS: List[Tuple[str, Any]] = [
    ("test_com", ok(repository="test_com")),
    ("test.com:tag", ok(repository="test.com", tag="tag")),
    ("test.com:5000", ok(repository="test.com", tag="5000")),
    ("test.com/repo:tag", ok("test.com", "repo", tag="tag")),
    ("test:5000/repo", ok("test:5000", "repo")),
    ("test:5000/repo:tag", ok("test:5000", "repo", tag="tag")),
    ("test:5000/repo@sha256:" + F64, ok("test:5000", "repo", digest="sha256:" + F64)),
    ("test:5000/repo:tag@sha256:" + F64, ok("test:5000", "repo", "tag", "sha256:" + F64)),
    ("", "ErrNameEmpty"),
    (":justtag", "ErrReferenceInvalidFormat"),
    ("@sha256:" + F64, "ErrReferenceInvalidFormat"),
    ("repo@sha256:" + "f" * 34, "ErrDigestInvalidLength"),
    ("validname@invaliddigest:" + F64, "ErrDigestUnsupported"),
    ("Uppercase:tag", "ErrNameContainsUppercase"),
    ("test:5000/Uppercase/lowercase:tag", "ErrNameContainsUppercase"),
    ("lowercase:Uppercase", ok(repository="lowercase", tag="Uppercase")),
    ("domain/" + "a" * 256 + ":tag", "ErrNameTooLong"),
    ("a/" * 127 + "a:tag-puts-this-over-max", ok("a", "a/" * 126 + "a", "tag-puts-this-over-max")),
    ("aa/asdf$$^/aa", "ErrReferenceInvalidFormat"),
    ("sub-dom1.foo.com/bar/baz/quux", ok("sub-dom1.foo.com", "bar/baz/quux")),
    ("sub-dom1.foo.com/bar/baz/quux:some-long-tag",
     ok("sub-dom1.foo.com", "bar/baz/quux", tag="some-long-tag")),
    ("b.gcr.io/test.example.com/my-app:test.example.com",
     ok("b.gcr.io", "test.example.com/my-app", tag="test.example.com")),
    ("xn--n3h.com/myimage:xn--n3h.com", ok("xn--n3h.com", "myimage", tag="xn--n3h.com")),
    ("xn--7o8h.com/myimage:xn--7o8h.com@sha512:" + F128,
     ok("xn--7o8h.com", "myimage", "xn--7o8h.com", "sha512:" + F128)),
    ("foo_bar.com:8080", ok(repository="foo_bar.com", tag="8080")),
    ("foo/foo_bar.com:8080", ok("", "foo/foo_bar.com", tag="8080")),
    ("192.168.1.1", ok(repository="192.168.1.1")),
    ("192.168.1.1:tag", ok(repository="192.168.1.1", tag="tag")),
    ("192.168.1.1:5000", ok(repository="192.168.1.1", tag="5000")),
    ("192.168.1.1/repo", ok("192.168.1.1", "repo")),
    ("192.168.1.1:5000/repo", ok("192.168.1.1:5000", "repo")),
    ("192.168.1.1:5000/repo:5050", ok("192.168.1.1:5000", "repo", tag="5050")),
    ("[2001:db8::1]", "ErrReferenceInvalidFormat"),
    ("[2001:db8::1]:5000", "ErrReferenceInvalidFormat"),
    ("[2001:db8::1]:tag", "ErrReferenceInvalidFormat"),
    ("[2001:db8::1]/repo", ok("[2001:db8::1]", "repo")),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", ok("[2001:db8:1:2:3:4:5:6]", "repo", tag="tag")),
    ("[2001:db8::1]:5000/repo", ok("[2001:db8::1]:5000", "repo")),
    ("[2001:db8::1]:5000/repo:tag", ok("[2001:db8::1]:5000", "repo", tag="tag")),
    ("[2001:db8::1]:5000/repo@sha256:" + F64,
     ok("[2001:db8::1]:5000", "repo", digest="sha256:" + F64)),
    ("[2001:db8::1]:5000/repo:tag@sha256:" + F64,
     ok("[2001:db8::1]:5000", "repo", "tag", "sha256:" + F64)),
    ("[2001:db8::]:5000/repo", ok("[2001:db8::]:5000", "repo")),
    ("[::1]:5000/repo", ok("[::1]:5000", "repo")),
    ("[fe80::1%eth0]:5000/repo", "ErrReferenceInvalidFormat"),
    ("[fe80::1%@invalidzone]:5000/repo", "ErrReferenceInvalidFormat"),
    ("example.com/" + "a" * 255 + ":tag", ok("example.com", "a" * 255, tag="tag")),
]

# From normalize_test.go: input -> fully normalised name (ParseNormalizedNamed).
NORMALIZE_VECTORS: List[Tuple[str, str]] = [
    ("fooo/bar", "docker.io/fooo/bar"), ("index.docker.io/fooo/bar", "docker.io/fooo/bar"),
    ("ubuntu", "docker.io/library/ubuntu"), ("library/ubuntu", "docker.io/library/ubuntu"),
    ("nonlibrary/ubuntu", "docker.io/nonlibrary/ubuntu"),
    ("other/library", "docker.io/other/library"),
    ("127.0.0.1:8000/private/moonbase", "127.0.0.1:8000/private/moonbase"),
    ("127.0.0.1:8000/privatebase", "127.0.0.1:8000/privatebase"),
    ("example.com/private/moonbase", "example.com/private/moonbase"),
    ("example.com:8000/privatebasee", "example.com:8000/privatebasee"),
    ("ubuntu-12.04-base", "docker.io/library/ubuntu-12.04-base"),
    ("index.docker.io/library/ubuntu-12.04-base", "docker.io/library/ubuntu-12.04-base"),
    ("foo", "docker.io/library/foo"), ("docker.io/foo", "docker.io/library/foo"),
    ("library/foo/bar", "docker.io/library/foo/bar"),
    ("store/foo/bar", "docker.io/store/foo/bar"),
    ("Foo/bar", "Foo/bar"), ("FOO/bar", "FOO/bar"),
    ("test_com/foo", "docker.io/test_com/foo"), ("docker/migrator", "docker.io/docker/migrator"),
    ("test-com:8080/foo", "test-com:8080/foo"), ("xn--n3h.com:18080/foo", "xn--n3h.com:18080/foo"),
    ("docker.io/library/foo/bar", "docker.io/library/foo/bar"),
    ("192.168.0.1", "docker.io/library/192.168.0.1"),
    ("[fc00::1]:5000/docker/docker", "[fc00::1]:5000/docker/docker"),
    ("docker.io/" + "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
     "docker.io/library/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"),
    ("docker---rules/docker", "docker.io/docker---rules/docker"),
    ("dock__er/docker", "docker.io/dock__er/docker"),
]

NORMALIZE_INVALID = [
    "https://github.com/docker/docker", "docker/Docker", "-docker", "-docker/docker",
    "-docker.io/docker/docker", "docker///docker", "docker.io/docker/Docker",
    "docker.io/docker///docker", "[fc00::1]", "[fc00::1]:5000", "fc00::1:5000/debian",
    "[fe80::1%eth0]:5000/debian", "[2001:db8:3:4::192.0.2.33]:5000/debian",
    "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
    "docker-/docker", "-docker-/docker", "____/____", "_docker/_docker", "dock..er/docker",
    "dock_.er/docker", "dock-.er/docker", "docker/",
    "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_" * 3
    + "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255/docker",
    "-foo", "a b", "alpine:", "alpine@", "alpine:tag@", "alpine\n", "../alpine",
]


class TestReference(unittest.TestCase):
    def test_distribution_parse_vectors(self) -> None:
        for value, expected in REFERENCE_VECTORS:
            with self.subTest(value=value[:60]):
                if isinstance(expected, str):
                    with self.assertRaises(oc.InvalidReferenceError):
                        oc.Reference.parse(value, default_tag="")
                    continue
                ref = oc.Reference.parse(value, default_tag="")
                # distribution's Parse takes any first component as the domain; the
                # normalised form (ours) does so only for '.', ':', localhost or capitals.
                full = "/".join(p for p in (expected["domain"], expected["repository"]) if p)
                first, _, rest = full.partition("/")
                if rest and ("." in first or ":" in first or first != first.lower()):
                    domain, repository = first, rest
                else:
                    domain, repository = "docker.io", full
                    if "/" not in repository:
                        repository = "library/" + repository
                self.assertEqual(ref.registry, domain)
                self.assertEqual(ref.repository, repository)
                self.assertEqual(ref.tag, expected["tag"])
                self.assertEqual(str(ref.digest or ""), expected["digest"])

    def test_error_messages_name_the_problem(self) -> None:
        for value, fragment in [("Uppercase:tag", "lowercase"),
                                ("domain/" + "a" * 256, "longer than 255"),
                                ("validname@invaliddigest:" + F64, "digest"),
                                ("", "empty"), ("a b", "invalid reference format")]:
            with self.assertRaises(oc.InvalidReferenceError) as caught:
                oc.Reference.parse(value)
            self.assertIn(fragment, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_normalisation(self) -> None:
        for value, expected in NORMALIZE_VECTORS:
            with self.subTest(value=value):
                self.assertEqual(oc.Reference.parse(value, default_tag="").name, expected)
        for value in NORMALIZE_INVALID:
            with self.subTest(value=value[:60]), self.assertRaises(oc.InvalidReferenceError):
                oc.Reference.parse(value)

    def test_canonical_and_familiar_forms(self) -> None:
        for value in ["alpine", "library/alpine", "docker.io/alpine:latest",
                      "index.docker.io/library/alpine", "docker.io/library/alpine:latest"]:
            self.assertEqual(oc.canonical_name(value), "docker.io/library/alpine:latest")
        cases = [("alpine:3.19", "alpine:3.19"), ("ghcr.io/o/r:v1", "ghcr.io/o/r:v1"),
                 ("linuxkit/init:abc", "linuxkit/init:abc"),
                 ("docker.io/library/foo/bar:1", "library/foo/bar:1"),
                 ("localhost:5000/x", "localhost:5000/x:latest")]
        for value, familiar in cases:
            self.assertEqual(oc.Reference.parse(value).familiar, familiar)

    def test_tag_and_digest(self) -> None:
        ref = oc.Reference.parse("alpine:3.19@sha256:" + F64)
        self.assertEqual((ref.tag, str(ref.digest)), ("3.19", "sha256:" + F64))
        self.assertEqual(str(ref), "docker.io/library/alpine:3.19@sha256:" + F64)
        self.assertEqual(str(oc.Reference.parse("alpine@sha256:" + F64)),
                         "docker.io/library/alpine@sha256:" + F64)
        with self.assertRaises(oc.InvalidReferenceError):
            oc.Reference.parse("alpine@sha256:" + "F" * 64)

    def test_api_host(self) -> None:
        self.assertEqual(oc.Reference.parse("alpine").api_host, "registry-1.docker.io")
        self.assertEqual(oc.Reference.parse("127.0.0.1:5000/a").api_host, "127.0.0.1:5000")


# =====================================================================================
# Platform
# =====================================================================================

def child(architecture: str, variant: str = "", os_name: str = "linux") -> oc.Descriptor:
    data = f"{os_name}/{architecture}/{variant}".encode()
    return oc.Descriptor(oc.MEDIA_OCI_MANIFEST, sha256(data), len(data),
                         platform=oc.Platform(os_name, architecture, variant))


class TestPlatform(unittest.TestCase):
    def test_parse_and_aliases(self) -> None:
        cases = {"amd64": "linux/amd64", "x86_64": "linux/amd64", "aarch64": "linux/arm64",
                 "arm64": "linux/arm64", "linux/arm64/v8": "linux/arm64",
                 "arm64/v8": "linux/arm64", "armhf": "linux/arm/v7", "armel": "linux/arm/v6",
                 "linux/arm/v7": "linux/arm/v7", "arm": "linux/arm/v7", "arm/v6": "linux/arm/v6",
                 "linux/riscv64": "linux/riscv64", "windows/amd64": "windows/amd64",
                 "LINUX/AMD64": "linux/amd64"}
        for value, expected in cases.items():
            self.assertEqual(str(oc.Platform.parse(value)), expected, value)
        for bad in ["linux/arm/v7/extra", "linux/$$", "/"]:
            with self.assertRaises(oc.OciCacheError):
                oc.Platform.parse(bad)

    def test_host_default(self) -> None:
        import platform
        expected = {"x86_64": "linux/amd64", "aarch64": "linux/arm64"}.get(platform.machine())
        if expected:
            self.assertEqual(str(oc.Platform.parse("")), expected)
        self.assertEqual(oc.Platform.parse(None), oc.Platform.host())

    def test_arm64_variants_are_one_platform(self) -> None:
        children = [child("amd64"), child("arm64", "v8")]
        self.assertEqual(oc.select_platform(children, oc.Platform.parse("arm64")), children[1])
        children = [child("amd64"), child("arm64")]
        self.assertEqual(oc.select_platform(children, oc.Platform.parse("linux/arm64/v8")),
                         children[1])

    def test_arm_variant_chain(self) -> None:
        v6, v7 = child("arm", "v6"), child("arm", "v7")
        self.assertEqual(oc.select_platform([v6, v7], oc.Platform.parse("arm")), v7)
        self.assertEqual(oc.select_platform([v6], oc.Platform.parse("arm")), v6)
        self.assertEqual(oc.select_platform([v7, v6], oc.Platform.parse("arm/v6")), v6)
        self.assertIsNone(oc.select_platform([v7], oc.Platform.parse("arm/v6")))

    def test_attestations_are_never_images(self) -> None:
        attestation = child("unknown", os_name="unknown")
        self.assertTrue(attestation.is_attestation)
        self.assertIsNone(oc.select_platform([attestation], oc.Platform("unknown", "unknown")))


# =====================================================================================
# Descriptor and manifests
# =====================================================================================

class TestDescriptor(unittest.TestCase):
    def test_round_trip_keeps_unknown_fields(self) -> None:
        data = {"mediaType": oc.MEDIA_OCI_MANIFEST, "size": 3, "digest": "sha256:" + F64,
                "urls": ["https://x"], "annotations": {"b": "2", "a": "1"},
                "platform": {"architecture": "arm", "os": "linux", "variant": "v7",
                             "os.features": ["x"]},
                "artifactType": "application/x", "data": "YWJj", "com.example.extra": [1]}
        descriptor = oc.Descriptor.from_json(data)
        self.assertEqual(descriptor.to_json(), data)
        self.assertEqual(list(descriptor.to_json())[:3], ["mediaType", "size", "digest"])

    def test_frozen_and_not_mutating(self) -> None:
        annotations = {"a": "1"}
        descriptor = oc.Descriptor(oc.MEDIA_OCI_MANIFEST, "sha256:" + F64, 1,
                                   annotations=annotations)
        renamed = descriptor.named("docker.io/library/x:1")
        self.assertEqual(annotations, {"a": "1"})
        self.assertEqual(descriptor.name, "")
        self.assertEqual(renamed.annotations[oc.ANNOTATION_CONTAINERD_NAME],
                         "docker.io/library/x:1")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            descriptor.size = 2  # type: ignore[misc]
        with self.assertRaises(TypeError):
            descriptor.annotations["b"] = "2"  # type: ignore[index]

    def test_invalid_descriptors(self) -> None:
        for bad in [[], {"digest": "sha256:bad", "size": 1},
                    {"digest": "sha256:" + F64, "size": -1},
                    {"digest": "sha256:" + F64, "size": "1"},
                    {"digest": "sha256:" + F64, "size": 1, "annotations": {"a": 1}}]:
            with self.assertRaises(oc.OciCacheError, msg=repr(bad)):
                oc.Descriptor.from_json(bad)

    def test_manifest_and_index(self) -> None:
        image = make_image("m")
        manifest = oc.Manifest.from_json(image.manifest.data)
        self.assertEqual(str(manifest.config.digest), image.config.digest)
        self.assertEqual([str(b.digest) for b in manifest.blobs()],
                         [image.config.digest, image.layers[0].digest])
        with self.assertRaisesRegex(oc.OciCacheError, "schema 1"):
            oc.Manifest.from_json(b'{"schemaVersion":1,"fsLayers":[]}')
        with self.assertRaises(oc.OciCacheError):
            oc.Manifest.from_json(b"[1]")
        index = oc.Index.from_json(make_index([image.descriptor()]).data)
        self.assertEqual(index.manifests[0].platform, oc.Platform("linux", "amd64"))

    def test_merge_index(self) -> None:
        amd, arm = make_image("a"), make_image("b", "arm64")
        arm2, riscv, s390x = (make_image("c", "arm64", "v8"), make_image("d", "riscv64"),
                              make_image("e", "s390x"))
        _, _, amd_att = make_attestation(amd)
        _, _, arm_att = make_attestation(arm)
        _, _, arm2_att = make_attestation(arm2)
        existing = oc.Index.from_json(make_index(
            [amd.descriptor(), arm.descriptor(), amd_att, arm_att]).data)
        incoming = [oc.Descriptor.from_json(d) for d in
                    [s390x.descriptor(), arm2.descriptor(), riscv.descriptor(), arm2_att]]
        merged = oc.merge_index(existing, incoming)
        self.assertEqual([str(m.digest) for m in merged.manifests],
                         [amd.manifest.digest, arm2.manifest.digest, amd_att["digest"],
                          s390x.manifest.digest, riscv.manifest.digest, arm2_att["digest"]])
        self.assertEqual(merged.media_type, oc.MEDIA_OCI_INDEX)


# =====================================================================================
# Layout
# =====================================================================================

class TestLayout(CacheTestCase):
    def test_fresh_cache_is_linuxkit_compatible(self) -> None:
        with open(os.path.join(self.cache_dir, "index.json"), "rb") as f:
            self.assertEqual(f.read(), b'{"schemaVersion":2,"mediaType":'
                             b'"application/vnd.oci.image.index.v1+json","manifests":[]}')
        with open(os.path.join(self.cache_dir, "oci-layout")) as f:
            self.assertEqual(json.load(f), {"imageLayoutVersion": "1.0.0"})
        self.assertTrue(os.path.isdir(os.path.join(self.cache_dir, "blobs", "sha256")))

    def test_write_blob_verifies_and_leaves_nothing_on_mismatch(self) -> None:
        layout = self.cache.layout
        with self.assertRaises(oc.DigestMismatchError):
            layout.write_blob(io.BytesIO(b"evil"), sha256(b"good"), 4)
        with self.assertRaises(oc.DigestMismatchError):
            layout.write_blob(io.BytesIO(b"good and more"), sha256(b"good"), 4)
        with self.assertRaises(oc.DigestMismatchError):
            layout.write_blob(io.BytesIO(b"goo"), sha256(b"good"), 4)
        self.assertFalse(layout.has_blob(sha256(b"good")))
        self.assertEqual(self.temp_files(), [])
        digest = layout.write_blob_bytes(b"good", sha256(b"good"))
        self.assertEqual(str(digest), sha256(b"good"))
        self.assertEqual(os.stat(layout.blob_path(digest)).st_mode & 0o777, 0o644 & ~oc._UMASK)

    def test_existing_blob_is_kept_and_refreshed(self) -> None:
        layout = self.cache.layout
        digest = layout.write_blob_bytes(b"data")
        path = layout.blob_path(digest)
        os.utime(path, (1, 1))
        layout.write_blob(io.BytesIO(b"ignored"), digest, 4)
        self.assertGreater(os.path.getmtime(path), 1)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"data")

    def test_lock_is_reentrant_and_excludes_threads(self) -> None:
        layout = self.cache.layout
        other = oc.Layout(self.cache_dir)  # a second object on the same cache
        entered = threading.Event()
        with layout.lock():
            with other.lock():  # reentrant across objects in one thread
                pass
            thread = threading.Thread(target=lambda: (other.lock().__enter__(), entered.set()))
            thread.start()
            thread.join(0.2)
            self.assertFalse(entered.is_set())
        thread.join(10)
        self.assertTrue(entered.is_set())

    def test_lock_excludes_other_processes(self) -> None:
        script = ("import ocicache,sys,time; l=ocicache.Layout(sys.argv[1])\n"
                  "with l.lock(): print('locked', flush=True); sys.stdin.readline()")
        holder = subprocess.Popen([sys.executable, "-c", script, self.cache_dir], cwd=HERE,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline(), b"locked\n")
        acquired = threading.Event()
        thread = threading.Thread(target=lambda: (self.cache.layout.lock().__enter__(),
                                                  acquired.set()), daemon=True)
        thread.start()
        self.assertFalse(acquired.wait(0.3))
        holder.stdin.write(b"\n")
        holder.stdin.flush()
        self.assertTrue(acquired.wait(10))

    def test_concurrent_processes_lose_no_name(self) -> None:
        image = make_image("shared")
        self.load_image("example.com/base:1", image)
        script = ("import ocicache,sys\n"
                  "p=ocicache.Provider(sys.argv[1]); d=p.find_descriptor('example.com/base:1')\n"
                  "for i in range(50): p.descriptor_write(f'example.com/p{sys.argv[2]}/x:{i}', d)")
        workers = [subprocess.Popen([sys.executable, "-c", script, self.cache_dir, str(n)],
                                    cwd=HERE) for n in range(8)]
        for worker in workers:
            self.assertEqual(worker.wait(120), 0)
        names = self.index_names()
        self.assertEqual(len(names), 401)
        self.assertEqual(len(set(names)), 401)
        self.assertTrue(self.cache.verify().ok)

    def test_concurrent_threads_lose_no_name(self) -> None:
        image = make_image("shared")
        base = self.load_image("example.com/base:1", image)

        def work(n: int) -> None:
            provider = self.cache if n % 2 else oc.Provider(self.cache_dir)
            for i in range(50):
                provider.descriptor_write(f"example.com/t{n}/x:{i}", base)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(len(set(self.index_names())), 401)

    def test_gc_frees_exactly_unreachable_blobs_older_than_grace(self) -> None:
        kept, dropped = make_image("kept"), make_image("dropped")
        self.load_image("example.com/kept:1", kept)
        self.load_image("example.com/dropped:1", dropped)
        self.cache.layout.update_index(lambda entries: [e for e in entries
                                                        if "dropped" not in e.name])
        layout = self.cache.layout
        young = layout.write_blob_bytes(b"young unnamed blob")
        stale_temp = os.path.join(self.cache_dir, "blobs", "sha256", "abc" + oc._TEMP_MARK + "x")
        fresh_temp = os.path.join(self.cache_dir, "blobs", "sha256", "def" + oc._TEMP_MARK + "y")
        for path in (stale_temp, fresh_temp):
            with open(path, "wb") as f:
                f.write(b"partial")
        old = time.time() - 7200
        for digest, path, _ in list(layout.blob_files()):
            if digest != young and path != fresh_temp:
                os.utime(path, (old, old))
        dry = self.cache.gc(3600, dry_run=True)
        self.assertTrue(all(layout.has_blob(b.digest) for b in dropped.blobs))
        report = self.cache.gc(3600)
        self.assertEqual(dry.deleted, report.deleted)
        expected = {b.digest for b in dropped.blobs} | {os.path.basename(stale_temp)}
        self.assertEqual({name for name, _ in report.deleted}, expected)
        self.assertEqual(report.kept_young, 2)
        self.assertTrue(all(layout.has_blob(b.digest) for b in kept.blobs))
        self.assertTrue(layout.has_blob(young))
        self.assertTrue(os.path.exists(fresh_temp))
        self.assertTrue(self.cache.verify().ok)

    def test_gc_keeps_every_child_of_an_index(self) -> None:
        amd, arm = make_image("a"), make_image("b", "arm64")
        manifest, attestation_blobs, entry = make_attestation(amd)
        index = make_index([amd.descriptor(), arm.descriptor(), entry])
        self.load(oci_archive([(index.descriptor(), named("example.com/multi:1"))],
                              [*amd.blobs, *arm.blobs, *attestation_blobs, index]))
        report = self.cache.gc(0)
        self.assertEqual(report.deleted, ())
        self.assertEqual(report.reachable, 1 + len({b.digest for b in [
            *amd.blobs, *arm.blobs, *attestation_blobs]}))

    def test_verify_reports_corrupt_and_missing_blobs(self) -> None:
        image = make_image("v")
        self.load_image("example.com/v:1", image)
        self.assertTrue(self.cache.verify().ok)
        with open(self.cache.layout.blob_path(image.layers[0].digest), "r+b") as f:
            f.write(b"X")
        os.unlink(self.cache.layout.blob_path(image.config.digest))
        report = self.cache.verify()
        self.assertFalse(report.ok)
        self.assertEqual(len(report.corrupt), 1)
        self.assertIn(image.layers[0].digest, report.corrupt[0])
        self.assertEqual(len(report.missing), 1)
        self.assertIn(image.config.digest, report.missing[0])
        self.assertIn("example.com/v:1", report.missing[0])

    def test_unreadable_index_is_a_clear_error(self) -> None:
        with open(os.path.join(self.cache_dir, "index.json"), "w") as f:
            f.write('{"manifests": [')
        with self.assertRaisesRegex(oc.CorruptCacheError, "invalid image cache"):
            self.cache.find_descriptor("alpine")


# =====================================================================================
# Tar formats: image_load of archives made by real tools and by hand, hostile archives
# =====================================================================================

def docker25_archive(name: str, image: TestImage, containerd_name: bool = True) -> bytes:
    """An archive laid out like Docker 25+'s ``docker save`` (moby image/tarexport)."""
    raw_layers = [Blob(oc.MEDIA_OCI_LAYER, gzip.decompress(layer.data)) for layer in image.layers]
    manifest = Blob(oc.MEDIA_OCI_MANIFEST, json.dumps({
        "schemaVersion": 2, "mediaType": oc.MEDIA_OCI_MANIFEST,
        "config": image.config.descriptor(mediaType=oc.MEDIA_OCI_CONFIG),
        "layers": [layer.descriptor() for layer in raw_layers]}).encode())
    ref = oc.Reference.parse(name)
    annotations = {oc.ANNOTATION_REF_NAME: ref.tag}
    if containerd_name:
        annotations[oc.ANNOTATION_CONTAINERD_NAME] = str(ref)
    v1_json = Blob("application/json", b'{"id":"legacy"}')
    extra = [
        ("manifest.json", json.dumps([{
            "Config": f"blobs/sha256/{image.config.digest.split(':')[1]}",
            "RepoTags": [ref.familiar],
            "Layers": [f"blobs/sha256/{b.digest.split(':')[1]}" for b in raw_layers]}]).encode()),
        ("repositories", json.dumps({ref.familiar.rsplit(":", 1)[0]: {ref.tag: "x"}}).encode()),
    ]
    return oci_archive([(manifest.descriptor(), annotations)],
                       [image.config, *raw_layers, manifest, v1_json], extra=extra,
                       index_last=False)


class TestArchives(CacheTestCase):
    def test_oci_archive_with_index_and_attestations(self) -> None:
        amd, arm = make_image("a"), make_image("b", "arm64")
        _, attestation_blobs, entry = make_attestation(amd)
        index = make_index([amd.descriptor(), arm.descriptor(), entry])
        loaded = self.load(oci_archive([(index.descriptor(), named("linuxkit/pkg:abc"))],
                                       [*amd.blobs, *arm.blobs, *attestation_blobs, index]))
        self.assertEqual([(d.name, str(d.digest)) for d in loaded],
                         [("docker.io/linuxkit/pkg:abc", index.digest)])
        self.assertEqual(self.index_names(), ["docker.io/linuxkit/pkg:abc"])
        self.assertTrue(self.cache.image_in_cache("linuxkit/pkg:abc", "", "arm64"))
        self.assertTrue(self.cache.verify().ok)

    def test_entry_order_does_not_matter_and_pipes_work(self) -> None:
        image = make_image("order")
        archive = oci_archive([(image.manifest.descriptor(), named("example.com/o:1"))],
                              image.blobs, index_last=False)
        path = self.path("o.tar.gz")
        with open(path, "wb") as f:
            f.write(gzip.compress(archive))
        result = subprocess.run(f"cat {path} | {sys.executable} {OCICACHE} --cache "
                                f"{self.cache_dir} import -", shell=True, capture_output=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode().split(), ["example.com/o:1", image.manifest.digest])

    def test_ref_name_fallbacks(self) -> None:
        full, tag_only = make_image("full"), make_image("tag")
        loaded = self.load(oci_archive(
            [(full.manifest.descriptor(), {oc.ANNOTATION_REF_NAME: "ghcr.io/o/full:1"}),
             (tag_only.manifest.descriptor(), {oc.ANNOTATION_REF_NAME: "v1"})],
            [*full.blobs, *tag_only.blobs]))
        self.assertEqual([d.name for d in loaded], ["ghcr.io/o/full:1", ""])
        self.assertEqual(self.index_names(), ["ghcr.io/o/full:1"])

    def test_docker25_save_layout(self) -> None:
        image = make_image("d25", layer_files=[{"a": b"1"}, {"b": b"2"}])
        for name, containerd in [("example.com/d25:1", True), ("alpine:3.19", False)]:
            (descriptor,) = self.load(docker25_archive(name, image, containerd))
            self.assertEqual(descriptor.name, oc.canonical_name(name))
            self.assertTrue(self.cache.image_in_cache(name, "", "amd64"))
        self.assertEqual(self.cache.new_source("alpine:3.19").config()["Env"], ["SEED=d25"])

    def test_skopeo_docker_archive_loads_with_same_digests(self) -> None:
        image = make_image("classic", layer_files=[{"etc/a": b"a"}, {"etc/b": b"b" * 5000}])
        source = self.path("src")
        write_layout(source, [(image.manifest.descriptor(), "v1")], image.blobs)
        archive = self.path("docker.tar")
        self.skopeo("copy", f"oci:{source}:v1", f"docker-archive:{archive}:example.com/c/img:1")
        want = json.loads(self.skopeo("inspect", f"docker-archive:{archive}"))
        result = self.cli("import", archive)
        self.assertEqual(result.returncode, 0, result.stderr)
        got = json.loads(self.skopeo("inspect", f"oci:{self.cache_dir}:example.com/c/img:1"))
        self.assertEqual(got["Layers"], want["Layers"])
        self.assertEqual(self.cache.new_source("example.com/c/img:1").config()["Env"],
                         ["SEED=classic"])
        self.skopeo("copy", f"oci:{self.cache_dir}:example.com/c/img:1", f"dir:{self.path('out')}")
        self.assertTrue(self.cache.verify().ok)
        self.assertEqual(self.cache.gc(0).deleted, ())  # nothing unreferenced was stored

    def test_skopeo_oci_archive_round_trips(self) -> None:
        image = make_image("ociarch")
        source = self.path("src")
        write_layout(source, [(image.manifest.descriptor(), "v1")], image.blobs)
        archive = self.path("oci.tar")
        self.skopeo("copy", f"oci:{source}:v1", f"oci-archive:{archive}:example.com/o/img:2")
        (descriptor,) = self.cache.image_load(open(archive, "rb"))
        self.assertEqual(descriptor.name, "example.com/o/img:2")
        raw = self.skopeo("inspect", "--raw", f"oci:{self.cache_dir}:example.com/o/img:2")
        self.assertEqual(sha256(raw.encode()), str(descriptor.digest))
        self.assertEqual(str(descriptor.digest), image.manifest.digest)

    def test_classic_archive_with_gzip_layers(self) -> None:
        image = make_image("gz")
        manifest_json = json.dumps([{"Config": "cfg.json", "RepoTags": ["gz:1", "gz:2"],
                                     "Layers": ["layer.tar.gz"]}]).encode()
        archive = tar_bytes([("cfg.json", image.config.data),
                             ("layer.tar.gz", image.layers[0].data),
                             ("manifest.json", manifest_json)])
        loaded = self.load(archive)
        self.assertEqual([d.name for d in loaded], ["docker.io/library/gz:1",
                                                    "docker.io/library/gz:2"])
        self.assertTrue(self.cache.image_in_cache("gz:2", "", "amd64"))

    def assert_rejected(self, archive: bytes, *fragments: str) -> None:
        """The CLI fails with one line; no name, no temp file, nothing outside the cache."""
        work = self.path("work")
        os.makedirs(work, exist_ok=True)
        path = os.path.join(work, "bad.tar")
        with open(path, "wb") as f:
            f.write(archive)
        before = set(os.listdir(self.tmp))
        result = self.cli("import", path, cwd=work)
        self.assert_one_line_error(result, *fragments)
        self.assertEqual(self.index_names(), [])
        self.assertEqual(os.listdir(work), ["bad.tar"])
        self.assertEqual(set(os.listdir(self.tmp)), before)
        self.assertEqual(self.temp_files(), [])
        self.assertFalse(os.path.exists("/tmp/ocicache-evil"))
        with self.assertRaises(oc.OciCacheError):
            self.cache.image_load(io.BytesIO(archive))

    def test_hostile_archives(self) -> None:
        image = make_image("h")
        good = [(image.manifest.descriptor(), named("example.com/h:1"))]
        cases = [
            ("dotdot", [("../evil", b"x")], "climbs out"),
            ("dotdot-inside", [("blobs/../../evil", b"x")], "climbs out"),
            ("absolute", [("/tmp/ocicache-evil", b"x")], "absolute path"),
            ("symlink-absolute", [("x", tar_member("x", tarfile.SYMTYPE,
                                                   linkname="/etc/passwd"))], "absolute path"),
            ("symlink-out", [("x", tar_member("blobs/x", tarfile.SYMTYPE,
                                              linkname="../../etc/passwd"))], "outside"),
            ("hardlink-out", [("x", tar_member("y", tarfile.LNKTYPE,
                                               linkname="../etc/passwd"))], "outside"),
            ("bad-digest-name", [("blobs/sha256/nothex", b"x")], "valid digest"),
            ("upper-digest-name", [("blobs/sha256/" + "A" * 64, b"x")], "valid digest"),
            ("md5-digest-name", [("blobs/md5/" + "a" * 32, b"x")], "valid digest"),
            ("nested-blob", [("blobs/sha256/a/b", b"x")], "blobs/<alg>/<hex>"),
            ("mismatch", [(f"blobs/sha256/{'0' * 64}", b"not zero")], "does not match"),
            ("device", [("x", tar_member("dev", tarfile.CHRTYPE))], "not a regular file"),
            ("huge-index", [("index.json", b" " * (oc.MAX_MANIFEST_SIZE + 1))], "limit"),
        ]
        for label, entries, fragment in cases:
            with self.subTest(label):
                self.assert_rejected(tar_bytes(entries), fragment)
        archive = oci_archive(good, image.blobs)
        inside_a_blob = archive.index(image.layers[0].data) + 10
        self.assert_rejected(archive[:inside_a_blob], "truncated")
        self.assert_rejected(b"this is not a tar at all" * 100, "archive")
        self.assert_rejected(b"", "archive")
        self.assert_rejected(gzip.compress(archive)[:200], "truncated")
        self.assert_rejected(oci_archive(good, image.blobs[1:]), "incomplete")
        self.assert_rejected(oci_archive(good, image.blobs[:-1]), "does not contain")
        self.assert_rejected(tar_bytes([("index.json", b"{not json")]), "JSON")
        self.assert_rejected(oci_archive([(image.manifest.descriptor(), named("Bad Name"))],
                                         image.blobs), "invalid")
        wrong_size = {**image.manifest.descriptor(), "size": 1}
        self.assert_rejected(oci_archive([(wrong_size, named("example.com/h:1"))], image.blobs),
                             "size")
        self.assert_rejected(tar_bytes([("oci-layout", b"{}")]), "neither index.json")
        self.assert_rejected(tar_bytes([("manifest.json", b'[{"Config":"c","Layers":[]}]')]),
                             "does not contain")
        # A header announcing far more data (8 GiB) than the stream holds.
        absurd = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
        absurd.size = (8 << 30) - 1
        self.assert_rejected(absurd.tobuf(tarfile.USTAR_FORMAT) + b"x" * 1024, "truncated")
        self.assertEqual(self.temp_files(), [])
        # Blobs verified before a failure stay, unnamed, for gc: never a half-written one.
        self.assertTrue(self.cache.layout.has_blob(image.layers[0].digest))

    def test_sigkill_during_a_large_load_leaves_a_valid_cache(self) -> None:
        rng = random.Random(7)
        big = rng.randbytes(200 * 1024 * 1024)
        layer = Blob(oc.MEDIA_OCI_LAYER, tar_bytes([("big.bin", big)]))
        config = Blob(oc.MEDIA_OCI_CONFIG, json.dumps({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]}}).encode())
        manifest = Blob(oc.MEDIA_OCI_MANIFEST, json.dumps({
            "schemaVersion": 2, "mediaType": oc.MEDIA_OCI_MANIFEST,
            "config": config.descriptor(), "layers": [layer.descriptor()]}).encode())
        archive = self.path("big.tar")
        with open(archive, "wb") as f:
            f.write(oci_archive([(manifest.descriptor(), named("example.com/big:1"))],
                                [layer, config, manifest]))
        del big, layer
        process = subprocess.Popen([sys.executable, OCICACHE, "--cache", self.cache_dir,
                                    "-q", "import", archive])
        self.addCleanup(process.kill)

        def partial_size() -> int:
            sizes = [os.path.getsize(os.path.join(d, f))
                     for d, _, files in os.walk(os.path.join(self.cache_dir, "blobs"))
                     for f in files if oc._TEMP_MARK in f]
            return max(sizes, default=0)

        wait_for(lambda: partial_size() > 20 * 1024 * 1024, 60, "a partial blob")
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        self.assertEqual(self.index_names(), [])
        self.assertIsNone(self.cache.find_descriptor("example.com/big:1"))
        self.assertTrue(self.cache.verify().ok)
        result = self.cli("-q", "import", archive)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.index_names(), ["example.com/big:1"])
        self.assertTrue(self.cache.verify().ok)
        self.assertEqual(len(self.cache.gc(0).deleted), 1)  # the killed run's temporary file


# =====================================================================================
# Provider: the CacheProvider methods, and what real tools read from the cache
# =====================================================================================

class TestProvider(CacheTestCase):
    def test_find_descriptor(self) -> None:
        image = make_image("f")
        loaded = self.load_image("alpine:3.19", image)
        for ref in ["alpine:3.19", "library/alpine:3.19", "docker.io/alpine:3.19",
                    oc.Reference.parse("docker.io/library/alpine:3.19")]:
            self.assertEqual(self.cache.find_descriptor(ref), loaded)
        self.assertIsNone(self.cache.find_descriptor("alpine:3.20"))
        by_digest = self.cache.find_descriptor(f"whatever:tag@{image.manifest.digest}")
        self.assertEqual(by_digest, loaded)
        self.assertIsNone(self.cache.find_descriptor("alpine@sha256:" + F64))
        with self.assertRaises(oc.InvalidReferenceError):
            self.cache.find_descriptor("Not Valid")

    def test_linuxkit_untagged_names_are_found_as_latest(self) -> None:
        image = make_image("u")
        self.load_image("example.com/x:1", image)
        untagged = oc.Descriptor.from_json(image.manifest.descriptor(
            annotations={oc.ANNOTATION_REF_NAME: "docker.io/library/alpine"}))
        self.cache.layout.update_index(lambda entries: entries + [untagged])
        self.assertEqual(self.cache.find_descriptor("alpine"), untagged)
        self.assertEqual(self.cache.find_descriptor("alpine:latest"), untagged)
        self.assertIsNone(self.cache.find_descriptor("alpine:3"))

    def test_descriptor_write(self) -> None:
        image = make_image("w")
        descriptor = self.load_image("example.com/w:1", image)
        source = self.cache.descriptor_write("example.com/w:release", descriptor)
        self.assertEqual(source.descriptor().name, "example.com/w:release")
        self.assertEqual(descriptor.name, "example.com/w:1")  # the caller's is unchanged
        self.cache.descriptor_write("example.com/w:release", descriptor)
        self.assertEqual(self.index_names(), ["example.com/w:1", "example.com/w:release"])
        missing = oc.Descriptor(oc.MEDIA_OCI_MANIFEST, "sha256:" + F64, 10)
        with self.assertRaisesRegex(oc.NotFoundError, "not in the cache"):
            self.cache.descriptor_write("example.com/w:2", missing)
        self.assertNotIn("example.com/w:2", self.index_names())

    def test_index_write_creates_and_merges(self) -> None:
        amd, arm, arm_new = make_image("a"), make_image("b", "arm64"), make_image("c", "arm64")
        _, amd_att_blobs, amd_att = make_attestation(amd)
        _, arm_att_blobs, arm_att = make_attestation(arm)
        _, new_att_blobs, new_att = make_attestation(arm_new)
        for image in (amd, arm, arm_new):
            for blob in image.blobs:
                self.cache.layout.write_blob_bytes(blob.data)
        for blob in [*amd_att_blobs, *arm_att_blobs, *new_att_blobs]:
            self.cache.layout.write_blob_bytes(blob.data)
        with self.assertRaisesRegex(oc.OciCacheError, "without any manifests"):
            self.cache.index_write("example.com/pkg:1")
        self.cache.index_write("example.com/pkg:1", amd.descriptor(), amd_att,
                               arm.descriptor(), arm_att)
        first = self.cache.find_descriptor("example.com/pkg:1")
        self.cache.descriptor_write("example.com/pkg:release", first)
        self.cache.index_write("example.com/pkg:1", arm_new.descriptor(), new_att)
        root = self.cache.find_descriptor("example.com/pkg:1")
        self.assertEqual(root.media_type, oc.MEDIA_OCI_INDEX)
        index = oc.Index.from_json(self.cache.layout.read_blob(root.digest))
        self.assertEqual([str(m.digest) for m in index.manifests],
                         [amd.manifest.digest, amd_att["digest"], arm_new.manifest.digest,
                          new_att["digest"]])
        # The release name still reaches the old index: it was not deleted.
        self.assertTrue(self.cache.layout.has_blob(first.digest))
        self.assertTrue(self.cache.verify().ok)
        # Deterministic: the same writes give the same digest.
        other = oc.Provider(self.path("other"))
        for digest, path, _ in self.cache.layout.blob_files():
            with open(path, "rb") as f:
                other.layout.write_blob(f, digest)
        other.index_write("example.com/pkg:1", amd.descriptor(), amd_att, arm.descriptor(),
                          arm_att)
        other.index_write("example.com/pkg:1", arm_new.descriptor(), new_att)
        self.assertEqual(other.find_descriptor("example.com/pkg:1").digest, root.digest)
        self.load_image("example.com/single:1", amd)
        with self.assertRaisesRegex(oc.OciCacheError, "not an index"):
            self.cache.index_write("example.com/single:1", arm.descriptor())
        with self.assertRaisesRegex(oc.NotFoundError, "not in the cache"):
            self.cache.index_write("example.com/new:1", make_image("absent").descriptor())

    def test_image_in_cache(self) -> None:
        amd, arm = make_image("a"), make_image("b", "arm64", "v8")
        index = make_index([amd.descriptor(), arm.descriptor()])
        self.load(oci_archive([(index.descriptor(), named("example.com/m:1"))],
                              [*amd.blobs, *arm.blobs, index]))
        self.assertTrue(self.cache.image_in_cache("example.com/m:1", "", "amd64"))
        self.assertTrue(self.cache.image_in_cache("example.com/m:1", "", "arm64"))
        self.assertTrue(self.cache.image_in_cache("example.com/m:1", "", "linux/arm64/v8"))
        self.assertFalse(self.cache.image_in_cache("example.com/m:1", "", "s390x"))
        self.assertFalse(self.cache.image_in_cache("example.com/absent:1", "", "amd64"))
        os.unlink(self.cache.layout.blob_path(arm.layers[0].digest))
        self.assertFalse(self.cache.image_in_cache("example.com/m:1", "", "arm64"))
        with open(self.cache.layout.blob_path(amd.layers[0].digest), "ab") as f:
            f.write(b"longer")  # wrong size
        self.assertFalse(self.cache.image_in_cache("example.com/m:1", "", "amd64"))
        single = make_image("s", "arm64")
        self.load_image("example.com/s:1", single)
        self.assertTrue(self.cache.image_in_cache("example.com/s:1", "", "arm64"))
        self.assertFalse(self.cache.image_in_cache("example.com/s:1", "", "amd64"))

    def test_missing_platform_names_the_ones_present(self) -> None:
        index = make_index([make_image("a").descriptor(), make_image("b", "arm64").descriptor()])
        self.cache.layout.write_blob_bytes(index.data)
        self.cache.layout.update_index(lambda e: [oc.Descriptor.from_json(
            index.descriptor()).named("example.com/m:1")])
        with self.assertRaisesRegex(oc.PlatformNotFoundError,
                                    "has no linux/s390x; it has linux/amd64, linux/arm64"):
            self.cache.new_source("example.com/m:1", "s390x").config()

    def test_remove_keeps_shared_blobs(self) -> None:
        base = {"etc/base": b"shared base layer"}
        one = make_image("one", layer_files=[base, {"one": b"1"}])
        two = make_image("two", layer_files=[base, {"two": b"2"}])
        self.load_image("example.com/one:1", one)
        self.load_image("example.com/two:1", two)
        self.cache.descriptor_write("example.com/one:alias",
                                    self.cache.find_descriptor("example.com/one:1"))
        self.assertEqual(self.cache.remove("example.com/one:1"), [])  # alias still uses all
        deleted = self.cache.remove("example.com/one:alias")
        self.assertEqual({str(d) for d in deleted},
                         {one.manifest.digest, one.config.digest, one.layers[1].digest})
        self.assertTrue(self.cache.verify().ok)
        self.assertTrue(self.cache.image_in_cache("example.com/two:1", "", "amd64"))
        with self.assertRaises(oc.NotFoundError):
            self.cache.remove("example.com/one:1")

    def test_get_content_and_store(self) -> None:
        image = make_image("s")
        self.load_image("example.com/s:1", image)
        with self.cache.get_content(image.config.digest) as f:
            self.assertEqual(f.read(), image.config.data)
        with self.assertRaises(oc.NotFoundError):
            self.cache.get_content("sha256:" + F64)
        store = self.cache.store()
        info = store.write(sha256(b"new"), io.BytesIO(b"new"), 3)
        self.assertEqual((str(info.digest), info.size), (sha256(b"new"), 3))
        self.assertEqual(store.info(image.layers[0].digest).size, len(image.layers[0].data))
        with store.open(sha256(b"new")) as f:
            self.assertEqual(f.read(), b"new")
        with self.assertRaises(oc.DigestMismatchError):
            store.write(sha256(b"x"), io.BytesIO(b"y"))
        self.assertEqual({str(i.digest) for i in store.walk()},
                         {b.digest for b in image.blobs} | {sha256(b"new")})
        with self.assertRaisesRegex(oc.OciCacheError, "used by example.com/s:1"):
            store.delete(image.config.digest)
        store.delete(sha256(b"new"))
        with self.assertRaises(oc.NotFoundError):
            store.info(sha256(b"new"))

    def test_new_source_is_lazy(self) -> None:
        source = self.cache.new_source("example.com/absent:1", "arm64")
        self.assertIsNone(source.descriptor())
        with self.assertRaises(oc.NotFoundError):
            source.config()

    def test_interfaces(self) -> None:
        self.assertIsInstance(self.cache, oc.CacheProvider)
        self.assertIsInstance(self.cache.new_source("x"), oc.ImageSource)
        self.assertEqual(oc.PackageResolver.__origin__.__name__, "Callable")

    def test_skopeo_and_umoci_read_the_cache(self) -> None:
        amd, arm = make_image("a"), make_image("b", "arm64")
        index = make_index([amd.descriptor(), arm.descriptor()])
        self.load(oci_archive([(index.descriptor(), named("example.com/multi:1"))],
                              [*amd.blobs, *arm.blobs, index]))
        single = make_image("single", layer_files=[{"etc/x": b"x"}, {"etc/y": b"y"}])
        self.load_image("example.com/single:1", single)
        self.cache.index_write("example.com/written:1", amd.descriptor())
        for name, manifest in [("example.com/single:1", single.manifest),
                               ("example.com/multi:1", index),
                               ("example.com/written:1", None)]:
            with self.subTest(name):
                raw = self.skopeo("inspect", "--raw", f"oci:{self.cache_dir}:{name}")
                root = self.cache.find_descriptor(name)
                self.assertEqual(sha256(raw.encode()), str(root.digest))
                if manifest is not None:
                    self.assertEqual(str(root.digest), manifest.digest)
                info = json.loads(self.skopeo("--override-arch", "amd64", "inspect",
                                              f"oci:{self.cache_dir}:{name}"))
                self.assertEqual(info["Architecture"], "amd64")
                out = self.path("dir-" + name.replace("/", "_"))
                self.skopeo("--override-arch", "amd64", "copy", f"oci:{self.cache_dir}:{name}",
                            f"dir:{out}")
        umoci = require_tool(self, "umoci")
        result = subprocess.run([umoci, "stat", "--json", "--image",
                                 f"{self.cache_dir}:example.com/single:1"],
                                capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        json.loads(result.stdout)


# =====================================================================================
# Sources: flattening, docker and OCI tarballs, SBOMs, judged by umoci, podman, skopeo
# =====================================================================================

def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "",
          mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 1_000_000) -> Tuple[str, Any]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.uid, info.gid = kind, linkname, mode, uid, gid
    info.mtime, info.size = mtime, len(data) if kind == tarfile.REGTYPE else 0
    return name, (info, data)


def directory(name: str, mode: int = 0o755, uid: int = 0) -> Tuple[str, Any]:
    return entry(name, tarfile.DIRTYPE, mode=mode, uid=uid)


LONG_NAME = "deep/" + "/".join(["a-rather-long-directory-name-%02d" % i for i in range(8)])

# Every case of peers.md §3e and more, across three layers.
FLATTEN_LAYERS: List[List[Tuple[str, Any]]] = [
    [
        directory("etc"), entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
        directory("usr"), directory("usr/bin"),
        entry("usr/bin/tool", data=b"tool v1\n", mode=0o755),
        entry("usr/bin/tool-link", tarfile.LNKTYPE, linkname="usr/bin/tool", mode=0o755),
        entry("usr/bin/su", data=b"setuid\n", mode=0o4755),
        directory("tmp", mode=0o1777), directory("home"), directory("home/user", 0o700, 1000),
        entry("home/user/.profile", data=b"export A=1\n", uid=1000, gid=1000),
        directory("data"), entry("data/keep", data=b"keep"), entry("data/old", data=b"old"),
        directory("data/olddir"), entry("data/olddir/inner", data=b"gone"),
        directory("opq"), entry("opq/a", data=b"a"), entry("opq/b", data=b"b"),
        directory("flip"), entry("flip/child", data=b"lower child"),
        entry("file-to-dir", data=b"was a file"),
        directory("recreated"), entry("recreated/old-child", data=b"old"),
        entry("sym-abs", tarfile.SYMTYPE, linkname="/etc/passwd"),
        entry("etc/sym-rel", tarfile.SYMTYPE, linkname="passwd"),
        entry("dangling", tarfile.SYMTYPE, linkname="/does/not/exist"),
        directory("données"), entry("données/é-ü-你好.txt", data="unicode ✓\n".encode()),
        entry(LONG_NAME + "/file-with-a-long-name-" + "x" * 60, data=b"long"),
        entry("empty"), entry("run-fifo", tarfile.FIFOTYPE),
        directory("lib"), entry("lib/orig", data=b"original content\n"),
        entry("lib/alias", tarfile.LNKTYPE, linkname="lib/orig"),
        entry("lib/alias2", tarfile.LNKTYPE, linkname="lib/orig"),
        entry("lib/over", data=b"before overwrite\n"),
        entry("lib/over-link", tarfile.LNKTYPE, linkname="lib/over"),
        entry("./dot-slash", data=b"normalised"),
        entry("etc/passwd-link", tarfile.LNKTYPE, linkname="etc/passwd"),
    ],
    [
        entry("data/.wh.old"), entry("data/.wh.olddir"),
        directory("opq"), entry("opq/.wh..wh..opq"), entry("opq/c", data=b"c, same layer"),
        entry("flip", data=b"now a file"),
        directory("file-to-dir"), entry("file-to-dir/inner", data=b"inside"),
        entry(".wh.recreated"),
        entry("lib/.wh.orig"), entry("lib/over", data=b"after overwrite\n"),
        entry("usr/bin/tool", data=b"tool v2\n", mode=0o755),
        directory("etc", mode=0o750),
    ],
    [
        directory("flip"), entry("flip/new-child", data=b"upper child"),
        entry("recreated", data=b"recreated as a file"),
        entry("data/new", data=b"new", uid=123, gid=456),
    ],
]


def make_layered_image(layers: Sequence[Sequence[Tuple[str, Any]]], seed: str = "flat",
                       architecture: str = "amd64") -> TestImage:
    blobs, diff_ids = [], []
    for layer in layers:
        raw = tar_bytes(layer)
        diff_ids.append(sha256(raw))
        blobs.append(Blob(oc.MEDIA_OCI_LAYER_GZIP, gzip.compress(raw, mtime=0)))
    config = Blob(oc.MEDIA_OCI_CONFIG, json.dumps({
        "architecture": architecture, "os": "linux", "config": {"Env": [f"SEED={seed}"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())
    manifest = Blob(oc.MEDIA_OCI_MANIFEST, json.dumps({
        "schemaVersion": 2, "mediaType": oc.MEDIA_OCI_MANIFEST, "config": config.descriptor(),
        "layers": [b.descriptor() for b in blobs]}).encode())
    return TestImage(manifest, config, blobs, {"architecture": architecture, "os": "linux"})


def tree(root: str, ignore: Iterable[str] = ()) -> Dict[str, Tuple[Any, ...]]:
    """Every path under ``root``: (type, mode, uid, gid, size, content hash, link target)."""
    found = {}
    ignored = set(ignore)
    for directory_path, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(directory_path, name)
            rel = os.path.relpath(full, root)
            if rel in ignored or any(rel.startswith(i + "/") for i in ignored):
                continue
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            digest, target = "", ""
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            found[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, digest,
                          target)
    return found


def extract_with_tar(archive: str, destination: str) -> None:
    os.makedirs(destination)
    subprocess.run(["tar", "--numeric-owner", "-xpf", archive, "-C", destination], check=True)


def extract_with_tarfile(archive: str, destination: str) -> None:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "fully_trusted_filter"):
            tar.extractall(destination, numeric_owner=True, filter="fully_trusted")
        else:
            tar.extractall(destination, numeric_owner=True)


class Podman:
    """podman with its own storage in a temporary directory (vfs, no daemon)."""

    def __init__(self, test: unittest.TestCase, tmp: str) -> None:
        self.command = [require_tool(test, "podman"), "--storage-driver", "vfs",
                        "--root", os.path.join(tmp, "podman-root"),
                        "--runroot", os.path.join(tmp, "podman-run"),
                        "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
        self.test = test

    def __call__(self, *args: str) -> str:
        result = subprocess.run(self.command + list(args), capture_output=True, timeout=300)
        self.test.assertEqual(result.returncode, 0, result.stderr.decode())
        return result.stdout.decode()


# What podman adds to a container's filesystem that is not in the image.
PODMAN_ADDED = ("etc/hosts", "etc/resolv.conf", "etc/hostname", "run", "dev", "proc", "sys",
                ".containerenv")


class TestSources(CacheTestCase):
    def flatten(self, name: str, platform: str = "") -> str:
        path = self.path(name.replace("/", "_") + ".rootfs.tar")
        with self.cache.new_source(name, platform).tar_reader() as stream, open(path, "wb") as f:
            shutil.copyfileobj(stream, f)
        return path

    def test_flattened_stream_order_and_content(self) -> None:
        image = make_layered_image(FLATTEN_LAYERS)
        self.load_image("example.com/flat:1", image)
        with tarfile.open(self.flatten("example.com/flat:1")) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            self.assertEqual(len(names), len(set(names)), "a path is listed twice")
            seen = set()
            for member in members:
                parent = member.name.rpartition("/")[0]
                self.assertTrue(not parent or parent in seen, f"{member.name} before {parent}")
                if member.islnk():
                    self.assertIn(member.linkname, seen, f"{member.name} before its target")
                self.assertNotIn(".wh.", member.name)
                self.assertFalse(member.name.startswith(("/", "./")))
                seen.add(member.name)
            content = {m.name: tar.extractfile(m).read() for m in members if m.isreg()}
        self.assertEqual(content["usr/bin/tool"], b"tool v2\n")
        self.assertEqual(content["lib/alias"], b"original content\n")
        self.assertEqual(content["lib/over"], b"after overwrite\n")
        self.assertEqual(content["lib/over-link"], b"before overwrite\n")
        self.assertEqual(content["opq/c"], b"c, same layer")
        self.assertEqual(content["recreated"], b"recreated as a file")
        self.assertEqual(content["dot-slash"], b"normalised")
        for gone in ["data/old", "data/olddir", "data/olddir/inner", "opq/a", "opq/b",
                     "flip/child", "recreated/old-child", "lib/orig"]:
            self.assertNotIn(gone, names)
        kinds = {m.name: m for m in members}
        self.assertEqual(content["usr/bin/tool-link"], b"tool v1\n")
        self.assertEqual(kinds["etc/passwd-link"].linkname, "etc/passwd")
        self.assertTrue(kinds["lib/alias2"].islnk())
        self.assertEqual(kinds["lib/alias2"].linkname, "lib/alias")
        self.assertTrue(kinds["flip"].isdir())
        self.assertTrue(kinds["file-to-dir"].isdir())
        self.assertEqual(kinds["etc"].mode, 0o750)
        self.assertEqual(kinds["usr/bin/su"].mode, 0o4755)
        self.assertEqual(kinds["tmp"].mode, 0o1777)
        self.assertEqual((kinds["data/new"].uid, kinds["data/new"].gid), (123, 456))
        self.assertTrue(kinds["run-fifo"].isfifo())
        self.assertEqual(kinds["sym-abs"].linkname, "/etc/passwd")

    def test_flatten_equals_umoci_and_podman(self) -> None:
        image = make_layered_image(FLATTEN_LAYERS)
        self.load_image("example.com/flat:1", image)
        archive = self.flatten("example.com/flat:1")
        extract_with_tar(archive, self.path("by-tar"))
        extract_with_tarfile(archive, self.path("by-tarfile"))
        ours = tree(self.path("by-tar"))
        self.assertEqual(tree(self.path("by-tarfile")), ours)
        umoci = require_tool(self, "umoci")
        result = subprocess.run([umoci, "unpack", "--image",
                                 f"{self.cache_dir}:example.com/flat:1", self.path("bundle")],
                                capture_output=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        self.assertEqual(tree(self.path("bundle", "rootfs")), ours)
        podman = Podman(self, self.tmp)
        docker_tar = self.path("flat-docker.tar")
        with self.cache.new_source("example.com/flat:1").v1_tar_reader() as stream, \
                open(docker_tar, "wb") as f:
            shutil.copyfileobj(stream, f)
        podman("load", "-i", docker_tar)
        container = podman("create", "example.com/flat:1", "/bin/true").strip().splitlines()[-1]
        podman("export", "-o", self.path("podman.tar"), container)
        extract_with_tar(self.path("podman.tar"), self.path("by-podman"))
        theirs = tree(self.path("by-podman"), PODMAN_ADDED)
        # podman's export gives the root of the container, not a directory, no mode of its own.
        self.assertEqual(theirs, {k: v for k, v in ours.items() if k not in PODMAN_ADDED})

    def test_single_layer_whiteouts_are_never_emitted(self) -> None:
        image = make_layered_image([[entry("a", data=b"a"), entry(".wh.b"),
                                     directory("d"), entry("d/.wh..wh..opq")]])
        self.load_image("example.com/one:1", image)
        with tarfile.open(self.flatten("example.com/one:1")) as tar:
            self.assertEqual(tar.getnames(), ["a", "d"])

    def test_escapes_are_neutralised(self) -> None:
        image = make_layered_image([[
            entry("ok", data=b"ok"), entry("../../escape", data=b"x"),
            entry("a/../../b", data=b"x"), entry("/abs/file", data=b"absolute"),
            entry("link-out", tarfile.LNKTYPE, linkname="../../etc/shadow"),
            entry("link-abs", tarfile.LNKTYPE, linkname="/ok"),
            entry("via-symlink", tarfile.SYMTYPE, linkname="/etc"),
            entry("via-symlink/passwd", data=b"through a symlink")]])
        self.load_image("example.com/escape:1", image)
        with tarfile.open(self.flatten("example.com/escape:1")) as tar:
            members = {m.name: m for m in tar.getmembers()}
        self.assertEqual(sorted(members), ["abs", "abs/file", "link-abs", "ok", "via-symlink"])
        self.assertEqual(members["link-abs"].linkname, "ok")

    def test_stream_errors_surface_from_read(self) -> None:
        image = make_layered_image([[entry("big", data=random.Random(1).randbytes(4 << 20))]])
        self.load_image("example.com/broken:1", image)
        path = self.cache.layout.blob_path(image.layers[0].digest)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
            f.seek(0, 2)
            f.write(b"\0" * (len(image.layers[0].data) - f.tell()))  # right size, bad data
        with self.assertRaises(oc.OciCacheError):
            with self.cache.new_source("example.com/broken:1").tar_reader() as stream:
                while stream.read(65536):
                    pass
        result = self.cli("export", "example.com/broken:1", "--format", "filesystem",
                          "-o", self.path("out.tar"))
        self.assert_one_line_error(result, "gzip")
        self.assertFalse(os.path.exists(self.path("out.tar")))
        self.assertEqual([f for f in os.listdir(self.tmp) if oc._TEMP_MARK in f], [])

    def test_export_output_options(self) -> None:
        image = make_image("out")
        self.load_image("example.com/out:1", image)
        target = self.path("existing.tar")
        with open(target, "wb") as f:
            f.write(b"x" * (1 << 20))
        result = self.cli("export", "example.com/out:1", "--format", "oci", "-o", target)
        self.assertEqual(result.returncode, 0, result.stderr)
        with tarfile.open(target) as tar:  # truncated: a valid tar, not old bytes after it
            self.assertIn("index.json", tar.getnames())
        self.assertLess(os.path.getsize(target), 1 << 20)
        result = self.cli("export", "example.com/out:1", "--format", "filesystem", "-o", "-")
        with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
            self.assertEqual(tar.getnames(), ["etc", "etc/out"])
        self.assert_one_line_error(self.cli("export", "example.com/nope:1", "--format", "oci",
                                            "-o", self.path("nope.tar")), "no image named")
        self.assertFalse(os.path.exists(self.path("nope.tar")))
        self.assert_one_line_error(self.cli("export", "example.com/out:1", "--format",
                                            "docker", "--platform", "all", "-o", "-"),
                                   "needs --format oci")
        self.assert_one_line_error(self.cli("export", "example.com/out:1", "--format", "oci",
                                            "-o", "-", "--platform", "s390x"), "s390x")

    def test_zstd_layers(self) -> None:
        try:
            from compression import zstd  # type: ignore[import-not-found]
        except ImportError:
            zstd = None
        raw = tar_bytes([("z", b"zstd content")])
        if zstd is not None:
            data = zstd.compress(raw)
        else:  # a real zstd frame of this tar, made by the zstd format's simplest form
            data = b"\x28\xb5\x2f\xfd" + b"\x00" * 16
        layer = Blob(oc.MEDIA_OCI_LAYER_ZSTD, data)
        config = Blob(oc.MEDIA_OCI_CONFIG, json.dumps({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(raw)]}}).encode())
        manifest = Blob(oc.MEDIA_OCI_MANIFEST, json.dumps({
            "schemaVersion": 2, "mediaType": oc.MEDIA_OCI_MANIFEST,
            "config": config.descriptor(), "layers": [layer.descriptor()]}).encode())
        self.load_image("example.com/zstd:1", TestImage(manifest, config, [layer], {}))
        if zstd is None:
            with self.assertRaisesRegex(oc.OciCacheError, "zstd.*Python 3.14"):
                self.cache.new_source("example.com/zstd:1", "amd64").tar_reader()
        else:
            with tarfile.open(self.flatten("example.com/zstd:1", "amd64")) as tar:
                self.assertEqual(tar.getnames(), ["z"])

    def test_docker_tar_loads_in_podman_and_skopeo(self) -> None:
        image = make_image("dock", layer_files=[{"etc/a": b"a"}, {"etc/b": b"b"}])
        self.load_image("example.com/dock:1", image)
        self.cache.descriptor_write("example.com/dock@" + image.manifest.digest,
                                    self.cache.find_descriptor("example.com/dock:1"))
        out = self.path("dock.tar")
        result = self.cli("export", "example.com/dock:1", "--format", "docker", "-o", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        info = json.loads(self.skopeo("inspect", f"docker-archive:{out}"))
        self.assertEqual(info["Env"], ["SEED=dock"])
        self.skopeo("copy", f"docker-archive:{out}", f"oci:{self.path('copy')}:x")
        with tarfile.open(out) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
            self.assertEqual(manifest[0]["RepoTags"], ["example.com/dock:1"])
        podman = Podman(self, self.tmp)
        self.assertIn("example.com/dock:1", podman("load", "-i", out))
        renamed = self.path("renamed.tar")
        self.cli("export", "example.com/dock:1", "--format", "docker", "--name", "other/x:2",
                 "-o", renamed)
        self.assertIn("docker.io/other/x:2", podman("load", "-i", renamed))
        untagged = self.path("untagged.tar")
        self.cli("export", "example.com/dock@" + image.manifest.digest, "--format", "docker",
                 "-o", untagged)
        with tarfile.open(untagged) as tar:
            self.assertEqual(json.load(tar.extractfile("manifest.json"))[0]["RepoTags"], [])
            self.assertNotIn("repositories", tar.getnames())
        podman("load", "-i", untagged)

    def test_oci_tar_round_trips(self) -> None:
        amd, arm = make_image("a"), make_image("b", "arm64")
        _, attestation_blobs, attestation = make_attestation(amd)
        index = make_index([amd.descriptor(), arm.descriptor(), attestation])
        self.load(oci_archive([(index.descriptor(), named("example.com/multi:1"))],
                              [*amd.blobs, *arm.blobs, *attestation_blobs, index]))
        single = self.path("single.tar")
        self.cli("export", "example.com/multi:1", "--format", "oci", "--platform", "arm64",
                 "-o", single)
        raw = self.skopeo("inspect", "--raw", f"oci-archive:{single}:example.com/multi:1")
        self.assertEqual(sha256(raw.encode()), arm.manifest.digest)
        whole = self.path("whole.tar")
        result = self.cli("export", "example.com/multi:1", "--format", "oci", "--platform",
                          "all", "-o", whole)
        self.assertEqual(result.returncode, 0, result.stderr)
        raw = self.skopeo("inspect", "--raw", f"oci-archive:{whole}:example.com/multi:1")
        self.assertEqual(sha256(raw.encode()), index.digest)
        self.skopeo("copy", "--all", f"oci-archive:{whole}:example.com/multi:1",
                    f"oci:{self.path('copy')}:x")
        other = oc.Provider(self.path("other"))
        with open(whole, "rb") as f:
            (loaded,) = other.image_load(f)
        self.assertEqual((loaded.name, str(loaded.digest)), ("example.com/multi:1", index.digest))
        self.assertTrue(other.verify().ok)
        self.assertEqual(len(list(other.store().walk())), len(list(self.cache.store().walk())))
        with open(single, "rb") as f:
            (loaded,) = oc.Provider(self.path("third")).image_load(f)
        self.assertEqual(str(loaded.digest), arm.manifest.digest)
        os.unlink(self.cache.layout.blob_path(arm.layers[0].digest))
        with self.assertRaisesRegex(oc.NotFoundError, "not complete"):
            self.cache.new_source("example.com/multi:1", "all").oci_tar_reader()

    def test_sboms(self) -> None:
        amd, arm = make_image("a"), make_image("b", "arm64")
        spdx_text = b'{ "spdxVersion" : "SPDX-2.3",  "name":"exact bytes" }'
        spdx = Blob(oc.MEDIA_IN_TOTO, b'{"_type":"https://in-toto.io/Statement/v0.1",'
                    b'"predicateType":"https://spdx.dev/Document","subject":[],'
                    b'"predicate":' + spdx_text + b'}')
        slsa = Blob(oc.MEDIA_IN_TOTO, b'{"predicateType":"https://slsa.dev/provenance/v0.2",'
                    b'"predicate":{"builder":{}}}')
        config = Blob(oc.MEDIA_OCI_CONFIG, b'{"architecture":"unknown","os":"unknown"}')
        attestation = Blob(oc.MEDIA_OCI_MANIFEST, json.dumps({
            "schemaVersion": 2, "mediaType": oc.MEDIA_OCI_MANIFEST,
            "config": config.descriptor(), "layers": [
                spdx.descriptor(annotations={oc.ANNOTATION_PREDICATE_TYPE:
                                             oc.SPDX_PREDICATE_TYPE}),
                slsa.descriptor(annotations={oc.ANNOTATION_PREDICATE_TYPE:
                                             "https://slsa.dev/provenance/v0.2"})]}).encode())
        entry_ = attestation.descriptor(
            platform={"architecture": "unknown", "os": "unknown"},
            annotations={oc.ANNOTATION_REFERENCE_TYPE: "attestation-manifest",
                         oc.ANNOTATION_REFERENCE_DIGEST: amd.manifest.digest})
        index = make_index([amd.descriptor(), arm.descriptor(), entry_])
        self.load(oci_archive([(index.descriptor(), named("example.com/sbom:1"))],
                              [*amd.blobs, *arm.blobs, spdx, slsa, config, attestation, index]))
        (document,) = self.cache.new_source("example.com/sbom:1", "amd64").sboms()
        self.assertEqual(document.read(), spdx_text)
        self.assertEqual(self.cache.new_source("example.com/sbom:1", "arm64").sboms(), [])
        with self.assertRaises(oc.PlatformNotFoundError):
            self.cache.new_source("example.com/sbom:1", "s390x").sboms()
        self.load_image("example.com/plain:1", amd)
        self.assertEqual(self.cache.new_source("example.com/plain:1", "amd64").sboms(), [])
        result = self.cli("sbom", "example.com/sbom:1", "--platform", "amd64")
        self.assertEqual(result.stdout, spdx_text + b"\n")
        second = Blob(oc.MEDIA_OCI_MANIFEST, attestation.data.replace(b'"layers"',
                                                                      b'"annotations":{},"layers"'))
        twice = make_index([amd.descriptor(), entry_, {**entry_, "digest": second.digest,
                                                       "size": len(second.data)}])
        self.load(oci_archive([(twice.descriptor(), named("example.com/twice:1"))],
                              [*amd.blobs, spdx, slsa, config, attestation, second, twice]))
        with self.assertRaisesRegex(oc.OciCacheError, "multiple attestation"):
            self.cache.new_source("example.com/twice:1", "amd64").sboms()

    def test_export_memory_is_bounded(self) -> None:
        big = random.Random(3).randbytes(192 << 20)
        image = make_layered_image([[entry("big.bin", data=big)]])
        del big
        self.load_image("example.com/big:1", image)
        del image
        for export_format in ("filesystem", "docker", "oci"):
            # VmHWM is this process's own peak (ru_maxrss would include the parent's).
            script = ("import ocicache,re,sys\n"
                      "status = ocicache.main(sys.argv[1:])\n"
                      "peak = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status')"
                      ".read()).group(1)) // 1024\n"
                      "sys.exit(status or (peak > 64 and f'peak RSS {peak} MiB'))")
            result = subprocess.run([sys.executable, "-c", script, "--cache", self.cache_dir,
                                     "export", "example.com/big:1", "--format", export_format,
                                     "-o", self.path("big.tar")], cwd=HERE, capture_output=True)
            self.assertEqual(result.returncode, 0, f"{export_format}: {result.stderr!r}")


# =====================================================================================
# Command line
# =====================================================================================

class TestCommandLine(CacheTestCase):
    def test_help_everywhere(self) -> None:
        result = self.cli("--help")
        self.assertEqual(result.returncode, 0)
        commands = ["ls", "inspect", "import", "export", "sbom", "rm", "clean", "gc", "verify"]
        for command in commands:
            self.assertIn(command, result.stdout.decode())
            sub = self.cli(command, "--help")
            self.assertEqual(sub.returncode, 0, command)
            self.assertIn("usage: ocicache " + command, sub.stdout.decode())

    def test_usage_errors_are_one_line_with_status_2(self) -> None:
        self.assert_one_line_error(self.cli("bogus"), "invalid choice", status=2)
        self.assert_one_line_error(self.cli("rm"), "required", status=2)
        self.assert_one_line_error(self.cli("gc", "--grace", "soon"), "invalid number", status=2)
        self.assert_one_line_error(self.cli(), "required", status=2)

    def test_ls_inspect_rm(self) -> None:
        amd, arm = make_image("a"), make_image("b", "arm64")
        index = make_index([amd.descriptor(), arm.descriptor()])
        self.load(oci_archive([(index.descriptor(), named("example.com/m:1"))],
                              [*amd.blobs, *arm.blobs, index]))
        os.unlink(self.cache.layout.blob_path(arm.layers[0].digest))
        result = self.cli("ls", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        (entry,) = json.loads(result.stdout)
        self.assertEqual(entry["name"], "example.com/m:1")
        self.assertEqual(entry["digest"], index.digest)
        self.assertEqual(entry["mediaType"], oc.MEDIA_OCI_INDEX)
        self.assertEqual(entry["platforms"], ["linux/amd64"])
        self.assertEqual(entry["size"], sum(len(b.data) for b in [
            index, amd.manifest, amd.config, *amd.layers, arm.manifest, arm.config]))
        table = self.cli("ls").stdout.decode()
        self.assertIn("example.com/m:1", table)
        self.assertIn("linux/amd64", table)
        inspected = json.loads(self.cli("inspect", "example.com/m:1").stdout)
        self.assertEqual(len(inspected["manifests"]), 2)
        inspected = json.loads(self.cli("inspect", "example.com/m:1", "--platform",
                                        "amd64").stdout)
        self.assertEqual(inspected["config"]["digest"], amd.config.digest)
        config = json.loads(self.cli("inspect", "example.com/m:1", "--config",
                                     "--platform", "amd64").stdout)
        self.assertEqual(config["config"]["Env"], ["SEED=a"])
        self.assert_one_line_error(self.cli("inspect", "example.com/m:1", "--platform", "s390x"),
                                   "has no linux/s390x")
        self.assert_one_line_error(self.cli("rm", "example.com/m:1", "example.com/nope:1"),
                                   "no image named example.com/nope:1")
        self.assertEqual(self.index_names(), ["example.com/m:1"])
        result = self.cli("rm", "example.com/m:1")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.index_names(), [])
        self.assertEqual(list(self.cache.store().walk()), [])

    def test_import_reports_names_and_errors(self) -> None:
        image = make_image("i")
        path = self.path("i.tar")
        with open(path, "wb") as f:
            f.write(oci_archive([(image.manifest.descriptor(), named("example.com/i:1"))],
                                image.blobs))
        result = self.cli("import", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode(), f"example.com/i:1 {image.manifest.digest}\n")
        self.assertEqual(self.cli("-q", "import", path).stdout, b"")
        self.assert_one_line_error(self.cli("import", self.path("absent.tar")),
                                   "No such file", "absent.tar")
        unnamed = self.path("unnamed.tar")
        with open(unnamed, "wb") as f:
            f.write(oci_archive([(image.manifest.descriptor(), {})], image.blobs))
        result = self.cli("import", unnamed)
        self.assertEqual(result.returncode, 0)
        self.assertIn("does not name", result.stderr.decode())

    def test_verify_gc_clean(self) -> None:
        image = make_image("v")
        self.load_image("example.com/v:1", image)
        self.cache.layout.write_blob_bytes(b"orphan")
        result = self.cli("verify")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"ok: {len(image.blobs) + 1} blobs verified", result.stdout.decode())
        result = self.cli("gc", "--grace", "0", "--dry-run")
        self.assertIn("would free 6 B in 1 files", result.stdout.decode())
        self.assertTrue(self.cache.layout.has_blob(sha256(b"orphan")))
        result = self.cli("gc", "--grace", "0")
        self.assertIn("freed 6 B in 1 files", result.stdout.decode())
        self.assertFalse(self.cache.layout.has_blob(sha256(b"orphan")))
        with open(self.cache.layout.blob_path(image.config.digest), "r+b") as f:
            f.write(b"#")
        result = self.cli("verify")
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"corrupt: {image.config.digest}", result.stdout.decode())
        self.assertEqual(len(result.stderr.decode().splitlines()), 1)
        result = self.cli("clean")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.index_names(), [])
        self.assertEqual(list(self.cache.store().walk()), [])

    def test_corrupt_index_is_one_line(self) -> None:
        with open(os.path.join(self.cache_dir, "index.json"), "w") as f:
            f.write("garbage")
        self.assert_one_line_error(self.cli("ls"), "invalid image cache")


# -------------------------------------------------------------------------------------

class _CountingResult(unittest.TextTestResult):
    """Counts passes so the run can end with 'N passed, N failed, N skipped'."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passed = 0

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self.passed += 1


def _run() -> int:
    runner = unittest.TextTestRunner(verbosity=2, resultclass=_CountingResult)
    result = runner.run(unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__]))
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    print(f"{result.passed} passed, {failed} failed, {len(result.skipped)} skipped")
    return 0 if result.wasSuccessful() and result.testsRun else 1


if __name__ == "__main__":
    sys.exit(_run())
