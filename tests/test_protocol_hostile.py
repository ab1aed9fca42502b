"""Hostile bodies against ``binary_to_dict``: no code runs, no crash, no blow-up, one error type.

The payloads live in ``tests/support/hostile_payloads.py`` (hand-assembled opcodes). Tests that
record a genuine weakness of ``binary_protocol`` are strict xfails with the reason; when
the decoder is fixed they turn into XPASS failures, and the mark should then be removed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copyreg
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

import binary_protocol
from binary_protocol import ProtocolError, binary_to_dict
from tests.support import hostile_payloads as hp

ROOT = Path(__file__).resolve().parents[1]
IDS = [p.id for p in hp.hostile_payloads("/nonexistent/collect-canary")]

# Payload ids that binary_protocol decodes although the format forbids them, each a strict
# xfail with the reason (empty since the decoder stopped using CPython's unpickler).
KNOWN_WEAKNESSES: dict[str, str] = {}


def _param(pid: str):
    marks = ()
    if pid in KNOWN_WEAKNESSES:
        marks = pytest.mark.xfail(strict=True, raises=AssertionError, reason=KNOWN_WEAKNESSES[pid])
    return pytest.param(pid, id=pid, marks=marks)


def _payloads(canary: Path) -> dict[str, hp.HostilePayload]:
    return {p.id: p for p in hp.hostile_payloads(str(canary))}


def _decode_outcome(body: bytes) -> tuple[ProtocolError | None, float]:
    start = time.monotonic()
    try:
        binary_to_dict(body)
    except ProtocolError as exc:
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


# ---------------------------------------------------------------------------------
# Every payload, in process


@pytest.mark.timeout(10)
@pytest.mark.parametrize("pid", [_param(pid) for pid in IDS])
def test_hostile_payload_is_refused(pid, tmp_path):
    canary = tmp_path / "canary"
    payload = _payloads(canary)[pid]

    err, elapsed = _decode_outcome(payload.body)

    assert not canary.exists(), f"{pid} ran code: the canary exists"
    assert err is not None, f"{pid} decoded instead of raising ProtocolError"
    assert isinstance(err, ValueError)
    assert len(str(err)) > 10, f"uninformative error message {str(err)!r}"
    assert elapsed < 2.0, f"{pid} took {elapsed:.2f} s to reject"


def test_payload_families_and_count(tmp_path):
    canary = tmp_path / "canary"
    payloads = hp.hostile_payloads(str(canary))
    counts = collections.Counter(p.family for p in payloads)

    assert set(counts) == set(hp.FAMILIES) == {
        "reduce", "inst_obj", "ext", "dotted", "object_array", "dtype_state", "build",
        "frombuffer_args", "lying_length", "nesting",
    }
    assert len(payloads) >= 30
    assert min(counts.values()) >= 5, counts
    assert len({p.id for p in payloads}) == len(payloads), "payload ids must be unique"
    assert [p.id for p in payloads] == IDS, "payload list must not depend on the canary path"
    assert all(type(p.body) is bytes for p in payloads)
    armed = [p for p in payloads if p.armed]
    assert len(armed) >= 20
    assert all(str(canary).encode() in p.body for p in armed)
    bare = [p for p in payloads if p.family == "reduce" and p.body.startswith(b"\x80\x05")]
    framed = [p for p in payloads if p.family == "reduce" and p.body.startswith(b"PK5F")]
    assert bare and framed


@pytest.mark.parametrize("name,body,want", hp.valid_bodies(), ids=[v[0] for v in hp.valid_bodies()])
def test_builders_make_bodies_the_decoder_accepts(name, body, want):
    """The helpers that build the hostile payloads produce accepted bodies when honest, so
    each refusal above is due to the hostile part and not to a malformed builder."""
    got = binary_to_dict(body)
    assert set(got) == set(want)
    for key, expected in want.items():
        if hasattr(got[key], "dtype"):
            assert (got[key].dtype.str, got[key].shape) == expected
            assert not got[key].flags.writeable or name.endswith("bytearray_numpy1")
        else:
            assert got[key] == expected


def test_decoding_hostile_payloads_imports_nothing(tmp_path):
    canary = tmp_path / "canary"
    for _, body, _ in hp.valid_bodies():  # warm up lazy imports on the accepting paths
        binary_to_dict(body)
    for body in (b"\x80\x05N.", b"\x80\x05\x8c\x02osb.", b"PK5F"):  # and on refusing paths
        with contextlib.suppress(ProtocolError):
            binary_to_dict(body)
    payloads = hp.hostile_payloads(str(canary))

    before = set(sys.modules)
    assert "this" not in before, "the side-effect module must not be loaded yet for this test"
    for payload in payloads:
        with contextlib.suppress(ProtocolError):
            binary_to_dict(payload.body)
    new = set(sys.modules) - before

    assert not new, f"decoding hostile payloads imported {sorted(new)}"
    assert not canary.exists()


# ---------------------------------------------------------------------------------
# The payloads are live: an unrestricted unpickler runs them


ARMED_CHILD = textwrap.dedent(
    """
    import json, os, pickle, sys
    from tests.support.hostile_payloads import hostile_payloads, split_frame
    from tests.support.wait import eventually

    canary = sys.argv[1]
    dead = []
    for p in hostile_payloads(canary):
        if not p.armed:
            continue
        if os.path.exists(canary):
            os.remove(canary)
        data, buffers = split_frame(p.body)
        try:
            pickle.loads(data, buffers=buffers)  # deliberately unrestricted
        except Exception:
            pass
        try:  # Popen / os.popen create it asynchronously
            eventually(lambda: os.path.exists(canary), 5, "the canary", every_s=0.005)
        except AssertionError:
            dead.append(p.id)
    print(json.dumps(dead))
    """
)


def test_armed_payloads_really_run_code_under_plain_pickle(tmp_path):
    """Guard against toothless payloads: every payload flagged ``armed`` creates the canary
    when fed to plain ``pickle.loads`` (in a throwaway interpreter)."""
    canary = tmp_path / "canary"
    proc = subprocess.run(
        [sys.executable, "-c", ARMED_CHILD, str(canary)],
        cwd=ROOT, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    dead = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert dead == [], f"armed payloads that did not run under plain pickle: {dead}"


# ---------------------------------------------------------------------------------
# Crash-prone families in fresh interpreters (a segfault cannot take pytest down)

DECODE_CHILD = textwrap.dedent(
    """
    import sys
    import binary_protocol
    body = sys.stdin.buffer.read()
    try:
        binary_protocol.binary_to_dict(body)
    except binary_protocol.ProtocolError as exc:
        print("REJECTED", repr(str(exc)))
        raise SystemExit(0)
    print("DECODED")
    raise SystemExit(3)
    """
)


def _decode_in_fresh_interpreter(body: bytes) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    return subprocess.run(
        [sys.executable, "-c", DECODE_CHILD], input=body, cwd=ROOT, env=env,
        capture_output=True, timeout=60,
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["object_array", "dtype_state", "build"])
def test_crash_prone_family_in_fresh_interpreters(family, tmp_path):
    canary = tmp_path / "canary"
    payloads = [p for p in hp.hostile_payloads(str(canary)) if p.family == family]
    assert payloads
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip((p.id for p in payloads),
                           pool.map(lambda p: _decode_in_fresh_interpreter(p.body), payloads), strict=False))

    bad = {
        pid: (proc.returncode, proc.stdout.decode(errors="replace")[-300:],
              proc.stderr.decode(errors="replace")[-1500:])
        for pid, proc in results.items()
        if proc.returncode != 0 or not proc.stdout.startswith(b"REJECTED")
    }
    assert not bad, f"payloads that crashed or were not rejected (rc < 0 is a signal): {bad}"
    assert not canary.exists()


# ---------------------------------------------------------------------------------
# copyreg extension codes


@pytest.mark.parametrize("opname,code,module,name", hp.EXT_REGISTRATIONS,
                         ids=[r[0] for r in hp.EXT_REGISTRATIONS])
def test_registered_extension_code_is_still_refused(opname, code, module, name, tmp_path):
    canary = tmp_path / "canary"
    body = hp.ext_call_body(code, module, name, str(canary))
    assert code not in copyreg._inverted_registry
    copyreg.add_extension(module, name, code)
    try:
        with pytest.raises(ProtocolError, match=r"opcode 0x8[234] .* not allowed"):
            binary_to_dict(body)
        assert code not in copyreg._extension_cache, "a refused lookup must not be cached"
    finally:
        copyreg.remove_extension(module, name, code)
    assert code not in copyreg._inverted_registry
    assert not canary.exists()


EXT_CACHE_CHILD = textwrap.dedent(
    """
    import copyreg, pickle, sys
    import binary_protocol
    from tests.support.hostile_payloads import ext_call_body

    canary, code = sys.argv[1], 0xF2
    copyreg.add_extension("builtins", "exec", code)
    # Somewhere else in the same process, trusted code loads a pickle that uses the code:
    # the C unpickler caches code -> builtins.exec in copyreg._extension_cache.
    assert pickle.loads(b"\\x80\\x05\\x82\\xf2.") is exec
    try:
        binary_protocol.binary_to_dict(ext_call_body(code, "builtins", "exec", canary))
    except binary_protocol.ProtocolError as exc:
        print("REJECTED", exc)
    else:
        print("DECODED")
    """
)


def test_extension_cache_filled_elsewhere_is_not_a_bypass(tmp_path):
    canary = tmp_path / "canary"
    proc = subprocess.run(
        [sys.executable, "-c", EXT_CACHE_CHILD, str(canary)],
        cwd=ROOT, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert not canary.exists(), "builtins.exec ran through a cached extension code"
    assert proc.stdout.startswith(b"REJECTED")


# ---------------------------------------------------------------------------------
# Resource use of small bodies

MEMO_CHILD = textwrap.dedent(
    """
    import sys, tracemalloc
    import binary_protocol
    from tests.support.hostile_payloads import memo_index_body

    body = memo_index_body(int(sys.argv[1]))
    tracemalloc.start()
    try:
        binary_protocol.binary_to_dict(body)
    except binary_protocol.ProtocolError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(len(body), peak)
    """
)


def test_small_body_cannot_make_the_decoder_allocate_much():
    proc = subprocess.run(
        [sys.executable, "-c", MEMO_CHILD, str(2**23)],
        cwd=ROOT, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    body_len, peak = map(int, proc.stdout.split())
    assert body_len < 16
    assert peak < 32 * 2**20, (
        f"a {body_len}-byte body made the decoder allocate {peak / 2**20:.0f} MiB"
    )


def test_colliding_dict_keys_are_not_quadratic():
    n = 8000
    plain, colliding = hp.colliding_keys_body(n, collide=False), hp.colliding_keys_body(n)
    err_plain, t_plain = _decode_outcome(plain)
    err_coll, t_coll = _decode_outcome(colliding)
    assert err_plain is not None and err_coll is not None
    assert t_coll < 10 * t_plain + 0.05, (
        f"{n} colliding int keys ({len(colliding)} bytes) took {t_coll:.2f} s, "
        f"{n} ordinary ones {t_plain:.4f} s"
    )


def test_bigint_shape_is_rejected_quickly():
    body = hp.bigint_shape_body(16_000)
    err, elapsed = _decode_outcome(body)
    assert err is not None
    assert elapsed < 0.1, f"a {len(body)}-byte body took {elapsed:.2f} s to reject"


def test_memo_and_depth_caps_bound_the_walk():
    """Memo sharing and depth: rejected by the node and depth caps, well under a second.

    Level k+1 is a tuple holding level k twice (through the memo); every level is appended
    to one list, so the result holds 2**levels visits in a body of a few hundred bytes.
    """
    for level_count, expected in ((60, "nesting deeper"), (25, "more than")):
        body = hp.bare_dict(
            hp.EMPTY_LIST  # the list that collects every level
            + hp.EMPTY_LIST + hp.MEMOIZE + hp.APPEND  # level 0, memo 0
            + b"".join(hp.binget(k) * 2 + hp.TUPLE2 + hp.MEMOIZE + hp.APPEND for k in range(level_count))
        )
        err, elapsed = _decode_outcome(body)
        assert err is not None and expected in str(err)
        assert elapsed < 1.0
    assert binary_protocol.MAX_NODES <= 1_000_000 and binary_protocol.MAX_DEPTH <= 64


# ---------------------------------------------------------------------------------
# Found by fuzzing and review of the restricted decoder (each was a real break).

F = b"\x8c\x13numpy._core.numeric\x8c\x0b_frombuffer\x93"
DTYPE = b"\x8c\x05numpy\x8c\x05dtype\x93"


def _rejected_quickly(body: bytes, limit_s: float = 1.0) -> str:
    err, elapsed = _decode_outcome(body)
    assert err is not None, "decoded instead of raising ProtocolError"
    assert elapsed < limit_s, f"took {elapsed:.2f} s"
    assert len(str(err)) < 600
    return str(err)


def test_deep_tuple_in_an_error_message_does_not_escape_as_recursion_error():
    # repr() of a 1000-deep tuple used to raise RecursionError (a 500, not a 400).
    as_dtype_name = b"\x80\x05}\x8c\x01x" + DTYPE + b"N" + b"\x85" * 1000 + b"\x89\x88\x87Rs."
    as_order = (b"\x80\x05}\x8c\x01x" + F + b"(C\x08" + bytes(8) + DTYPE + b"\x8c\x02f4\x89\x88\x87RK\x02\x85N"
                + b"\x85" * 1000 + b"tRs.")
    assert "tuple" in _rejected_quickly(as_dtype_name)
    assert "tuple" in _rejected_quickly(as_order)


def test_memo_shared_strings_cannot_blow_up_an_error_message():
    # repr() of a list holding one 60 kB string 10,000 times built a 600 MB message.
    body = (b"\x80\x05}\x8c\x01x" + DTYPE + b"]X" + struct.pack("<I", 60000) + b"A" * 60000
            + b"\x94a(" + b"h\x00" * 10000 + b"e\x89\x88\x87Rs.")
    assert "list" in _rejected_quickly(body)


def test_self_referential_list_walk_is_bounded():
    # A list holding itself 100,000 times grew the walk's stack to ~32 x 100,000 entries.
    body = b"\x80\x05}\x8c\x01x]\x94(" + b"h\x00" * 100_000 + b"es."
    assert "more than" in _rejected_quickly(body)


def test_opcode_floods_are_cut_off():
    tuples = b"\x80\x05}\x8c\x01xN" + b"\x85" * 1_599_990 + b"s."
    # The opcode cap is what stops it (the message says so); the time bound only has to tell
    # "cut off" from "runs for minutes", so it leaves room for a loaded CI box.
    assert "opcodes" in _rejected_quickly(tuples, limit_s=10.0)
    empty_frames = b"\x80\x05" + (b"\x95" + bytes(8)) * 1000 + b"}."
    assert "FRAME" in _rejected_quickly(empty_frames)


def test_strings_must_be_strict_utf8_both_ways():
    lone_surrogate = b"\x80\x05}\x8c\x01x\x8c\x03\xed\xa0\x80s."
    _rejected_quickly(lone_surrogate)
    with pytest.raises(ProtocolError, match="UTF-8"):
        binary_protocol.dict_to_binary({"x": "\ud800"})
    with pytest.raises(ProtocolError, match="UTF-8"):
        binary_protocol.dict_to_binary({"\ud800": 1})


def test_dtype_state_holding_an_array_is_refused_without_comparing_it():
    array = F + b"(C\x08" + bytes(8) + DTYPE + b"\x8c\x02f4\x89\x88\x87RK\x02\x85\x8c\x01CtR"
    state = b"(K\x03\x8c\x01<" + array + b"NNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    body = b"\x80\x05}\x8c\x01x" + F + b"(C\x04" + bytes(4) + DTYPE + b"\x8c\x02f4\x89\x88\x87R" + state + b"b"
    body += b"K\x01\x85\x8c\x01CtRs."
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "dtype state" in _rejected_quickly(body)
