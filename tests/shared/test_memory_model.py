"""The memory model: cgroup limits from fixture files (v1, v2, "max"), the host budget, predictions."""

from __future__ import annotations

from pathlib import Path

from shared.memory import (
    GB, MB, PRIOR_FIXED_BYTES, Profile, Shape, cgroup_memory_limit, host_budget, predict,
)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_limit(tmp_path):
    _write(tmp_path, "system.slice/worker.service/memory.max", str(12 * GB))
    assert cgroup_memory_limit("0::/system.slice/worker.service\n", tmp_path) == 12 * GB


def test_cgroup_v2_max_means_no_limit_and_an_ancestor_can_still_limit(tmp_path):
    _write(tmp_path, "a/b/memory.max", "max")
    assert cgroup_memory_limit("0::/a/b", tmp_path) is None
    _write(tmp_path, "a/memory.max", str(8 * GB))
    assert cgroup_memory_limit("0::/a/b", tmp_path) == 8 * GB


def test_cgroup_v2_in_a_container_root(tmp_path):
    _write(tmp_path, "memory.max", str(6 * GB))
    assert cgroup_memory_limit("0::/\n", tmp_path) == 6 * GB


def test_cgroup_v1_limit_and_unlimited(tmp_path):
    text = "12:pids:/docker/abc\n5:memory:/docker/abc\n1:name=systemd:/docker/abc\n"
    _write(tmp_path, "memory/docker/abc/memory.limit_in_bytes", str(4 * GB))
    assert cgroup_memory_limit(text, tmp_path) == 4 * GB
    _write(tmp_path, "memory/docker/abc/memory.limit_in_bytes", "9223372036854771712")
    assert cgroup_memory_limit(text, tmp_path) is None


def test_no_cgroup_files(tmp_path):
    assert cgroup_memory_limit("0::/nowhere", tmp_path) is None
    assert cgroup_memory_limit("", tmp_path) is None


def test_host_budget():
    assert host_budget(32 * GB, None, 2 * GB) == 30 * GB
    assert host_budget(32 * GB, 8 * GB, 1 * GB) == 7 * GB  # the container's limit, not the host's RAM
    assert host_budget(4 * GB, 8 * GB, 1 * GB) == 3 * GB
    assert host_budget(32 * GB, 8 * GB, 1 * GB, explicit=5 * GB) == 5 * GB


def test_predictions_profile_then_scaled_then_prior():
    seen = Profile(Shape(512, 512, True), peak_bytes=6 * GB, base_bytes=5 * GB, samples=3)
    exact = predict(Shape(512, 512, True), [seen], 5 * GB)
    assert (exact.bytes, exact.source) == (6 * GB, "profile")
    # 4x the latent pixels: 4x what the job used above the loaded pipeline
    bigger = predict(Shape(1024, 1024, True), [seen], 5 * GB)
    assert bigger.source == "scaled" and bigger.bytes == 5 * GB + 4 * GB
    # guidance off halves the UNet batch
    assert predict(Shape(512, 512, False), [seen], 5 * GB).bytes == 5 * GB + GB // 2
    prior = predict(Shape(512, 512, False), [], 600 * MB)
    assert prior.source == "prior" and prior.bytes > 600 * MB + PRIOR_FIXED_BYTES
    assert predict(Shape(1024, 1024, True), [], 600 * MB).bytes > prior.bytes
