"""Cross-modal generators behind one interface; `GENERATORS[name](cfg, target)`.

A generator makes views of the synthetic modality `target` ("image" or "text"):
  initial(instance, real, n, rng) -> [View]     round 0, from the real view
      (`real`: the real text as a str when target is image, the real image as
      uint8 (H,W,3) when target is text)
  chain(instance, parent, n, rnd, rng) -> [View]  round rnd > 0, from a kept view:
      parent image -> caption (U_rnd) -> image, or parent caption -> image -> caption

Entries:
  pregenerated  serves the views of the views stores `stores` ({split: dir}, or
                {modality: {split: dir}}) made offline with
                real generators (the real-use path). `initial` returns every
                round-0 view of the instance and `chain` every view of round rnd
                whose parent is `parent`; `n` is not used (nothing is dropped).
                A missing round or a kept parent without children is an error
                naming the instance and the round.
  demo          procedural generators over the demo worlds (demo_generators.py), with a
                configurable rate of label-irrelevant outputs (`noise`) and, with
                `knowledge`, imperfect knowledge of the knowledge world's facts
                (`knowledge_error`, `mention_rate`).
"""
import hashlib

import numpy as np

from mi2rage_jax import demo_generators
from mi2rage_jax import views as views_lib
from mi2rage_jax.views import View, ViewsStoreError


class DemoGenerator:
  name = "demo"

  def __init__(self, cfg, target):
    self.target = target
    self.gen = demo_generators.DemoGenerators(
        noise=float(cfg.noise), image_size=int(cfg.image_size), max_pairs=int(cfg.max_pairs),
        knowledge_error=float(cfg.knowledge_error), mention_rate=float(cfg.mention_rate),
        knowledge=bool(cfg.knowledge))

  def _to_target(self, source, rng):
    if self.target == "image":
      return self.gen.render(source, rng)
    return self.gen.caption(source, rng)

  def _from_target(self, view, rng):
    if self.target == "image":
      return self.gen.caption(view, rng)
    return self.gen.render(view, rng)

  def initial(self, instance, real, n, rng):
    out = []
    for k in range(n):
      data, ok = self._to_target(real, rng)
      out.append(View(id=f"r0v{k}", round=0, modality=self.target, generator="demo",
                      data=data, meta={"faithful": bool(ok)}))
    return out

  def chain(self, instance, parent, n, rnd, rng):
    out = []
    for k in range(n):
      bridge, ok1 = self._from_target(parent.data, rng)
      data, ok2 = self._to_target(bridge, rng)
      faithful = bool(ok1 and ok2 and (parent.meta or {}).get("faithful", True))
      out.append(View(id=f"r{rnd}{parent.id}c{k}", round=rnd, modality=self.target,
                      generator="demo", parent=parent.id,
                      bridge=bridge if isinstance(bridge, str) else None,
                      data=data, meta={"faithful": faithful}))
    return out


class PregeneratedGenerator:
  name = "pregenerated"

  def __init__(self, cfg, target):
    self.target = target
    self.stores = {}
    stores = dict(cfg.stores) if hasattr(cfg.stores, "keys") else {}
    if target in stores and hasattr(stores[target], "keys"):   # {modality: {split: dir}}
      stores = dict(stores[target])
    self.paths = stores
    if not self.paths:
      raise ValueError("generator 'pregenerated' needs generator.stores = {split: store dir}")

  def store(self, split):
    if split not in self.stores:
      if split not in self.paths:
        raise ValueError(f"generator.stores has no views store for split {split!r}")
      store = views_lib.load_store(self.paths[split])
      if store.modality != self.target:
        raise ViewsStoreError(f"views store {self.paths[split]}: modality {store.modality!r}, "
                              f"but this setting synthesises {self.target!r}")
      self.stores[split] = store
    return self.stores[split]

  def _rounds(self, instance, rnd):
    store = self.store(instance.split)
    if instance.id not in store.instance_ids:
      raise ViewsStoreError(f"views store {store.root}: instance {instance.id!r}, round {rnd}: "
                            "instance without views")
    if rnd >= store.num_rounds(instance.id):
      raise ViewsStoreError(
          f"views store {store.root}: instance {instance.id!r}, round {rnd}: missing round "
          f"(the store has {store.num_rounds(instance.id)}); generate it from the kept views "
          f"in the workdir's selections/ and add it to the store")
    return store

  def initial(self, instance, real, n, rng):
    del real, n, rng
    return self._absolute(self._rounds(instance, 0), instance.id, 0, None)

  def chain(self, instance, parent, n, rnd, rng):
    del n, rng
    store = self._rounds(instance, rnd)
    out = self._absolute(store, instance.id, rnd, parent.id)
    if not out:
      raise ViewsStoreError(f"views store {store.root}: instance {instance.id!r}, round {rnd}: "
                            f"no view chained from kept view {parent.id!r}")
    return out

  def _absolute(self, store, inst, rnd, parent):
    out = []
    for v in store.views(inst, rnd):
      if rnd > 0 and v.parent != parent:
        continue
      if v.file is not None:
        v.file = str((store.root / v.file).absolute())
      out.append(v)
    return out


GENERATORS = {"demo": DemoGenerator, "pregenerated": PregeneratedGenerator}


def build(cfg, target):
  if cfg.name not in GENERATORS:
    raise ValueError(f"generator {cfg.name!r}; allowed: {sorted(GENERATORS)}")
  return GENERATORS[cfg.name](cfg, target)


def seeded(seed, *keys):
  """A numpy Generator determined by the seed and keys (independent of call order)."""
  digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
  return np.random.default_rng(np.frombuffer(digest, np.uint32).tolist())
