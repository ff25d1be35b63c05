"""MI2RAGE stages for one missing-modality setting, in one workdir.

Settings: "no_real_text" (train on real images + synthetic texts; ImageStudent)
and "no_real_image" (real texts + synthetic images; TextStudent). During
training only the real view of the training modality is ever read.

Stages, in order (each writes its outputs, then stages/<name>.done; a finished
stage is skipped on rerun, an interrupted `fit` resumes from its checkpoint):
  generate_r  r = 0..K: candidates of round r for train and test instances:
              round 0 from the real view, round r > 0 chained from the views
              kept at round r-1 (`ccg.children` per kept view: an int or one
              per round); appended to
              the views store views/<split>/ (views.py format).
  teacher_r   (teacher.kind = trained | similarity) trains on the round-r
              candidates C_r = kept_{r-1} + new_r: ckpt/teacher_round{r}/.
  select_r    scores every candidate and writes selections/<split>_round{r}.json:
              {"round", "criterion", "kept_fraction" | "final",
               "instances": {id: {"candidates": [view ids], "scores": [...],
                                  "kept": [view ids], "ranking": [view ids]}}}
              r < K: per instance the `ccg.keep_fraction` lowest scores (ties by
              candidate index; selection.py). r = K: the ranking (lowest score
              first) from which students take their first N views.
              Scores: train = teacher loss with the true label; test = the
              label-free `teacher.test_criterion` (base_config's maxprob:
              -log max_y p(y|v), i.e. the most confident views first; agree:
              the loss against the consensus of the instance's candidates; real:
              the loss against the teacher's prediction on the instance's real
              view of the synthetic modality, which a test instance has; the
              demo's default).
  student     trains the student on the first `student.n_train_views` views of
              each train instance: ckpt/student_n{N}/.
  test        student on test instances: first `student.n_test_views` views
              plus the real view of the synthetic modality appended
              (`student.append_real`): results/test_ntr{N}_nte{M}.json.
              (student/test markers carry N and M: another n_train/n_test in the
              same workdir reuses generation, teachers and selections.)
  diversity   generalised variance (diversity.py) of the generated (V'_r) and
              kept (V_r) train views per round, and the demo generators'
              faithful fraction before/after selection: results/diversity.json.

Teacher kinds (ablations): trained (paper), similarity (dual-encoder cosine to
the real view), random (uniform random scores), none (no filtering: every
candidate is kept in the chain; the final N are random).
"""
import functools
import itertools
import json
import logging
import os
import pathlib
import time

import numpy as np

from mi2rage_jax import data as data_lib
from mi2rage_jax import diversity as diversity_lib
from mi2rage_jax import generators as gen_lib
from mi2rage_jax import models, selection
from mi2rage_jax import views as views_lib
from mi2rage_jax.models.similarity import SimilarityModel
from remote_jax import distributed, engine, pretrained, sharding
from remote_jax import metrics as metrics_lib
from remote_jax.writers import to_json

log = logging.getLogger(__name__)

SETTINGS = {"no_real_text": "text", "no_real_image": "image"}   # setting -> synthetic modality
# oracle (demo generators only): keeps the views the generator made faithfully (its
# `meta.faithful`, random among equals): what a perfect selection would give, an upper bound
# for the analysis, never a method.
TEACHER_KINDS = ("trained", "similarity", "random", "none", "oracle")
_PER_KEYS = set(SETTINGS) | set(SETTINGS.values())


def _write_json(path, obj):
  """Atomic JSON write, by the main process only (the others read it after a barrier)."""
  if not distributed.is_main():
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=to_json))
  os.replace(tmp, path)


class Run:
  """All stages of one setting. `dataset` and `encoder` may be shared between runs."""

  def __init__(self, cfg, workdir, setting, dataset, encoder, writer=None):
    if setting not in SETTINGS:
      raise ValueError(f"setting {setting!r}; allowed: {sorted(SETTINGS)}")
    if cfg.teacher.kind not in TEACHER_KINDS:
      raise ValueError(f"teacher.kind {cfg.teacher.kind!r}; allowed: {TEACHER_KINDS}")
    if cfg.teacher.get("test_criterion", "maxprob") not in (*selection.LABEL_FREE, "real"):
      raise ValueError(f"teacher.test_criterion {cfg.teacher.test_criterion!r}; allowed: "
                       f"{(*selection.LABEL_FREE, 'real')} (label-free: the test labels are "
                       "never read)")
    self.cfg, self.setting = cfg, setting
    self.target = SETTINGS[setting]
    self.workdir = pathlib.Path(workdir)
    self.ds, self.enc, self.writer = dataset, encoder, writer
    self.splits = (cfg.data.train_split, cfg.data.test_split)
    self.train_split, self.test_split = self.splits
    self.K = int(cfg.ccg.rounds)
    self.unimodal = bool(cfg.student.unimodal)
    self.num_classes = len(dataset.relations)
    if setting == "no_real_text" and not dataset.has_images:
      raise ValueError("setting no_real_text needs real images; this dataset has none "
                       "(text-only data works with no_real_image)")
    self.generator = None if self.unimodal else gen_lib.build(cfg.generator, self.target)
    self.size = int(cfg.data.image_size)
    self._stores = {}
    self._enc_cache = {}
    self._view_cache = {}
    self._cand_cache = {}
    self._models = {}
    self._types = {i.id: i.triplet_type for insts in dataset.splits.values() for i in insts}

  @functools.cached_property
  def mesh(self):
    """The device mesh of config.mesh that teachers and students train on."""
    return sharding.make_mesh(self.cfg.mesh)

  def per(self, value):
    """A config value, or its entry for this setting (or synthetic modality) if a dict."""
    if hasattr(value, "keys") and value.keys() and set(value.keys()) <= _PER_KEYS:
      return value[self.setting] if self.setting in value else value[self.target]
    return value

  def optim(self, optim_cfg):
    """The optimiser config with per-setting values (e.g. lr) resolved."""
    return {k: self.per(v) for k, v in dict(optim_cfg).items()}

  def n_views(self, split):
    scfg = self.cfg.student
    return int(self.per(scfg.n_train_views if split == self.train_split
                        else scfg.n_test_views))

  def children(self, r):
    """Views chained from each kept view in round r >= 1 (an int, or one per round)."""
    c = self.cfg.ccg.children
    return int(c[min(r, len(c)) - 1] if isinstance(c, (list, tuple)) else c)

  # ---------------------------------------------------------------- bookkeeping
  def _done_path(self, name):
    """stages/<name>.done; student and test markers carry the numbers of views."""
    if name in ("student", "test"):
      name += f"_ntr{self.n_views(self.train_split)}"
    if name.startswith("test"):
      name += f"_nte{self.n_views(self.test_split)}"
    return self.workdir / "stages" / f"{name}.done"

  def done(self, name):
    return self._done_path(name).exists()

  def _stage(self, name, fn):
    if self.done(name):
      log.info("[%s] stage %s: done, skipped", self.setting, name)
      return "skipped"
    t0 = time.time()
    log.info("[%s] stage %s: running", self.setting, name)
    info = fn() or {}
    _write_json(self._done_path(name), {"seconds": time.time() - t0, **info})
    # Several processes: the main one wrote the stage's files; the others drop what they
    # hold in memory and read those files, as a rerun would.
    distributed.barrier(f"mi2rage/{self.setting}/{name}")
    if not distributed.is_main():
      for cache in (self._stores, self._view_cache, self._cand_cache):
        cache.clear()
    return "ran"

  def stage_names(self):
    if self.unimodal:
      return ["student", "test"]
    names = []
    for r in range(self.K + 1):
      names += [f"generate_{r}"]
      if self.cfg.teacher.kind in ("trained", "similarity"):
        names += [f"teacher_{r}"]
      names += [f"select_{r}"]
    return names + ["student", "test", "diversity"]

  def run(self):
    """Runs (or skips) every stage; returns {stage: "ran" | "skipped"}."""
    report = {}
    for name in self.stage_names():
      stage, _, r = name.partition("_")
      fn = getattr(self, f"_{stage}")
      report[name] = self._stage(name, (lambda fn=fn, r=r: fn(int(r))) if r else fn)
    return report

  # ---------------------------------------------------------------- views
  def store(self, split):
    if split not in self._stores:
      root = self.workdir / "views" / split
      if (root / "manifest.json").exists():
        self._stores[split] = views_lib.load_store(root)
      else:
        self._stores[split] = views_lib.ViewsStore(root, self.target)
    return self._stores[split]

  def selection_path(self, split, r):
    return self.workdir / "selections" / f"{split}_round{r}.json"

  def load_selection(self, split, r):
    path = self.selection_path(split, r)
    if not path.exists():
      raise FileNotFoundError(f"{path} missing: stage select_{r} has not run")
    return json.loads(path.read_text())["instances"]

  def candidates(self, split, r):
    """{instance id: [View]} of round r: kept views of round r-1, then new views of r."""
    if (split, r) in self._cand_cache:
      return self._cand_cache[(split, r)]
    store = self.store(split)
    prev = self.candidates(split, r - 1) if r > 0 else None
    kept = self.load_selection(split, r - 1) if r > 0 else None
    out = {}
    for inst in self.ds.splits[split]:
      new = self._load_views(store, inst.id, r)
      if prev is not None:
        keep = set(kept[inst.id]["kept"])
        out[inst.id] = [v for v in prev[inst.id] if v.id in keep] + new
      else:
        out[inst.id] = new
    self._cand_cache[(split, r)] = out
    return out

  def _load_views(self, store, inst_id, r):
    key = (str(store.root), inst_id, r)
    if key not in self._view_cache:
      self._view_cache[key] = store.views(inst_id, r)
    return self._view_cache[key]

  # ---------------------------------------------------------------- encodings
  def _caption_enc(self, inst, view):
    key = ("cap", inst.id, view.id)
    if key not in self._enc_cache:
      self._enc_cache[key] = self.enc.encode_caption(view.data, inst)
    return self._enc_cache[key]

  def _names_enc(self, inst):
    key = ("names", inst.id)
    if key not in self._enc_cache:
      self._enc_cache[key] = self.enc.encode_names(inst)
    return self._enc_cache[key]

  def _real_text_enc(self, inst):
    key = ("real", inst.id)
    if key not in self._enc_cache:
      self._enc_cache[key] = self.enc.encode_real_text(inst)
    return self._enc_cache[key]

  def _pixels(self, key, image):
    if key not in self._enc_cache:
      self._enc_cache[key] = data_lib.pixels(image, self.size)
    return self._enc_cache[key]

  def _view_pixels(self, inst, view):
    return self._pixels(("vpix", inst.id, view.id), view.data)

  def _real_pixels(self, inst):
    return self._pixels(("rpix", inst.id), data_lib.real_image(inst))

  def _real_as_view(self, inst):
    """The real view of the synthetic modality (test instances have both), as a View the
    teacher can score: test_criterion 'real'."""
    data = data_lib.real_text(inst) if self.target == "text" else data_lib.real_image(inst)
    return views_lib.View(id="<real>", round=-1, modality=self.target, generator="real",
                          data=data)

  # ---------------------------------------------------------------- teacher batches
  def teacher_batch(self, pairs):
    """Teacher input for [(instance, view)]: the synthetic view and entity names ONLY."""
    if self.target == "text":
      b = data_lib.stack([self._caption_enc(i, v) for i, v in pairs])
    else:
      b = data_lib.stack([self._names_enc(i) for i, _ in pairs])
      b["pixels"] = np.stack([self._view_pixels(i, v) for i, v in pairs])
    b["label"] = np.asarray([i.label for i, _ in pairs], np.int32)
    return b

  def similarity_batch(self, pairs):
    """(real view, synthetic view) pairs on the text and image sides."""
    if self.target == "text":   # real image, synthetic caption
      b = data_lib.stack([self._caption_enc(i, v) for i, v in pairs])
      b["pixels"] = np.stack([self._real_pixels(i) for i, _ in pairs])
    else:                       # real text, synthetic image
      b = data_lib.stack([self._real_text_enc(i) for i, _ in pairs])
      b["pixels"] = np.stack([self._view_pixels(i, v) for i, v in pairs])
    b["label"] = np.arange(len(pairs), dtype=np.int32)
    return b

  def teacher_model(self):
    if self.cfg.teacher.kind == "similarity":
      m = self.cfg.model
      return SimilarityModel(models.common.bert_config(m.text),
                             models.common.vision_config(m.vision))
    return models.build_teacher(self.target, self.cfg.model, self.num_classes)

  def _pairs(self, cands, split):
    insts = {i.id: i for i in self.ds.splits[split]}
    return [(insts[iid], v) for iid, vs in cands.items() for v in vs]

  def _setup(self, model, init_batch, optim_cfg, steps, seed):
    """The engine's Setup (remote_jax.engine.build) on the config's mesh, with the
    pretrained encoders of config.model loaded."""
    load = lambda params: pretrained.load_pretrained(params, self.cfg.model, int(self.cfg.seed),
                                                     use_cls=True, use_depth=False)
    return engine.build(model, init_batch, self.optim(optim_cfg), steps, self.mesh,
                        rules=self.cfg.sharding, seed=seed, load=load)

  def _fit(self, s, rows, batch_size, make, steps, seed, tag, name):
    """Trains on batches of `batch_size` rows drawn from range(rows) (with replacement
    only when fewer); `make([row]) -> batch`. Returns the params."""
    def draw(rng):
      return rng.choice(rows, batch_size, replace=rows < batch_size)

    return engine.fit(s, draw, make, steps, seed, self.workdir / "ckpt" / tag,
                       ckpt_every=int(self.cfg.ckpt_every), writer=self.writer,
                       name=f"{self.setting}/{name}")

  def folds(self):
    """teacher.folds: 1 = the paper (one teacher scores the views it trained on); k > 1 =
    cross-fitted (k teachers, each trained without one fold of the training instances,
    which it alone scores; test views get the mean of the k teachers' logits)."""
    k = int(self.cfg.teacher.get("folds", 1))
    if k < 1 or (k > 1 and self.cfg.teacher.kind != "trained"):
      raise ValueError(f"teacher.folds={k}: must be 1, or > 1 with teacher.kind 'trained' "
                       f"(not {self.cfg.teacher.kind!r})")
    return k

  def fold_of(self, iid):
    """The fold of a training instance: fixed by the seed and the instance id."""
    return int(gen_lib.seeded(self.cfg.seed, "teacher-fold", iid).integers(self.folds()))

  def _teachers(self, r):
    """[(Setup, params)] of the round-r teacher(s): one per fold."""
    pairs = self._pairs(self.candidates(self.train_split, r), self.train_split)
    k = self.folds()
    if k == 1:
      return [self._fit_teacher(r, pairs)]
    return [self._fit_teacher(r, [p for p in pairs if self.fold_of(p[0].id) != f], fold=f)
            for f in range(k)]

  def _fit_teacher(self, r, pairs, fold=None):
    """(Setup, trained params) of the round-r teacher (of one fold: trained without it)."""
    key = ("teacher", r, fold)
    if key in self._models:
      return self._models[key]
    tcfg = self.cfg.teacher
    make = self.similarity_batch if tcfg.kind == "similarity" else self.teacher_batch
    tag = f"teacher_round{r}" + ("" if fold is None else f"_fold{fold}")
    s = self._setup(self.teacher_model(), make(pairs[:1]), tcfg.optim, int(tcfg.steps),
                    int(self.cfg.seed) + 101 * r)
    params = self._fit(s, len(pairs), int(tcfg.batch_size),
                       lambda idx: make([pairs[k] for k in idx]), int(tcfg.steps),
                       int(self.cfg.seed) + r + 1000 * (fold or 0), tag,
                       tag.replace("_round", "_"))
    self._models[key] = (s, params)
    return s, params

  # ---------------------------------------------------------------- stages
  def _generate(self, r):
    n_views = 0
    for split in self.splits:
      store = self.store(split)
      kept = self.load_selection(split, r - 1) if r > 0 else None
      prev = self.candidates(split, r - 1) if r > 0 else None
      for inst in self.ds.splits[split]:
        if inst.id in store.instance_ids and store.num_rounds(inst.id) > r:
          continue   # written before an interruption
        rng = gen_lib.seeded(self.cfg.seed, "generate", split, inst.id, r)
        if r == 0:
          real = (data_lib.real_text(inst) if self.target == "image"
                  else data_lib.real_image(inst))
          new = self.generator.initial(inst, real, int(self.cfg.ccg.n_initial), rng)
        else:
          keep = kept[inst.id]["kept"]
          parents = [v for v in prev[inst.id] if v.id in keep]
          new = [c for p in parents
                 for c in self.generator.chain(inst, p, self.children(r), r, rng)]
        store.add_round(inst.id, r, new, write_files=distributed.is_main())
        n_views += len(new)
      if distributed.is_main():
        store.save()
    return {"views": n_views}

  def _teacher(self, r):
    self._teachers(r)
    return {"examples": len(self._pairs(self.candidates(self.train_split, r),
                                        self.train_split)), "folds": self.folds()}

  def _scores(self, r, split, cands):
    """{instance id: np.array of scores, lower = keep first}."""
    tcfg = self.cfg.teacher
    kind = tcfg.kind
    if kind in ("random", "none", "oracle"):
      out = {iid: gen_lib.seeded(self.cfg.seed, "random-teacher", split, iid, r).random(len(vs))
             for iid, vs in cands.items()}
      if kind == "oracle":
        for iid, vs in cands.items():
          if any("faithful" not in (v.meta or {}) for v in vs):
            raise ValueError(f"teacher.kind 'oracle' needs the demo generators' meta.faithful; "
                             f"instance {iid!r} of split {split!r} has a view without it")
          out[iid] = out[iid] + np.asarray([0.0 if v.meta["faithful"] else 1.0 for v in vs])
      return out
    pairs = self._pairs(cands, split)
    teachers = self._teachers(r)
    bs = int(tcfg.eval_batch_size)
    if kind == "similarity":
      s, params = teachers[0]
      scores = s.jit_eval(lambda p, b: s.model.apply({"params": p}, b, method="pair_scores"))
      flat = -engine.predict(s, params, len(pairs), bs,   # most similar first
                              lambda idx: self.similarity_batch([pairs[k] for k in idx]),
                              scores)
    else:
      def logits_of(s_params, rows):
        s, params = s_params
        return engine.predict(s, params, len(rows), bs,
                               lambda idx: self.teacher_batch([pairs[rows[k]] for k in idx]))

      if len(teachers) == 1:
        logits = logits_of(teachers[0], np.arange(len(pairs)))
      elif split == self.train_split:   # each view scored by the teacher that never saw it
        fold = np.asarray([self.fold_of(inst.id) for inst, _ in pairs])
        logits = np.zeros((len(pairs), self.num_classes), np.float32)
        for f, t in enumerate(teachers):
          rows = np.flatnonzero(fold == f)
          if len(rows):
            logits[rows] = logits_of(t, rows)
      else:
        logits = np.mean([logits_of(t, np.arange(len(pairs))) for t in teachers], 0)
      criterion = "loss" if split == self.train_split else tcfg.test_criterion
      counts = [len(vs) for vs in cands.values()]
      if criterion == "real":   # the loss against the teacher's reading of the real view
        insts = {i.id: i for i in self.ds.splits[split]}
        real = [(insts[iid], self._real_as_view(insts[iid])) for iid in cands]
        def real_batch(idx):
          return self.teacher_batch([real[k] for k in idx])
        real_logits = np.mean([engine.predict(s, params, len(real), bs, real_batch)
                               for s, params in teachers], 0)
        flat = selection.loss_score(logits, np.repeat(real_logits.argmax(-1), counts))
      else:
        groups = np.repeat(np.arange(len(cands)), counts)
        flat = selection.score(criterion, logits, np.asarray([i.label for i, _ in pairs]),
                               groups)
    out, k = {}, 0
    for iid, vs in cands.items():
      out[iid] = flat[k:k + len(vs)]
      k += len(vs)
    return out

  def _select(self, r):
    final = r == self.K
    frac = 1.0 if self.cfg.teacher.kind == "none" else float(self.cfg.ccg.keep_fraction)
    info = {}
    for split in self.splits:
      cands = self.candidates(split, r)
      scores = self._scores(r, split, cands)
      n_final = self.n_views(split)
      kept = (selection.select_top(scores, n_final) if final
              else selection.select_fraction(scores, frac))
      criterion = (self.cfg.teacher.kind if self.cfg.teacher.kind != "trained" else
                   ("loss" if split == self.train_split else self.cfg.teacher.test_criterion))
      out = {}
      for iid, vs in cands.items():
        ids = [v.id for v in vs]
        out[iid] = {"candidates": ids, "scores": [float(x) for x in scores[iid]],
                    "kept": [ids[k] for k in kept[iid]],
                    "ranking": [ids[k] for k in selection.lowest(scores[iid], len(ids))]}
      _write_json(self.selection_path(split, r),
                  {"round": r, "final": final, "criterion": criterion,
                   "kept_fraction": None if final else frac, "instances": out})
      info[split] = sum(len(o["kept"]) for o in out.values())
    return info

  # ---------------------------------------------------------------- students
  def final_views(self, split, n):
    """{instance id: first n views of the final ranking} ({} lists when unimodal)."""
    if self.unimodal:
      return {i.id: [] for i in self.ds.splits[split]}
    cands = {iid: {v.id: v for v in vs} for iid, vs in self.candidates(split, self.K).items()}
    sel = self.load_selection(split, self.K)
    return {iid: [cands[iid][vid] for vid in sel[iid]["ranking"][:n]] for iid in cands}

  def student_model(self):
    return models.build_student(self.setting, self.cfg.model, self.num_classes)

  def student_batch(self, insts, views, slots, real_view=False):
    """Student input; `slots` view slots, filled by `views[id]` (+ the real view appended
    when `real_view`), the rest masked."""
    b = len(insts)
    mask = np.zeros((b, slots), bool)
    if self.setting == "no_real_text":
      encs = []
      for row, inst in enumerate(insts):
        vs = ([self._names_enc(inst)] if self.unimodal else
              [self._caption_enc(inst, v) for v in views[inst.id]])
        if real_view:
          vs.append(self._real_text_enc(inst))
        mask[row, :len(vs)] = True
        vs = vs + [vs[0] if vs else self._names_enc(inst)] * (slots - len(vs))
        encs.append(data_lib.stack(vs))
      out = {f"view_{k}": np.stack([e[k] for e in encs]) for k in encs[0]}
      # The entity names alone, what a caption dropped in training becomes (view_dropout).
      names = data_lib.stack([self._names_enc(i) for i in insts])
      out.update({f"names_{k}": v for k, v in names.items()})
      out["pixels"] = np.stack([self._real_pixels(i) for i in insts])
    else:
      out = data_lib.stack([self._real_text_enc(i) for i in insts])
      pix = np.zeros((b, slots, self.size, self.size, 3), np.float32)
      for row, inst in enumerate(insts):
        vs = [self._view_pixels(inst, v) for v in views[inst.id]]
        if real_view:
          vs.append(self._real_pixels(inst))
        mask[row, :len(vs)] = True
        for k, p in enumerate(vs):
          pix[row, k] = p
      out["view_pixels"] = pix
    out["view_mask"] = mask
    out["label"] = np.asarray([i.label for i in insts], np.int32)
    return out

  def _slots(self, n, real=False):
    if self.setting == "no_real_text" and self.unimodal:
      return 1
    return (0 if self.unimodal else n) + int(real)

  def _student_params(self):
    if "student" in self._models:
      return self._models["student"]
    scfg = self.cfg.student
    n = self.n_views(self.train_split)
    insts = self.ds.splits[self.train_split]
    views = self.final_views(self.train_split, n)
    slots = self._slots(n)

    def make(idx):
      return self.student_batch([insts[k] for k in idx], views, slots)

    s = self._setup(self.student_model(), make([0]), scfg.optim, int(scfg.steps),
                    int(self.cfg.seed))
    tag = f"student{'_unimodal' if self.unimodal else ''}_n{n}"
    params = self._fit(s, len(insts), int(scfg.batch_size), make, int(scfg.steps),
                       int(self.cfg.seed) + 7, tag, "student")
    self._models["student"] = (s, params)
    return s, params

  def _student(self):
    self._student_params()
    return {"n_train_views": self.n_views(self.train_split)}

  def evaluate(self, n_test=None):
    """Test metrics with n_test synthetic views (default student.n_test_views)."""
    scfg = self.cfg.student
    n = self.n_views(self.test_split) if n_test is None else int(n_test)
    s, params = self._student_params()
    insts = self.ds.splits[self.test_split]
    views = self.final_views(self.test_split, n)
    real = bool(scfg.append_real) and not self.unimodal and self._has_real_target()
    slots = self._slots(n, real)
    logits = engine.predict(s, params, len(insts), int(scfg.eval_batch_size),
                             lambda idx: self.student_batch([insts[k] for k in idx], views,
                                                            slots, real))
    preds = logits.argmax(-1)
    labels = np.asarray([i.label for i in insts])
    m = metrics_lib.relation_metrics(preds, labels, self.ds.negative_id,
                                     triplet_type=np.asarray([i.triplet_type for i in insts]),
                                     relation_names=self.ds.relations,
                                     buckets=self.ds.buckets.get(self.test_split))
    keep = {k: v for k, v in m.items() if k not in ("confusion", "per_relation")}
    return {"setting": self.setting, "n_train_views": self.n_views(self.train_split),
            "n_test_views": n, "append_real": real, "teacher": self.cfg.teacher.kind,
            "test_criterion": self.cfg.teacher.test_criterion,
            "rounds": self.K, "unimodal": self.unimodal, **json.loads(
                json.dumps(keep, default=to_json))}

  def _has_real_target(self):
    inst = self.ds.splits[self.test_split][0]
    return inst.image is not None if self.target == "image" else inst.tokens is not None

  def _test(self):
    res = self.write_test(None)
    if self.writer is not None:
      self.writer.write(0, {f"{self.setting}/test/{k}": v for k, v in res.items()
                            if isinstance(v, float)})
    return {"f1": res["f1"]}

  def write_test(self, n_test):
    """Evaluates with n_test synthetic views (None: config) -> results/test_ntr*_nte*.json."""
    res = self.evaluate(n_test)
    tag = f"ntr{res['n_train_views']}_nte{res['n_test_views']}"
    _write_json(self.workdir / "results" / f"test_{tag}.json", res)
    log.info("[%s] test %s: acc %.2f P %.2f R %.2f F1 %.2f", self.setting, tag, res["acc"],
                 res["precision"], res["recall"], res["f1"])
    return res

  # ---------------------------------------------------------------- diversity
  def view_features(self, vs):
    kind = self.cfg.diversity.features
    if kind != "raw":
      raise ValueError(f"diversity.features {kind!r}; allowed: 'raw'")
    if self.target == "image":
      return np.stack([data_lib.pixels(v.data, 16).reshape(-1) for v in vs])
    return np.stack([_hashed_ngrams(v.data) for v in vs])

  def _diversity(self):
    dcfg = self.cfg.diversity
    store = self.store(self.train_split)
    ids = [i.id for i in self.ds.splits[self.train_split]]
    n = self.n_views(self.train_split)
    out = {"pca_dim": int(dcfg.pca_dim), "components": int(dcfg.components),
           "features": dcfg.features, "rounds": []}
    for r in range(self.K + 1):
      sel = self.load_selection(self.train_split, r)
      cands = self.candidates(self.train_split, r)
      kept = {iid: set(sel[iid]["ranking"][:n] if r == self.K else sel[iid]["kept"])
              for iid in ids}
      out["rounds"].append({
          "round": r,
          "generated": self._set_stats([(iid, v) for iid in ids
                                        for v in self._load_views(store, iid, r)]),
          "candidates": self._set_stats([(iid, v) for iid in ids for v in cands[iid]]),
          "kept": self._set_stats([(iid, v) for iid in ids for v in cands[iid]
                                   if v.id in kept[iid]])})
    _write_json(self.workdir / "results" / "diversity.json", out)
    return {}

  def _set_stats(self, pairs):
    """Size, generalised variance and (demo) faithful fraction of [(instance id, view)]."""
    dcfg = self.cfg.diversity
    stats = {"n": len(pairs)}
    faithful = [(v.meta["faithful"], self._types[iid]) for iid, v in pairs
                if v.meta and "faithful" in v.meta]
    if faithful:
      f = np.asarray(faithful, np.float64)
      stats["faithful_fraction"] = float(f[:, 0].mean())
      stats["faithful_by_triplet_type"] = {
          metrics_lib.TRIPLET_TYPES[t]: float(f[f[:, 1] == t, 0].mean())
          for t in sorted(set(f[:, 1].astype(int)))}
    if len(pairs) > int(dcfg.components):
      stats.update({k: v for k, v in diversity_lib.generalized_variance(
          self.view_features([v for _, v in pairs]), int(dcfg.pca_dim), int(dcfg.components),
          int(self.cfg.seed)).items() if k in ("det", "logdet", "log10", "dim")})
    return stats


def _hashed_ngrams(text, dim=512):
  """Text features for the diversity estimate: hashed unigram+bigram counts."""
  import zlib
  words = text.lower().split()
  feats = np.zeros(dim, np.float32)
  for gram in words + [a + " " + b for a, b in itertools.pairwise(words)]:
    feats[zlib.crc32(gram.encode()) % dim] += 1.0
  return feats

