"""Nothing a user already has is ever lost: every command that writes refuses an output
path holding something it did not write (one line naming the path, exit 2), and
``--overwrite`` replaces only our own outputs, deleting only the files they consist of.
Local paths here; ``s3://`` (the loopback moto server) at the end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from cli_run import cli, snapshot
from s3_server import moto_s3

from cache import FeatureStore, Listing, StoreWriter, make_signature
from cache.hdf5 import export_hdf5
from cache.ownership import (
    PNG_TEXT,
    ForeignPathError,
    is_marked_png,
    prepare_run_folder,
    remove_store,
    store_state,
)


def refused(res, path) -> str:
    """Exit 2 with exactly one stderr line, naming ``path``; returns the line."""
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], res.stderr
    return lines[0]


def _sig(dtype="float16"):
    return make_signature(encoder="litemedsam", checkpoint_sha256="ab" * 32, img_size=256, preprocessing={},
                          precision="fp32", dataset_kind="synthetic", dataset_signature="cd" * 32, dtype=dtype)


def make_store(url, n=4, storage_options=None, overwrite=False, dtype="float16") -> str:
    """A complete store of ours (random embeddings, written through StoreWriter)."""
    data = np.random.default_rng(0).standard_normal((n, 256, 64, 64)).astype(np.float32)
    listing = Listing(ids=[f"i{k}" for k in range(n)], labels=[k % 2 for k in range(n)], splits=["train"] * n,
                      groups=[""] * n, slices=[-1] * n)
    with StoreWriter.open(str(url), signature=_sig(dtype), listing=listing, classes=["a", "b"], shard_size=2,
                          storage_options=storage_options, overwrite=overwrite) as w:
        for a, b in w.pending():
            w.write_shard(a, data[a:b])
            w.mark_done(a, [8] * (b - a), [8] * (b - a), [f"h{i}" for i in range(a, b)], [False] * (b - a))
        w.commit()
    return str(url)


def foreign_zarr(path):
    g = zarr.open_group(str(path), mode="w-", zarr_format=3, attributes={"made_by": "someone else"})
    g.create_array("x", shape=(3,), dtype="int32")[:] = [1, 2, 3]
    return path


@pytest.fixture()
def user_folder(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    (d / "thesis.docx").write_text("precious")
    return d


@pytest.fixture()
def user_file(tmp_path):
    f = tmp_path / "file.zarr"
    f.write_text("keep")
    return f


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    return export_hdf5(make_store(d / "s.zarr"), d / "s.h5")


# --- extract (local, dask) ---------------------------------------------------------------
EXTRACT = ("extract", "--dataset", "imagefolder", "--data-root", "nowhere", "-q")


@pytest.mark.parametrize("what", ["folder", "file", "zarr"])
@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--dask-workers", "1", "--overwrite"]])
def test_extract_refuses_what_it_did_not_write(tmp_path, user_folder, user_file, what, extra):
    target = {"folder": user_folder, "file": user_file, "zarr": tmp_path / "other.zarr"}[what]
    if what == "zarr":
        foreign_zarr(target)
    before = snapshot(target)
    line = refused(cli(*EXTRACT, "--out", target, *extra), target)
    assert "not a feature store" in line
    assert snapshot(target) == before  # nothing deleted, nothing added
    assert not Path(str(target) + ".lock").exists()


def test_writer_refuses_foreign_paths_itself(tmp_path, user_folder, user_file):
    """The guard is in the cache layer, not only in the CLI (dask, import, notebooks)."""
    other = foreign_zarr(tmp_path / "other.zarr")
    for target in (user_folder, user_file, other):
        before = snapshot(target)
        for overwrite in (False, True):
            with pytest.raises(ForeignPathError, match="not a feature store"):
                make_store(target, overwrite=overwrite)
        assert snapshot(target) == before


def test_overwrite_deletes_only_the_files_of_our_store(tmp_path):
    url = make_store(tmp_path / "s.zarr")
    (tmp_path / "s.zarr" / "NOTES.txt").write_text("mine")  # the user's file inside our store
    (tmp_path / "s.zarr" / "embeddings" / "README").write_text("mine too")
    make_store(url, overwrite=True, dtype="int8")
    assert (tmp_path / "s.zarr" / "NOTES.txt").read_text() == "mine"
    assert (tmp_path / "s.zarr" / "embeddings" / "README").read_text() == "mine too"
    assert FeatureStore(url).dtype == "int8"
    remove_store(url)
    assert sorted(snapshot(tmp_path / "s.zarr")) == ["NOTES.txt", "embeddings/README"]


def test_an_empty_folder_is_used_and_a_foreign_lock_file_is_refused(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    assert store_state(tmp_path / "empty.zarr")[0] == "empty"
    FeatureStore(make_store(tmp_path / "empty.zarr"))
    lock = tmp_path / "b.zarr.lock"
    for text in ("my shopping list", "2024", "12 34\n", "7\n8\n"):  # only "<pid>\n" is ours
        lock.write_text(text)
        with pytest.raises(Exception, match="not a store lock"):
            make_store(tmp_path / "b.zarr")
        assert lock.read_text() == text and not (tmp_path / "b.zarr").exists()
    for text in ("4242\n", ""):  # left by a killed writer, or one killed before writing its pid
        lock.write_text(text)
        FeatureStore(make_store(tmp_path / "b.zarr", overwrite=True))
        assert not lock.exists()


def test_extract_over_its_own_store_with_overwrite_replaces_it(tmp_path):
    """The real command end to end, tiny random-weight encoder."""
    from PIL import Image
    from tiny_sam import make_tiny_sam_checkpoint

    ckpt = make_tiny_sam_checkpoint(tmp_path / "sam16.pth", embed_dim=16, depth=1, global_attn=(0,), num_heads=1)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.fromarray(np.full((16, 16), 40 if c == "a" else 200, np.uint8)).save(tmp_path / "data" / c / "x.png")
    out = tmp_path / "s.zarr"
    args = ("extract", "-d", "imagefolder", "-r", tmp_path / "data", "-o", out, "--encoder", "sam",
            "--checkpoint", ckpt, "--workers", "0", "-q")
    assert cli(*args).exit_code == 0
    (out / "NOTES.txt").write_text("mine")
    res = cli(*args, "--dtype", "int8")
    assert res.exit_code == 2 and "made differently" in res.stderr
    assert cli(*args, "--dtype", "int8", "--overwrite").exit_code == 0
    assert FeatureStore(out).dtype == "int8" and (out / "NOTES.txt").read_text() == "mine"


# --- import / export -----------------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_import_refuses_a_folder_or_group_it_did_not_write(tmp_path, export, extra):
    imp = tmp_path / "imp"
    imp.mkdir()
    (imp / "keep.txt").write_text("precious")
    other = foreign_zarr(tmp_path / "other.zarr")
    for target in (imp, other):
        before = snapshot(target)
        refused(cli("import", export, "--out", target, *extra), target)
        assert snapshot(target) == before


def test_import_replaces_its_own_store_only_with_overwrite(tmp_path, export):
    out = tmp_path / "y.zarr"
    assert cli("import", export, "--out", out).exit_code == 0
    refused(cli("import", export, "--out", out), out)
    res = cli("import", export, "--out", out, "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert FeatureStore(out).n == 4


def test_export_refuses_foreign_files_and_folders(tmp_path, export, user_folder):
    import h5py

    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2, 3]
    store = str(export.parent / "s.zarr")
    for target in (text, other, user_folder):
        before = snapshot(target)
        for extra in ([], ["--overwrite"]):
            refused(cli("export", store, "--out", target, *extra), target)
        assert snapshot(target) == before
    mine = tmp_path / "mine.h5"
    assert cli("export", store, "--out", mine).exit_code == 0
    refused(cli("export", store, "--out", mine), mine)
    assert cli("export", store, "--out", mine, "--overwrite").exit_code == 0
    link = tmp_path / "link.h5"  # to an export of ours: --overwrite would write on the target
    link.symlink_to(mine)
    before = snapshot(mine)
    refused(cli("export", store, "--out", link, "--overwrite"), link)
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir() if ".partial" in p.name) == []


# --- train / segment run folders ---------------------------------------------------------------
def test_run_folder_helper_keeps_what_is_not_a_run_output(tmp_path):
    outputs = ("model.pt", "metrics.json", "overlays/")
    markers = ("config.json", "model.pt")
    kw = dict(outputs=outputs, markers=markers, is_marker=lambda p: p.read_bytes() == b"weights")
    run = tmp_path / "run"
    prepare_run_folder(run, overwrite=False, resume=False, **kw)
    (run / "model.pt").write_bytes(b"weights")
    (run / "metrics.json").write_text("{}")
    (run / "overlays").mkdir()
    _picture(run / "overlays" / "0.png", marked=True)
    (run / "overlays" / "mine.txt").write_text("mine")
    (run / "notes.txt").write_text("mine")
    for overwrite, resume in ((True, False), (False, True)):  # a file of the user's inside an output folder
        with pytest.raises(ForeignPathError, match="overlays: not written by"):
            prepare_run_folder(run, overwrite=overwrite, resume=resume, **kw)
    (run / "overlays" / "mine.txt").unlink()
    with pytest.raises(ForeignPathError, match="earlier training run"):
        prepare_run_folder(run, overwrite=False, resume=False, **kw)
    prepare_run_folder(run, overwrite=False, resume=True, **kw)
    assert (run / "model.pt").exists()
    prepare_run_folder(run, overwrite=True, resume=False, **kw)
    assert sorted(snapshot(run)) == ["notes.txt"]
    (run / "config.json").write_text("my settings")  # a marker's name, not its content
    for overwrite, resume in ((False, False), (True, False), (False, True)):
        with pytest.raises(ForeignPathError, match="config.json: not written by"):
            prepare_run_folder(run, overwrite=overwrite, resume=resume, **kw)
    assert (run / "config.json").read_text() == "my settings"


@pytest.mark.parametrize("task", [["--model", "probe"], ["--task", "segment", "--head", "linear"]])
@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--resume"]])
def test_train_and_segment_refuse_a_folder_without_a_run(synthetic_store, user_folder, user_file, task, extra):
    for target in (user_folder, user_file):
        before = snapshot(target)
        refused(cli("train", "--from-cache", synthetic_store, *task, "--out", target, "--epochs", "1", "-q",
                    *extra), target)
        assert snapshot(target) == before


@pytest.mark.parametrize("task", [["--model", "probe"], ["--task", "segment", "--head", "linear"]])
def test_train_refuses_a_users_file_named_like_a_run_file(synthetic_store, tmp_path, task):
    """A user's config.json or model.pt does not make a folder a run: --overwrite must not
    delete it, and --resume must not read it."""
    import torch

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"lr": 0.1, "epochs": 90}')
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3, "config": {}}, theirs / "model.pt")
    for folder, named in ((mine, mine / "config.json"), (theirs, theirs / "model.pt")):
        for extra in ([], ["--overwrite"], ["--resume"]):
            before = snapshot(folder)
            refused(cli("train", "--from-cache", synthetic_store, *task, "--out", folder, "--epochs", "1", "-q",
                        *extra), named)
            assert snapshot(folder) == before


def test_segment_refuses_an_earlier_run_without_overwrite(synthetic_store, tmp_path):
    run = tmp_path / "run"
    args = ("train", "--from-cache", synthetic_store, "--task", "segment", "--head", "linear", "--out", run,
            "--epochs", "1", "--device", "cpu", "-q")
    assert cli(*args).exit_code == 0
    (run / "notes.txt").write_text("mine")
    line = refused(cli(*args), run)
    assert "--overwrite" in line
    res = cli(*args, "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert (run / "notes.txt").read_text() == "mine" and (run / "model.pt").is_file()


# --- make-synthetic, summarize, report, failures report --------------------------------------------
def test_make_synthetic_refuses_files_and_foreign_folders_and_keeps_user_images(tmp_path, user_folder, user_file):
    for target in (user_folder, user_file):
        before = snapshot(target)
        refused(cli("make-synthetic", target, "--per-class", "1", "--size", "32"), target)
        assert snapshot(target) == before
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "synthetic.json").write_text('{"mine": true}')  # a look-alike is not ours
    refused(cli("make-synthetic", fake, "--per-class", "1", "--size", "32"), fake)
    ds = tmp_path / "ds"
    assert cli("make-synthetic", ds, "--per-class", "2", "--size", "32").exit_code == 0
    (ds / "images" / "mine.png").write_bytes(b"my own picture")
    assert cli("make-synthetic", ds, "--per-class", "1", "--size", "32").exit_code == 0
    assert (ds / "images" / "mine.png").read_bytes() == b"my own picture"
    assert not (ds / "images" / "cyst_0001.png").exists()  # the earlier run's own phantoms are replaced
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "cyst_0000.png").write_bytes(b"someone else's picture, named like a phantom")
    (ds / "masks").rename(tmp_path / "old_masks")
    (ds / "masks").symlink_to(elsewhere)
    refused(cli("make-synthetic", ds, "--per-class", "1", "--size", "32"), ds / "masks")
    assert (elsewhere / "cyst_0000.png").read_bytes() == b"someone else's picture, named like a phantom"


@pytest.fixture(scope="module")
def probe_run(synthetic_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "classify" / "probe"
    res = cli("train", "--from-cache", synthetic_store, "--model", "probe", "--out", run, "--epochs", "2",
              "--device", "cpu", "--no-plots", "-q")
    assert res.exit_code == 0, res.stderr
    return run


def test_summarize_and_report_replace_their_own_files_only(probe_run, tmp_path, user_file):
    out = tmp_path / "reports"
    assert cli("summarize", probe_run, "--out", out).exit_code == 0
    assert cli("summarize", probe_run, "--out", out).exit_code == 0  # its own files: replaced
    runs = out / "scores"
    assert cli("report", "--runs", runs, "--out", out).exit_code == 0
    assert cli("report", "--runs", runs, "--out", out).exit_code == 0
    copy = tmp_path / "copy_of_report.md"  # a link writes on its target, even one that looks like ours
    copy.write_text((out / "report.md").read_text())
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(copy)
    kept = copy.read_text()
    refused(cli("report", "--runs", runs, "--out", out), out / "report.md")
    assert copy.read_text() == kept
    (out / "report.md").unlink()
    (out / "report.md").write_text("# My notes\n")
    refused(cli("report", "--runs", runs, "--out", out), out / "report.md")
    assert (out / "report.md").read_text() == "# My notes\n"
    (out / "curves" / "classify" / "probe.csv").write_text("my,own,table\n")
    refused(cli("summarize", probe_run, "--out", out), out / "curves" / "classify" / "probe.csv")
    assert (out / "curves" / "classify" / "probe.csv").read_text() == "my,own,table\n"
    for cmd in (("summarize", probe_run), ("report", "--runs", runs)):
        refused(cli(*cmd, "--out", user_file), user_file)
        assert user_file.read_text() == "keep"


def test_evaluate_writes_only_into_a_new_empty_or_its_own_folder(probe_run, synthetic_store, tmp_path,
                                                                  user_folder, user_file):
    """`evaluate --out` (either task) refuses a folder holding anything it did not write, even a
    file of its own names, with or without --overwrite; its own earlier output is replaced
    only with --overwrite, and nothing beside it is touched."""
    import torch

    seg = tmp_path / "seg.pt"  # reaches segmentation's own --out check (no head needed before it)
    torch.save({"task": "segment", "store": {"url": str(synthetic_store)}}, seg)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text("my numbers")
    for model in (probe_run / "model.pt", seg):
        for extra in ([], ["--overwrite"]):
            for folder, named in ((user_folder, user_folder / "thesis.docx"), (mine, mine / "metrics.json"),
                                  (user_file, user_file)):
                before = snapshot(folder)
                refused(cli("evaluate", model, "--out", folder, "-q", *extra), named)
                assert snapshot(folder) == before
    out = tmp_path / "ev"
    assert cli("evaluate", probe_run / "model.pt", "--out", out, "-q").exit_code == 0
    first = snapshot(out)
    assert {"metrics.json", "predictions.csv", "confusion_test.png"} <= set(first)
    refused(cli("evaluate", probe_run / "model.pt", "--out", out, "-q"), out)
    assert snapshot(out) == first
    assert cli("evaluate", probe_run / "model.pt", "--out", out, "--overwrite", "-q").exit_code == 0
    assert set(snapshot(out)) == set(first)
    (out / "notes.txt").write_text("mine")
    refused(cli("evaluate", probe_run / "model.pt", "--out", out, "--overwrite", "-q"), out / "notes.txt")
    assert (out / "notes.txt").read_text() == "mine" and set(snapshot(out)) == set(first) | {"notes.txt"}


def _picture(path: Path, marked: bool = False) -> bytes:
    """A real PNG (a user's, or with ``marked`` one carrying our PNG_TEXT) at ``path``; its bytes."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (PNG_TEXT.items() if marked else ()):
        info.add_text(key, value)
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(path, pnginfo=info)
    return path.read_bytes()


def test_evaluate_overwrite_keeps_pictures_and_links_under_its_own_names(probe_run, tmp_path):
    """An earlier evaluation is replaced only where every file is evaluate's own: a picture of
    yours named like its figures (or like ``roc_*.png``), or a link at one of its names, is
    refused even with --overwrite, and the link's target is not touched."""
    out = tmp_path / "ev"
    assert cli("evaluate", probe_run / "model.pt", "--out", out, "-q").exit_code == 0
    assert is_marked_png(out / "confusion_test.png") and is_marked_png(out / "roc_test.png")
    elsewhere = tmp_path / "holiday.png"
    kept = _picture(elsewhere)
    link = lambda f: f.symlink_to(elsewhere)  # noqa: E731
    for name, make in (("roc_my_notes.png", _picture), ("roc_test.png", _picture), ("roc_test.png", link),
                       ("predictions.csv", link)):
        ours = (out / name).read_bytes() if (out / name).exists() else None
        (out / name).unlink(missing_ok=True)
        make(out / name)
        before = snapshot(out)
        refused(cli("evaluate", probe_run / "model.pt", "--out", out, "--overwrite", "-q"), out / name)
        assert snapshot(out) == before and elsewhere.read_bytes() == kept
        (out / name).unlink()
        if ours is not None:
            (out / name).write_bytes(ours)
    assert cli("evaluate", probe_run / "model.pt", "--out", out, "--overwrite", "-q").exit_code == 0


def test_run_overwrite_keeps_linked_folders_and_unmarked_pictures(tmp_path):
    """Replacing or resuming a run refuses a link at an output name (a linked overlays/ would
    have its PNGs deleted) and a PNG without our mark, alone or inside an output folder."""
    kw = dict(outputs=("model.pt", "history.png", "overlays/"), markers=("model.pt",),
              is_marker=lambda p: p.read_bytes() == b"weights")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"weights")
    pics = tmp_path / "pics"
    pics.mkdir()
    kept = _picture(pics / "beach.png", marked=True)
    (run / "overlays").symlink_to(pics)
    for overwrite, resume in ((True, False), (False, True)):
        with pytest.raises(ForeignPathError, match="overlays: not written by"):
            prepare_run_folder(run, overwrite=overwrite, resume=resume, **kw)
    assert (pics / "beach.png").read_bytes() == kept
    (run / "overlays").unlink()
    (run / "overlays").mkdir()
    _picture(run / "overlays" / "case1.png", marked=True)
    mine = _picture(run / "overlays" / "drawn.png")
    _picture(run / "history.png")
    with pytest.raises(ForeignPathError, match="history.png: not written by"):
        prepare_run_folder(run, overwrite=True, resume=False, **kw)
    _picture(run / "history.png", marked=True)
    for overwrite, resume in ((True, False), (False, True)):  # resuming could write over drawn.png
        with pytest.raises(ForeignPathError, match="overlays: not written by"):
            prepare_run_folder(run, overwrite=overwrite, resume=resume, **kw)
    assert (run / "overlays" / "drawn.png").read_bytes() == mine
    (run / "overlays" / "drawn.png").rename(tmp_path / "drawn.png")
    prepare_run_folder(run, overwrite=True, resume=False, **kw)
    assert sorted(snapshot(run)) == [] and (tmp_path / "drawn.png").read_bytes() == mine


def test_failures_report_never_replaces_a_foreign_file(tmp_path):
    from stages.extract.failures import write_failures_report

    url = str(tmp_path / "s.zarr")
    report = tmp_path / "s.zarr.failures.csv"
    report.write_text("my,own,csv\n")
    assert write_failures_report(url, [], []) is None
    assert write_failures_report(url, [1], [{"id": "x", "error": "bad"}]) is None
    assert report.read_text() == "my,own,csv\n"
    report.unlink()
    assert write_failures_report(url, [1], [{"id": "x", "error": "bad"}]) == str(report)
    assert write_failures_report(url, [], []) is None and not report.exists()  # our own stale one goes


# --- errors name their file ----------------------------------------------------------------------
def test_info_on_a_damaged_store_names_the_store_and_the_file(tmp_path):
    url = make_store(tmp_path / "s.zarr")
    meta = tmp_path / "s.zarr" / "zarr.json"
    meta.write_text(meta.read_text()[:-20])
    line = refused(cli("info", url), meta)
    assert "damaged" in line
    url2 = make_store(tmp_path / "t.zarr")
    arr = tmp_path / "t.zarr" / "done" / "zarr.json"
    arr.write_text("{not json")
    refused(cli("info", url2), arr)
    url3 = make_store(tmp_path / "u.zarr")
    chunk = tmp_path / "u.zarr" / "label" / "c" / "0"
    chunk.write_bytes(b"\x00" * 5)
    refused(cli("info", url3), tmp_path / "u.zarr" / "label")


# --- s3:// ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    with moto_s3("safe") as server:
        yield server


def test_s3_prefix_with_foreign_objects_is_refused_by_every_writer(s3, export):
    endpoint, opts, fs = s3
    fs.pipe("safe/theirs/thesis.docx", b"precious")
    foreign_zarr_url = "s3://safe/group.zarr"
    zarr.open_group(foreign_zarr_url, mode="w-", zarr_format=3, storage_options=opts, attributes={"x": 1})
    for url in ("s3://safe/theirs", foreign_zarr_url, "s3://safe/theirs/thesis.docx"):
        before = {p: fs.cat_file(p) for p in fs.find(url[5:])}
        for extra in ([], ["--overwrite"]):
            for path in ([], ["--dask-workers", "1"]):  # the local and the dask path
                refused(cli(*EXTRACT, "--out", url, "--storage-option", f"endpoint_url={endpoint}", *extra, *path),
                        url)
            refused(cli("import", export, "--out", url, "--storage-option", f"endpoint_url={endpoint}", *extra), url)
            with pytest.raises(ForeignPathError):
                make_store(url, storage_options=opts, overwrite=bool(extra))
        fs.invalidate_cache()
        assert {p: fs.cat_file(p) for p in fs.find(url[5:])} == before
        assert not fs.exists(url[5:] + ".lease")


def test_s3_overwrite_deletes_only_the_objects_of_our_store(s3):
    _, opts, fs = s3
    url = make_store("s3://safe/ours.zarr", storage_options=opts)
    fs.pipe("safe/ours.zarr/NOTES.txt", b"mine")
    make_store(url, storage_options=opts, overwrite=True, dtype="int8")
    fs.invalidate_cache()
    assert fs.cat_file("safe/ours.zarr/NOTES.txt") == b"mine"
    assert FeatureStore(url, storage_options=opts).dtype == "int8"
    remove_store(url, opts)
    fs.invalidate_cache()
    assert fs.find("safe/ours.zarr") == ["safe/ours.zarr/NOTES.txt"]


def test_temporaries_of_a_killed_creation_do_not_make_a_folder_foreign(tmp_path):
    """zarr writes ``zarr.<uuid4>.partial`` then renames it: a writer killed in between
    leaves only that, which is ours; a file of the user's that merely ends in .partial is not."""
    d = tmp_path / "k.zarr"
    d.mkdir()
    (d / "zarr.0123456789abcdef0123456789abcdef.partial").write_bytes(b"{")
    assert store_state(d)[0] == "empty"
    make_store(d)
    assert sorted(p.name for p in d.iterdir() if p.name.endswith(".partial")) == []
    e = tmp_path / "e.zarr"
    e.mkdir()
    (e / "draft.partial").write_text("mine")
    with pytest.raises(ForeignPathError):
        make_store(e)
    assert (e / "draft.partial").read_text() == "mine"
