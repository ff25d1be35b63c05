"""One `records.Sample` -> one example dict of fixed-shape numpy arrays (design.md section 1).

Follows the reference input construction (reference_remote.md section 2) exactly: marker
placement loop, caption pairing, 4.11 pair truncation, PIL crop + CLIP resize/centre-crop,
depth slice + cv2-style nearest resize, box features. Pixels stay uint8 (`obj_pixels_u8`);
the grain map in pipeline.py applies the CLIP normalisation.
"""
import collections
import dataclasses

import numpy as np
from PIL import Image

from remote_jax.data import batch_spec
from remote_jax.data.records import DataError

DEPTH_NORMS = ("none", "minmax", "more")
MODALITIES = ("both", "text", "vision")
# The one word a textual entity becomes under modalities="vision" (a BERT special token).
HIDDEN_WORD = "[MASK]"
TRIPLET_TYPES = ("entity-entity", "object-object", "entity-object")


def mark_sentence(tokens, head, tail):
  """[DS] 112-129: at each i, <s1>, </s1>, <s2>, </s2> checks in this order, then word i.

  Objects get no marker. Quirk kept: a tail ending where the head starts gives
  `<s1> </s2>` (head checks come first).
  """
  out = []
  for i in range(len(tokens) + 1):
    for entity, (open_, close) in ((head, ("<s1>", "</s1>")), (tail, ("<s2>", "</s2>"))):
      if not entity.is_object:
        if i == entity.pos[0]:
          out.append(open_)
        if i == entity.pos[1]:
          out.append(close)
    if i < len(tokens):
      out.append(tokens[i])
  return " ".join(out)


def markers_only(record):
  """-> (record, tokens) for modalities="vision": each textual entity becomes one [MASK]
  between its markers, head before tail, and every other word goes. Masking word by
  word would keep the sentence's shape (word counts between and after the markers),
  which on the demo world names the template and so the relation (e-e F1 89); keeping
  the sentence order would tell whether the tail comes first (on the demo world, a swapped
  pair, so `none`: e-e F1 42.9 with no words at all)."""
  textual = [n for n, e in (("head", record.head), ("tail", record.tail)) if not e.is_object]
  sides = {}
  for i, name in enumerate(textual):
    sides[name] = dataclasses.replace(getattr(record, name), pos=(i, i + 1))
  return dataclasses.replace(record, **sides), (HIDDEN_WORD,) * len(textual)


def caption_text(record, captions):
  """[DS] 164-199: `<o1> cap </o1>` for an object side, `<k1> desc </k1>` for text; head
  part then tail part, joined by one space. A None caption (MORE entities) has no part; no
  part at all gives None (single-sequence encoding)."""
  parts = []
  for entity, caption, n in ((record.head, captions[0], 1), (record.tail, captions[1], 2)):
    if caption is not None:
      tag = "o" if entity.is_object else "k"
      parts.append(f"<{tag}{n}> {caption} </{tag}{n}>")
  return " ".join(parts) or None


def crop_box_pixels(box, width, height):
  """The integer pixel box PIL uses for crop((l*W, t*H, r*W, b*H)) (Python round), widened to
  at least one pixel so tiny boxes still give a crop."""
  l, t, r, b = box
  x0, y0, x1, y1 = (round(v) for v in (l * width, t * height, r * width, b * height))
  return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def clip_resize_center_crop(image, size):
  """transformers 4.11 CLIPFeatureExtractor: shorter side to `size` (bicubic, long side
  int(size*long/short)), then centre crop with top = int((H - size + 1) / 2)."""
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  if short != size:
    new_short, new_long = size, int(size * long / short)
    image = image.resize((new_short, new_long) if w <= h else (new_long, new_short),
                         Image.BICUBIC)
  w, h = image.size
  top, left = int((h - size + 1) * 0.5), int((w - size + 1) * 0.5)
  return image.crop((left, top, left + size, top + size))


def crop_rgb(image, box, size):
  """RGB crop of a normalised (l, t, r, b) box -> (size, size, 3) uint8."""
  region = image.crop(crop_box_pixels(box, *image.size))
  return np.asarray(clip_resize_center_crop(region, size), np.uint8)


def depth_slice(shape, box):
  """[DS] 226: rows int(Hd*t):int(Hd*b), cols int(Wd*l):int(Wd*r); at least one pixel (the
  reference's cv2.resize raises on an empty slice)."""
  hd, wd = shape
  l, t, r, b = box
  r0, c0 = min(int(hd * t), hd - 1), min(int(wd * l), wd - 1)
  r1, c1 = max(int(hd * b), r0 + 1), max(int(wd * r), c0 + 1)
  return slice(r0, r1), slice(c0, c1)


def nearest_indices(src, dst):
  """cv2.INTER_NEAREST source index for each output index: min(floor(x / (dst/src)), src-1)."""
  scale = 1.0 / (dst / src)
  return np.minimum(np.floor(np.arange(dst) * scale).astype(np.int64), src - 1)


def crop_depth(depth, box, size):
  """Depth crop stretched to (size, size, 1) float32 (aspect not kept, as in the reference)."""
  rows, cols = depth_slice(depth.shape, box)
  patch = depth[rows, cols]
  ri, ci = nearest_indices(patch.shape[0], size), nearest_indices(patch.shape[1], size)
  return patch[ri][:, ci].astype(np.float32)[..., None]


def normalise_depth(depth, mode):
  """none: raw Depth-Anything output (released REMOTE); minmax: per image to [0, 1];
  more: MOREformer's 255 - 100 d."""
  depth = depth.astype(np.float32)
  if mode == "none":
    return depth
  if mode == "minmax":
    lo, hi = float(depth.min()), float(depth.max())
    return (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
  if mode == "more":
    return 255.0 - 100.0 * depth
  raise ValueError(f"data.depth_norm={mode!r}; expected one of {DEPTH_NORMS}")


def box_features(box):
  l, t, r, b = box
  return np.asarray([l, t, r, b, (r - l) * (b - t)], np.float32)


def _position(ids, token_id):
  hits = np.flatnonzero(ids == token_id)
  return int(hits[0]) if hits.size else -1


class Preprocessor:
  """Callable `(sample, index) -> example dict`; deterministic, caches a few decoded images."""

  def __init__(self, tokenizer, relations, *, num_objects, crop_size, use_caption, use_depth,
               depth_norm, modalities, image_cache=16):
    if depth_norm not in DEPTH_NORMS:
      raise ValueError(f"data.depth_norm={depth_norm!r}; expected one of {DEPTH_NORMS}")
    if modalities not in MODALITIES:
      raise ValueError(f"data.modalities={modalities!r}; expected one of {MODALITIES}")
    self.modalities = modalities
    self.tokenizer = tokenizer
    self.label_ids = {name: i for i, name in enumerate(relations)}
    self.num_objects, self.crop_size = int(num_objects), int(crop_size)
    self.use_caption, self.use_depth, self.depth_norm = use_caption, use_depth, depth_norm
    self._cache, self._cache_size = collections.OrderedDict(), image_cache

  def text(self, sample):
    """The (sentence, caption) strings handed to the tokenizer."""
    record = sample.record
    tokens, captions = record.tokens, sample.captions
    if self.modalities == "vision":
      record, tokens = markers_only(record)
    if captions is not None and self.modalities != "both":
      # Object captions are image evidence, entity descriptions text evidence.
      keep_objects = self.modalities == "vision"
      captions = tuple(c if e.is_object == keep_objects else None
                       for e, c in zip((record.head, record.tail), captions))
    sentence = mark_sentence(tokens, record.head, record.tail)
    caption = caption_text(record, captions) if self.use_caption and captions else None
    return sentence, caption

  def objects(self, sample):
    """(pixels (K,S,S,3) uint8, depth (K,S,S,1) f32, boxes (K,5) f32, mask (K,) bool)."""
    key = (sample.image, sample.depth, sample.objects)
    if key not in self._cache:
      self._cache[key] = self._objects(sample)
      if len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    return self._cache[key]

  def _objects(self, sample):
    k, s = self.num_objects, self.crop_size
    pixels = np.zeros((k, s, s, 3), np.uint8)
    depth = np.zeros((k, s, s, 1), np.float32)
    boxes = np.zeros((k, 5), np.float32)
    mask = np.zeros((k,), bool)
    if not sample.objects:
      return pixels, depth, boxes, mask
    where = f"{sample.record.source}:{sample.record.line}"
    try:
      with Image.open(sample.image) as f:
        image = f.convert("RGB")
    except OSError as e:
      raise DataError("missing_image", sample.image, None, "<file>", f"cannot decode the image "
                      f"({str(e)[:60]})", "replace the file", used_by=where) from None
    depth_map = self._depth(sample, where) if self.use_depth and sample.depth else None
    for slot, (_, box) in enumerate(sample.objects):
      mask[slot] = True
      if self.modalities == "text":   # the slot exists, its pixels, depth and box do not
        continue
      pixels[slot] = crop_rgb(image, box, s)
      if depth_map is not None:
        depth[slot] = crop_depth(depth_map, box, s)
      boxes[slot] = box_features(box)
    return pixels, depth, boxes, mask

  def _depth(self, sample, where):
    try:
      with np.load(sample.depth) as f:
        depth = f["depth_map"]
    except (OSError, KeyError, ValueError) as e:
      raise DataError("missing_depth", sample.depth, None, "depth_map", f"cannot read an array "
                      f"'depth_map' ({type(e).__name__})", "regenerate the depth file",
                      used_by=where) from None
    if depth.ndim == 3 and depth.shape[-1] == 1:
      depth = depth[..., 0]
    if depth.ndim != 2 or depth.size == 0:
      raise DataError("missing_depth", sample.depth, None, "depth_map", f"shape {depth.shape} is "
                      "not (H, W)", "store a 2-D depth map", used_by=where)
    return normalise_depth(depth, self.depth_norm)

  def __call__(self, sample, index):
    record = sample.record
    encoded = self.tokenizer.encode(*self.text(sample))
    ids = encoded["input_ids"]
    marker = self.tokenizer.marker_ids
    out = dict(encoded)
    for side, entity, n in (("head", record.head, 1), ("tail", record.tail, 2)):
      if entity.is_object:
        out[f"{side}_marker"] = _position(ids, marker[f"<o{n}>"])
        out[f"{side}_desc"] = -1
      else:
        out[f"{side}_marker"] = _position(ids, marker[f"<s{n}>"])
        out[f"{side}_desc"] = _position(ids, marker[f"<k{n}>"])
      out[f"{side}_obj"] = sample.slot(entity)
    pixels, depth, boxes, mask = self.objects(sample)
    out.update(obj_pixels_u8=pixels, obj_depth=depth, obj_boxes=boxes, obj_mask=mask,
               triplet_type=record.triplet_type, label=self.label_ids[record.relation],
               index=index)
    for key in batch_spec.SCALAR_INTS:
      out[key] = np.int32(out[key])
    out["mask"] = np.bool_(True)
    return out

