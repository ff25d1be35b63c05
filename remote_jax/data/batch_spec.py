"""The batch contract: every field of a REMOTE batch with its shape, dtype and meaning.

The one definition that the stored examples (the tfds features, `example_spec`), the grain
map (`pipeline.ToBatchContract`), the init and compile batches (`dummy_batch`,
`abstract_batch`) and docs/design.md section 1 (`markdown_table`; a test compares them) use.

Dimensions: B batch, L max tokens (data.max_length; fewer in a batch cut by
data.pad_to_multiple_of), K object slots (data.num_objects), S crop size (data.crop_size).
A stored example has the same fields without B, except that pixels are
stored as uint8 `obj_pixels_u8` and become CLIP-normalised float32 `obj_pixels` in the map.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
  dims: tuple          # after B: "L", "K", "S" or a fixed size
  dtype: type
  meaning: str
  fill: object = 0     # the dummy batch's value
  model: bool = True   # read by the model (False: travels to predictions only)


_SIDE = ("token position of `<s1>` (text head) or `<o1>` (object head); -1 if truncated away",
         "token position of `<k1>` (text head with a description); else -1",
         "object slot of an object head; -1 for a textual head")
FIELDS = {
    "input_ids": Field(("L",), np.int32,
                       "`[CLS] marked sentence [SEP] caption parts [SEP] [PAD]...`"),
    "token_type_ids": Field(("L",), np.int32, "0 sentence segment, 1 caption segment"),
    "attention_mask": Field(("L",), np.int32, "1 real token, 0 padding", fill=1),
    "obj_pixels": Field(("K", "S", "S", 3), np.float32, "CLIP-normalised RGB crops (stored "
                        "uint8 as `obj_pixels_u8`, normalised in the grain map)"),
    "obj_depth": Field(("K", "S", "S", 1), np.float32,
                       "depth crops, normalised per `config.data.depth_norm`"),
    "obj_boxes": Field(("K", 5), np.float32, "`[l, t, r, b, (r-l)*(b-t)]`, normalised to [0,1]"),
    "obj_mask": Field(("K",), np.bool_, "True for a real object slot", fill=True),
    "head_marker": Field((), np.int32, _SIDE[0], fill=-1),
    "head_desc": Field((), np.int32, _SIDE[1], fill=-1),
    "head_obj": Field((), np.int32, _SIDE[2], fill=-1),
    "tail_marker": Field((), np.int32, "the same for the tail (`<s2>`, `<o2>`)", fill=-1),
    "tail_desc": Field((), np.int32, "the same for the tail (`<k2>`)", fill=-1),
    "tail_obj": Field((), np.int32, "the same for the tail", fill=-1),
    "triplet_type": Field((), np.int32,
                          "0 entity-entity, 1 object-object, 2 entity-object (either order)"),
    "label": Field((), np.int32, "relation id; the negative class (`none`/`None`) is the "
                   "dataset's `negative_id`"),
    "mask": Field((), np.bool_, "False on eval padding rows (every real example counts once)",
                  fill=True),
    "index": Field((), np.int32, "the example's row in its split (for predictions)",
                   model=False),
}
# Batch fields the model reads.
MODEL_FIELDS = tuple(k for k, f in FIELDS.items() if f.model)
# Stored under another name and dtype: field -> (stored name, stored dtype).
STORED_AS = {"obj_pixels": ("obj_pixels_u8", np.uint8)}
# Per-example integer scalars (stored as int64 by tfds, back to int32 in the grain map).
SCALAR_INTS = tuple(k for k, f in FIELDS.items() if f.dims == () and f.dtype == np.int32)


def _shape(field, max_length, num_objects, crop_size):
  sizes = {"L": max_length, "K": num_objects, "S": crop_size}
  return tuple(int(sizes.get(d, d)) for d in field.dims)


def batch_spec(batch_size, max_length, num_objects, crop_size, fields=tuple(FIELDS)):
  """{field: (shape, numpy dtype)} of a batch."""
  return {k: ((batch_size, *_shape(FIELDS[k], max_length, num_objects, crop_size)),
              FIELDS[k].dtype) for k in fields}


def example_spec(max_length, num_objects, crop_size):
  """{key: (shape, numpy dtype)} of one stored example (the builder's features)."""
  out = {}
  for k, field in FIELDS.items():
    name, dtype = STORED_AS.get(k, (k, field.dtype))
    out[name] = (_shape(field, max_length, num_objects, crop_size), dtype)
  return out


def _sizes(meta):
  return meta["max_length"], meta["num_objects"], meta["crop_size"]


def dummy_batch(meta, batch_size=2):
  """A model batch of each field's fill value, for init (`meta`: dataset_meta's sizes)."""
  spec = batch_spec(batch_size, *_sizes(meta), fields=MODEL_FIELDS)
  return {k: np.full(shape, FIELDS[k].fill, dtype) for k, (shape, dtype) in spec.items()}


def abstract_batch(meta, batch_size, sharding=None):
  """The global model batch as ShapeDtypeStructs, for compiling ahead of the data."""
  import jax
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in batch_spec(batch_size, *_sizes(meta),
                                              fields=MODEL_FIELDS).items()}


def markdown_table():
  """The contract as docs/design.md section 1 shows it."""
  rows = ["| key | shape, dtype | meaning |", "|---|---|---|"]
  for k, f in FIELDS.items():
    shape = ",".join(("B",) + tuple(str(d) for d in f.dims))
    shape = f"({shape},)" if not f.dims else f"({shape})"
    dtype = "bool" if f.dtype == np.bool_ else np.dtype(f.dtype).name
    rows.append(f"| {k} | {shape} {dtype} | {f.meaning} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(markdown_table())
