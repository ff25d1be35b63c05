"""Plots (their size, and that they show their data: the same data draws the same pixels,
other data other pixels, in the panel it belongs to) and metric writers (JSONL, TensorBoard)."""
import json
import logging
import pathlib
import struct

import numpy as np
import pytest
from PIL import Image

from remote_jax import plots, writers


def png_size(path):
  """(width, height) from the PNG header; asserts the signature."""
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", head[16:24])


def pixels(path):
  return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def count_near(image, rgb, tol=30):
  """Pixels within `tol` of colour `rgb` in every channel."""
  return int((np.abs(image - np.asarray(rgb)) <= tol).all(-1).sum())


def iter_event_scalars(logdir):
  """(tag, step, value) of every scalar in the TensorBoard event files under `logdir`.

  Reads the TFRecord framing directly with tensorboardX's protobufs, so no
  TensorFlow or tensorboard install is needed (CRCs are not checked).
  """
  from tensorboardX.proto import event_pb2
  for path in sorted(pathlib.Path(logdir).rglob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      n = int.from_bytes(data[pos:pos + 8], "little")
      body = data[pos + 12:pos + 12 + n]
      pos += 12 + n + 4
      event = event_pb2.Event.FromString(body)
      for v in event.summary.value:
        if v.HasField("simple_value"):
          yield v.tag, int(event.step), float(v.simple_value)


def write_run(workdir):
  with writers.MetricWriter(workdir, enabled=True) as w:
    w.write_config({"optim": {"lr": 1e-5}, "seed": np.int64(1234)})
    for step in range(1, 31):
      w.write(step, {"loss": 2.0 / step, "lr": 1e-5}, split="train")
    for epoch, step in enumerate((10, 20, 30), start=1):
      w.write(step, {"epoch": epoch, "f1": 50.0 + epoch, "e-e": {"f1": 40.0}}, split="dev")
      w.write(step, {"epoch": epoch, "f1": 45.0 + epoch}, split="test")
    w.write(31, {"loss": float("nan")}, split="train")


def test_metric_writer_jsonl_tb_and_config(tmp_path):
  write_run(tmp_path)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]  # every line parses
  assert len(records) == 30 + 6 + 1
  assert records[0] == {"step": 1, "split": "train", "loss": 2.0, "lr": 1e-5}
  assert records[30]["e-e/f1"] == 40.0  # nested dicts flattened
  assert records[-1]["loss"] is None  # NaN -> null, still valid JSON
  assert [r["f1"] for r in writers.read_metrics(tmp_path, split="test")] == [46.0, 47.0, 48.0]
  assert json.loads((tmp_path / "config.json").read_text()) == {
      "optim": {"lr": 1e-5}, "seed": 1234}
  scalars = list(iter_event_scalars(tmp_path / "tb"))
  dev_f1 = [(s, v) for tag, s, v in scalars if tag == "dev/f1"]
  assert dev_f1 == [(10, 51.0), (20, 52.0), (30, 53.0)]
  assert ("train/loss", 2, 1.0) in scalars


def test_disabled_writer_writes_nothing(tmp_path):
  w = writers.MetricWriter(tmp_path / "w", enabled=False)
  w.write_config({"a": 1})
  w.write(1, {"loss": 1.0}, split="train")
  w.close()
  assert not (tmp_path / "w").exists()


def test_progress_logs_every_n_steps_without_tty(caplog):
  p = writers.Progress(total=10, log_every=5, tty=False, enabled=True)
  with caplog.at_level(logging.INFO, logger="remote_jax.writers"):
    for step in range(1, 11):
      status = p.update(step, loss=0.5, examples=32)
  p.close()
  assert len(caplog.records) == 2 and "step 10/10" in caplog.records[-1].getMessage()
  assert status.startswith("loss=0.5000 ex/s=")
  q = writers.Progress(total=10, tty=False, enabled=True)
  q.update(1, loss=2.0)
  assert q.update(2) == "loss=2.0000"  # last loss kept, no ex/s without examples
  assert writers.Progress(10, enabled=False).update(1, loss=1.0) == ""


def test_training_curves(tmp_path):
  write_run(tmp_path)
  recs = writers.read_metrics(tmp_path)
  path = plots.training_curves(recs, tmp_path / "curves.png", figsize=(8, 3), dpi=50)
  assert png_size(path) == (400, 150)
  path = plots.training_curves(recs, tmp_path / "by_epoch.png", x="epoch")
  assert png_size(path) == (1000, 400)
  # The same records draw the same pixels; dev F1 falling instead of rising (same values,
  # so the same axes) changes the right-hand metric panel and leaves the loss panel alone.
  again = pixels(plots.training_curves(recs, tmp_path / "again.png", x="epoch"))
  np.testing.assert_array_equal(again, pixels(path))
  falling = [dict(r, f1=104.0 - r["f1"]) if r["split"] == "dev" else r for r in recs]
  other = pixels(plots.training_curves(falling, tmp_path / "falling.png", x="epoch"))
  w = other.shape[1]
  np.testing.assert_array_equal(other[:, :int(0.45 * w)], again[:, :int(0.45 * w)])
  assert (other[:, int(0.55 * w):] != again[:, int(0.55 * w):]).any(-1).sum() > 100


def test_confusion_matrix(tmp_path):
  conf = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # an empty row must not divide by 0
  path = plots.confusion_matrix(conf, ["none", "a", "b"], tmp_path / "c.png",
                                figsize=(5, 5), dpi=60)
  assert png_size(path) == (300, 300)
  # Rows are normalised: a row with all its examples in one cell draws that cell in the
  # colour map's darkest blue, whatever the count; spread rows draw none.
  dark = (8, 48, 107)   # Blues(1.0)
  def dark_area(confusion, name):
    return count_near(pixels(plots.confusion_matrix(confusion, ["none", "a", "b"],
                                                    tmp_path / name, figsize=(5, 5), dpi=60)),
                      dark, tol=12)
  colourbar = dark_area(np.ones((3, 3), int), "spread.png")   # only the colour bar's top
  one, two = dark_area(np.diag([5, 0, 0]), "one.png"), dark_area(np.diag([50, 1, 0]), "two.png")
  assert one > colourbar + 1000
  assert two - colourbar == pytest.approx(2 * (one - colourbar), rel=0.1)   # a cell each
  # (up to the printed counts: white digits on the dark cells)
  assert dark_area(np.diag([1, 7, 0]), "counts.png") == pytest.approx(two, abs=100)
  with pytest.raises(ValueError, match="relation names"):
    plots.confusion_matrix(conf, ["none", "a"], tmp_path / "bad.png")


def test_router_weights(tmp_path):
  rng = np.random.default_rng(0)
  router = rng.dirichlet(np.ones(5), size=(12, 7))  # (N, tokens, E): tokens averaged
  labels = np.arange(12) % 3
  path = plots.router_weights(router, labels, ["none", "r1", "r2", "r3"],
                              [f"V2T_{i}" for i in range(5)], tmp_path / "router.png",
                              mask=np.arange(12) < 10, figsize=(6, 4), dpi=50)
  assert png_size(path) == (300, 200)
  # Other routing, other picture; the same routing, the same picture.
  np.testing.assert_array_equal(pixels(path), pixels(plots.router_weights(
      router, labels, ["none", "r1", "r2", "r3"], [f"V2T_{i}" for i in range(5)],
      tmp_path / "again.png", mask=np.arange(12) < 10, figsize=(6, 4), dpi=50)))
  onto_first = np.zeros_like(router)
  onto_first[..., 0] = 1.0
  other = plots.router_weights(onto_first, labels, ["none", "r1", "r2", "r3"],
                               [f"V2T_{i}" for i in range(5)], tmp_path / "first.png",
                               mask=np.arange(12) < 10, figsize=(6, 4), dpi=50)
  assert (pixels(other) != pixels(path)).any(-1).sum() > 100
  with pytest.raises(ValueError, match="expert names"):
    plots.router_weights(router, labels, ["none", "r1", "r2"], ["a"], tmp_path / "x.png")
  mean, counts = plots.mean_by_row(router, labels, 4, mask=np.arange(12) < 10)
  np.testing.assert_array_equal(counts, [4, 3, 3, 0])
  np.testing.assert_allclose(mean[1], router[[1, 4, 7]].mean((0, 1)))
  assert np.isnan(mean[3]).all()


def test_ot_diagnostics(tmp_path):
  diags = {f"{mod}_{lvl}": {"uniform_deviation": dev, "plan_entropy": 1.0 - dev / 10,
                            "marginal_error": 1e-6}
           for mod, dev0 in (("text", 0.0), ("vision", 0.5))
           for lvl, dev in enumerate([dev0, dev0 + 1e-4, 0.3])}
  flat = {f"{k}/{n}": v for k, d in diags.items() for n, v in d.items()}  # trainer's form
  path = plots.ot_diagnostics(diags, tmp_path / "ot.png", figsize=(9, 3), dpi=40)
  assert png_size(path) == (360, 120)
  assert png_size(plots.ot_diagnostics(flat, tmp_path / "flat.png")) == (1200, 350)
  # Uniform plans are marked in red (crosses and the title); without them only the
  # threshold line is red.
  red = lambda d, name: count_near(pixels(plots.ot_diagnostics(d, tmp_path / name)),
                                   (255, 0, 0), tol=60)
  none_uniform = {k: dict(d, uniform_deviation=0.3) for k, d in diags.items()}
  assert red(diags, "marked.png") > 3 * red(none_uniform, "unmarked.png")
  with pytest.raises(ValueError, match="modality"):
    plots.ot_diagnostics({"text": {}}, tmp_path / "bad.png")
