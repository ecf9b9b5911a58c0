"""`hcnr-deploy data fetch`: the honesty benchmarks from their public sources, checked, into a data folder.

SelfAware and UnknownBench (FalseQA, NEC, RefuNQ) come from GitHub at pinned commits over plain HTTPS, each
checked against its pinned sha256 (the values of the unchanged public files, verified against the project's
copies in ../shared/data). `--mirror URL` (or $HCNR_DATA_MIRROR) replaces https://raw.githubusercontent.com with a
mirror holding the same paths (OWNER/REPO/COMMIT/PATH). KUQ comes from the Hugging Face hub through
huggingface_hub (dataset amayuelas/KUQ at a pinned revision), which honours HF_ENDPOINT (a hub mirror), HF_TOKEN
and the hub cache; its sha256 is not pinned (no verified copy here): the first download's is recorded in
fetch.json and a later fetch that gets other bytes is an error.

Each file is written atomically (a partial download never appears under its name). Offline (HF_HUB_OFFLINE=1, or
the downloads fail) the error is one line naming each missing file, where it comes from and where to put it.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from eval_harness.atomic import write_text_atomic
from eval_harness.benchmarks import file_sha256 as sha256_of
from eval_harness.errors import UserError

GITHUB_RAW = "https://raw.githubusercontent.com"
MIRROR_ENVVAR = "HCNR_DATA_MIRROR"
MANIFEST = "fetch.json"
SELFAWARE = "yinzhangyue/SelfAware/f0bad1ff77bd42fc4eb2360281ed646c7bb7bd0c"
UNKNOWNBENCH = "genglinliu/UnknownBench/7283e4218b9146275d3069306927c3289fad576a"
KUQ_REPO, KUQ_REVISION = "amayuelas/KUQ", "e7245253705b7bd3e1b99e58de38f0ab0d8e7b5f"


@dataclass(frozen=True)
class Source:
    benchmark: str
    dest: str                  # path inside the data folder (the layout of ../shared/data)
    github: str | None = None  # OWNER/REPO/COMMIT/PATH under GITHUB_RAW (or the mirror)
    hub: str | None = None     # a file of the hub dataset KUQ_REPO at KUQ_REVISION
    sha256: str | None = None  # None: not pinned


def _ub(name: str, sha256: str) -> Source:
    stem = name.split("_")[0]
    return Source(stem.lower(), f"unknownbench/{name}.jsonl", f"{UNKNOWNBENCH}/data/{stem}/{name}.json", sha256=sha256)


SOURCES = (
    Source("selfaware", "selfaware/SelfAware.json", f"{SELFAWARE}/data/SelfAware.json",
           sha256="32929585ffdd4048f35f7f167720722eb8ddcf59908ffc958da2f84ea634dc54"),
    Source("kuq", "kuq/knowns_unknowns.jsonl", hub="knowns_unknowns.jsonl"),
    _ub("FalseQA_answerable", "227cfc2f3d614c0d40dcd8ef00c0201545fe74f067191806416bf44524e06e37"),
    _ub("FalseQA_unanswerable", "00ff24d90bc06605cde99ab2345768569591e36008a5c0b10b3e3a01b3bdb0a4"),
    _ub("NEC_answerable", "458201872dd39bf194f62b6e6c44233242dd99f0ca6cd6723199f39ef84e74df"),
    _ub("NEC_unanswerable", "72a666544e4fc5269ece3d80f27f6f7a29a3e45ac50660da2e85b94f0eae2f05"),
    _ub("RefuNQ_answerable", "6f16a61912076245c8592728b7d68a7f9dc9fb725344b671615b466b0faeb7a3"),
    _ub("RefuNQ_unanswerable", "3e1510f12df0a38f032d291942e224811d40755c358129798fcd15f53d6042c5"),
)


class Unreachable(Exception):
    """A source could not be reached (offline, refused, not found)."""


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def url_of(src: Source, mirror: str | None) -> str:
    if src.hub is not None:
        endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        return f"{endpoint}/datasets/{KUQ_REPO}/resolve/{KUQ_REVISION}/{src.hub}"
    return f"{(mirror or GITHUB_RAW).rstrip('/')}/{src.github}"


def _download_url(url: str, tmp: Path, timeout: float = 60.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise Unreachable(getattr(e, "reason", None) or e) from None


def _download_hub(filename: str, tmp: Path):
    """Through huggingface_hub (its cache, HF_ENDPOINT and HF_TOKEN), copied to `tmp`."""
    import shutil

    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(KUQ_REPO, filename, repo_type="dataset", revision=KUQ_REVISION,
                               endpoint=os.environ.get("HF_ENDPOINT") or None, local_files_only=offline())
    except Exception as e:  # offline, refused, unknown: huggingface_hub raises many kinds
        raise Unreachable(type(e).__name__) from None
    shutil.copyfile(path, tmp)


def fetch_one(src: Source, folder: Path, mirror: str | None, recorded: str | None) -> str:
    """Download `src` to folder/src.dest (atomically) and return its sha256; raises Unreachable or UserError."""
    target = folder / src.dest
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    try:
        if src.hub is not None:
            _download_hub(src.hub, tmp)
        elif offline():
            raise Unreachable("offline (HF_HUB_OFFLINE)")
        else:
            _download_url(url_of(src, mirror), tmp)
        got = sha256_of(tmp)
        want = src.sha256 or recorded
        if want is not None and got != want:
            which = "pinned" if src.sha256 else "recorded"
            raise UserError(f"{url_of(src, mirror)}: sha256 {got[:16]}... is not the {which} {want[:16]}... of "
                            f"{src.dest}; the source or mirror serves another file; nothing written")
        os.replace(tmp, target)
        return got
    finally:
        tmp.unlink(missing_ok=True)


def fetch(folder: Path, benchmarks=None, mirror: str | None = None, console=print) -> dict:
    """Every file of `benchmarks` (default all five) present and checked in `folder`; returns {dest: sha256}.
    A file already there with the right checksum is kept; a wrong one is downloaded again."""
    from eval_harness.benchmarks import HONESTY_BENCHMARKS, parse_benchmarks

    names = parse_benchmarks(benchmarks) if benchmarks else list(HONESTY_BENCHMARKS)
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    done, missing = {}, []
    for src in (s for s in SOURCES if s.benchmark in names):
        target = folder / src.dest
        want = src.sha256 or manifest.get(src.dest)
        if target.is_file() and (want is None or sha256_of(target) == want):
            done[src.dest] = sha256_of(target)
            console(f"present    {src.dest}")
            continue
        try:
            done[src.dest] = fetch_one(src, folder, mirror, manifest.get(src.dest))
        except Unreachable as e:
            missing.append((src, str(e)))
            continue
        console(f"downloaded {src.dest}" + ("" if src.sha256 else " (checksum not pinned: recorded in fetch.json)"))
    if done:
        manifest.update(done)
        write_text_atomic(manifest_path, json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    if missing:
        where = "; ".join(f"{folder / s.dest} from {url_of(s, mirror)}" for s, _ in missing)
        raise UserError(f"could not download {len(missing)} file(s) ({missing[0][1]}): put each at {where} (the "
                        f"unchanged public files), or point --mirror / ${MIRROR_ENVVAR} (GitHub files) or HF_ENDPOINT "
                        f"(KUQ) at a copy, and run `hcnr-deploy data fetch` again")
    return done
