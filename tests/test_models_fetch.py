"""`pose-service models fetch` against a file server of its own on 127.0.0.1 (Range support, and a
connection it can cut mid-file), serving small files shaped like the released ones (the keys and
shapes `models verify` reads): every file lands where the engine reads it, a cut download resumes
from the .part's size, a file whose hash is wrong is refused, the HMR2 archive is extracted (and
one naming a path outside its folder is refused), --dry-run touches nothing, and `models verify`
passes on the result once the SMPL model (the manual step) is in place."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import sys
import tarfile
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

import numpy as np
import pytest

from gpu_worker.engines import hmr2_assets
from pose_service.cli import main
from pose_service.verbs import models_fetch
from pose_service.verbs.models_fetch import ARCHIVE, ARCHIVE_MEMBERS, MANUAL, SOURCES

# ---------------------------------------------------------------------------------------------
# the file server


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, Optional[str]]] = []  # (path, its Range header)
        self.cut_next: set[str] = set()  # paths whose next response stops halfway

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def asked(self, path: str) -> list[Optional[str]]:
        return [rng for asked, rng in self.requests if asked == path]


class RangeHandler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        self.server.requests.append((self.path, rng))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(rng[len("bytes="):].rstrip("-")) if rng else 0
        if start >= len(body) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in self.server.cut_next:
            self.server.cut_next.discard(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.close_connection = True  # the client sees the connection end before Content-Length
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def local_only(monkeypatch, tmp_path):
    """The caches under tmp_path, no proxy, and no request anywhere but 127.0.0.1."""
    for var, value in cache_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                models_fetch.MIRROR_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    real_open = models_fetch.open_from

    def open_local(url: str, offset: int):
        assert urlsplit(url).hostname == "127.0.0.1", f"a test tried to download {url}"
        return real_open(url, offset)

    monkeypatch.setattr(models_fetch, "open_from", open_local)


def cache_env(tmp_path) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch"),
            "FVCORE_CACHE": str(tmp_path / "fvcore")}


# ---------------------------------------------------------------------------------------------
# small files shaped like the released ones


def stand_in(kind: str) -> bytes:
    """The smallest file of each kind with the keys and shapes `models verify` checks."""
    import torch
    import yaml

    def zeros(*shape):
        return np.zeros(shape, dtype=np.uint8)

    def tensor(*shape):
        return torch.zeros(shape, dtype=torch.uint8)

    out = io.BytesIO()
    if kind == "smpl":
        pickle.dump({**{k: zeros(*s) for k, s in hmr2_assets.SMPL_SHAPES.items()}, "shapedirs": zeros(6890, 3, 10)},
                    out)
    elif kind == "j19":
        pickle.dump(zeros(19, 6890), out)
    elif kind == "mean_params":
        np.savez(out, pose=zeros(144), shape=zeros(10), cam=zeros(3))
    elif kind == "texture":
        np.savez(out, smpl_faces=zeros(13776, 3), vt=zeros(10, 2), ft=zeros(13776, 3))
    elif kind in ("mean_std", "uv_bary", "uv_face"):
        np.save(out, zeros(*{"mean_std": (2, 1, 229), "uv_bary": (256, 256, 3), "uv_face": (256, 256)}[kind]))
    elif kind == "hmr2_config":
        out.write(yaml.safe_dump({"MODEL": {"BACKBONE": {"TYPE": "vit"}, "SMPL_HEAD": {"TYPE": "transformer_decoder"}},
                                  "SMPL": {"MODEL_PATH": "data/smpl", "MEAN_PARAMS": "data/m.npz"},
                                  "EXTRA": {"FOCAL_LENGTH": 5000}}).encode())
    elif kind == "pose_predictor_config":
        out.write(yaml.safe_dump({"configs": {"in_feat": 8, "frame_length": 4, "transformer": {"depth": 1},
                                              "extra_feat": {"pose_shape": {"dim": 229}}, "num_smpl_heads": 1}}).encode())
    elif kind == "hmr2_checkpoint":
        names = {"backbone.patch_embed.proj.weight": (8, 3, 16, 16), "backbone.pos_embed": (1, 5, 8),
                 "backbone.blocks.0.attn.qkv.weight": (24, 8), "backbone.last_norm.weight": (8,),
                 "smpl_head.transformer.layers.0.w": (1,), "smpl_head.decpose.weight": (144, 4),
                 "smpl_head.decshape.weight": (10, 4), "smpl_head.deccam.weight": (3, 4)}
        torch.save({"state_dict": {name: tensor(*shape) for name, shape in names.items()}}, out)
    elif kind == "resnet50":
        torch.save({"conv1.weight": tensor(64, 3, 7, 7), "layer4.2.conv3.weight": tensor(2048, 512, 1, 1)}, out)
    elif kind == "hmar_weights":
        torch.save({"model": {f"hmar.{part}.w": tensor(1) for part in ("encoding_head", "texture_head", "backbone")}},
                   out)
    elif kind == "pose_predictor":
        names = ["encoder.transformer.layers.0.w", "encoder.transformer1.layers.0.w",
                 "encoder.smpl_head.0.decpose.weight", "encoder.loca_head.0.0.weight"]
        torch.save({"state_dict": {name: tensor(1) for name in names}}, out)
    elif kind == "detectron2":
        pickle.dump({"model": {"backbone.net.w": zeros(1), "roi_heads.box_predictors.0.cls_score.weight": zeros(81, 4)}},
                    out)
    else:
        raise AssertionError(kind)
    return out.getvalue()


def tar_gz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return out.getvalue()


def wanted(tmp_path) -> list[hmr2_assets.Asset]:
    """What the default config's rung reads: ViTDet on CUDA, the texture sampler."""
    return hmr2_assets.required_assets("vitdet", cache_env(tmp_path), "texture")


def url_path(name: str) -> str:
    return urlsplit(SOURCES[name].url).path


def serve_release(server: FileServer, tmp_path, monkeypatch) -> dict[str, bytes]:
    """Every file at its original path under the server; returns each asset's bytes. The
    ResNet-50's real size and hash are pinned in the table: the stand-in's take their place."""
    bodies = {asset.name: stand_in(asset.content) for asset in wanted(tmp_path) if asset.name not in MANUAL}
    server.files[url_path(ARCHIVE)] = tar_gz({f"./{ARCHIVE_MEMBERS[name]}": bodies[name] for name in ARCHIVE_MEMBERS}
                                             | {"data/vitpose_backbone.pth": b"also in the archive"})
    for name, body in bodies.items():
        if name not in ARCHIVE_MEMBERS:
            server.files[url_path(name)] = body
    resnet = bodies["resnet50_imagenet"]
    monkeypatch.setitem(SOURCES, "resnet50_imagenet", dataclasses.replace(
        SOURCES["resnet50_imagenet"], size=len(resnet), sha256=hashlib.sha256(resnet).hexdigest()))
    return bodies


def fetch(server: FileServer, *extra: str) -> int:
    return main(["models", "fetch", "--mirror", server.url, "--quiet", *extra])


def paths(tmp_path) -> dict[str, str]:
    return {asset.name: asset.path for asset in wanted(tmp_path)}


# ---------------------------------------------------------------------------------------------


def test_every_file_lands_where_the_engine_reads_it_and_verify_passes(server, tmp_path, monkeypatch, capsys):
    bodies = serve_release(server, tmp_path, monkeypatch)
    assert fetch(server) == 0
    out = capsys.readouterr().out
    where = paths(tmp_path)
    for name, body in bodies.items():
        with open(where[name], "rb") as fh:
            assert fh.read() == body, name
    # renamed as docs §5 says; the archive extracted (all of it) and then removed; no .part left
    assert where["phalp_pose_predictor"].endswith("weights/pose_predictor.pth")
    root = os.path.join(cache_env(tmp_path)["HOME"], ".cache", "4DHumans")
    assert os.path.isfile(os.path.join(root, "data", "vitpose_backbone.pth"))
    assert not os.path.exists(os.path.join(root, ARCHIVE))
    assert not [f for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".part")]
    # the SMPL model stays manual: named with the import-smpl step
    assert "smplify.is.tue.mpg.de" in out and "pose-service models import-smpl" in out
    assert where["hmr2_smpl_neutral"] in out and where["phalp_smpl_neutral"] in out
    assert main(["models", "verify", "--engine", "hmr2_phalp", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)["files"]
    assert {r["name"] for r in rows if r["status"] != "present" and not r.get("optional")} == MANUAL
    for name in MANUAL:  # what `models import-smpl` writes
        os.makedirs(os.path.dirname(where[name]), exist_ok=True)
        with open(where[name], "wb") as fh:
            fh.write(stand_in("smpl"))
    assert main(["models", "verify", "--engine", "hmr2_phalp"]) == 0, capsys.readouterr().out
    # a second run fetches nothing
    asked = len(server.requests)
    assert fetch(server) == 0
    assert len(server.requests) == asked


def test_a_cut_download_resumes_from_the_part_files_size(server, tmp_path, monkeypatch, capsys):
    bodies = serve_release(server, tmp_path, monkeypatch)
    path = url_path("phalp_hmar_weights")
    dest = paths(tmp_path)["phalp_hmar_weights"]
    server.cut_next.add(path)
    assert fetch(server, "--retries", "0") == 1
    assert "interrupted at" in capsys.readouterr().err
    assert not os.path.exists(dest)
    kept = os.path.getsize(dest + ".part")
    assert 0 < kept < len(bodies["phalp_hmar_weights"])
    assert fetch(server) == 0
    assert server.asked(path) == [None, f"bytes={kept}-"]
    with open(dest, "rb") as fh:
        assert fh.read() == bodies["phalp_hmar_weights"]
    assert not os.path.exists(dest + ".part")


def test_a_cut_download_is_resumed_within_one_run(server, tmp_path, monkeypatch, capsys):
    bodies = serve_release(server, tmp_path, monkeypatch)
    path = url_path("vitdet_h_weights")
    server.cut_next.add(path)
    assert fetch(server) == 0
    half = len(bodies["vitdet_h_weights"]) // 2
    assert server.asked(path) == [None, f"bytes={half}-"]
    assert "resuming (1/2)" in capsys.readouterr().err


def test_a_file_whose_sha256_does_not_match_is_refused_and_left_as_part(server, tmp_path, monkeypatch, capsys):
    serve_release(server, tmp_path, monkeypatch)
    dest = paths(tmp_path)["phalp_texture"]
    assert fetch(server, "--sha256", "phalp_texture", "0" * 64) == 1
    err = capsys.readouterr().err
    assert "phalp_texture: refused, its sha256 is" in err and f"left at {dest}.part" in err
    assert not os.path.exists(dest) and os.path.isfile(dest + ".part")
    assert os.path.isfile(paths(tmp_path)["phalp_mean_std"])  # the others were fetched
    assert fetch(server, "--sha256", "phalp_texture", "0" * 64) == 1  # the whole .part: refused again, not re-fetched
    assert server.asked(url_path("phalp_texture"))[-1] == f"bytes={os.path.getsize(dest + '.part')}-"


def test_a_pinned_size_that_does_not_match_is_refused(server, tmp_path, monkeypatch, capsys):
    serve_release(server, tmp_path, monkeypatch)
    monkeypatch.setitem(SOURCES, "resnet50_imagenet", dataclasses.replace(SOURCES["resnet50_imagenet"], size=102_502_400))
    assert fetch(server) == 1
    assert "the source table expects 102502400" in capsys.readouterr().err
    assert not os.path.exists(paths(tmp_path)["resnet50_imagenet"])


def test_a_file_that_is_not_what_verify_expects_is_refused(server, tmp_path, monkeypatch, capsys):
    serve_release(server, tmp_path, monkeypatch)
    server.files[url_path("phalp_mean_std")] = b"<html>moved</html>"
    assert fetch(server) == 1
    assert "phalp_mean_std: refused, it is not the file `models verify` expects" in capsys.readouterr().err
    assert not os.path.exists(paths(tmp_path)["phalp_mean_std"])


def test_dry_run_prints_the_plan_and_touches_nothing(server, tmp_path, monkeypatch, capsys):
    serve_release(server, tmp_path, monkeypatch)
    assert fetch(server, "--dry-run") == 0
    out = capsys.readouterr().out
    assert server.requests == [] and os.listdir(tmp_path) == []
    where = paths(tmp_path)
    for name in SOURCES.keys() - {ARCHIVE, "regnety_weights"}:
        assert f"{server.url}{url_path(name)}" in out and where[name] in out, name
    assert f"{server.url}{url_path(ARCHIVE)}" in out
    assert f"extracted into {os.path.join(cache_env(tmp_path)['HOME'], '.cache', '4DHumans')}" in out
    assert "(renamed from pose_predictor_40006.ckpt)" in out and "(renamed from config_40006.yaml)" in out
    assert "regnety" not in out  # the default rung's detector is ViTDet
    assert "[manual ] hmr2_smpl_neutral" in out


def test_the_detector_option_picks_the_regnety_weights(server, tmp_path, monkeypatch, capsys):
    assert fetch(server, "--dry-run", "--detector", "regnety") == 0
    out = capsys.readouterr().out
    assert "model_final_ef3a80.pkl" in out and "model_final_f05665.pkl" not in out


def test_an_archive_naming_a_path_outside_its_folder_is_refused_whole(server, tmp_path, monkeypatch, capsys):
    bodies = serve_release(server, tmp_path, monkeypatch)
    members = {ARCHIVE_MEMBERS[name]: bodies[name] for name in ARCHIVE_MEMBERS}
    server.files[url_path(ARCHIVE)] = tar_gz({**members, "../../escaped.txt": b"x"})
    assert fetch(server) == 1
    assert f"{ARCHIVE}: refused, it names '../../escaped.txt', outside the folder" in capsys.readouterr().err
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f == "escaped.txt"]
    assert not os.path.exists(paths(tmp_path)["hmr2_checkpoint"])


def test_links_in_the_archive_are_skipped(server, tmp_path, monkeypatch):
    bodies = serve_release(server, tmp_path, monkeypatch)
    members = {ARCHIVE_MEMBERS[name]: bodies[name] for name in ARCHIVE_MEMBERS}
    server.files[url_path(ARCHIVE)] = tar_gz(members, links={"data/passwd": "/etc/passwd"})
    assert fetch(server) == 0
    root = os.path.join(cache_env(tmp_path)["HOME"], ".cache", "4DHumans")
    assert not os.path.lexists(os.path.join(root, "data", "passwd"))
    assert os.path.isfile(paths(tmp_path)["hmr2_checkpoint"])


def test_one_source_can_be_replaced_and_unknown_names_are_refused(server, tmp_path, monkeypatch, capsys):
    bodies = serve_release(server, tmp_path, monkeypatch)
    server.files["/elsewhere/texture.npz"] = bodies["phalp_texture"]
    assert fetch(server, "--source", "phalp_texture", f"{server.url}/elsewhere/texture.npz") == 0
    assert server.asked("/elsewhere/texture.npz") == [None] and server.asked(url_path("phalp_texture")) == []
    assert fetch(server, "--source", "no_such_file", "http://127.0.0.1/x") == 2
    assert "no_such_file" in capsys.readouterr().err


def test_the_source_table_agrees_with_what_verify_names():
    """Each URL fetched is the one `models verify` tells the operator about, and every file the
    engine reads is fetched, extracted from the archive or named as manual."""
    env = {"HOME": "/h", "TORCH_HOME": "/t", "FVCORE_CACHE": "/f"}
    assets = {a.name: a for d in ("vitdet", "regnety") for a in hmr2_assets.required_assets(d, env, "texture")}
    for name, asset in assets.items():
        assert (name in SOURCES) + (name in ARCHIVE_MEMBERS) + (name in MANUAL) == 1, name
        if name in SOURCES:
            assert SOURCES[name].url in asset.source, name
        if name in ARCHIVE_MEMBERS:
            assert SOURCES[ARCHIVE].url in asset.source and asset.path.endswith(ARCHIVE_MEMBERS[name]), name
    assert SOURCES.keys() - {ARCHIVE} == {n for n in assets if n not in ARCHIVE_MEMBERS and n not in MANUAL}


def test_an_archive_kept_from_a_cut_extraction_is_extracted_without_downloading_it_again(server, tmp_path, monkeypatch,
                                                                                          capsys):
    serve_release(server, tmp_path, monkeypatch)
    root = os.path.join(cache_env(tmp_path)["HOME"], ".cache", "4DHumans")
    os.makedirs(root)
    with open(os.path.join(root, ARCHIVE), "wb") as fh:
        fh.write(server.files[url_path(ARCHIVE)])
    assert fetch(server, "--dry-run") == 0
    assert "kept from a run whose extraction was cut short" in capsys.readouterr().out
    assert fetch(server) == 0
    assert server.asked(url_path(ARCHIVE)) == []
    assert os.path.isfile(paths(tmp_path)["hmr2_checkpoint"]) and not os.path.exists(os.path.join(root, ARCHIVE))


class Gone:
    """Pickled by reference to a module the reader lacks, as a checkpoint that needs a package this
    environment does not have (yacs for HMR2's, without hmr2 installed)."""
    __module__ = "a_package_not_installed_here"


def test_an_intact_file_naming_a_class_this_environment_lacks_is_not_fetched_again(server, tmp_path, monkeypatch,
                                                                                   capsys):
    import torch
    serve_release(server, tmp_path, monkeypatch)
    dest = paths(tmp_path)["hmr2_checkpoint"]
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    saved_from = types.ModuleType(Gone.__module__)
    saved_from.Gone = Gone  # type: ignore[attr-defined]
    with monkeypatch.context() as while_saving:
        while_saving.setitem(sys.modules, Gone.__module__, saved_from)
        torch.save({"state_dict": {}, "hyper_parameters": {"cfg": Gone()}}, dest)
    row = hmr2_assets.verify([a for a in wanted(tmp_path) if a.name == "hmr2_checkpoint"])[0]
    assert row["status"] == "unreadable_here", row
    assert "a_package_not_installed_here.Gone" in row["problem"]
    assert fetch(server, "--dry-run") == 0
    out = capsys.readouterr().out
    extracted = [line for line in out.splitlines() if "extracted into" in line]
    assert extracted and not any("hmr2_checkpoint" in line for line in extracted)  # not fetched for it again
    assert "[manual ] hmr2_checkpoint" in out and "a_package_not_installed_here.Gone" in out
