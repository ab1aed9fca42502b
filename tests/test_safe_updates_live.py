"""Safe updates against a real gunicorn: bad updates publish nothing, failures are clean, and an
update's answer is true for every worker when it comes.

"Nothing published" is read from the store itself and from X-Model-Version on fresh
connections (spread over the workers).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from policy_server.store import model_store as store_module
from policy_server.store.model_store import ModelStore
from request_tools import PolicyClient, PolicyServerError
from tests.support.fakes import fake_observation
from tests.support.serving import run_server
from tests.support.tiny_model import tiny_weights, write_linked_out_model, write_tiny_model

pytestmark = pytest.mark.integration

ADMIN_KEY = "admin-key-for-tests"


def live(tmp_path: Path, tiny_models: Path, store: Path, workers: int = 2):
    return run_server(
        tmp_path, workers=workers,
        args=("--model-path", str(tiny_models / "tiny"), "--model-root", str(tiny_models), "--store-poll-ms", "50",
              "--admin-key", ADMIN_KEY),
        env={"POLICY_SERVER_MODEL_STORE": str(store)},
    )


def served(server, count: int = 8) -> set[tuple[str, float]]:
    """(X-Model-Version, action) over ``count`` fresh connections."""
    seen = set()
    for i in range(count):
        with PolicyClient(server.base_url, retries=0) as fresh:
            action = fresh.infer(fake_observation(i))["action"]
            seen.add((fresh.last_model_version, float(action.flat[0])))
    return seen


def assert_only_version_one(server, store: Path) -> None:
    state = ModelStore(str(store))
    assert state.pointer("default").version == 1 and state.versions("default") == [1]
    assert os.listdir(store / "default" / "versions") == ["000001"]
    assert os.listdir(store / "default" / ".staging") == []
    assert served(server) == {("1", 1.0)}


def refusal(call, status: int, fragment: str) -> None:
    with pytest.raises(PolicyServerError) as refused:
        call()
    assert refused.value.status == status, refused.value
    assert fragment in refused.value.detail, refused.value.detail


def test_bad_updates_publish_nothing_and_good_ones_are_true_when_answered(tmp_path, tiny_models):
    canary = write_linked_out_model(tiny_models, tmp_path)
    store = tmp_path / "store"
    with live(tmp_path, tiny_models, store) as server, PolicyClient(server.base_url, admin_key=ADMIN_KEY) as admin:
        refusal(lambda: admin.update_model(model_path="evil"), 403, "'policy.py' is a link that leads outside")
        refusal(lambda: admin.load_model("other", model_path="evil"), 403, "'policy.py'")
        weights = tiny_weights(2.0)
        weights["linear.bias"][4] = -np.inf  # the hard case: outputs stay finite behind a ReLU
        refusal(lambda: admin.update_model(weights=weights), 422, "weight 'linear.bias' is not finite")
        assert not canary.exists()
        assert_only_version_one(server, store)

        # read your writes: the default call returns once every worker serves the new version
        answer = admin.update_model(weights=tiny_weights(2.0))
        assert (answer["version"], answer["all_workers"], answer["lagging"]) == (2, True, [])
        assert len(answer["workers"]) == 2 and "warnings" in answer  # the tiny model is constant
        assert served(server) == {("2", 2.0)}
        back = admin.update_model(version=1)
        assert back["all_workers"] is True
        for i in range(6):  # a robot's sequence: the same client, right after the answer
            admin.infer(fake_observation(i))
            assert admin.last_model_version == "1"
        assert served(server) == {("1", 1.0)}
        quick = admin.update_model(version=2, wait_s=0)
        assert quick["version"] == 2 and "all_workers" not in quick


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (yields True), or nothing where mounting is not allowed (False)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def test_store_write_failures_answer_json_and_keep_serving(tmp_path, tiny_models):
    store = tmp_path / "store"
    with tiny_filesystem(store, "1m") as mounted:
        if not mounted and os.geteuid() == 0:
            pytest.skip("cannot mount a tmpfs here, and root ignores a read-only mode")
        write_tiny_model(tiny_models / "big", tag=2.0)
        (tiny_models / "big" / "blob.bin").write_bytes(os.urandom(2 << 20))  # more than the store holds
        with live(tmp_path, tiny_models, store) as server, PolicyClient(server.base_url, admin_key=ADMIN_KEY) as admin:
            if mounted:
                refusal(lambda: admin.update_model(model_path="big"), 507, "No space left on device (ENOSPC)")
                assert_only_version_one(server, store)
                remount(store, "ro")
                reason = "Read-only file system (EROFS)"
            else:
                os.chmod(store / "default", 0o555)  # no new pointer can be written
                reason = "Permission denied (EACCES)"
            try:
                refusal(lambda: admin.update_model(weights=tiny_weights(3.0)), 500, reason)
                refusal(lambda: admin.update_model(version=1), 500, reason)
            finally:
                remount(store, "rw") if mounted else os.chmod(store / "default", 0o755)
            assert_only_version_one(server, store)
            answer = admin.update_model(weights=tiny_weights(3.0))  # the store works again
            assert answer["version"] == 2 and answer["all_workers"] is True
            assert served(server) == {("2", 3.0)}


def test_leftovers_of_a_crashed_publish_are_removed_at_start(tmp_path, tiny_models):
    store_dir = tmp_path / "store"
    store = ModelStore(str(store_dir), model_root=str(tiny_models))
    store.seed("default", str(tiny_models / "tiny"))  # what the server will find already seeded
    staged = store.stage("default", str(tiny_models / "tiny"))
    os.rename(staged, store.version_dir("default", 2))  # killed between its rename and its pointer
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = store_dir / "default" / ".staging" / f"candidate-{dead.pid}@{store_module._HOST}-x"
    orphan.mkdir()
    assert store.versions("default") == [1]  # invisible even before the cleanup
    with live(tmp_path, tiny_models, store_dir, workers=1) as server, PolicyClient(server.base_url) as client:
        assert not orphan.exists()
        assert_only_version_one(server, store_dir)
        assert {m["name"]: m["kept_versions"] for m in client.models()} == {"default": [1]}
