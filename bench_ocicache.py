#!/usr/bin/env python3
"""Benchmarks for ocicache: ``make bench``, or ``python3 bench_ocicache.py``.

Builds a deterministic image (one large gzip layer of incompressible bytes and 20 small
layers), serves it from a real ``docker-registry`` on 127.0.0.1, and times ocicache's
pull, push and export against skopeo, umoci, ``cp`` and the machine's own limits, taking the
contenders in turn over several rounds. It also builds the shapes of issue 19 (many
small files, many layers, many platforms, many names) and measures them against linuxkit
($LINUXKIT, else a ``linuxkit`` on PATH). Prints medians and ratios against the
project's targets with PASS or MISS per row, and writes every sample as JSON::

    python3 bench_ocicache.py                           # 1 GiB layer, 3 rounds
    python3 bench_ocicache.py --size-mib 64 --rounds 1  # a quick run
    python3 bench_ocicache.py --only shapes --rounds 1  # the shapes (or: names, main)
    python3 bench_ocicache.py --json results.json

Benchmarks are not tests: a MISS is reported, not failed, so the exit status is 0
unless an operation itself fails. Standard library only; nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
OCICACHE = os.path.join(HERE, "ocicache.py")
# The interpreter itself, not a launcher such as pyenv's ``python3`` shim (a shell
# script that would add tens of milliseconds to every start we time).
PYTHON = sys.executable

MIB = 1024 * 1024
LOOPBACK = "127.0.0.1"
REPOSITORY = "bench/img"
TAG = "1"
SMALL_LAYERS = 20
BIG_FILE_SIZE = 64 * MIB           # the big layer holds its bytes as files of this size
PULL_JOBS = 4                      # ocicache's default --jobs; the pull limit uses it too
COMMAND_TIMEOUT = 600.0            # no single command may hang the benchmark
USER_AGENT = "ocicache-bench/1"    # our own requests; not counted as the client's
DEFAULT_JSON = os.path.join(tempfile.gettempdir(), "ocicache-bench-results.json")

TARGET_PULL_VS_LIMIT = 1.3
TARGET_PULL_VS_SKOPEO = 0.4
TARGET_WARM_PULL_MS = 100.0
TARGET_PUSH_VS_SKOPEO = 0.8
TARGET_REPUSH_MS = 300.0
TARGET_EXPORT_VS_CP = 1.5
TARGET_FLATTEN_VS_LIMIT = 1.3
TARGET_FLATTEN_VS_UMOCI = 0.3
TARGET_PEAK_RSS_MIB = 48.0
TARGET_IMPORT_MS = 25.0
# Issue 19's targets, against linuxkit (Go) in the same run.
TARGET_FLATTEN_VS_LINUXKIT = 1.0
TARGET_SMALL_FILES_VS_LINUXKIT = 0.7
TARGET_LS_VS_LINUXKIT = 2.0
TARGET_NAME_WRITE_MS = 300.0       # rm of one name, descriptor_write of one name
TARGET_NAMES_LINEAR = 4.0          # 20,000 names / 5,000 names: 4x is linear, 16x quadratic
TARGET_PULL_VS_LINUXKIT = 1.0      # many layers, many platforms, durable
TARGET_SMALL_PULL_VS_LINUXKIT = 1.5


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# =====================================================================================
# The image
#
# Every byte follows from the seed and the size. The big layer's file contents are
# SHAKE-256 in counter mode, which gzip cannot shrink; the build checks that it did
# not. The small layers are a few short text files each, like /etc tweaks.
# =====================================================================================

SEED = b"ocicache-bench-1"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclasses.dataclass(frozen=True)
class Blob:
    """A blob of the benchmark image, as written to disk by the build."""

    media_type: str
    digest: str                    # "sha256:<hex>"
    size: int
    path: str                      # where the build wrote it

    def descriptor(self) -> Dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclasses.dataclass(frozen=True)
class Image:
    """The benchmark image: what the build wrote and the registry serves."""

    layers: List[Blob]             # the big one first
    config: Blob
    manifest: Blob
    big_layer_tar_size: int        # uncompressed, for the compressibility check

    @property
    def blobs(self) -> List[Blob]:
        """The blobs the manifest lists."""
        return [*self.layers, self.config]


def incompressible(seed: bytes, size: int) -> Iterator[bytes]:
    """``size`` bytes of SHAKE-256 in counter mode, in blocks of at most 1 MiB."""
    for counter, offset in enumerate(range(0, size, MIB)):
        block = seed + counter.to_bytes(8, "big")
        yield hashlib.shake_256(block).digest(min(MIB, size - offset))


def _tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = size, kind, 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info.tobuf(tarfile.PAX_FORMAT)


class _LayerWriter:
    """Writes a gzip layer, hashing the tar (its diff_id) and the blob (its digest)."""

    def __init__(self, path: str, level: int = 6) -> None:
        self._file = open(path, "wb")
        # wbits 31: a gzip wrapper with mtime 0, so the bytes depend only on the input.
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
        self.diff_id = hashlib.sha256()
        self.digest = hashlib.sha256()
        self.tar_size = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        self.diff_id.update(data)
        self.tar_size += len(data)
        self._emit(self._compressor.compress(data))

    def add_file(self, name: str, chunks: Iterator[bytes], size: int) -> None:
        self.write(_tar_header(name, size))
        for chunk in chunks:
            self.write(chunk)
        self.write(b"\0" * (-size % tarfile.BLOCKSIZE))

    def add_directory(self, name: str) -> None:
        self.write(_tar_header(name, 0, tarfile.DIRTYPE))

    def _emit(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        self._file.write(data)

    def close(self) -> None:
        self.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # the end-of-archive marker
        self._emit(self._compressor.flush())
        self._file.close()


def _write_layer(directory: str, fill: Callable[[_LayerWriter], None],
                 level: int = 6) -> Tuple[Blob, str, int]:
    """Write a layer; returns its blob, its diff_id and the size of its tar."""
    temp = os.path.join(directory, "layer.partial")
    writer = _LayerWriter(temp, level)
    fill(writer)
    writer.close()
    path = os.path.join(directory, writer.digest.hexdigest())
    os.replace(temp, path)
    blob = Blob(MEDIA_LAYER_GZIP, f"sha256:{writer.digest.hexdigest()}", writer.size, path)
    return blob, f"sha256:{writer.diff_id.hexdigest()}", writer.tar_size


def _write_json_blob(directory: str, media_type: str, value: Any) -> Blob:
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(directory, digest)
    with open(path, "wb") as f:
        f.write(data)
    return Blob(media_type, f"sha256:{digest}", len(data), path)


def build_image(directory: str, size: int) -> Image:
    """The benchmark image: a ``size``-byte incompressible layer, then 20 small ones."""
    os.makedirs(directory, exist_ok=True)

    def big(writer: _LayerWriter) -> None:
        for number, offset in enumerate(range(0, size, BIG_FILE_SIZE)):
            length = min(BIG_FILE_SIZE, size - offset)
            seed = SEED + b"/big/" + str(number).encode()
            writer.add_file(f"data/part-{number:03d}", incompressible(seed, length), length)

    def small(number: int) -> Callable[[_LayerWriter], None]:
        def fill(writer: _LayerWriter) -> None:
            for item in range(5):
                text = "".join(f"layer {number} file {item} line {line}\n"
                               for line in range(64)).encode()
                writer.add_file(f"etc/bench/{number:02d}/{item}.conf", iter([text]), len(text))
        return fill

    big_layer, big_diff_id, big_tar_size = _write_layer(directory, big)
    if big_layer.size < 0.99 * big_tar_size:
        raise BenchError(f"gzip shrank the big layer from {big_tar_size} to {big_layer.size} "
                         "bytes; its data is meant to be incompressible")
    small_layers = [_write_layer(directory, small(n)) for n in range(SMALL_LAYERS)]
    layers = [big_layer, *(layer for layer, _, _ in small_layers)]
    diff_ids = [big_diff_id, *(diff_id for _, diff_id, _ in small_layers)]
    config = _write_json_blob(directory, MEDIA_CONFIG, {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    manifest = _write_json_blob(directory, MEDIA_MANIFEST, {
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers]})
    return Image(layers, config, manifest, big_tar_size)


# =====================================================================================
# The registry
#
# Debian's docker-registry (distribution 2.8) on 127.0.0.1 at a free port, with its
# storage in the benchmark's work directory. Its access log, one line per request on
# its stdout, is how the warm pull shows that it made no request.
# =====================================================================================

def child_environment(pycache: str) -> Dict[str, str]:
    """The environment for every command: no proxies, mirrors or registry overrides.

    Python writes bytecode caches, as on a developer's machine, but to ``pycache``
    rather than next to ocicache.py.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REGISTRY_", "OCICACHE_", "LINUXKIT_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and k != "PYTHONDONTWRITEBYTECODE"}
    env["NO_PROXY"] = env["no_proxy"] = "*"
    env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


class Registry:
    """``docker-registry serve`` on 127.0.0.1, its config, storage and logs in ``directory``."""

    def __init__(self, binary: str, directory: str, env: Dict[str, str]) -> None:
        self.binary = binary
        self.directory = directory
        self.env = env
        self.port = 0
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.access_log = os.path.join(directory, "access.log")
        self.app_log = os.path.join(directory, "registry.log")
        self._sentinels = 0

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self, attempts: int = 5) -> None:
        os.makedirs(self.directory, exist_ok=True)
        config_path = os.path.join(self.directory, "config.yml")
        for _ in range(attempts):
            self.port = _free_port()  # may be taken before the registry binds it: retry
            config = {
                "version": "0.1",
                "log": {"level": "warn", "accesslog": {"disabled": False}},
                "storage": {
                    "filesystem": {"rootdirectory": os.path.join(self.directory, "storage")},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
                "http": {"addr": self.host, "secret": "ocicache-bench"},
                "health": {"storagedriver": {"enabled": False}},
            }
            with open(config_path, "w") as f:
                json.dump(config, f)  # JSON is YAML
            with open(self.access_log, "ab") as out, open(self.app_log, "ab") as err:
                self.process = subprocess.Popen(
                    [self.binary, "serve", config_path], stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, env=self.env, start_new_session=True)
            if self._wait_ready(30.0):
                return
            self.stop()
            if "address already in use" not in _read_text(self.app_log):
                break
        raise BenchError("docker-registry did not start:\n" + _read_text(self.app_log)[-2000:])

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            if self._get("/v2/") == 200:
                return True
            time.sleep(0.01)
        return False

    def _get(self, path: str) -> Optional[int]:
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=5)
        try:
            connection.request("GET", path, headers={"User-Agent": USER_AGENT})
            response = connection.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()

    def requests(self) -> int:
        """How many requests others have made so far.

        A log line is written just after its response, so we make one request of our
        own and wait for its line: every request answered before it is in the log by
        then.
        """
        self._sentinels += 1
        marker = f"bench-sentinel={self._sentinels}"
        if self._get(f"/v2/?{marker}") != 200:
            raise BenchError("the registry stopped answering")
        wait_until(lambda: marker in _read_text(self.access_log), 10.0, "the access log")
        return sum(1 for line in _read_text(self.access_log).splitlines()
                   if line and f'"{USER_AGENT}"' not in line)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def reset(self) -> None:
        """Start again with empty storage (on a new port)."""
        self.stop()
        remove(os.path.join(self.directory, "storage"))
        self.start()


def upload(registry: Registry, image: Image) -> None:
    """Push the image with plain distribution API calls, streaming each blob from disk."""
    upload_blobs(registry, REPOSITORY, image.blobs, [(image.manifest, TAG)])


def upload_blobs(registry: Registry, repository: str, blobs: Sequence[Blob],
                 manifests: Sequence[Tuple[Blob, str]]) -> None:
    """Upload ``blobs``, then each manifest or index under its reference (a digest or a
    tag) in order: the children of an index before it."""
    connection = http.client.HTTPConnection(LOOPBACK, registry.port, timeout=COMMAND_TIMEOUT,
                                            blocksize=MIB)

    def call(method: str, path: str, body: Any, headers: Dict[str, str], status: int) -> Any:
        connection.request(method, path, body=body, headers={"User-Agent": USER_AGENT, **headers})
        response = connection.getresponse()
        response.read()
        if response.status != status:
            raise BenchError(f"upload: {method} {path} answered {response.status}")
        return response

    try:
        for blob in blobs:
            started = call("POST", f"/v2/{repository}/blobs/uploads/", b"",
                           {"Content-Length": "0"}, 202)
            location = urllib.parse.urlsplit(started.headers["Location"])
            query = f"{location.query}&" if location.query else ""
            with open(blob.path, "rb") as body:
                call("PUT", f"{location.path}?{query}digest={blob.digest}", body,
                     {"Content-Length": str(blob.size),
                      "Content-Type": "application/octet-stream"}, 201)
        for manifest, reference in manifests:
            with open(manifest.path, "rb") as f:
                call("PUT", f"/v2/{repository}/manifests/{reference}", f.read(),
                     {"Content-Type": manifest.media_type}, 201)
    finally:
        connection.close()


# =====================================================================================
# Measuring
#
# A contender is a callable that does one run and returns a Sample. ocicache always
# runs as its own process, through a wrapper that reports its peak RSS.
# =====================================================================================

@dataclasses.dataclass
class Sample:
    """One run of one contender."""

    seconds: float
    rss_kib: Optional[int] = None                 # peak RSS, ocicache only
    extra: Dict[str, float] = dataclasses.field(default_factory=dict)


# Runs ocicache as ``python3 -m ocicache ARGS`` does (as __main__, from cached bytecode),
# or given a path, as ``python3 ocicache.py ARGS`` does (compiled from the source), then
# writes the process's VmHWM, its peak RSS, to a file. Read from outside, the peak is
# hard to catch: /proc/<pid>/status is gone once the child has exited, and
# getrusage(RUSAGE_CHILDREN) or wait4's ru_maxrss carry over the peak of the process
# that forked it (Python spawns with vfork, and exec keeps the old peak: /bin/true
# started from a 300 MiB Python reports 300 MiB). Measured inside, after exec, it is
# ocicache's own, plus runpy's import, a few hundred KiB.
_RSS_WRAPPER = """\
import runpy, sys
rss_file, script = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
try:
    if script.endswith(".py"):
        runpy.run_path(script, run_name="__main__")
    else:
        runpy.run_module(script, run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status, open(rss_file, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")))
"""

# What ``python3 ocicache.py`` must do before running a line of it.
_COMPILE_ONLY = "import sys; compile(open(sys.argv[1], 'rb').read(), sys.argv[1], 'exec')"


def run(argv: Sequence[str], env: Dict[str, str], cwd: Optional[str] = None) -> float:
    """Run a command to completion and return its wall time; fail on a non-zero exit."""
    started = time.perf_counter()
    result = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                            cwd=cwd, env=env, timeout=COMMAND_TIMEOUT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        output = (result.stderr or result.stdout).decode(errors="replace").strip()
        raise BenchError(f"{' '.join(argv)} exited with {result.returncode}: {output[-2000:]}")
    return seconds


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def timed(action: Callable[[], Any]) -> Sample:
    started = time.perf_counter()
    action()
    return Sample(time.perf_counter() - started)


@dataclasses.dataclass
class Bench:
    """What every case works with: the running registry, the image, the tools."""

    work: str
    registry: Registry
    main_image: Optional[Image]        # built only when a case that reads it runs
    push_target: Registry              # a second registry, emptied before every push
    tools: Dict[str, Optional[str]]    # command name -> its path, None when missing
    fixtures: Dict[str, Any] = dataclasses.field(default_factory=dict)  # built shapes

    @property
    def image(self) -> Image:
        if self.main_image is None:
            raise BenchError("the main image was not built for this selection of cases")
        return self.main_image

    def fixture(self, key: str, build: Callable[[], Any]) -> Any:
        """What ``build`` returns, built on the first call of the run (fixtures are
        shared by cases and rounds, and live in the run's work directory)."""
        if key not in self.fixtures:
            started = time.monotonic()
            self.fixtures[key] = build()
            print(f"fixture {key} built in {time.monotonic() - started:.1f} s",
                  file=sys.stderr, flush=True)
        return self.fixtures[key]

    def run(self, *argv: str, cwd: Optional[str] = None) -> float:
        return run(argv, self.registry.env, cwd)

    @property
    def ref(self) -> str:
        return f"{self.registry.host}/{REPOSITORY}:{TAG}"

    @property
    def cache(self) -> str:
        """ocicache's cache: emptied for each cold pull, complete after the last one."""
        return os.path.join(self.work, "cache")

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)

    def cache_blob(self, blob: Blob) -> str:
        algorithm, hex_digest = blob.digest.split(":")
        return os.path.join(self.cache, "blobs", algorithm, hex_digest)

    def ocicache(self, *args: str, as_script: bool = False, cache: str = "") -> Sample:
        """``python3 -m ocicache ARGS`` from ocicache.py's directory, as README recommends
        running it, or with ``as_script`` ``python3 ocicache.py ARGS``; on ``cache``, by
        default the main one."""
        rss_file = self.path("rss")
        cache = cache or self.cache
        if as_script:
            seconds = self.run(PYTHON, "-c", _RSS_WRAPPER, rss_file, OCICACHE,
                               "--cache", cache, *args)
        else:
            seconds = self.run(PYTHON, "-c", _RSS_WRAPPER, rss_file, "ocicache",
                               "--cache", cache, *args, cwd=HERE)
        fields = _read_text(rss_file).split()  # "VmHWM:", "40960", "kB"
        return Sample(seconds, rss_kib=int(fields[1]))


# =====================================================================================
# The machine's limits
#
# What the same job costs with nothing but the standard library's fastest path, in this
# process (so without an interpreter start, which ocicache pays).
# =====================================================================================

def limit_pull(bench: Bench, directory: str) -> None:
    """GET the manifest, then every blob with http.client, PULL_JOBS at a time, largest
    first (ocicache's schedule), hashing each with sha256 as it is written, then fsync
    and rename: the same guarantees a cache must give."""
    os.makedirs(directory)
    host = bench.registry.host

    def get(path: str) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection(host, timeout=COMMAND_TIMEOUT)
        connection.request("GET", path, headers={"User-Agent": "bench-limit",
                                                 "Accept": MEDIA_MANIFEST})
        response = connection.getresponse()
        if response.status != 200:
            raise BenchError(f"limit: GET {path} answered {response.status}")
        return response

    def fetch(blob: Blob) -> None:
        response = get(f"/v2/{REPOSITORY}/blobs/{blob.digest}")
        hasher = hashlib.sha256()
        buffer = memoryview(bytearray(MIB))
        temp = os.path.join(directory, blob.digest.split(":")[1] + ".partial")
        with open(temp, "wb", buffering=0) as out:
            while True:
                count = response.readinto(buffer)
                if not count:
                    break
                hasher.update(buffer[:count])
                out.write(buffer[:count])
            os.fsync(out.fileno())
        response.close()
        if f"sha256:{hasher.hexdigest()}" != blob.digest:
            raise BenchError(f"limit: blob {blob.digest} arrived with other content")
        os.replace(temp, temp[:-len(".partial")])

    get(f"/v2/{REPOSITORY}/manifests/{TAG}").read()
    with concurrent.futures.ThreadPoolExecutor(PULL_JOBS) as pool:
        list(pool.map(fetch, sorted(bench.image.blobs, key=lambda b: -b.size)))


# zlib's fastest way here: 256 KiB read, at most 256 KiB out per call (128 KiB is 4%
# slower). Reading 1 MiB at a time costs 40% more (each call copies the input it leaves
# for the next), and pieces of 512 KiB or more cost 2.5 times as much (each is fresh
# memory, page faults and all).
_DECOMPRESS_PIECE = 256 * 1024


def limit_decompress(paths: Sequence[str]) -> None:
    """zlib-decompress each gzip file to /dev/null, 256 KiB at a time."""
    with open(os.devnull, "wb") as sink:
        for path in paths:
            decompressor = zlib.decompressobj(31)
            with open(path, "rb", buffering=0) as blob:
                while True:
                    chunk = blob.read(_DECOMPRESS_PIECE)
                    if not chunk:
                        break
                    while chunk:
                        sink.write(decompressor.decompress(chunk, _DECOMPRESS_PIECE))
                        chunk = decompressor.unconsumed_tail
            if not decompressor.eof:
                raise BenchError(f"limit: layer {path} ends early")


# =====================================================================================
# Checks
#
# A check turns a case's samples into one row of the table: a value (a ratio of
# medians, a wall time, a peak RSS) and the target it must not exceed.
# =====================================================================================

@dataclasses.dataclass
class CaseResult:
    """Every sample of a case, by contender."""

    samples: Dict[str, List[Sample]]

    def median(self, contender: str) -> float:
        return statistics.median(s.seconds for s in self.samples[contender])

    def peak_rss_mib(self, contender: str) -> float:
        return max(s.rss_kib or 0 for s in self.samples[contender]) / 1024

    def most(self, contender: str, key: str) -> float:
        return max(s.extra[key] for s in self.samples[contender])


@dataclasses.dataclass
class Row:
    """One line of the table and of the JSON's "checks"."""

    case: str
    measure: str
    ocicache: str                  # what ocicache measured
    reference: str                 # what it is compared with
    value: Optional[float]         # None: a contender could not run
    unit: str
    target: Optional[float]        # None: reported, no target

    @property
    def result(self) -> str:
        if self.value is None:
            return "SKIP"
        if self.target is None:
            return ""
        return "PASS" if self.value <= self.target else "MISS"


@dataclasses.dataclass
class Check:
    """How to turn a case's samples into a Row."""

    measure: str
    needs: Sequence[str]           # the contenders it reads
    evaluate: Callable[[CaseResult], Tuple[float, str, str]]  # value, ocicache, reference
    unit: str
    target: Optional[float]

    def row(self, case: str, result: CaseResult) -> Row:
        missing = [n for n in self.needs if n not in result.samples]
        if missing:
            return Row(case, self.measure, "", f"{', '.join(missing)} not installed", None,
                       self.unit, self.target)
        value, ours, reference = self.evaluate(result)
        return Row(case, self.measure, ours, reference, value, self.unit, self.target)


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def ratio(a: str, b: str, target: Optional[float]) -> Check:
    """median(a) / median(b)."""
    def evaluate(r: CaseResult) -> Tuple[float, str, str]:
        return r.median(a) / r.median(b), _seconds(r.median(a)), f"{b} {_seconds(r.median(b))}"
    return Check(f"{a} / {b}", (a, b), evaluate, "x", target)


def wall_ms(contender: str, target: Optional[float]) -> Check:
    def evaluate(r: CaseResult) -> Tuple[float, str, str]:
        return r.median(contender) * 1000, _seconds(r.median(contender)), ""
    measure = "wall time" if contender == "ocicache" else f"{contender} wall time"
    return Check(measure, (contender,), evaluate, "ms", target)


def difference_ms(a: str, b: str, target: Optional[float]) -> Check:
    """median(a) - median(b), in milliseconds."""
    def evaluate(r: CaseResult) -> Tuple[float, str, str]:
        return ((r.median(a) - r.median(b)) * 1000, _seconds(r.median(a)),
                f"{b} {_seconds(r.median(b))}")
    return Check(f"{a} - {b}", (a, b), evaluate, "ms", target)


def peak_rss(contender: str = "ocicache", target: float = TARGET_PEAK_RSS_MIB) -> Check:
    def evaluate(r: CaseResult) -> Tuple[float, str, str]:
        return r.peak_rss_mib(contender), "", "highest of all runs"
    return Check("peak RSS", (contender,), evaluate, "MiB", target)


def most(contender: str, key: str, target: Optional[float]) -> Check:
    def evaluate(r: CaseResult) -> Tuple[float, str, str]:
        return r.most(contender, key), "", "most in any run"
    return Check(key if contender == "ocicache" else f"{contender} {key}", (contender,),
                 evaluate, "", target)


# =====================================================================================
# Cases
#
# Each case factory takes the Bench and returns its contenders (ocicache first) and its
# checks. The cases run in the order of CASES; the cold pull leaves the complete cache
# that the warm pull and the exports read.
# =====================================================================================

@dataclasses.dataclass
class Case:
    """Contenders for the same job, timed in turn, and the checks on their samples."""

    name: str
    contenders: Dict[str, Callable[[], Sample]]
    checks: List[Check]
    repeat: int = 1                # runs of each contender in a round

    def run(self, rounds: int) -> CaseResult:
        """Run the contenders in turn, each round starting with the next one."""
        names = list(self.contenders)
        samples: Dict[str, List[Sample]] = {name: [] for name in names}
        for number in range(rounds):
            order = names[number % len(names):] + names[:number % len(names)]
            for _ in range(self.repeat):
                for name in order:
                    # What the previous run wrote is still going to disk: flush it first,
                    # so that no contender pays for another's writeback.
                    os.sync()
                    samples[name].append(self.contenders[name]())
            shown = "  ".join(f"{name} {_describe(samples[name][-self.repeat:])}"
                              for name in names)
            print(f"{self.name:<16} {number + 1}/{rounds}  {shown}", file=sys.stderr, flush=True)
        return CaseResult(samples)


def _describe(samples: List[Sample]) -> str:
    text = _seconds(statistics.median(s.seconds for s in samples))
    if samples[0].rss_kib is not None:
        text += f" ({max(s.rss_kib or 0 for s in samples) / 1024:.1f} MiB)"
    return text


def _with_tool(bench: Bench, name: str, contenders: Dict[str, Callable[[], Sample]],
               contender: Callable[[str], Sample]) -> None:
    """Add a peer tool's contender when the tool is installed (its rows SKIP otherwise)."""
    path = bench.tools.get(name)
    if path is not None:
        contenders[name] = lambda: contender(path)


def cold_pull(bench: Bench) -> Case:
    def ocicache() -> Sample:
        remove(bench.cache)
        return bench.ocicache("pull", "--platform", "amd64", bench.ref)

    def skopeo(tool: str) -> Sample:
        target = bench.path("skopeo-pull")
        remove(target)
        sample = Sample(bench.run(tool, "copy", "--src-tls-verify=false",
                                  f"docker://{bench.ref}", f"oci:{target}:bench"))
        remove(target)
        return sample

    def limit() -> Sample:
        target = bench.path("limit-pull")
        remove(target)
        sample = timed(lambda: limit_pull(bench, target))
        remove(target)
        return sample

    contenders: Dict[str, Callable[[], Sample]] = {"ocicache": ocicache}
    _with_tool(bench, "skopeo", contenders, skopeo)
    contenders["limit"] = limit
    return Case("cold pull", contenders, [
        ratio("ocicache", "limit", TARGET_PULL_VS_LIMIT),
        ratio("ocicache", "skopeo", TARGET_PULL_VS_SKOPEO),
        peak_rss()])


def _warm_pull(bench: Bench, as_script: bool) -> Sample:
    before = bench.registry.requests()
    sample = bench.ocicache("pull", "--platform", "amd64", bench.ref, as_script=as_script)
    sample.extra["registry requests"] = bench.registry.requests() - before
    return sample


def warm_pull(bench: Bench) -> Case:
    """The pull again, when the image is complete in the cache."""
    return Case("warm pull", {"ocicache": lambda: _warm_pull(bench, as_script=False),
                              "bare": lambda: bare_start(bench)}, [
        wall_ms("ocicache", TARGET_WARM_PULL_MS),
        difference_ms("ocicache", "bare", None),
        most("ocicache", "registry requests", 0),
        peak_rss()], repeat=5)


def warm_pull_script(bench: Bench) -> Case:
    """The pull again as ``python3 ocicache.py``, which compiles the whole file first on
    every run. That part is timed on its own: a start that only compiles ocicache.py."""
    def compile_only() -> Sample:
        return Sample(bench.run(PYTHON, "-c", _COMPILE_ONLY, OCICACHE))

    return Case("warm pull script", {"ocicache.py": lambda: _warm_pull(bench, as_script=True),
                                     "compile only": compile_only}, [
        wall_ms("ocicache.py", None),
        difference_ms("ocicache.py", "compile only", None),
        most("ocicache.py", "registry requests", 0),
        peak_rss("ocicache.py")], repeat=5)


def _export_case(bench: Bench, name: str, ocicache_format: str, skopeo_transport: str,
                 skopeo_name: str) -> Case:
    """An export to a tar vs skopeo's copy to the same kind of tar vs cp of the blobs:
    ocicache's with the record of checked blobs its pull wrote, and without one (every
    blob hashed beside the copy)."""
    def ocicache(first: bool = False) -> Sample:
        target = bench.path(f"export.{ocicache_format}.tar")
        if first:
            remove(os.path.join(bench.cache, ".ocicache-checked-blobs.json"))
        sample = bench.ocicache("export", "--format", ocicache_format, "--platform", "amd64",
                                "-o", target, bench.ref)
        remove(target)
        return sample

    def skopeo(tool: str) -> Sample:
        target = bench.path(f"skopeo.{ocicache_format}.tar")
        remove(target)
        sample = Sample(bench.run(tool, "copy", f"oci:{bench.cache}:{bench.ref}",
                                  f"{skopeo_transport}:{target}:{skopeo_name}"))
        remove(target)
        return sample

    def cp(tool: str) -> Sample:
        target = bench.path("cp")
        os.makedirs(target)
        blobs = [*bench.image.blobs, bench.image.manifest]
        sample = Sample(bench.run(tool, "--reflink=never",
                                  *(bench.cache_blob(b) for b in blobs), target))
        remove(target)
        return sample

    contenders: Dict[str, Callable[[], Sample]] = {  # in this order in every round
        "ocicache first": lambda: ocicache(first=True), "ocicache": ocicache}
    _with_tool(bench, "skopeo", contenders, skopeo)
    _with_tool(bench, "cp", contenders, cp)
    return Case(name, contenders, [
        ratio("ocicache", "cp", TARGET_EXPORT_VS_CP),
        ratio("ocicache first", "cp", None),
        ratio("ocicache", "skopeo", None),
        peak_rss()])


def docker_export(bench: Bench) -> Case:
    return _export_case(bench, "docker export", "docker", "docker-archive",
                        f"{REPOSITORY}:{TAG}")


def oci_export(bench: Bench) -> Case:
    return _export_case(bench, "OCI export", "oci", "oci-archive", bench.ref)


def _flatten_contenders(bench: Bench, cache: str, ref: str,
                        layers: Sequence[str]) -> Dict[str, Callable[[], Sample]]:
    """ocicache's filesystem export of ``ref`` in ``cache`` (gzip files ``layers``) vs
    linuxkit's, umoci's unpack and the zlib limit."""
    def ocicache() -> Sample:
        target = bench.path("rootfs.tar")
        sample = bench.ocicache("export", "--format", "filesystem", "--platform", "amd64",
                                "-o", target, ref, cache=cache)
        remove(target)
        return sample

    def linuxkit(tool: str) -> Sample:
        target = bench.path("linuxkit-rootfs.tar")
        sample = Sample(bench.run(tool, "cache", "export", "--cache", cache, "--format",
                                  "filesystem", "--platform", "linux/amd64", "--outfile",
                                  target, ref))
        remove(target)
        return sample

    def umoci(tool: str) -> Sample:
        target = bench.path("bundle")
        remove(target)
        sample = Sample(bench.run(tool, "unpack", "--image", f"{cache}:{ref}", target))
        remove(target)
        return sample

    contenders: Dict[str, Callable[[], Sample]] = {"ocicache": ocicache}
    _with_tool(bench, "linuxkit", contenders, linuxkit)
    _with_tool(bench, "umoci", contenders, umoci)
    contenders["zlib limit"] = lambda: timed(lambda: limit_decompress(layers))
    return contenders


def flatten(bench: Bench) -> Case:
    contenders = _flatten_contenders(bench, bench.cache, bench.ref,
                                     [bench.cache_blob(layer) for layer in bench.image.layers])
    return Case("flatten", contenders, [
        ratio("ocicache", "zlib limit", TARGET_FLATTEN_VS_LIMIT),
        ratio("ocicache", "linuxkit", TARGET_FLATTEN_VS_LINUXKIT),
        ratio("ocicache", "umoci", TARGET_FLATTEN_VS_UMOCI),
        peak_rss()])


def bare_start(bench: Bench) -> Sample:
    """A bare interpreter start, ``python3 -c pass``: what every ocicache run pays first."""
    return Sample(bench.run(PYTHON, "-c", "pass", cwd=HERE))


def import_time(bench: Bench) -> Case:
    """``import ocicache`` over a bare start; and what the start itself spends in site
    (the .pth files of site-packages, which every contender written in Python pays and
    linuxkit does not: 25 ms of a 33 ms start here, 15 ms of it a sandbox's certifi hook)."""
    def import_ocicache() -> Sample:
        return Sample(bench.run(PYTHON, "-c", "import ocicache", cwd=HERE))

    return Case("import", {"import ocicache": import_ocicache, "bare": lambda: bare_start(bench),
                           "bare -S": lambda: Sample(bench.run(PYTHON, "-S", "-c", "pass",
                                                               cwd=HERE))},
                [difference_ms("import ocicache", "bare", TARGET_IMPORT_MS),
                 difference_ms("bare", "bare -S", None)], repeat=15)


def push(bench: Bench) -> Case:
    """The complete cache's image into an empty registry: ocicache push vs skopeo copy."""
    target = bench.push_target

    def ocicache() -> Sample:
        target.reset()
        return bench.ocicache("push", "--remote-name", f"{target.host}/{REPOSITORY}:{TAG}",
                              bench.ref)

    def skopeo(tool: str) -> Sample:
        target.reset()
        return Sample(bench.run(tool, "copy", "--dest-tls-verify=false",
                                f"oci:{bench.cache}:{bench.ref}",
                                f"docker://{target.host}/{REPOSITORY}:{TAG}"))

    contenders: Dict[str, Callable[[], Sample]] = {"ocicache": ocicache}
    _with_tool(bench, "skopeo", contenders, skopeo)
    return Case("push", contenders, [
        ratio("ocicache", "skopeo", TARGET_PUSH_VS_SKOPEO),
        peak_rss()])


def copy(bench: Bench) -> Case:
    """The registry's image into an empty second registry: ocicache copy (staging the
    blobs through an empty cache, as a first copy does) vs skopeo copy docker:// to
    docker:// (which streams them)."""
    target = bench.push_target
    source = f"{bench.registry.host}/{REPOSITORY}:{TAG}"

    def ocicache() -> Sample:
        target.reset()  # on a new port
        staging = bench.path("copy-cache")
        remove(staging)
        sample = bench.ocicache("copy", source, f"{target.host}/{REPOSITORY}:{TAG}",
                                cache=staging)
        remove(staging)
        return sample

    def skopeo(tool: str) -> Sample:
        target.reset()
        return Sample(bench.run(tool, "copy", "--src-tls-verify=false",
                                "--dest-tls-verify=false", f"docker://{source}",
                                f"docker://{target.host}/{REPOSITORY}:{TAG}"))

    contenders: Dict[str, Callable[[], Sample]] = {"ocicache": ocicache}
    _with_tool(bench, "skopeo", contenders, skopeo)
    return Case("copy", contenders, [ratio("ocicache", "skopeo", None), peak_rss()])


def repush(bench: Bench) -> Case:
    """The same push again when the registry has every blob and the tag."""
    target = bench.push_target
    remote = f"{target.host}/{REPOSITORY}:{TAG}"
    bench.ocicache("push", "--remote-name", remote, bench.ref)  # whatever push ran last

    def ocicache() -> Sample:
        before = target.requests()
        sample = bench.ocicache("push", "--remote-name", remote, bench.ref)
        sample.extra["registry requests"] = target.requests() - before
        return sample

    return Case("re-push", {"ocicache": ocicache, "bare": lambda: bare_start(bench)}, [
        wall_ms("ocicache", TARGET_REPUSH_MS),
        difference_ms("ocicache", "bare", None),
        most("ocicache", "registry requests", None),
        peak_rss()], repeat=3)


# =====================================================================================
# Shapes (issue 19)
#
# Images and caches shaped like real ones: a layer of 200,000 small files with a layer
# over it, 100 layers of 1 MiB, 500 tiny layers, an index of 8 platforms, a 65 KB
# multi-arch image, caches of 20,000 and 5,000 names. Each follows from the seed, is
# built the first time a case asks for it and is kept for the rest of the run in the run's
# work directory. Flatten and name cases read a cache laid out directly (blobs linked
# from the build, index.json as ocicache writes it); pull cases read an upload to the
# registry. Layer contents are incompressible, like the main image's (small files are hex
# text), and compressed at level 1 to keep the build short.
# =====================================================================================

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
SHAPE_HOST = "bench.local"         # the host of names in caches laid out directly
SMALL_FILES = 200_000
FEW_SMALL_FILES = 50_000           # the same shape at a quarter: is the cost linear?
SMALL_FILES_PER_DIRECTORY = 1000
SMALL_FILE_MAX = 4096              # sizes are 0 to 4 KiB
NAMES = 20_000
FEW_NAMES = 5_000
NAMES_SHARED_LAYERS = 100          # every name's image has 3 of these and its own config
PLATFORMS = [("amd64", ""), ("arm64", ""), ("arm", "v7"), ("arm", "v6"), ("386", ""),
             ("ppc64le", ""), ("s390x", ""), ("riscv64", "")]
SMALL_INDEX_PLATFORMS = 4          # the 65 KB multi-arch image: 2 layers of 7.5 KB each
SMALL_INDEX_FILE = 7500


@dataclasses.dataclass(frozen=True)
class Shape:
    """A built image: its layers and configs, then its manifests and indexes, children
    before the index that lists them, the root last."""

    blobs: List[Blob]
    manifests: List[Blob]
    layers: List[Blob]
    entries: int = 0               # tar entries in all layers

    @property
    def root(self) -> Blob:
        return self.manifests[-1]

    @property
    def size(self) -> int:
        return sum(blob.size for blob in [*self.blobs, *self.manifests])


LayerBuild = Tuple[Blob, str, int]   # what _write_layer returns


def _platform(architecture: str, variant: str) -> Dict[str, str]:
    return {"architecture": architecture, "os": "linux", **({"variant": variant} if variant else {})}


def _image_blobs(directory: str, layers: Sequence[LayerBuild], platform: Dict[str, str],
                 label: str = "") -> Tuple[Blob, Blob]:
    """The config and the manifest of an image of ``layers``."""
    config = _write_json_blob(directory, MEDIA_CONFIG, {
        **platform, "config": {"Labels": {"bench": label}} if label else {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id, _ in layers]}})
    manifest = _write_json_blob(directory, MEDIA_MANIFEST, {
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config.descriptor(),
        "layers": [layer.descriptor() for layer, _, _ in layers]})
    return config, manifest


def _files_layer(directory: str, files: Sequence[Tuple[str, bytes]]) -> LayerBuild:
    def fill(writer: _LayerWriter) -> None:
        for name, data in files:
            writer.add_file(name, iter([data]), len(data))
    return _write_layer(directory, fill, level=1)


def _incompressible_bytes(seed: bytes, size: int) -> bytes:
    return b"".join(incompressible(SEED + b"/" + seed, size))


def _single_image(directory: str, layers: Sequence[LayerBuild], entries: int = 0) -> Shape:
    config, manifest = _image_blobs(directory, layers, _platform("amd64", ""))
    blobs = [layer for layer, _, _ in layers]
    return Shape([*blobs, config], [manifest], blobs, entries)


def _small_file_path(number: int) -> str:
    directory, item = divmod(number, SMALL_FILES_PER_DIRECTORY)
    return f"usr/share/bench/d{directory:03d}/f{item:03d}"


def build_small_files(directory: str, count: int = SMALL_FILES) -> Shape:
    """A layer of ``count`` files of 0 to 4 KiB in directories of 1,000, and a layer
    over it that deletes every 20th file (a whiteout) and replaces the 10th after each:
    10 % of the files, half of them gone, half of them new. The files are hex text, which
    gzip halves, so that reading the layers costs what it does for real files."""
    os.makedirs(directory, exist_ok=True)
    pool = hashlib.shake_256(SEED + b"/pool").hexdigest(MIB // 2).encode()

    def content(number: int, generation: int) -> bytes:
        size = (number * 2654435761 + generation * 40503) % (SMALL_FILE_MAX + 1)
        offset = (number * 7919 + generation * 104729) % (len(pool) - SMALL_FILE_MAX)
        return pool[offset:offset + size]

    def base(writer: _LayerWriter) -> None:
        for parent in ("usr/", "usr/share/", "usr/share/bench/"):
            writer.add_directory(parent)
        for number in range(count):
            if number % SMALL_FILES_PER_DIRECTORY == 0:
                writer.add_directory(_small_file_path(number).rsplit("/", 1)[0] + "/")
            data = content(number, 0)
            writer.add_file(_small_file_path(number), iter([data]), len(data))

    def upper(writer: _LayerWriter) -> None:
        for number in range(0, count, 10):
            if number % 20 == 0:
                parent, name = _small_file_path(number).rsplit("/", 1)
                writer.add_file(f"{parent}/.wh.{name}", iter([]), 0)
            else:
                data = content(number, 1)
                writer.add_file(_small_file_path(number), iter([data]), len(data))

    layers = [_write_layer(directory, base, level=1), _write_layer(directory, upper, level=1)]
    directories = 3 + -(-count // SMALL_FILES_PER_DIRECTORY)
    return _single_image(directory, layers, count + directories + -(-count // 10))


def build_layers(directory: str, count: int, size: int) -> Shape:
    """``count`` layers of one incompressible file of ``size`` bytes each."""
    os.makedirs(directory, exist_ok=True)
    layers = [_files_layer(directory, [(f"data/layer-{n:03d}",
                                        _incompressible_bytes(b"layer/%d" % n, size))])
              for n in range(count)]
    return _single_image(directory, layers, count)


def build_tiny_layers(directory: str, count: int) -> Shape:
    """``count`` layers of one short text file each, like a Dockerfile's RUN steps."""
    os.makedirs(directory, exist_ok=True)
    layers = [_files_layer(directory, [(f"etc/tiny/{n:03d}.conf",
                                        f"step {n} of {count}\n".encode())])
              for n in range(count)]
    return _single_image(directory, layers, count)


def build_index(directory: str, platforms: Sequence[Tuple[str, str]], layers: int,
                size: int) -> Shape:
    """An index of one image per platform, each of ``layers`` layers holding one
    incompressible file of ``size`` bytes."""
    os.makedirs(directory, exist_ok=True)
    blobs: List[Blob] = []
    children: List[Tuple[Blob, Dict[str, str]]] = []
    for architecture, variant in platforms:
        platform = _platform(architecture, variant)
        built = [_files_layer(directory, [(f"data/{architecture}{variant}-{n}", _incompressible_bytes(
            f"{architecture}{variant}/{n}".encode(), size))]) for n in range(layers)]
        config, manifest = _image_blobs(directory, built, platform)
        blobs += [*(layer for layer, _, _ in built), config]
        children.append((manifest, platform))
    index = _write_json_blob(directory, MEDIA_INDEX, {
        "schemaVersion": 2, "mediaType": MEDIA_INDEX,
        "manifests": [{**manifest.descriptor(), "platform": platform}
                      for manifest, platform in children]})
    layer_blobs = [b for b in blobs if b.media_type == MEDIA_LAYER_GZIP]
    return Shape(blobs, [*(m for m, _ in children), index], layer_blobs, len(layer_blobs))


def write_layout(cache: str, entries: Sequence[Tuple[str, Blob]]) -> bytes:
    """Make ``cache`` an OCI layout naming ``entries``; returns index.json's bytes.

    index.json is written as ocicache writes it (3-space indent, as linuxkit does)."""
    os.makedirs(os.path.join(cache, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(cache, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    index = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [
        {**blob.descriptor(), "annotations": {REF_NAME: name}} for name, blob in entries]},
        indent=3).encode()
    with open(os.path.join(cache, "index.json"), "wb") as f:
        f.write(index)
    return index


def shape_cache(cache: str, shape: Shape, name: str) -> str:
    """A cache holding ``shape`` (its blobs hard-linked) named ``name``; returns ``cache``."""
    write_layout(cache, [(name, shape.root)])
    for blob in [*shape.blobs, *shape.manifests]:
        target = os.path.join(cache, "blobs", *blob.digest.split(":"))
        if not os.path.exists(target):
            os.link(blob.path, target)
    return cache


@dataclasses.dataclass(frozen=True)
class NamesCache:
    """A cache of many names, each an image with its own manifest and config and 3 layers
    shared with others; one name in the middle is the one cases pull, remove or rename."""

    cache: str
    names: List[str]
    roots: List[Blob]
    index: bytes                   # index.json as built
    blobs: List[Tuple[str, bytes]]   # path and bytes of every blob of the middle name

    @property
    def middle(self) -> int:
        return len(self.names) // 2

    def restore(self) -> None:
        """Undo what a case's run changed: index.json and the middle name's blobs (linuxkit
        cache rm deletes its shared layers too)."""
        temp = os.path.join(self.cache, "index.json.bench")
        with open(temp, "wb") as f:
            f.write(self.index)
        os.replace(temp, os.path.join(self.cache, "index.json"))
        for path, data in self.blobs:
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.write(data)


def build_names_cache(cache: str, host: str, count: int) -> NamesCache:
    """``count`` names ``<host>/names/n<i>:1`` of single-platform images."""
    blobs = os.path.join(cache, "blobs", "sha256")
    os.makedirs(blobs)
    shared = [_files_layer(blobs, [(f"etc/shared/{n}", f"shared layer {n}\n".encode())])
              for n in range(NAMES_SHARED_LAYERS)]
    names, roots = [], []
    middle: List[Tuple[str, bytes]] = []
    for number in range(count):
        layers = [shared[(number + 7 * k) % NAMES_SHARED_LAYERS] for k in range(3)]
        config, manifest = _image_blobs(blobs, layers, _platform("amd64", ""), f"n{number}")
        names.append(f"{host}/names/n{number:05d}:1")
        roots.append(manifest)
        if number == count // 2:
            middle = [(blob.path, _read_bytes(blob.path))
                      for blob in (config, manifest, *(layer for layer, _, _ in layers))]
    index = write_layout(cache, list(zip(names, roots)))
    return NamesCache(cache, names, roots, index, middle)


def _durable(sample: Sample) -> Sample:
    """The run's time and that of a sync after it: what it takes for the pull to be on disk
    (ocicache fsyncs; linuxkit and skopeo leave it to the kernel)."""
    started = time.perf_counter()
    os.sync()
    sample.seconds += time.perf_counter() - started
    return sample


def _counting(bench: Bench, run: Callable[[], Sample]) -> Sample:
    """``run``'s sample, with the registry requests it made."""
    before = bench.registry.requests()
    sample = run()
    sample.extra["registry requests"] = bench.registry.requests() - before
    return sample


def _uploaded(bench: Bench, key: str, build: Callable[[str], Shape]) -> Tuple[Shape, str]:
    """The shape ``key`` (built once for every case that reads it) uploaded to the
    registry; returns it and its name there."""
    shape: Shape = bench.fixture(key, lambda: build(bench.path(os.path.join("shapes", key))))
    children = [(m, m.digest) for m in shape.manifests[:-1]]
    bench.fixture(f"{key} upload", lambda: upload_blobs(
        bench.registry, f"shapes/{key}", shape.blobs, [*children, (shape.root, TAG)]))
    return shape, f"{bench.registry.host}/shapes/{key}:{TAG}"


def _pull_case(bench: Bench, name: str, key: str, build: Callable[[str], Shape],
               which: Sequence[str], target: float, with_bare: bool = False) -> Case:
    """A durable pull of shape ``key`` into an empty cache: ocicache with ``which``
    (--platform or --all-platforms) vs linuxkit cache pull (every platform) vs skopeo."""
    shape, ref = _uploaded(bench, key, build)
    all_platforms = len(shape.manifests) > 1

    def fresh(directory: str, run: Callable[[str], Sample]) -> Sample:
        target_dir = bench.path(directory)
        remove(target_dir)
        sample = _counting(bench, lambda: _durable(run(target_dir)))
        remove(target_dir)
        return sample

    def ocicache() -> Sample:
        return fresh("pull-ocicache", lambda d: bench.ocicache("pull", *which, ref, cache=d))

    def linuxkit(tool: str) -> Sample:
        return fresh("pull-linuxkit", lambda d: Sample(bench.run(
            tool, "cache", "pull", "--cache", d, ref)))

    def skopeo(tool: str) -> Sample:
        return fresh("pull-skopeo", lambda d: Sample(bench.run(
            tool, "copy", "--src-tls-verify=false", *(["--all"] if all_platforms else []),
            f"docker://{ref}", f"oci:{d}:bench")))

    contenders: Dict[str, Callable[[], Sample]] = {"ocicache": ocicache}
    _with_tool(bench, "linuxkit", contenders, linuxkit)
    _with_tool(bench, "skopeo", contenders, skopeo)
    checks = [ratio("ocicache", "linuxkit", target), ratio("ocicache", "skopeo", None)]
    if with_bare:
        contenders["bare"] = lambda: bare_start(bench)
        checks.append(difference_ms("ocicache", "bare", None))
    checks += [most("ocicache", "registry requests", None),
               most("linuxkit", "registry requests", None), peak_rss()]
    return Case(name, contenders, checks)


def pull_layers(bench: Bench) -> Case:
    """100 layers of 1 MiB, durable."""
    return _pull_case(bench, "pull 100x1MiB", "layers",
                      lambda d: build_layers(d, 100, MIB), ["--platform", "amd64"],
                      TARGET_PULL_VS_LINUXKIT)


def pull_tiny_layers(bench: Bench) -> Case:
    """500 layers of a few bytes, durable."""
    return _pull_case(bench, "pull 500 tiny", "tiny", lambda d: build_tiny_layers(d, 500),
                      ["--platform", "amd64"], TARGET_PULL_VS_LINUXKIT)


def pull_platforms(bench: Bench) -> Case:
    """An index of 8 platforms of 5 layers of 64 KiB, every platform, durable."""
    return _pull_case(bench, "pull 8 platforms", "platforms",
                      lambda d: build_index(d, PLATFORMS, 5, 64 * 1024), ["--all-platforms"],
                      TARGET_PULL_VS_LINUXKIT)


def pull_small_index(bench: Bench) -> Case:
    """A 65 KB multi-arch image (4 platforms of 2 layers), every platform: round trips."""
    return _pull_case(bench, "pull 65KB index", "small-index",
                      lambda d: build_index(d, PLATFORMS[:SMALL_INDEX_PLATFORMS], 2,
                                            SMALL_INDEX_FILE),
                      ["--all-platforms"], TARGET_SMALL_PULL_VS_LINUXKIT, with_bare=True)


SYNC_TAGS = 20                 # tags of the repository the sync cases mirror
SYNC_LAYER = 256 * 1024        # each tag's own layer, beside one shared 1 MiB layer


def _sync_repository(bench: Bench) -> str:
    """shapes/sync in the registry, SYNC_TAGS images sharing a base layer (built and
    uploaded once); returns the repository's name."""
    def build() -> List[Tuple[List[Blob], Blob]]:
        directory = bench.path(os.path.join("shapes", "sync"))
        os.makedirs(directory, exist_ok=True)
        base = _files_layer(directory, [("usr/lib/base", _incompressible_bytes(b"base", MIB))])
        images = []
        for n in range(SYNC_TAGS):
            own = _files_layer(directory, [(f"app/{n}", _incompressible_bytes(b"sync/%d" % n,
                                                                              SYNC_LAYER))])
            config, manifest = _image_blobs(directory, [base, own], _platform("amd64", ""))
            images.append(([base[0], own[0], config], manifest))
        return images

    def send() -> None:
        for n, (blobs, manifest) in enumerate(images):
            upload_blobs(bench.registry, "shapes/sync", blobs, [(manifest, f"1.{n}.0")])

    images = bench.fixture("sync", build)
    bench.fixture("sync upload", send)
    return f"{bench.registry.host}/shapes/sync"


def _sync_contenders(bench: Bench, fresh: bool) -> Dict[str, Callable[[], Sample]]:
    """ocicache sync of every tag (a semver range) into the second registry, through an
    empty cache, vs skopeo sync docker to docker of the same repository; ``fresh``
    empties the target before each run, else it holds every image already."""
    source, target = _sync_repository(bench), bench.push_target

    def ocicache() -> Sample:
        if fresh:
            target.reset()  # on a new port: the file is written after
        path, staging = bench.path("sync.json"), bench.path("sync-cache")
        with open(path, "w") as f:
            json.dump({"target": f"{target.host}/mirror", "images": [
                {"source": source, "tags": {"semver": ">=1 <2"}}]}, f)
        remove(staging)
        before = target.requests()
        sample = bench.ocicache("sync", path, cache=staging)
        sample.extra["registry requests"] = target.requests() - before
        remove(staging)
        return sample

    def skopeo(tool: str) -> Sample:
        if fresh:
            target.reset()
        before = target.requests()
        sample = Sample(bench.run(tool, "sync", "--src", "docker", "--dest", "docker",
                                  "--src-tls-verify=false", "--dest-tls-verify=false",
                                  source, f"{target.host}/mirror"))
        sample.extra["registry requests"] = target.requests() - before
        return sample

    contenders: Dict[str, Callable[[], Sample]] = {"ocicache": ocicache}
    _with_tool(bench, "skopeo", contenders, skopeo)
    return contenders


def sync(bench: Bench) -> Case:
    """SYNC_TAGS tags of a repository into an empty second registry."""
    return Case(f"sync {SYNC_TAGS} tags", _sync_contenders(bench, True), [
        ratio("ocicache", "skopeo", None), most("ocicache", "registry requests", None),
        most("skopeo", "registry requests", None), peak_rss()])


def resync(bench: Bench) -> Case:
    """The same sync again, the target holding every image: one HEAD per tag each side
    for ocicache; skopeo sync looks at every blob and writes every manifest again."""
    bench.push_target.reset()
    contenders = _sync_contenders(bench, False)
    for run in contenders.values():  # both mirrors land in the target, which then stays
        run()
    return Case(f"re-sync {SYNC_TAGS} tags", contenders, [
        ratio("ocicache", "skopeo", None), most("ocicache", "registry requests", None),
        most("skopeo", "registry requests", None), peak_rss()])


def per_entry_us(a: str, b: str, entries: int) -> Check:
    """(median(a) - median(b)) / entries, in microseconds."""
    def evaluate(r: CaseResult) -> Tuple[float, str, str]:
        return ((r.median(a) - r.median(b)) / entries * 1e6, _seconds(r.median(a)),
                f"{b} {_seconds(r.median(b))}, {entries} entries")
    return Check(f"({a} - {b}) / entry", (a, b), evaluate, "us", None)


def _flatten_shape(bench: Bench, key: str, build: Callable[[str], Shape]) -> Tuple[Shape, Dict[str, Callable[[], Sample]]]:
    name = f"{SHAPE_HOST}/shapes/{key}:{TAG}"
    shape = bench.fixture(key, lambda: build(bench.path(os.path.join("shapes", key))))
    cache = bench.fixture(f"{key} cache", lambda: shape_cache(
        bench.path(os.path.join("shapes", f"{key}-cache")), shape, name))
    return shape, _flatten_contenders(bench, cache, name, [layer.path for layer in shape.layers])


def flatten_small_files(bench: Bench) -> Case:
    """A layer of 200,000 files of 0-4 KiB and one deleting or replacing 10 % of them;
    ocicache also on the same shape of 50,000 files, for how the cost grows."""
    shape, contenders = _flatten_shape(bench, "small-files", build_small_files)
    _, few = _flatten_shape(bench, "few-small-files",
                            lambda d: build_small_files(d, FEW_SMALL_FILES))
    few_name = f"ocicache {FEW_SMALL_FILES // 1000}k"
    contenders[few_name] = few["ocicache"]
    contenders["bare"] = lambda: bare_start(bench)
    return Case("flatten 200k files", contenders, [
        ratio("ocicache", "linuxkit", TARGET_SMALL_FILES_VS_LINUXKIT),
        ratio("ocicache", "umoci", None),
        ratio("ocicache", "zlib limit", None),
        per_entry_us("ocicache", "bare", shape.entries),
        ratio("ocicache", few_name, SMALL_FILES / FEW_SMALL_FILES),
        peak_rss()])


def flatten_layers(bench: Bench) -> Case:
    """100 layers of 1 MiB (the pull case's image, in a cache of its own)."""
    _, contenders = _flatten_shape(bench, "layers", lambda d: build_layers(d, 100, MIB))
    return Case("flatten 100x1MiB", contenders, [
        ratio("ocicache", "linuxkit", TARGET_FLATTEN_VS_LINUXKIT),
        ratio("ocicache", "umoci", None),
        ratio("ocicache", "zlib limit", None),
        peak_rss()])


FEW = f" {FEW_NAMES // 1000}k"     # the contenders on the cache of FEW_NAMES names

# Names ``sys.argv[3]`` as the descriptor in ``sys.argv[4]`` in the cache ``sys.argv[2]``
# with the library call linuxkit's Go code makes (DescriptorWrite); there is no command.
_DESCRIPTOR_WRITE = """\
import json, sys, ocicache
ocicache.Provider(sys.argv[1]).descriptor_write(sys.argv[2], json.loads(sys.argv[3]))
"""


def _names_case(bench: Bench, name: str, ocicache: Callable[[NamesCache], Sample],
                linuxkit: Optional[Callable[[str, NamesCache], Sample]],
                checks: List[Check], with_bare: bool = False, repeat: int = 1) -> Case:
    """A case on the caches of NAMES and FEW_NAMES names, restored after every run."""
    many = bench.fixture("names", lambda: build_names_cache(
        bench.path("names-cache"), bench.registry.host, NAMES))
    few = bench.fixture("few names", lambda: build_names_cache(
        bench.path("few-names-cache"), bench.registry.host, FEW_NAMES))

    def restoring(run: Callable[[], Sample], names: NamesCache) -> Callable[[], Sample]:
        def contender() -> Sample:
            try:
                return run()
            finally:
                names.restore()
        return contender

    contenders: Dict[str, Callable[[], Sample]] = {
        "ocicache": restoring(lambda: ocicache(many), many),
        f"ocicache{FEW}": restoring(lambda: ocicache(few), few)}
    tool = bench.tools.get("linuxkit")
    if linuxkit is not None and tool is not None:
        contenders["linuxkit"] = restoring(lambda: linuxkit(tool, many), many)
        contenders[f"linuxkit{FEW}"] = restoring(lambda: linuxkit(tool, few), few)
    if with_bare:
        contenders["bare"] = lambda: bare_start(bench)
    return Case(name, contenders, checks, repeat=repeat)


def _ls_case(bench: Bench, name: str, *options: str) -> Case:
    return _names_case(
        bench, name, lambda n: bench.ocicache("ls", *options, cache=n.cache),
        lambda tool, n: Sample(bench.run(tool, "cache", "ls", "--cache", n.cache)), [
            ratio("ocicache", "linuxkit", TARGET_LS_VS_LINUXKIT),
            ratio(f"ocicache{FEW}", f"linuxkit{FEW}", TARGET_LS_VS_LINUXKIT),
            ratio("ocicache", f"ocicache{FEW}", None),
            peak_rss()])


def names_ls(bench: Bench) -> Case:
    """``ls`` of a cache of 20,000 (and 5,000) names vs linuxkit cache ls."""
    return _ls_case(bench, "names ls")


def names_ls_json(bench: Bench) -> Case:
    """``ls --json`` of the same caches vs linuxkit cache ls (it has no JSON)."""
    return _ls_case(bench, "names ls --json", "--json")


def names_warm_pull(bench: Bench) -> Case:
    """A pull of one name the cache holds complete: no request, little past the start."""
    def ocicache(names: NamesCache) -> Sample:
        return _counting(bench, lambda: bench.ocicache(
            "pull", "--platform", "amd64", names.names[names.middle], cache=names.cache))
    return _names_case(bench, "names warm pull", ocicache, None, [
        difference_ms("ocicache", "bare", TARGET_WARM_PULL_MS),
        difference_ms(f"ocicache{FEW}", "bare", TARGET_WARM_PULL_MS),
        most("ocicache", "registry requests", 0),
        peak_rss()], with_bare=True, repeat=3)


def _name_write_checks() -> List[Check]:
    return [wall_ms("ocicache", TARGET_NAME_WRITE_MS),
            wall_ms(f"ocicache{FEW}", TARGET_NAME_WRITE_MS),
            ratio("ocicache", f"ocicache{FEW}", None),
            difference_ms("ocicache", "bare", None)]


def names_rm(bench: Bench) -> Case:
    """``rm`` of one name (and the blobs only it uses) vs linuxkit cache rm."""
    return _names_case(
        bench, "names rm",
        lambda n: bench.ocicache("rm", n.names[n.middle], cache=n.cache),
        lambda tool, n: Sample(bench.run(tool, "cache", "rm", "--cache", n.cache,
                                         n.names[n.middle])),
        [*_name_write_checks(), ratio("ocicache", "linuxkit", None), peak_rss()],
        with_bare=True)


def names_descriptor_write(bench: Bench) -> Case:
    """``Provider.descriptor_write`` of one name (pointing it at its neighbour's image)."""
    def ocicache(names: NamesCache) -> Sample:
        descriptor = json.dumps(names.roots[names.middle + 1].descriptor())
        return Sample(bench.run(PYTHON, "-c", _DESCRIPTOR_WRITE, names.cache,
                                names.names[names.middle], descriptor, cwd=HERE))
    return _names_case(bench, "names desc write", ocicache, None, _name_write_checks(),
                       with_bare=True)


def _linear_case(bench: Bench, name: str, *args: str) -> Case:
    return _names_case(bench, name, lambda n: bench.ocicache(*args, cache=n.cache), None, [
        wall_ms("ocicache", None),
        ratio("ocicache", f"ocicache{FEW}", TARGET_NAMES_LINEAR),
        peak_rss()])


def names_gc(bench: Bench) -> Case:
    """``gc --dry-run``: linear in blobs, so 20,000 names cost at most 4 times 5,000."""
    return _linear_case(bench, "names gc -n", "gc", "--dry-run")


def names_verify(bench: Bench) -> Case:
    """``verify``: linear in blobs, so 20,000 names cost at most 4 times 5,000."""
    return _linear_case(bench, "names verify", "verify")


PULL_CASES: List[Callable[[Bench], Case]] = [cold_pull, warm_pull, warm_pull_script]
PUSH_CASES: List[Callable[[Bench], Case]] = [push, repush, copy]
EXPORT_CASES: List[Callable[[Bench], Case]] = [docker_export, oci_export, flatten]
MAIN_CASES = [*PULL_CASES, *PUSH_CASES, *EXPORT_CASES, import_time]  # read the main image
NAME_CASES: List[Callable[[Bench], Case]] = [
    names_ls, names_ls_json, names_warm_pull, names_rm, names_descriptor_write, names_gc,
    names_verify]
SHAPE_CASES: List[Callable[[Bench], Case]] = [
    flatten_small_files, flatten_layers, *NAME_CASES, pull_layers, pull_tiny_layers,
    pull_platforms, pull_small_index, sync, resync]
CASES = [*MAIN_CASES, *SHAPE_CASES]
# Names --only takes for several cases at once.
GROUPS = {"main": MAIN_CASES, "shapes": SHAPE_CASES, "names": NAME_CASES}


# =====================================================================================
# Report
# =====================================================================================

def _format_value(value: Optional[float], unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "":
        return f"{value:.0f}"
    return f"{value:.1f} {unit}"


def print_table(rows: Sequence[Row]) -> None:
    header = ("case", "measure", "ocicache", "compared with", "value", "target", "")
    lines = [header] + [
        (row.case, row.measure, row.ocicache, row.reference,
         _format_value(row.value, row.unit),
         "" if row.target is None else f"<= {_format_value(row.target, row.unit)}",
         row.result) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


# What each reference in the table is, for the reader of the table and of the JSON.
NOTES = {
    "limit": f"http.client GETs of the manifest, then of the blobs "
             f"{PULL_JOBS} at a time, largest first (ocicache's schedule), sha256 while "
             "writing, fsync and rename; in the benchmark process (no interpreter start)",
    "skopeo": "skopeo copy: docker:// to oci: for the pull; oci: (the ocicache cache) to "
              "docker:// (a second registry, emptied before each run) for the push, docker:// "
              "to docker:// (the same two registries) for the copy, and to "
              "docker-archive: or oci-archive: for the exports; skopeo sync --src docker "
              "--dest docker of the whole repository for the sync cases (registry requests: "
              "those the target registry logged)",
    "cp": "cp --reflink=never of the image's blobs (layers, config, manifest) out of the "
          "cache: the bytes a docker or OCI tar holds",
    "umoci": "umoci unpack of the image in the ocicache cache to a bundle directory",
    "linuxkit": "linuxkit (Go; $LINUXKIT, else on PATH) on the same cache: cache export "
                "--format filesystem, cache ls, cache rm; cache pull into an empty cache "
                "(every platform, as it always does)",
    "durable": "pull cases time the command and a sync(2) after it, for every contender",
    "names": f"caches of {NAMES} and {FEW_NAMES} names (contenders marked{FEW}), each an "
             f"image with its own manifest and config and 3 of {NAMES_SHARED_LAYERS} shared "
             "layers; index.json and the removed blobs are restored after every run",
    "zlib limit": "zlib decompression of every layer in the cache to /dev/null, 256 KiB in "
                  "and at most 256 KiB out per call (the fastest measured), in the "
                  "benchmark process",
    "bare": "python3 -c pass: a bare interpreter start, same interpreter and environment",
    "bare -S": "python3 -S -c pass: the same start without site (no site-packages, no .pth "
               "file run): bare minus this is what site costs every Python start here",
    "ocicache": "python3 -m ocicache ARGS from ocicache.py's directory (bytecode cached), as "
                "README recommends running it, through a wrapper that reads its peak RSS "
                "(VmHWM); pulls count registry requests in the registry's access log",
    "ocicache first": "the export when the cache has no record of checked blobs (as in a "
                      "cache linuxkit or another user wrote): every blob is hashed beside "
                      "the copy; ocicache is the export after ocicache's own pull",
    "ocicache.py": "python3 ocicache.py ARGS (compiled from source on every run, as a script "
                   "is), through the same wrapper",
    "compile only": "python3 -c 'compile(ocicache.py)': an interpreter start that compiles "
                    "ocicache.py and runs nothing, the floor of any python3 ocicache.py run",
}


def _command_output(argv: Sequence[str]) -> str:
    """The first line a command prints, such as its version."""
    result = subprocess.run(list(argv), capture_output=True, timeout=30)
    return ((result.stdout or result.stderr).decode(errors="replace").strip() or "?") \
        .splitlines()[0]


def write_json(path: str, args: argparse.Namespace, bench: Bench,
               results: Sequence[Tuple[Case, CaseResult]], rows: Sequence[Row],
               seconds: float) -> None:
    with open(OCICACHE, "rb") as f:
        ocicache_sha256 = hashlib.sha256(f.read()).hexdigest()
    tools = {"docker-registry": bench.registry.binary, **bench.tools}
    report = {
        "parameters": {"size_mib": args.size_mib, "rounds": args.rounds},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": PYTHON, "python_version": platform.python_version()},
        "versions": {"ocicache": _command_output([PYTHON, OCICACHE, "--version"]),
                     "ocicache.py sha256": ocicache_sha256,
                     **{name: _command_output([tool, "version" if name == "linuxkit"
                                               else "--version"])
                        for name, tool in tools.items() if tool is not None and name != "cp"}},
        "image": None if bench.main_image is None else {
            "manifest": bench.image.manifest.digest,
            "layers": [layer.descriptor() for layer in bench.image.layers],
            "big_layer_tar_size": bench.image.big_layer_tar_size},
        "shapes": {key: {"root": value.root.digest, "size": value.size,
                         "layers": len(value.layers), "entries": value.entries}
                   for key, value in bench.fixtures.items() if isinstance(value, Shape)},
        "notes": NOTES,
        "cases": {case.name: {name: {"median_seconds": result.median(name),
                                     "samples": [dataclasses.asdict(s) for s in samples]}
                              for name, samples in result.samples.items()}
                  for case, result in results},
        "checks": [{**dataclasses.asdict(row), "result": row.result} for row in rows],
        "seconds": seconds,
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


# =====================================================================================
# Command line
# =====================================================================================

def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _case_names(value: str) -> List[str]:
    names = [name for name in value.split(",") if name]
    unknown = [name for name in names
               if name not in GROUPS and name not in {f.__name__ for f in CASES}]
    if unknown:
        raise argparse.ArgumentTypeError(f"no case named {', '.join(unknown)}")
    return [case for name in names
            for case in ([f.__name__ for f in GROUPS[name]] if name in GROUPS else [name])]


def _tool(name: str) -> Optional[str]:
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}")
                                  else None)


def measure(args: argparse.Namespace, registry_binary: str, tools: Dict[str, Optional[str]],
            work: str) -> Tuple[Bench, List[Tuple[Case, CaseResult]]]:
    """Build the image (when a case reads it), serve it, and run every case in ``work``."""
    factories = [f for f in CASES if not args.only or f.__name__ in args.only]
    image = None
    if any(f in MAIN_CASES for f in factories):
        started = time.monotonic()
        image = build_image(os.path.join(work, "image"), args.size_mib * MIB)
        print(f"image built in {time.monotonic() - started:.0f} s: a {args.size_mib} MiB "
              f"layer (gzip/tar {image.layers[0].size / image.big_layer_tar_size:.4f}) and "
              f"{SMALL_LAYERS} small ones", file=sys.stderr, flush=True)
    registry = Registry(registry_binary, os.path.join(work, "registry"),
                        child_environment(os.path.join(work, "pycache")))
    push_target = Registry(registry_binary, os.path.join(work, "push-registry"),
                           child_environment(os.path.join(work, "pycache")))
    registry.start()
    try:
        push_target.start()
        if image is not None:
            upload(registry, image)
            shutil.rmtree(os.path.join(work, "image"))  # the registry has the bytes now
        bench = Bench(work, registry, image, push_target, tools)
        # The first run on any machine writes the bytecode cache; no timed run pays it.
        bench.run(PYTHON, "-c", "import ocicache", cwd=HERE)
        if image is not None and cold_pull not in factories:
            bench.ocicache("pull", "--platform", "amd64", bench.ref)  # what the rest reads
        results = []
        for factory in factories:
            case = factory(bench)
            results.append((case, case.run(args.rounds)))
        return bench, results
    finally:
        push_target.stop()
        registry.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    # The limits run in this process: at glibc malloc's best, as ocicache's command line
    # sets it up (see ocicache._raise_malloc_thresholds), not at whatever the blocks
    # allocated so far make of it.
    bytes(16 * MIB)
    parser = argparse.ArgumentParser(
        prog="bench_ocicache.py", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=_positive, default=1024,
                        help="size of the big layer in MiB (default 1024)")
    parser.add_argument("--rounds", type=_positive, default=3,
                        help="rounds of every case (default 3)")
    parser.add_argument("--json", default=DEFAULT_JSON, metavar="FILE",
                        help=f"where to write the results (default {DEFAULT_JSON})")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="where to make the temporary work directory, which needs "
                             "about 5 times --size-mib free (default: $TMPDIR)")
    parser.add_argument("--only", type=_case_names, default=[], metavar="CASES",
                        help="run only these cases, comma-separated: "
                             f"{', '.join(f.__name__ for f in CASES)}; or the groups "
                             f"{', '.join(GROUPS)}")
    args = parser.parse_args(argv)

    registry_binary = _tool("docker-registry")
    if registry_binary is None:
        print("bench_ocicache: error: docker-registry is not installed (make deps installs "
              "it)", file=sys.stderr)
        return 1
    tools = {name: _tool(name) for name in ("skopeo", "umoci", "cp")}
    # linuxkit (Go) is the anchor of issue 19's targets: $LINUXKIT, else one on PATH.
    tools["linuxkit"] = os.environ.get("LINUXKIT") or _tool("linuxkit")
    for name, path in tools.items():
        if path is None:
            print(f"bench_ocicache: {name} is not installed; its rows are skipped",
                  file=sys.stderr)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="ocicache-bench-", dir=args.workdir) as work:
            bench, results = measure(args, registry_binary, tools, work)
    except (BenchError, OSError, subprocess.TimeoutExpired) as e:
        print(f"bench_ocicache: error: {e}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    rows = [check.row(case.name, result) for case, result in results for check in case.checks]
    rounds = f"{args.rounds} round{'s' if args.rounds > 1 else ''}"
    image = "shapes only" if bench.main_image is None else f"a {args.size_mib} MiB layer"
    print(f"\nocicache benchmark: {image}, medians of {rounds}, "
          f"{os.cpu_count()} CPUs, {seconds:.0f} s in all\n")
    print_table(rows)
    print()
    for name, note in NOTES.items():
        print(f"{name}: {note}")
    write_json(args.json, args, bench, results, rows, seconds)
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
