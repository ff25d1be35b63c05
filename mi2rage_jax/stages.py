"""The stages of an MI²RAGE run (pipeline.py lists them), as parts of `pipeline.Run`:
generation, teachers and selection (`TeacherStages`), the student and its test
(`StudentStages`), the diversity estimate (`DiversityStage`). Their inputs come from
`Run.batches` (batches.py); each writes its outputs under the run's workdir.
"""
import itertools
import json
import logging
import os
import pathlib
import zlib

import numpy as np

from mi2rage_jax import data as data_lib
from mi2rage_jax import diversity as diversity_lib
from mi2rage_jax import generators as gen_lib
from mi2rage_jax import models, selection
from mi2rage_jax.models.similarity import SimilarityModel
from remote_jax import config as config_lib
from remote_jax import distributed, engine
from remote_jax import metrics as metrics_lib
from remote_jax.writers import to_json

# The run's one logger (pipeline.py's): stage lines and test results.
log = logging.getLogger("mi2rage_jax.pipeline")


def write_json(path, obj):
  """Atomic JSON write, by the main process only (the others read it after a barrier)."""
  if not distributed.is_main():
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=to_json))
  os.replace(tmp, path)


class TeacherStages:
  """generate_r, teacher_r, select_r: candidates, the teachers that score them, the kept."""

  def teacher_model(self):
    if self.cfg.teacher.kind == "similarity":
      m = self.cfg.model
      return SimilarityModel(models.common.bert_config(m.text),
                             models.common.vision_config(m.vision))
    return models.build_teacher(self.target, self.cfg.model, self.num_classes)

  def _pairs(self, cands, split):
    insts = {i.id: i for i in self.ds.splits[split]}
    return [(insts[iid], v) for iid, vs in cands.items() for v in vs]

  def folds(self):
    """teacher.folds: 1 = the paper (one teacher scores the views it trained on); k > 1 =
    cross-fitted (k teachers, each trained without one fold of the training instances,
    which it alone scores; test views get the mean of the k teachers' logits)."""
    return config_lib.mi2rage_folds(self.cfg)

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
    make = self.batches.similarity if tcfg.kind == "similarity" else self.batches.teacher
    tag = f"teacher_round{r}" + ("" if fold is None else f"_fold{fold}")
    s = self._setup(self.teacher_model(), make(pairs[:1]), tcfg.optim, int(tcfg.steps),
                    int(self.cfg.seed) + 101 * r)
    params = self._fit(s, len(pairs), int(tcfg.batch_size),
                       lambda idx: make([pairs[k] for k in idx]), int(tcfg.steps),
                       int(self.cfg.seed) + r + 1000 * (fold or 0), tag,
                       tag.replace("_round", "_"))
    self._models[key] = (s, params)
    return s, params

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
                             lambda idx: self.batches.similarity([pairs[k] for k in idx]),
                             scores)
    else:
      def logits_of(s_params, rows):
        s, params = s_params
        return engine.predict(s, params, len(rows), bs,
                              lambda idx: self.batches.teacher([pairs[rows[k]] for k in idx]))

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
        real = [(insts[iid], self.batches.real_as_view(insts[iid])) for iid in cands]
        def real_batch(idx):
          return self.batches.teacher([real[k] for k in idx])
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
      write_json(self.selection_path(split, r),
                  {"round": r, "final": final, "criterion": criterion,
                   "kept_fraction": None if final else frac, "instances": out})
      info[split] = sum(len(o["kept"]) for o in out.values())
    return info


class StudentStages:
  """student and test: the student on the final views, its test metrics."""

  def student_model(self):
    return models.build_student(self.setting, self.cfg.model, self.num_classes)

  def _student_params(self):
    if "student" in self._models:
      return self._models["student"]
    scfg = self.cfg.student
    n = self.n_views(self.train_split)
    insts = self.ds.splits[self.train_split]
    views = self.final_views(self.train_split, n)
    slots = self.batches.slots(n)

    def make(idx):
      return self.batches.student([insts[k] for k in idx], views, slots)

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
    slots = self.batches.slots(n, real)
    logits = engine.predict(s, params, len(insts), int(scfg.eval_batch_size),
                            lambda idx: self.batches.student([insts[k] for k in idx], views,
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
    write_json(self.workdir / "results" / f"test_{tag}.json", res)
    log.info("[%s] test %s: acc %.2f P %.2f R %.2f F1 %.2f", self.setting, tag, res["acc"],
                 res["precision"], res["recall"], res["f1"])
    return res


class DiversityStage:
  """diversity: generalised variance and faithful fraction of generated and kept views."""

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
    write_json(self.workdir / "results" / "diversity.json", out)
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
  words = text.lower().split()
  feats = np.zeros(dim, np.float32)
  for gram in words + [a + " " + b for a, b in itertools.pairwise(words)]:
    feats[zlib.crc32(gram.encode()) % dim] += 1.0
  return feats

