"""`pose-service models fetch`: download every file the configured hmr2_phalp rungs read into the
caches the engine reads (the paths `models verify` checks), from each file's public source.

Each download goes to `<file>.part` and is resumed with an HTTP Range request when a run is cut
short. A finished `.part` is checked (its size against the server's and, where the source table
pins them, the expected size and sha256; then its content as `models verify` reads it) before it
is renamed into place; one that fails is refused and left as `.part`. hmr2_data.tar.gz is extracted
into $HOME/.cache/4DHumans after every member has been checked to stay inside it. The SMPL model
is licensed and stays manual (`pose-service models import-smpl`).

Sources: the table below; `--mirror URL` (or $POSE_SERVICE_MODELS_MIRROR) fetches every file from
URL + the original URL's path (a mirror laid out as `wget -x -nH` writes it); `--source NAME URL`
replaces one; `--sha256 NAME HEX` pins a hash."""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import posixpath
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from gpu_worker.engines import hmr2_assets
from gpu_worker.engines.hmr2_assets import Asset

MIRROR_ENV = "POSE_SERVICE_MODELS_MIRROR"
USER_AGENT = "pose-service-models-fetch/1"
CHUNK = 1 << 20
TIMEOUT_S = 60.0
ARCHIVE = "hmr2_data.tar.gz"


@dataclass(frozen=True)
class Source:
    url: str
    size: Optional[int] = None  # bytes, where known
    sha256: str = ""  # no project publishes hashes: pin one here (or with --sha256 NAME HEX) once you trust a copy


PHALP = hmr2_assets.PHALP_HOST
SOURCES: dict[str, Source] = {
    ARCHIVE: Source(hmr2_assets.HMR2_ARCHIVE_URL),
    "phalp_smpl_to_j19": Source(PHALP + "3D/SMPL_to_J19.pkl"),
    "phalp_smpl_mean_params": Source(PHALP + "3D/smpl_mean_params.npz"),
    "phalp_texture": Source(PHALP + "3D/texture.npz"),
    "phalp_mean_std": Source(PHALP + "3D/mean_std.npy"),
    "phalp_hmar_weights": Source(PHALP + "weights/hmar_v2_weights.pth"),
    "phalp_pose_predictor": Source(PHALP + "weights/pose_predictor_40006.ckpt"),
    "phalp_pose_predictor_config": Source(PHALP + "weights/config_40006.yaml"),
    "phalp_uv_bary_map": Source(PHALP + "bmap_256.npy"),
    "phalp_uv_face_map": Source(PHALP + "fmap_256.npy"),
    # torch.hub names its files after their sha256's first 8 hex digits: this hash begins 19c8e357
    "resnet50_imagenet": Source(hmr2_assets.RESNET50_URL, size=102_502_400,
                                sha256="19c8e3572231adff6824a2da93fd67b5986919a2e65f8b6007eab4edee220097"),
    "vitdet_h_weights": Source(hmr2_assets.VITDET_URL),
    "regnety_weights": Source(hmr2_assets.REGNETY_URL),
}
# where each HMR2 file lies inside hmr2_data.tar.gz (extracted into $HOME/.cache/4DHumans)
ARCHIVE_MEMBERS = {
    "hmr2_checkpoint": "logs/train/multiruns/hmr2/0/checkpoints/epoch=35-step=1000000.ckpt",
    "hmr2_model_config": "logs/train/multiruns/hmr2/0/model_config.yaml",
    "hmr2_smpl_to_j19": "data/SMPL_to_J19.pkl",
    "hmr2_smpl_mean_params": "data/smpl_mean_params.npz",
}
MANUAL = {"hmr2_smpl_neutral", "phalp_smpl_neutral"}  # the SMPL licence: see closing_notes


class FetchError(Exception):
    pass


@dataclass
class Download:
    name: str
    source: Source
    dest: str
    assets: list[Asset]  # what it puts in place
    extract_into: str = ""  # an archive's folder

    @property
    def part(self) -> str:
        return self.dest + ".part"

    @property
    def renamed_from(self) -> str:
        remote = os.path.basename(urlsplit(self.source.url).path)
        return "" if self.extract_into or remote == os.path.basename(self.dest) else remote


@dataclass
class Plan:
    present: list[Asset] = field(default_factory=list)
    downloads: list[Download] = field(default_factory=list)
    manual: list[tuple[Asset, str]] = field(default_factory=list)  # with why it is not ready


# ----------------------------------------------------------------------------------------------
# what to fetch


def wanted_assets(cfg: Any, detector: Optional[str], base_env: Mapping[str, str] = os.environ) -> list[Asset]:
    """The files of every hmr2_phalp rung, as `models verify` lists them (each rung's detector,
    appearance and cache overrides), each path once."""
    from gpu_worker.engines.hmr2_phalp import Settings
    from pose_service.hmr2_verify import hmr2_rungs

    by_path: dict[str, Asset] = {}
    for rung in hmr2_rungs(cfg, detector):
        device_type = "cuda" if str(rung.get("device", "cuda")).startswith("cuda") else "cpu"
        settings = Settings.from_options(rung.get("options") or {})
        for asset in hmr2_assets.required_assets(settings.detector, settings.environment(base_env),
                                                 settings.appearance_on(device_type)):
            by_path.setdefault(asset.path, asset)
    return list(by_path.values())


def archive_root(asset: Asset) -> str:
    """The folder hmr2_data.tar.gz is extracted into, for one of its members."""
    member = os.path.join(*ARCHIVE_MEMBERS[asset.name].split("/"))
    return asset.path[: -len(member)].rstrip(os.sep)


def make_plan(assets: Sequence[Asset], sources: Mapping[str, Source]) -> Plan:
    plan = Plan()
    archives: dict[str, Download] = {}
    for asset in assets:
        status, _, problem = hmr2_assets.asset_status(asset)
        if status == "present":
            plan.present.append(asset)
        elif asset.name in MANUAL or status == "unreadable_here":  # a package missing, not the file
            plan.manual.append((asset, problem or status))
        elif asset.name in ARCHIVE_MEMBERS:
            root = archive_root(asset)
            if root not in archives:
                archives[root] = Download(ARCHIVE, sources[ARCHIVE], os.path.join(root, ARCHIVE), [], root)
            archives[root].assets.append(asset)
        else:
            plan.downloads.append(Download(asset.name, sources[asset.name], asset.path, [asset]))
    plan.downloads[:0] = archives.values()
    return plan


def resolve_sources(mirror: str = "", overrides: Sequence[Sequence[str]] = (), pins: Sequence[Sequence[str]] = (),
                    table: Mapping[str, Source] = SOURCES) -> dict[str, Source]:
    """The table, with every URL moved under `mirror`, then (NAME, URL) and (NAME, SHA256) applied."""
    sources = dict(table)
    if mirror:
        sources = {name: dataclasses.replace(s, url=mirror.rstrip("/") + urlsplit(s.url).path)
                   for name, s in sources.items()}
    for name, url in named_values(overrides, "--source", sources):
        sources[name] = dataclasses.replace(sources[name], url=url)
    for name, digest in named_values(pins, "--sha256", sources):
        sources[name] = dataclasses.replace(sources[name], sha256=digest.lower())
    return sources


def named_values(pairs: Sequence[Sequence[str]], option: str,
                 sources: Mapping[str, Source]) -> list[tuple[str, str]]:
    unknown = [name for name, _ in pairs if name not in sources]
    if unknown:
        raise FetchError(f"{option} {unknown[0]!r}: not a file this fetches; one of {', '.join(sources)}")
    return [(name, value) for name, value in pairs]


# ----------------------------------------------------------------------------------------------
# HTTP with resumption


def open_from(url: str, offset: int) -> Any:
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def content_range(header: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """`bytes START-END/TOTAL` or `bytes */TOTAL` -> (START, TOTAL), None where absent or `*`."""
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[6:].partition("/")
    start = span.split("-")[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def download(url: str, part: str, label: str, quiet: bool = False) -> Optional[int]:
    """Fetch `url` into `part`, continuing a partial `part`; returns the server's size of the file
    (None when it does not say). Raises FetchError when cut short, keeping `part`."""
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    try:
        response = open_from(url, offset)
    except urllib.error.HTTPError as exc:
        _, total = content_range(exc.headers.get("Content-Range"))
        if exc.code == 416 and offset and total == offset:
            return total  # the .part was already whole
        if exc.code == 416:
            os.remove(part)  # larger than the file now served: start again
            return download(url, part, label, quiet)
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"{url}: {getattr(exc, 'reason', exc)}") from None
    with response:
        start, total = content_range(response.headers.get("Content-Range"))
        if response.status == 206 and start != offset:
            raise FetchError(f"{url}: asked for bytes from {offset}, the server sent them from {start}")
        if response.status != 206:
            offset = 0  # the server sent the whole file
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        copy_body(response, part, offset, total, label, quiet)
    written = os.path.getsize(part)
    if total is not None and written != total:
        raise FetchError(f"{label}: interrupted at {written} of {total} bytes; run again to resume "
                         f"(kept {part})")
    return total


def copy_body(response: Any, part: str, offset: int, total: Optional[int], label: str, quiet: bool) -> None:
    from tqdm import tqdm

    os.makedirs(os.path.dirname(part), exist_ok=True)
    with open(part, "ab" if offset else "wb") as out, \
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                 disable=True if quiet else None, leave=False) as bar:
        while chunk := read_chunk(response):
            out.write(chunk)
            bar.update(len(chunk))


def read_chunk(response: Any) -> bytes:
    """The next chunk; b"" at the end and when the connection was cut (the caller's size check names
    that, and the .part is resumed next time)."""
    try:
        return response.read(CHUNK)
    except (http.client.HTTPException, ConnectionError, TimeoutError):
        return b""


# ----------------------------------------------------------------------------------------------
# checks and installation


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def refusal(item: Download) -> str:
    """Why the finished .part (as long as the server's file) is not the file expected; "" when it is."""
    size = os.path.getsize(item.part)
    expected = item.source.size
    if expected is not None and size != expected:
        return f"it has {size} bytes, the source table expects {expected}"
    if item.source.sha256:
        actual = sha256_of(item.part)
        if actual != item.source.sha256:
            return f"its sha256 is {actual}, expected {item.source.sha256}"
    for asset in [] if item.extract_into else item.assets:
        problem = hmr2_assets.content_problem(dataclasses.replace(asset, path=item.part))
        if problem:
            return f"it is not the file `models verify` expects: {problem}"
    return ""


def member_path(member: tarfile.TarInfo) -> str:
    return posixpath.normpath(member.name.replace("\\", "/"))


def escapes(member: tarfile.TarInfo) -> bool:
    path = member_path(member)
    return path.startswith("/") or path == ".." or path.startswith("../") or ":" in path.split("/")[0]


def extract_archive(archive: str, root: str, wanted: Sequence[str]) -> None:
    """Regular files and folders only, none outside `root` (an archive naming one is refused
    whole). They are extracted into a staging folder and then moved into place, so a cut extraction
    leaves no half-written checkpoint under its real name; a file already in place is kept unless
    it is one of `wanted` (an operator's converted SMPL model is never overwritten)."""
    staging = os.path.join(root, ".hmr2_data.extracting")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            outside = [m.name for m in members if escapes(m)]
            if outside:
                raise FetchError(f"{archive}: refused, it names {outside[0]!r}, outside the folder it is "
                                 "extracted into (delete it to download it again)")
            regular = [m for m in members if m.isfile() or m.isdir()]  # links and devices are skipped
            absent = sorted(set(wanted) - {member_path(m) for m in regular if m.isfile()})
            if absent:
                raise FetchError(f"{archive}: it has no {', '.join(absent)}; not the HMR2 release archive? "
                                 "(delete it to download it again)")
            extract_members(tar, regular, staging)
        move_tree(staging, root, replace={os.path.normpath(os.path.join(root, *w.split("/"))) for w in wanted})
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise FetchError(f"{archive}: cannot be extracted ({type(exc).__name__}: {exc}); delete it to download "
                         "it again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def extract_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], folder: str) -> None:
    """tarfile's "data" filter (Python >= 3.10.12) checks every path again as it writes."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(folder, members=members, filter="data")
    else:
        tar.extractall(folder, members=members)


def move_tree(staging: str, root: str, replace: set[str]) -> None:
    for folder, _, files in os.walk(staging):
        target = os.path.join(root, os.path.relpath(folder, staging))
        os.makedirs(target, exist_ok=True)
        for name in files:
            dest = os.path.normpath(os.path.join(target, name))
            if dest in replace or not os.path.exists(dest):
                os.replace(os.path.join(folder, name), dest)


def fetch_one(item: Download, retries: int, quiet: bool) -> None:
    already_whole = bool(item.extract_into) and os.path.isfile(item.dest)  # a kept archive, extraction cut
    if not already_whole:
        download_with_retries(item, retries, quiet)
        problem = refusal(item)
        if problem:
            raise FetchError(f"{item.name}: refused, {problem}; left at {item.part} (delete it to download "
                             "again, or check the source)")
        os.replace(item.part, item.dest)
    if item.extract_into:
        extract_archive(item.dest, item.extract_into, [ARCHIVE_MEMBERS[a.name] for a in item.assets])
        os.remove(item.dest)


def download_with_retries(item: Download, retries: int, quiet: bool) -> None:
    for attempt in range(retries + 1):
        try:
            download(item.source.url, item.part, item.name, quiet)
            return
        except FetchError as exc:
            if attempt == retries or not os.path.isfile(item.part):
                raise
            print(f"  {exc}; resuming ({attempt + 1}/{retries})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# the verb


def describe(item: Download) -> list[str]:
    size = f", {item.source.size} bytes" if item.source.size else ""
    lines = [f"  [fetch  ] {item.name}  {item.source.url}{size}"]
    if item.extract_into:
        lines.append(f"            extracted into {item.extract_into}: {', '.join(a.name for a in item.assets)}")
    else:
        renamed = f" (renamed from {item.renamed_from})" if item.renamed_from else ""
        lines.append(f"            -> {item.dest}{renamed}")
    if item.extract_into and os.path.isfile(item.dest):
        lines.append(f"            extracts {item.dest}, kept from a run whose extraction was cut short")
    elif os.path.isfile(item.part):
        lines.append(f"            resumes {item.part} at {os.path.getsize(item.part)} bytes")
    return lines


def print_plan(plan: Plan) -> None:
    total = len(plan.present) + len(plan.manual) + sum(len(d.assets) for d in plan.downloads)
    print(f"models fetch: {total} files for the configured hmr2_phalp rungs; {len(plan.present)} in place, "
          f"{len(plan.downloads)} downloads, {len(plan.manual)} manual")
    for asset in plan.present:
        print(f"  [present] {asset.name}  {asset.path}")
    for item in plan.downloads:
        print("\n".join(describe(item)))
    for asset, why in plan.manual:
        print(f"  [manual ] {asset.name}  {asset.path} ({why})")


def closing_notes(plan: Plan) -> str:
    if not plan.manual:
        return "Next: pose-service models verify"
    paths = "\n".join(f"     {asset.path}" for asset, _ in plan.manual)
    return ("Still manual (a licence stands in the way):\n"
            "  1. register at https://smplify.is.tue.mpg.de and download basicModel_neutral_lbs_10_207_0_v1.0.0.pkl\n"
            "     (SMPL is for non-commercial use only)\n"
            "  2. pose-service models import-smpl path/to/basicModel_neutral_lbs_10_207_0_v1.0.0.pkl\n"
            f"     which writes:\n{paths}\n"
            "Then: pose-service models verify")


def run_plan(plan: Plan, retries: int, quiet: bool) -> list[str]:
    failures = []
    for item in plan.downloads:
        print(f"fetching {item.name} from {item.source.url}", flush=True)
        try:
            fetch_one(item, retries, quiet)
        except (FetchError, OSError) as exc:  # OSError: the disk (full, not writable)
            failures.append(str(exc))
            print(f"  failed: {exc}", file=sys.stderr, flush=True)
        else:
            print(f"  done: {', '.join(a.path for a in item.assets)}", flush=True)
    return failures


def models_fetch(cfg: Any, args: Any) -> int:
    try:
        sources = resolve_sources(args.mirror or os.environ.get(MIRROR_ENV, ""), args.source or [],
                                  args.sha256 or [])
        plan = make_plan(wanted_assets(cfg, args.detector), sources)
    except (FetchError, ValueError) as exc:
        print(f"pose-service models fetch: {exc}", file=sys.stderr)
        return 2
    print_plan(plan)
    if args.dry_run:
        print("dry run: nothing fetched")
        print(closing_notes(plan))
        return 0
    failures = run_plan(plan, args.retries, args.quiet)
    if failures:
        print(f"{len(failures)} of {len(plan.downloads)} downloads failed:\n  " + "\n  ".join(failures),
              file=sys.stderr)
    print(closing_notes(plan))
    return 1 if failures else 0
