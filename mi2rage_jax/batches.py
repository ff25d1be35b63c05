"""The model inputs of one MI²RAGE setting, built from instances and views with each
encoding cached (keys: batch_spec.py).

A teacher reads only the synthetic view and the entity names; a similarity teacher pairs
the real view with a synthetic one; a student reads the real view of its training modality
and its synthetic views in N slots, masked where empty.
"""
import numpy as np

from mi2rage_jax import batch_spec
from mi2rage_jax import data as data_lib
from mi2rage_jax import views as views_lib


class Batches:
  """Batches of a setting ("no_real_text": synthetic texts, "no_real_image": synthetic
  images); `unimodal` students see no synthetic view. Encodings are cached by instance and
  view id (`clear` drops them)."""

  def __init__(self, encoder, setting, target, unimodal, image_size):
    self.enc, self.setting, self.target = encoder, setting, target
    self.unimodal, self.size = bool(unimodal), int(image_size)
    self.cache = {}

  def clear(self):
    self.cache.clear()

  # ---------------------------------------------------------------- encodings
  def _cached(self, key, make):
    if key not in self.cache:
      self.cache[key] = make()
    return self.cache[key]

  def caption(self, inst, view):
    return self._cached(("cap", inst.id, view.id), lambda: self.enc.encode_caption(view.data,
                                                                                    inst))

  def names(self, inst):
    return self._cached(("names", inst.id), lambda: self.enc.encode_names(inst))

  def real_text(self, inst):
    return self._cached(("real", inst.id), lambda: self.enc.encode_real_text(inst))

  def view_pixels(self, inst, view):
    return self._cached(("vpix", inst.id, view.id),
                        lambda: data_lib.pixels(view.data, self.size))

  def real_pixels(self, inst):
    return self._cached(("rpix", inst.id),
                        lambda: data_lib.pixels(data_lib.real_image(inst), self.size))

  def real_as_view(self, inst):
    """The real view of the synthetic modality (test instances have both), as a View the
    teacher can score: test_criterion 'real'."""
    data = data_lib.real_text(inst) if self.target == "text" else data_lib.real_image(inst)
    return views_lib.View(id="<real>", round=-1, modality=self.target, generator="real",
                          data=data)

  # ---------------------------------------------------------------- teachers
  def teacher(self, pairs):
    """Teacher input for [(instance, view)]: the synthetic view and entity names ONLY
    (KEYS text_teacher / image_teacher)."""
    if self.target == "text":
      b = data_lib.stack([self.caption(i, v) for i, v in pairs])
    else:
      b = data_lib.stack([self.names(i) for i, _ in pairs])
      b["pixels"] = np.stack([self.view_pixels(i, v) for i, v in pairs])
    b["label"] = np.asarray([i.label for i, _ in pairs], np.int32)
    return b

  def similarity(self, pairs):
    """(real view, synthetic view) pairs on the text and image sides (KEYS similarity)."""
    if self.target == "text":   # real image, synthetic caption
      b = data_lib.stack([self.caption(i, v) for i, v in pairs])
      b["pixels"] = np.stack([self.real_pixels(i) for i, _ in pairs])
    else:                       # real text, synthetic image
      b = data_lib.stack([self.real_text(i) for i, _ in pairs])
      b["pixels"] = np.stack([self.view_pixels(i, v) for i, v in pairs])
    b["label"] = np.arange(len(pairs), dtype=np.int32)
    return b

  # ---------------------------------------------------------------- students
  def slots(self, n, real=False):
    """View slots of a student batch with n synthetic views (+ the real one when `real`)."""
    if self.setting == "no_real_text" and self.unimodal:
      return 1
    return (0 if self.unimodal else n) + int(real)

  def student(self, insts, views, slots, real_view=False):
    """Student input (KEYS[setting]); `slots` view slots, filled by `views[id]` (+ the real
    view appended when `real_view`), the rest masked."""
    b = len(insts)
    mask = np.zeros((b, slots), bool)
    if self.setting == "no_real_text":
      encs = []
      for row, inst in enumerate(insts):
        vs = ([self.names(inst)] if self.unimodal else
              [self.caption(inst, v) for v in views[inst.id]])
        if real_view:
          vs.append(self.real_text(inst))
        mask[row, :len(vs)] = True
        vs = vs + [vs[0] if vs else self.names(inst)] * (slots - len(vs))
        encs.append(data_lib.stack(vs))
      out = {k: np.stack([e[t] for e in encs])
             for k, t in zip(batch_spec.prefixed("view_"), batch_spec.TOKENS)}
      # The entity names alone, what a caption dropped in training becomes (view_dropout).
      names = data_lib.stack([self.names(i) for i in insts])
      out.update({k: names[t] for k, t in zip(batch_spec.prefixed("names_"),
                                               batch_spec.TOKENS)})
      out["pixels"] = np.stack([self.real_pixels(i) for i in insts])
    else:
      out = data_lib.stack([self.real_text(i) for i in insts])
      pix = np.zeros((b, slots, self.size, self.size, 3), np.float32)
      for row, inst in enumerate(insts):
        vs = [self.view_pixels(inst, v) for v in views[inst.id]]
        if real_view:
          vs.append(self.real_pixels(inst))
        mask[row, :len(vs)] = True
        for k, p in enumerate(vs):
          pix[row, k] = p
      out["view_pixels"] = pix
    out["view_mask"] = mask
    out["label"] = np.asarray([i.label for i in insts], np.int32)
    return out
