"""Resolve containers/requirements-gpu.txt with pip's resolver against the real package index,
for the image's platform (Python 3.12, manylinux x86_64, binaries only), reading metadata only.

    python containers/resolve_gpu_stack.py                  # resolve; print the set and what was downloaded
    python containers/resolve_gpu_stack.py --refresh-cache  # download once, store the metadata, resolve

Why a local shim: pip reads a wheel's dependencies from its METADATA, and without PEP 658 it has
to download the whole wheel for that (~4 GB for this set: torch and its CUDA libraries). The index
this project reaches serves no `<wheel>.metadata` files and ignores range requests, so pip would
download everything on every run. This script runs pip against a small index on 127.0.0.1 that
forwards every project page from the real index unchanged (which versions and files exist, their
hashes, yanked flags, Python requirements: all live) and adds PEP 658 metadata for the files
whose METADATA it has stored, keyed by the sha256 that the real index publishes for that exact
file (containers/gpu-metadata-cache.json). A file the cache does not know (a new upstream
release) is downloaded from the real index as usual and reported; --refresh-cache stores it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REQ = HERE / "requirements-gpu.txt"
CACHE = HERE / "gpu-metadata-cache.json"
# The image is NGC PyTorch 25.12 (Ubuntu 24.04, glibc 2.39): every manylinux tag up to 2_39.
PLATFORMS = [f"manylinux_2_{x}_x86_64" for x in range(39, 16, -1)] + ["manylinux2014_x86_64"]
# A modern pip (run from its wheel): pip 23.2, this environment's, has no JSON-API metadata support
# worth relying on and took 51 s against pip 26.3's 23 s for the same full-download resolve.
RESOLVER_PIP = "26.3"
JSON_TYPE = "application/vnd.pypi.simple.v1+json"


def upstream_index() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/") + "/"


def ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)


def pip_env() -> dict:
    # The real index, not this machine's pip configuration (/etc/xdg/pip adds local mirrors,
    # find-links and a torch cap); keep what reaching the index needs (certificate, timeout).
    keep = {"PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_PROXY"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in keep}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def index_unreachable() -> Optional[str]:
    """None when the index answers; else why not."""
    url = upstream_index() + "pip/"
    try:
        with urllib.request.urlopen(url, timeout=15, context=ssl_context()) as r:
            r.read(1)
        return None
    except Exception as e:  # DNS, no route, TLS, HTTP error: the index cannot be reached
        return f"{url}: {type(e).__name__}: {e}"


def load_cache(path: Path = CACHE) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def fetch_page(project: str, attempts: int = 4) -> tuple[int, Optional[dict], str]:
    """(HTTP status, the project's JSON page from the real index or None, its URL). Retries
    connection errors (a burst of lookups can meet a transient DNS failure); after the last
    attempt it answers 503, which pip retries in turn."""
    up = urllib.request.Request(upstream_index() + project + "/", headers={"Accept": JSON_TYPE})
    for i in range(attempts):
        try:
            with urllib.request.urlopen(up, timeout=60, context=ssl_context()) as r:
                return 200, json.loads(r.read()), r.geturl()
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return e.code, None, ""
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5 * 2**i)
    return 503, None, ""


def usable_wheel(filename: str) -> bool:
    """Could pip install this file for CPython 3.12 on manylinux x86_64 with --only-binary?
    Errs on the side of keeping: pip makes the exact decision on what is left."""
    if not filename.endswith(".whl"):
        return False
    parts = filename[:-4].split("-")
    if len(parts) < 5:
        return True
    py, abi, plat = parts[-3].split("."), parts[-2].split("."), parts[-1].split(".")
    plat_ok = any(p == "any" or (p.startswith("manylinux") and p.endswith("_x86_64")) for p in plat)
    abi_ok = any(a in ("none", "abi3", "cp312") for a in abi)
    py_ok = any(
        t.startswith("py3")
        or t == "cp312"
        or (t.startswith("cp3") and "abi3" in abi and t[3:].isdigit() and int(t[3:]) <= 12)
        for t in py
    )
    return plat_ok and abi_ok and py_ok


class Shim:
    """The local index: project pages forwarded from the real index with file URLs pointing
    here; `<file>.metadata` answered from the cache; files themselves redirected to the real
    index (and counted as downloads)."""

    def __init__(self, cache: dict[str, str]):
        self.cache = {sha: text.encode() for sha, text in cache.items()}
        self.origin: dict[str, str] = {}  # file sha256 -> real URL
        self.downloads: list[tuple[str, str]] = []  # (file sha256, file name) pip had to fetch
        self.pages = 0
        self.lock = threading.Lock()
        shim = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # pip's own log is enough
                pass

            def do_GET(self):
                try:
                    shim.handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                except Exception as e:  # an answer pip retries, not a traceback on the console
                    try:
                        shim.send(self, 503, str(e).encode(), "text/plain")
                    except OSError:
                        pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Shim":
        # Fetch the live pages of every project the cache knows, 8 at a time, before pip asks
        # for them one by one: pip's sequential page requests were half of a resolve's time.
        from concurrent.futures import ThreadPoolExecutor

        names = set()
        for body in self.cache.values():
            m = re.search(rb"^Name: *(\S+)", body, re.M)
            if m:
                names.add(normalize(m.group(1).decode()))
        self.pool = ThreadPoolExecutor(8)
        self.prefetched = {n: self.pool.submit(fetch_page, n) for n in sorted(names)}
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        m = re.fullmatch(r"/simple/([^/]+)/?", path)
        if m:
            return self.project_page(req, m.group(1))
        m = re.fullmatch(r"/files/([0-9a-f]{64})/([^/]+)", path)
        if m:
            sha, name = m.groups()
            if name.endswith(".metadata"):
                body = self.cache.get(sha)
                if body is None:
                    return self.send(req, 404, b"", "text/plain")
                return self.send(req, 200, body, "text/plain")
            with self.lock:
                self.downloads.append((sha, name))
                target = self.origin.get(sha)
            if target is None:
                return self.send(req, 404, b"", "text/plain")
            req.send_response(302)
            req.send_header("Location", target)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return None
        return self.send(req, 404, b"", "text/plain")

    def project_page(self, req: BaseHTTPRequestHandler, project: str) -> None:
        fut = self.prefetched.get(normalize(project))
        code, page, base = fut.result() if fut is not None else fetch_page(project)
        if page is None:
            return self.send(req, code, b"", "text/plain")
        with self.lock:
            self.pages += 1
        # Leave out the files pip would discard anyway for this target (other platforms, other
        # CPython ABIs, sources under --only-binary): pip's evaluation of thousands of links per
        # page (torch, numpy) was most of its CPU time. The resolution cannot change by it.
        page["files"] = [f for f in page.get("files", []) if usable_wheel(f.get("filename", ""))]
        for f in page["files"]:
            sha = (f.get("hashes") or {}).get("sha256")
            for key in ("core-metadata", "dist-info-metadata", "data-dist-info-metadata"):
                f.pop(key, None)
            if not sha:
                continue  # no published hash: nothing to key metadata by; pip downloads it
            real = urllib.parse.urljoin(base, f["url"])
            with self.lock:
                self.origin[sha] = real
            f["url"] = f"{self.url}/files/{sha}/{f['filename']}"
            body = self.cache.get(sha)
            if body is not None and f["filename"].endswith(".whl"):
                f["core-metadata"] = {"sha256": hashlib.sha256(body).hexdigest()}
        self.send(req, 200, json.dumps(page).encode(), JSON_TYPE)

    @staticmethod
    def send(req: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str) -> None:
        req.send_response(code)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)


def resolver_pip() -> Path:
    """The pinned pip wheel, fetched once into .cache/ (git-ignored); pip runs from a wheel."""
    d = REPO / ".cache" / "resolve-pip"
    whl = d / f"pip-{RESOLVER_PIP}-py3-none-any.whl"
    if not whl.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(d),
                f"pip=={RESOLVER_PIP}",
            ],
            check=True,
            env=pip_env(),
            timeout=120,
        )
    return whl


def platform_args() -> list[str]:
    return [
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *[a for p in PLATFORMS for a in ("--platform", p)],
    ]


def metadata_headers(wheel: Path) -> str:
    """The METADATA of a wheel without its long description (the body after the first blank
    line): pip reads only the headers, and the cache stays small."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = z.read(name).decode("utf-8", "replace")
    head = re.split(r"\r?\n\r?\n", text, maxsplit=1)[0]
    return head.rstrip("\n") + "\n\n"


def refresh_cache(req: Path = REQ, cache_path: Path = CACHE) -> dict[str, str]:
    """Download the resolved set once (through the shim, so the same resolution) and store the
    METADATA of every wheel under the sha256 of the file."""
    cache = load_cache(cache_path)
    with tempfile.TemporaryDirectory() as tmp, Shim(cache) as shim:
        subprocess.run(
            [
                sys.executable,
                str(resolver_pip() / "pip"),
                "download",
                "--no-cache-dir",
                "-q",
                "--index-url",
                shim.url + "/simple/",
                "--trusted-host",
                "127.0.0.1",
                *platform_args(),
                "-d",
                tmp,
                "-r",
                str(req),
            ],
            check=True,
            env=pip_env(),
        )
        for f in Path(tmp).glob("*.whl"):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(8 << 20), b""):
                    h.update(chunk)
            cache[h.hexdigest()] = metadata_headers(f)
    # Candidates pip looked at and rejected while backtracking are not in the downloaded set:
    # resolve again and store the metadata of whatever it still had to download.
    for _ in range(3):
        cache_path.write_text(json.dumps(dict(sorted(cache.items())), indent=0) + "\n")
        extra = resolve(req, cache_path=cache_path)["downloaded_urls"]
        if not extra:
            break
        with tempfile.TemporaryDirectory() as tmp:
            for sha, url in extra.items():
                f = Path(tmp) / url.rsplit("/", 1)[1]
                with urllib.request.urlopen(url, timeout=300, context=ssl_context()) as r, open(f, "wb") as out:
                    shutil.copyfileobj(r, out, 8 << 20)
                if hashlib.sha256(f.read_bytes()).hexdigest() == sha:  # the file the index lists, nothing else
                    cache[sha] = metadata_headers(f)
    cache_path.write_text(json.dumps(dict(sorted(cache.items())), indent=0) + "\n")
    return cache


def resolve(req: Path = REQ, report: Optional[Path] = None, cache_path: Path = CACHE) -> dict:
    """Run pip's resolver (dry run) through the shim. Returns {returncode, stderr, seconds,
    report (parsed, or None), downloaded (wheel files pip had to fetch), pages}."""
    t0 = time.monotonic()
    pip_whl = resolver_pip()
    with tempfile.TemporaryDirectory() as tmp, Shim(load_cache(cache_path)) as shim:
        report_path = Path(report) if report else Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            str(pip_whl / "pip"),
            "install",
            "--dry-run",
            "--ignore-installed",
            "--no-cache-dir",
            "--index-url",
            shim.url + "/simple/",
            "--trusted-host",
            "127.0.0.1",
            *platform_args(),
            "--target",
            str(Path(tmp) / "target"),
            "--report",
            str(report_path),
            "-r",
            str(req),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=pip_env(), timeout=600)
        parsed = json.loads(report_path.read_text()) if proc.returncode == 0 and report_path.exists() else None
        return {
            "returncode": proc.returncode,
            "stderr": proc.stderr,
            "seconds": time.monotonic() - t0,
            "report": parsed,
            "downloaded": sorted({n for _, n in shim.downloads}),
            "pages": shim.pages,
            "downloaded_urls": {sha: shim.origin[sha] for sha, _ in shim.downloads if sha in shim.origin},
        }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refresh-cache", action="store_true", help="download the set once and store its metadata")
    p.add_argument("--report", help="also write pip's JSON report here")
    args = p.parse_args(argv)
    why = index_unreachable()
    if why:
        print(f"resolve_gpu_stack: the index cannot be reached: {why}", file=sys.stderr)
        return 2
    if args.refresh_cache:
        n = len(refresh_cache())
        print(f"resolve_gpu_stack: {n} metadata entries in {CACHE.relative_to(REPO)}")
    r = resolve(report=Path(args.report) if args.report else None)
    if r["returncode"] != 0:
        print(r["stderr"][-4000:], file=sys.stderr)
        print(
            f"resolve_gpu_stack: pip could not resolve {REQ.relative_to(REPO)} (exit {r['returncode']})",
            file=sys.stderr,
        )
        return 1
    got = {i["metadata"]["name"]: i["metadata"]["version"] for i in r["report"]["install"]}
    print(
        f"resolve_gpu_stack: {len(got)} packages in {r['seconds']:.1f} s ({r['pages']} index pages); "
        f"torch {got.get('torch')}, vllm {got.get('vllm')}, transformers {got.get('transformers')}"
    )
    if r["downloaded"]:
        print(
            f"resolve_gpu_stack: metadata not cached, wheels downloaded: {', '.join(r['downloaded'])} "
            f"(store them with --refresh-cache)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
