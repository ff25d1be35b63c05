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
import json
import logging
import pathlib
import time

from mi2rage_jax import batches as batches_lib
from mi2rage_jax import generators as gen_lib
from mi2rage_jax import stages
from mi2rage_jax import views as views_lib
from remote_jax import config as config_lib
from remote_jax import distributed, engine, pretrained, sharding

log = logging.getLogger(__name__)

SETTINGS = {"no_real_text": "text", "no_real_image": "image"}   # setting -> synthetic modality
_PER_KEYS = set(SETTINGS) | set(SETTINGS.values())


class Run(stages.TeacherStages, stages.StudentStages, stages.DiversityStage):
  """All stages of one setting. `dataset` and `encoder` may be shared between runs."""

  def __init__(self, cfg, workdir, setting, dataset, encoder, writer=None):
    if setting not in SETTINGS:
      raise ValueError(f"setting {setting!r}; allowed: {sorted(SETTINGS)}")
    config_lib.check_mi2rage(cfg)
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
    if cfg.teacher.test_criterion == "real" and not dataset.has_images:
      raise ValueError("teacher.test_criterion='real' ranks test views against the teacher's "
                       "reading of the real image; this dataset has none: set "
                       "--config.teacher.test_criterion to maxprob, entropy or agree")
    self.generator = None if self.unimodal else gen_lib.build(cfg.generator, self.target)
    self.batches = batches_lib.Batches(encoder, setting, self.target, self.unimodal,
                                       cfg.data.image_size)
    self._stores = {}
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
    stages.write_json(self._done_path(name), {"seconds": time.time() - t0, **info})
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

  def final_views(self, split, n):
    """{instance id: first n views of the final ranking} ({} lists when unimodal)."""
    if self.unimodal:
      return {i.id: [] for i in self.ds.splits[split]}
    cands = {iid: {v.id: v for v in vs} for iid, vs in self.candidates(split, self.K).items()}
    sel = self.load_selection(split, self.K)
    return {iid: [cands[iid][vid] for vid in sel[iid]["ranking"][:n]] for iid in cands}
