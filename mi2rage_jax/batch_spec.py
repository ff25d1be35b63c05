"""MI²RAGE's batch keys: the one definition that the batch builders (batches.py), the
models (models/) and the tests use, as remote_jax/data/batch_spec.py is REMOTE's.

Dimensions: B batch, N view slots, L max tokens (data.max_length), S image size
(data.image_size). Pixels are CLIP-normalised float32 RGB (data.pixels).
"""
import numpy as np

# One token encoding (data.Encoder): (L,) int32 arrays and two int32 scalars.
TOKENS = ("input_ids", "token_type_ids", "attention_mask", "subj_pos", "obj_pos")
# What each key holds: (dims after B, dtype, meaning).
ENCODING = {
    "input_ids": (("L",), np.int32, "token ids, entity markers <s1> </s1> <s2> </s2> included"),
    "token_type_ids": (("L",), np.int32, "0 first segment, 1 second segment"),
    "attention_mask": (("L",), np.int32, "1 real token, 0 padding"),
    "subj_pos": ((), np.int32, "position of the first <s1>; -1 if truncated away"),
    "obj_pos": ((), np.int32, "position of the first <s2>; -1 if truncated away"),
}
assert tuple(ENCODING) == TOKENS


def prefixed(prefix):
  """The encoding's keys under `prefix` (a student's view slots: `view_`, (B, N, ...))."""
  return tuple(prefix + k for k in TOKENS)


# The keys of each model's batch; every batch also carries "label" (B,) int32 (a
# similarity batch: the row of its pair, the diagonal target).
KEYS = {
    # a synthetic caption with the entity names appended or marked
    "text_teacher": TOKENS,
    # the entity names alone and one synthetic image (S, S, 3)
    "image_teacher": TOKENS + ("pixels",),
    # the text side (a synthetic caption or the real text) and the image side (the real
    # image or a synthetic one)
    "similarity": TOKENS + ("pixels",),
    # no_real_text (ImageStudent): the real image; N synthetic captions (B, N, ...); the
    # names-only encoding (read by view dropout); the view mask (B, N) bool
    "no_real_text": ("pixels",) + prefixed("view_") + prefixed("names_") + ("view_mask",),
    # no_real_image (TextStudent): the real text; N synthetic images (B, N, S, S, 3); the mask
    "no_real_image": TOKENS + ("view_pixels", "view_mask"),
}
