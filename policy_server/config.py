"""One configuration object, filled with the precedence CLI > environment > defaults.

Every field ``name`` has an environment variable ``POLICY_SERVER_NAME`` and a CLI flag
``--name`` (underscores become dashes). The launcher turns the merged config back into
environment variables, so gunicorn workers read the same values with ``from_env()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from policy_server.contract import MODEL_NAME_PATTERN
from policy_server.errors import ConfigError
from policy_server.key_files import read_key_file

ENV_PREFIX = "POLICY_SERVER_"
# Measured with benchmarks/bench_serving.py on 2 CPU cores (default policy, 16 clients):
# cap 4 gave 441 req/s and p99/p50 1.85, cap 8 429 req/s and 2.61, cap 16 380 req/s and 5.7.
AUTO_BATCH_CPU = 4
AUTO_BATCH_CUDA = 16
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _opt(default, help: str, kind: type | None = None):
    return field(default=default, metadata={"help": help, "kind": kind or type(default)})


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server instance (all of its gunicorn workers)."""

    model_path: str = _opt("models/default", "model directory following the models/ contract; seeds the store")
    model_name: str = _opt("default", "name of the default model in the store (what /infer serves)")
    model_store: str = _opt(
        "model-store", "model store directory shared by all workers and instances ('' = no store, no hot reload)"
    )
    model_root: str = _opt("models", "/update_model and /models/<name>/load accept model_path only inside this")
    store_keep: int = _opt(5, "versions kept per model in the store (rollback targets)")
    store_poll_ms: int = _opt(100, "how often each worker checks the store for a new current version")
    retain_previous_s: float = _opt(
        60.0, "seconds every worker keeps serving a superseded version (the previous stable one, an ended canary) "
        "after the last request pinned to it (X-Model-Version) on any worker sharing the store; 0 = unload at once"
    )
    # Safe updates: the default wait, and bounds on what one update may stage.
    update_wait_s: float = _opt(
        10.0, "how long /update_model, load and unload wait by default for every worker of this instance to "
        "serve the new state before answering (wait_s overrides it; 0 = answer at once)"
    )
    stage_max_files: int = _opt(10_000, "most regular files one model directory may hold (413 above)")
    stage_max_bytes: int = _opt(16 << 30, "most bytes one model directory may hold (413 above)")
    admin_key: str | None = _opt(
        None, "key required in X-Admin-Key by /update_model and model management (else the API key rules)", str
    )
    admin_key_file: str | None = _opt(
        None, "file holding the admin key (a mounted secret; trailing newlines stripped); not with admin_key", str
    )
    max_update_bytes: int = _opt(1 << 30, "largest accepted /update_model body (weights push)")
    cache_size: int = _opt(0, "response cache entries per worker (0 = off)")
    cache_ttl_s: float = _opt(60.0, "seconds a cached response stays valid")
    run_dir: str | None = _opt(
        None, "scratch directory of this instance (worker status); default: a fresh temp dir per start", str
    )
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N (auto picks CUDA when present)")
    host: str = _opt("127.0.0.1", "address to bind; non-loopback needs an API key")
    port: int = _opt(50000, "TCP port to bind")
    workers: int = _opt(4, "gunicorn worker processes (each loads the model once)")
    threads: int = _opt(8, "request threads per worker (gthread)")
    torch_threads: int = _opt(0, "torch threads per worker; 0 means cores // workers")
    api_key: str | None = _opt(None, "key required in X-API-Key on every route but /health, /ready", str)
    api_key_file: str | None = _opt(
        None, "file holding the API key (a mounted secret; trailing newlines stripped); not with api_key", str
    )
    allow_unauthenticated: bool = _opt(
        False, "allow binding a non-loopback address without an API key (trusted networks only)"
    )
    max_body_bytes: int = _opt(64 * 1024 * 1024, "largest accepted request body (413 above)")
    timeout_s: int = _opt(120, "gunicorn worker timeout: a silent worker is restarted after this")
    graceful_timeout_s: int = _opt(30, "seconds a worker gets to finish in-flight requests on SIGTERM")
    keepalive_s: int = _opt(75, "seconds an idle keep-alive connection stays open")
    # The front door (policy_server/front_door/worker.py): reading requests before a thread sees them.
    head_timeout_s: float = _opt(
        10.0, "seconds from a request's first byte to its complete head; past it: 408 and the connection "
        "closes (a connection that sends nothing is closed quietly after keepalive_s)"
    )
    body_timeout_s: float = _opt(
        10.0, "seconds a request body may take, plus its length / min_body_bytes_per_s; past it: 408 and close"
    )
    min_body_bytes_per_s: int = _opt(
        65536, "slowest accepted average upload rate (bytes/s) of a request body, on top of body_timeout_s"
    )
    ws_idle_timeout_s: float = _opt(
        300.0, "seconds a WebSocket connection may stay without a frame (any frame, a ping too); then close 1001"
    )
    admission_limit: int = _opt(
        64, "requests a worker holds at once (being read, waiting for a thread, queued, batching); past it: "
        "503 with Retry-After at once"
    )
    shed_wait_ms: int = _opt(
        500, "a worker whose oldest request waiting for a thread arrived longer ago than this answers new "
        "requests 503 with Retry-After at once (keeps what it holds inside deadline_ms)"
    )
    max_reading_per_worker: int = _opt(
        256, "connections a worker reads an unfinished request from at once; past it: 503 and close"
    )
    max_reading_per_client: int = _opt(
        64, "connections one client address sends unfinished requests on, per worker; past it: 503 and close"
    )
    max_reading_bytes: int = _opt(
        256 * 1024 * 1024, "bytes of request bodies a worker receives at once (their Content-Lengths summed); a "
        "request that would pass it gets 503 with Retry-After from its head (bounds the memory slow uploads hold)"
    )
    malloc_tuning: bool = _opt(
        False, "workers raise glibc's mmap and trim thresholds (mallopt); measured no gain, see docs/front-door.md"
    )
    log_level: str = _opt("info", "debug, info, warning or error")
    log_dir: str | None = _opt(
        None, "also write access.log and error.log here (logs go to stdout always); final_metrics.json goes "
        "here, else to logs/", str,
    )
    max_batch_size: int = _opt(
        0, "most requests one forward takes; 0 = auto: 16 on CUDA, 4 on CPU (where bigger batches only add latency)"
    )
    max_batch_delay_ms: float = _opt(
        0.0, "0: never wait for company; > 0: wait up to this long from a batch's first arrival to fill it"
    )
    queue_size: int = _opt(256, "requests a worker queues before answering 503 with Retry-After")
    deadline_ms: int = _opt(
        2000, "default deadline; X-Deadline-Ms may lower it per request; past it before compute: 504"
    )
    autocast: str = _opt("off", "off, bf16 or fp16: mixed precision for the forward (CUDA; bf16 also on CPU)")
    compile: bool = _opt(False, "torch.compile the policy module (slower start, warm-up compiles)")
    quantize_int8: bool = _opt(False, "dynamic int8 quantization of Linear layers (CPU only)")
    channels_last: bool = _opt(False, "convert the policy module to channels_last memory format")
    # Open Inference Protocol and Unix domain sockets
    oip_max_json_bytes: int = _opt(
        1024 * 1024, "largest Open Inference Protocol JSON header (or all-JSON body) of /v2 infer requests "
        "(parsing 1 MiB of JSON holds a worker's GIL for up to ~0.1 s; send images as binary data)"
    )
    uds: str | None = _opt(None, "also bind this Unix domain socket path (clients: unix:///path)", str)
    uds_mode: str = _opt("660", "file mode (octal) of the --uds socket, set once it is bound")
    uds_only: bool = _opt(False, "bind only the --uds socket, no TCP port")
    # TLS: gunicorn's own certificate settings; TCP listeners serve HTTPS when set.
    certfile: str | None = _opt(None, "PEM certificate (chain) to serve HTTPS with; needs --keyfile", str)
    keyfile: str | None = _opt(None, "PEM private key of --certfile (unencrypted)", str)
    ca_certs: str | None = _opt(None, "PEM CA bundle that client certificates are checked against (mTLS)", str)
    cert_reqs: str = _opt("none", "client certificates: none, optional or required (the last two need --ca-certs)")
    tls_min_version: str = _opt("1.2", "oldest TLS version accepted: 1.2 or 1.3")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, read_key_files: bool = True) -> ServerConfig:
        """Defaults overridden by ``POLICY_SERVER_*`` variables, keys read from their files
        (``api_key_file``, ``admin_key_file``) unless ``read_key_files`` is false."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        config = cls(**values)
        return config._read_key_files() if read_key_files else config

    @classmethod
    def from_sources(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerConfig:
        """CLI flags over environment variables over defaults, then keys read from their files."""
        args = vars(_parser(cls).parse_args(argv))
        return dataclasses.replace(cls.from_env(environ, read_key_files=False), **args)._read_key_files()

    def _read_key_files(self) -> ServerConfig:
        """``api_key``/``admin_key`` from ``*_key_file`` where set (settings as given, read once).
        A key given both ways is a ConfigError, whichever source each came from."""
        keys = {}
        for name in ("api_key", "admin_key"):
            path = getattr(self, f"{name}_file")
            if path is None:
                continue
            if getattr(self, name) is not None:
                raise ConfigError(
                    f"{name} and {name}_file are both set ({ENV_PREFIX}{name.upper()} or --{name.replace('_', '-')}, "
                    f"and {ENV_PREFIX}{name.upper()}_FILE or --{name.replace('_', '-')}-file): give the key one way"
                )
            keys[name] = read_key_file(path, f"{name}_file")
        return dataclasses.replace(self, **keys) if keys else self

    def to_env(self) -> dict[str, str]:
        """The config as ``POLICY_SERVER_*`` variables (unset fields left out). A key read from
        a file travels as its file's path, never as its value."""
        env = {}
        from_files = {name for name in ("api_key", "admin_key") if getattr(self, f"{name}_file") is not None}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name not in from_files:
                env[ENV_PREFIX + f.name.upper()] = str(int(value) if isinstance(value, bool) else value)
        return env

    def validate(self) -> None:
        """Raise ConfigError for values that cannot serve safely."""
        if not (0 < self.port < 65536):
            raise ConfigError(f"port {self.port} is out of range")
        for name in (
            "workers", "threads", "max_body_bytes", "timeout_s", "queue_size", "deadline_ms",
            "store_keep", "store_poll_ms", "max_update_bytes", "stage_max_files", "stage_max_bytes",
            "admission_limit", "max_reading_per_worker", "max_reading_per_client", "min_body_bytes_per_s",
            "shed_wait_ms", "max_reading_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not 0 <= self.update_wait_s <= 300:
            raise ConfigError("update_wait_s must be between 0 and 300")
        if not 0 <= self.retain_previous_s <= 86400:
            raise ConfigError("retain_previous_s must be between 0 and 86400")
        if not (self.head_timeout_s > 0 and self.body_timeout_s > 0 and self.ws_idle_timeout_s > 0):
            raise ConfigError("head_timeout_s, body_timeout_s and ws_idle_timeout_s must be positive")
        if self.max_batch_size < 0:
            raise ConfigError("max_batch_size must be 0 (auto) or more")
        if self.max_batch_delay_ms < 0:
            raise ConfigError("max_batch_delay_ms must be 0 or more")
        if self.autocast not in ("off", "bf16", "fp16"):
            raise ConfigError(f"autocast {self.autocast!r} is not off, bf16 or fp16")
        if self.quantize_int8 and self.device.startswith("cuda"):
            raise ConfigError("quantize_int8 is a CPU option")
        if self.torch_threads < 0:
            raise ConfigError("torch_threads must be 0 (auto) or more")
        if self.device != "auto" and self.device != "cpu" and not _is_cuda_device(self.device):
            raise ConfigError(f"device {self.device!r} is not auto, cpu, cuda or cuda:N")
        for name in ("api_key", "admin_key"):
            key = getattr(self, name)
            if key is not None and len(key) < 8:
                raise ConfigError(f"{name} must be at least 8 characters")
        if self.oip_max_json_bytes < 1:
            raise ConfigError("oip_max_json_bytes must be at least 1")
        self.uds_file_mode()
        if self.uds_only and not self.uds:
            raise ConfigError("uds_only needs --uds PATH")
        self._validate_tls()
        if self.cache_size < 0 or self.cache_ttl_s <= 0:
            raise ConfigError("cache_size must be 0 (off) or more and cache_ttl_s positive")
        if not MODEL_NAME_PATTERN.fullmatch(self.model_name):
            raise ConfigError(f"model_name must match {MODEL_NAME_PATTERN.pattern}")
        if not is_loopback(self.host) and not self.api_key and not self.allow_unauthenticated:
            raise ConfigError(
                f"refusing to bind {self.host} without an API key: set --api-key-file (POLICY_SERVER_API_KEY_FILE) "
                "or --api-key (POLICY_SERVER_API_KEY), or --allow-unauthenticated on a trusted network"
            )

    @property
    def tls(self) -> bool:
        """True when TCP listeners serve HTTPS (``certfile`` set)."""
        return bool(self.certfile)

    def cert_reqs_flag(self) -> ssl.VerifyMode:
        """``cert_reqs`` as gunicorn's ``cert_reqs`` setting (an ``ssl.CERT_*`` value)."""
        try:
            return _CERT_REQS[self.cert_reqs]
        except KeyError:
            raise ConfigError(f"cert_reqs {self.cert_reqs!r} is not none, optional or required") from None

    def tls_minimum_version(self) -> ssl.TLSVersion:
        """``tls_min_version`` as an ``ssl.TLSVersion``."""
        try:
            return _TLS_VERSIONS[self.tls_min_version]
        except KeyError:
            raise ConfigError(f"tls_min_version {self.tls_min_version!r} is not 1.2 or 1.3") from None

    def _validate_tls(self) -> None:
        """Certificate settings: both files or neither, readable, matching; client checks need a CA."""
        requires = self.cert_reqs_flag()
        self.tls_minimum_version()
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("certfile and keyfile go together: set both to serve HTTPS, or neither")
        if not self.certfile:
            if self.ca_certs or requires != ssl.CERT_NONE:
                raise ConfigError("ca_certs and cert_reqs check client certificates: they need certfile and keyfile")
            return
        for name in ("certfile", "keyfile", "ca_certs"):
            path = getattr(self, name)
            if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise ConfigError(f"{name} {path!r} is not a readable file")
        if requires != ssl.CERT_NONE and not self.ca_certs:
            raise ConfigError(
                f"cert_reqs {self.cert_reqs} needs ca_certs (the CA bundle client certificates are checked by)"
            )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:  # what gunicorn loads in each worker: fail here, clearly, rather than there
            context.load_cert_chain(self.certfile, self.keyfile, password=_no_password)
            if self.ca_certs:
                context.load_verify_locations(cafile=self.ca_certs)
        except ConfigError:
            raise
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load certfile {self.certfile!r} with keyfile {self.keyfile!r}"
                f"{f' and ca_certs {self.ca_certs!r}' if self.ca_certs else ''}: {exc} (a key that does not match "
                "the certificate, a file that is not PEM, or an encrypted key)"
            ) from None

    def uds_file_mode(self) -> int:
        """``uds_mode`` as an int (ConfigError unless octal digits within 0o777)."""
        try:
            mode = int(self.uds_mode, 8)
        except ValueError:
            raise ConfigError(f"uds_mode {self.uds_mode!r} is not an octal file mode such as 660") from None
        if not 0 <= mode <= 0o777:
            raise ConfigError(f"uds_mode {self.uds_mode!r} is outside 000..777")
        return mode

    def batch_size_for(self, device: str) -> int:
        """``max_batch_size``, or the auto default for ``device``."""
        if self.max_batch_size:
            return self.max_batch_size
        return AUTO_BATCH_CUDA if device.startswith("cuda") else AUTO_BATCH_CPU

    def torch_threads_per_worker(self, cores: int | None = None) -> int:
        """Torch intra-op threads for one worker: explicit, or cores // workers (at least 1)."""
        if self.torch_threads:
            return self.torch_threads
        cores = cores or len(os.sched_getaffinity(0))
        return max(1, cores // self.workers)


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _no_password() -> bytes:
    """An encrypted key fails to load instead of prompting on the terminal."""
    raise ConfigError("keyfile is encrypted; give an unencrypted key (readable only by the server's user)")


def is_loopback(host: str) -> bool:
    """True for localhost and addresses in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_cuda_device(device: str) -> bool:
    return device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())


def _parse(f: dataclasses.Field, raw: str):
    kind = f.metadata["kind"]
    name = ENV_PREFIX + f.name.upper()
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"{name}={raw!r} is not a boolean")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    return raw


def _parser(cls) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="server.py",
        description="Serve a robot policy over HTTP with gunicorn.",
        argument_default=argparse.SUPPRESS,
        epilog=f"Every flag can also be set as an environment variable {ENV_PREFIX}<NAME>.",
    )
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = f.metadata["kind"]
        help_text = f"{f.metadata['help']} (env {ENV_PREFIX}{f.name.upper()}, default {f.default!r})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, help=help_text, metavar=f.name.upper())
    return parser
