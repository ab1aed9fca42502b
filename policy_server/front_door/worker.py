"""The front door: a gunicorn worker that reads whole requests before any thread sees them.

``worker_class = "policy_server.front_door.FrontDoorWorker"`` (gunicorn.conf.py). Built on
gunicorn's gthread ``ThreadWorker``: the same accept loop, thread pool and WSGI response
code, but the *poller* thread reads each request's head and body without blocking
(:mod:`policy_server.front_door.reader`), and a request thread gets only complete requests. So:

- a slow, stalled or vanished client costs a buffer and a file descriptor, never a thread;
  reading is bounded by ``head_timeout_s`` (from the request's first byte) and a body
  deadline of ``body_timeout_s`` + length / ``min_body_bytes_per_s``; past it: JSON 408 and
  the connection closes;
- requests being read are bounded per worker (``max_reading_per_worker``), per client
  address (``max_reading_per_client``) and in body bytes (``max_reading_bytes``); connections
  by ``worker_connections`` (the longest idle make room for new ones);
- admission (this module): every request the worker holds (being read, waiting for a
  thread, in the app, queued, batching) counts against ``admission_limit``, and a worker
  whose requests wait too long for a thread (``shed_wait_ms``) sheds; past either the
  poller answers 503 with Retry-After at once, and the connection stays usable;
- protocol refusals get the documented JSON body, a count in ``policy_requests_total`` and
  ``policy_front_door_refusals_total``, and one access-log line;
- probes (the routes of the app's probes group: ``/health``, ``/ready``, ``/metrics``,
  OIP's ``/v2/health/*``; see ``front_door.http.AppRoutes``) run on a reserved lane of their
  own (``PROBE_THREADS``), so they answer while every request thread is busy, and are never shed;
- each request's arrival (``time.monotonic()``) goes into ``environ[ARRIVED]``; the app
  counts its deadline from there;
- a client that resets its connection after a complete request is counted as 499 and
  logged at INFO (see :mod:`policy_server.app.observability`), never as a 500.
"""

from __future__ import annotations

import itertools
import logging
import selectors
import time
from concurrent import futures

from gunicorn.http import wsgi
from gunicorn.workers.gthread import ThreadWorker

from policy_server.config import ServerConfig
from policy_server.front_door.admission import Admission
from policy_server.front_door.conn import BUSY, HANDSHAKING, IDLE, WS_IDLE, Conn
from policy_server.front_door.http import GONE, AppRoutes, late_answer, past_deadline, reset_by_peer
from policy_server.front_door.reader import SCAN_S, SEND_TIMEOUT_S, RequestReader
from policy_server.front_door.tls import TLSReader
from policy_server.front_door.websocket import GOING_AWAY, WebSocketReader
from policy_server.wsgi_keys import ARRIVED, BUDGET, DEFERRED, UPGRADE

log = logging.getLogger(__name__)

PROBE_THREADS = 2
NOTIFY_S = 1.0  # heartbeat to the master at most this often (each one is a syscall on the poller)


class FrontDoorWorker(RequestReader, TLSReader, WebSocketReader, ThreadWorker):
    """gthread, with requests read whole by the poller before a thread takes them (TLS too:
    the poller does the handshake, :mod:`policy_server.front_door.tls`; WebSocket messages
    too, after an upgrade, :mod:`policy_server.front_door.websocket`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.settings = ServerConfig.from_env()
        self.admission = Admission(self.settings, self.cfg.threads)  # what it holds, and whether it takes more
        self._init_reader()
        self.probe_pool = None
        self.obs = None

    def init_process(self) -> None:
        # Imported here, in the worker: the master loads this class before it creates the
        # Prometheus multiprocess directory, and must not own metric files.
        from policy_server.app import observability

        self.obs = observability
        self.probe_pool = futures.ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="probe")
        self._fit_descriptor_limit()
        self._init_tls()
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.routes = AppRoutes(self.wsgi, self.settings)  # once: what the poller needs of the app's routes

    # -- hand-off (poller thread) ------------------------------------------------------

    def _dispatch(self, conn: Conn) -> None:
        self._stop_reading(conn)
        conn.state = BUSY
        self.poller.unregister(conn.sock)
        pool = self.probe_pool if conn.probe else self.tpool
        if pool is self.tpool:
            self.admission.hand_off(conn)
        future = pool.submit(self.handle, conn)
        future.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def finish_request(self, conn: Conn, future) -> None:
        """A request thread is done with ``conn`` (on the poller thread)."""
        self.admission.end()
        try:
            keep = bool(future.result())
        except Exception:  # noqa: BLE001 (handle() already answered and logged it; the connection just closes)
            keep = False
        if conn not in self.conns:
            return
        if conn.ws is not None:  # it was upgraded: WebSocket from now on
            self._ws_resume(conn, keep)
            return
        if keep and self.alive:
            conn.sock.setblocking(False)
            conn.state = IDLE
            self.poller.register(conn.sock, selectors.EVENT_READ, conn.callback)
            self._keep_alive(conn)
            if conn.tls:
                self._tls_resume(conn)
        else:
            conn.state = IDLE
            self._close(conn)

    def run(self) -> None:
        self.poller.register(self.method_queue.fileno(), selectors.EVENT_READ, self.method_queue.run_callbacks)
        self.set_accept_enabled(True)
        beat = 0.0
        while self.alive:
            now = time.monotonic()
            if now - beat >= NOTIFY_S:
                self.notify()
                beat = now
            if self.nr_conns >= self.max_conns:
                self._make_room()
            can_accept = self.nr_conns < self.max_conns
            if can_accept != self._accepting:
                self.set_accept_enabled(can_accept)
            self.wait_for_and_dispatch_events(timeout=SCAN_S if self.conns else 1.0)
            if not self.is_parent_alive():
                break
            self._expire()
        # Stopping: accept nothing new; answer what is being read or served; idle ones go.
        self.set_accept_enabled(False)
        for conn in list(self.conns):
            if conn.state in (IDLE, HANDSHAKING) and not conn.buf:
                conn.deadline = min(conn.deadline, time.monotonic() + 2.0)
            elif conn.state == WS_IDLE:  # busy ones get their close once answered
                self._ws_close(conn, GOING_AWAY, "server shutting down")
        graceful = time.monotonic() + self.cfg.graceful_timeout
        while self.conns and time.monotonic() < graceful:
            self.notify()
            self.wait_for_and_dispatch_events(timeout=SCAN_S)
            self._expire()
        for conn in list(self.conns):
            if conn.state != BUSY:
                self._close(conn)
        self.tpool.shutdown(wait=False)
        self.probe_pool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()
        for listener in self.sockets:
            listener.close()

    # -- request threads ----------------------------------------------------------

    def handle(self, conn: Conn) -> bool:
        """Serve one complete request (on a request thread); True keeps the connection."""
        return self._timed(conn, lambda: self._serve(conn))

    def _timed(self, conn: Conn, work) -> bool:
        """Run ``work`` for ``conn``'s request on this request thread, counted for admission."""
        began = time.monotonic()
        probe = conn.probe
        self.admission.take(conn, counted=not probe)
        try:
            return work()
        finally:
            if not probe:  # the request threads' mean time per request, for the admission estimate
                self.admission.served(time.monotonic() - began)

    def _serve(self, conn: Conn) -> bool:
        req = conn.req
        deferred: list = []
        delivered = False
        late = False
        committed = None
        try:
            if reset_by_peer(conn.sock):  # while the socket is still non-blocking
                self.obs.count_vanished(
                    conn.route, req, conn.addr, time.monotonic() - conn.arrived, "before its request ran"
                )
                return False
            conn.sock.settimeout(SEND_TIMEOUT_S)
            resp, environ = wsgi.create(req, conn.sock, conn.client, conn.server, self.cfg)
            environ["wsgi.multithread"] = True
            environ[ARRIVED] = conn.arrived
            environ[BUDGET] = self.admission.budget
            environ[UPGRADE] = None  # the app may put a WebSocket session here with its 101
            if self.tls_context is not None and not conn.tls:  # a Unix socket beside HTTPS
                environ["wsgi.url_scheme"] = "http"
            environ[DEFERRED] = deferred
            self.nr += 1
            if not self.alive or not self.cfg.keepalive:
                resp.force_close()
            head: list = []  # the app's status and headers, sent with its first bytes (or replaced)

            def start_response(status, headers, exc_info=None):
                head[:] = [status, headers]
                return resp.write

            respiter = self.wsgi(environ, start_response)
            try:
                items = iter(respiter)
                first = next(items, None)  # an app may call start_response only here
                late = past_deadline(environ, head)
                if late:  # never a late action: the answer is replaced by a 504
                    self.obs.count_late_answer("write")
                    head, first, items = late_answer(environ, head)
                committed = time.monotonic()
                resp.start_response(*head)
                for item in itertools.chain([first] if first is not None else [], items):
                    resp.write(item)
                resp.close()
                delivered = True
            finally:
                if hasattr(respiter, "close"):
                    respiter.close()
            session = environ.get(UPGRADE)
            if session is not None and resp.status_code == 101:
                self._ws_upgraded(conn, session)
            return not resp.should_close()
        except OSError as exc:
            if exc.errno not in GONE and not isinstance(exc, TimeoutError):
                log.exception("socket error serving a request")
            return False
        except Exception as exc:  # noqa: BLE001 (gunicorn's handler answers 500 and logs it)
            self.handle_error(req, conn.sock, conn.client, exc)
            return False
        finally:
            for record in deferred:
                record(delivered, 504 if late else None, committed)


__all__ = ["ARRIVED", "FrontDoorWorker"]
