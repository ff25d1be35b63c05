"""MORE (NJUNLP/MORE) in the same line format (reference_remote.md section 1.2).

Differences from UMRE: one box file per split, boxes in YOLO centre format (cx, cy, w, h)
converted here to (l, t, r, b) as [M-DS] 141 does, at most 10 objects, images in
`img_org/<split>/`, and object captions only: a textual entity gets its `<k>` part only when
the captions file happens to describe it. The published box files are `torch.save`d dicts;
`convert_more_pth` (or `python -m remote_jax.data.more --convert-pth IN OUT`) turns one into
JSON once, the only place torch is needed.
"""
import argparse
import json
import pathlib
from typing import ClassVar

from remote_jax.data import umre
from remote_jax.data.records import DataError


class MoreReader(umre.UmreReader):
  name = "more"
  SPLIT_NAMES: ClassVar[dict] = {"train": "train", "val": "valid", "test": "test"}
  DEFAULT_PATHS: ClassVar[dict] = dict(
      train="txt/train.txt", val="txt/valid.txt", test="txt/test.txt",
      boxes="ent_{split}_dict.json", captions="caption_dict.json",
      images="img_org/{split}", depth="img_dep", relations="rel2id.json")
  MAX_OBJECTS = 10
  descriptions_required = False

  def load_boxes(self, split):
    path = self._required("boxes", split)
    if path.suffix == ".pth":
      raise DataError("malformed", path, None, "<file>", "MORE boxes are a torch .pth file",
                      f"convert once with remote_jax.data.more.convert_more_pth({str(path)!r}, "
                      "'<out>.json') and point data.paths.boxes at the JSON ({split} allowed)")
    return self._json("boxes", split)

  def to_ltrb(self, box):
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
        isinstance(v, (int, float)) for v in box):
      return box  # let check_box report it
    cx, cy, w, h = (float(v) for v in box)
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def convert_more_pth(pth, json_out):
  """Published `ent_{split}_dict.pth` -> JSON `{img_id: {'[OBJk]': [cx, cy, w, h]}}`.

  Key order (the slot order) is kept. Returns the number of images written.
  """
  try:
    import torch
  except ImportError:
    raise ImportError(
        f"converting {pth} needs torch, only for this one-off conversion: install a CPU "
        "torch (e.g. pip install torch==2.13.0) in a scratch environment, run "
        "convert_more_pth there, then use the JSON") from None
  table = torch.load(str(pth), map_location="cpu", weights_only=False)
  out = {str(img): {str(name): [float(v) for v in (box.tolist() if hasattr(box, "tolist")
                                                   else box)]
                    for name, box in objs.items()}
         for img, objs in table.items()}
  pathlib.Path(json_out).write_text(json.dumps(out))
  return len(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--convert-pth", nargs=2, metavar=("IN_PTH", "OUT_JSON"), required=True,
                      help="convert a published ent_<split>_dict.pth to JSON (needs torch)")
  args = parser.parse_args(argv)
  n = convert_more_pth(*args.convert_pth)
  print(f"wrote {n} images to {args.convert_pth[1]}")


if __name__ == "__main__":
  main()
