"""MI2RAGE teachers and students: no real-view leak, view masks, jit(vmap) shapes."""
import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import common
from mi2rage_jax import batch_spec, models, pipeline
from mi2rage_jax import data as data_lib
from remote_jax import engine, pretrained
from remote_jax.data.records import Entity
from tests.conftest import C, one_device, random_params
from tests.conftest import mi2rage_model_cfg as model_cfg


def _image_student_batch(rng, b, n, length=12, valid=None):
  ids = rng.integers(5, 100, (b, n, length)).astype(np.int32)
  mask = np.zeros((b, n), bool)
  for row, k in enumerate(valid if valid is not None else [n] * b):
    mask[row, :k] = True
  names = rng.integers(5, 100, (b, length)).astype(np.int32)
  return dict(pixels=rng.normal(size=(b, 16, 16, 3)).astype(np.float32), view_input_ids=ids,
              view_token_type_ids=np.zeros_like(ids), view_attention_mask=np.ones_like(ids),
              view_subj_pos=np.full((b, n), 1, np.int32), view_obj_pos=np.full((b, n), 3, np.int32),
              view_mask=mask, names_input_ids=names, names_token_type_ids=np.ones_like(names),
              names_attention_mask=np.ones_like(names),
              names_subj_pos=np.full((b,), 2, np.int32), names_obj_pos=np.full((b,), 5, np.int32))


def _text_student_batch(rng, b, n, length=12, valid=None):
  ids = rng.integers(5, 100, (b, length)).astype(np.int32)
  mask = np.zeros((b, n), bool)
  for row, k in enumerate(valid if valid is not None else [n] * b):
    mask[row, :k] = True
  return dict(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=np.ones_like(ids),
              subj_pos=np.array([1, 2, 0][:b], np.int32), obj_pos=np.array([4, 5, 6][:b], np.int32),
              view_pixels=rng.normal(size=(b, n, 16, 16, 3)).astype(np.float32), view_mask=mask)


BATCHES = {"no_real_text": _image_student_batch, "no_real_image": _text_student_batch}


@pytest.fixture(scope="module", params=sorted(BATCHES))
def student(request):
  setting = request.param
  model = models.build_student(setting, model_cfg(), C)
  batch = BATCHES[setting](np.random.default_rng(0), 3, 4)
  params = random_params(model, batch)
  apply = jax.jit(lambda p, b: model.apply({"params": p}, b, True))
  return setting, model, params, apply


def test_fewer_views_equal_masked_views(student):
  setting, _, params, apply = student
  make = BATCHES[setting]
  valid = [2, 1, 2]
  full = make(np.random.default_rng(1), 3, 4, valid=valid)       # slots 2..3 hold junk
  short = {k: (v[:, :2] if k.startswith("view_") else v) for k, v in full.items()}
  out_full = np.asarray(apply(params, full))
  out_short = np.asarray(apply(params, short))
  np.testing.assert_allclose(out_full, out_short, atol=1e-5, rtol=1e-5)
  # The check can fail: unmasking a junk slot changes the output.
  leaky = dict(full, view_mask=np.ones_like(full["view_mask"]))
  assert np.abs(np.asarray(apply(params, leaky)) - out_full).max() > 1e-4


def test_jit_vmap_shapes(student):
  setting, model, params, apply = student
  make = BATCHES[setting]
  batches = [make(np.random.default_rng(s), 3, 4, valid=[4, 2, 1]) for s in (2, 3)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
  out = jax.jit(jax.vmap(lambda b: model.apply({"params": params}, b, True)))(stacked)
  assert out.shape == (2, 3, C)
  for k, b in enumerate(batches):
    np.testing.assert_allclose(out[k], apply(params, b), atol=1e-5)


def _dropped(setting, batch):
  """The batch with every synthetic view dropped: the text student's image slots masked,
  the image student's captions replaced by the entity names alone (its query)."""
  if setting == "no_real_image":
    return dict(batch, view_mask=np.zeros_like(batch["view_mask"]))
  n = batch["view_input_ids"].shape[1]
  return dict(batch, **{f"view_{k}": np.repeat(batch[f"names_{k}"][:, None], n, 1)
                        for k in ("input_ids", "token_type_ids", "attention_mask", "subj_pos",
                                  "obj_pos")})


@pytest.mark.parametrize("setting", sorted(BATCHES))
def test_view_dropout_drops_views_in_training_only(setting):
  cfg = model_cfg()
  cfg.text.update(hidden_dropout=0.0, attention_dropout=0.0)
  cfg.dropout = 0.0   # so that view dropout is the only randomness in training mode
  batch = BATCHES[setting](np.random.default_rng(4), 3, 4)
  no_views = _dropped(setting, batch)
  params = random_params(models.build_student(setting, cfg, C), batch)

  def out(rate, b, deterministic, seed=0):
    cfg.view_dropout = rate
    model = models.build_student(setting, cfg, C)
    return np.asarray(model.apply({"params": params}, b, deterministic,
                                  rngs={"dropout": jax.random.key(seed)}))

  # Evaluation never drops; rate 1 in training sees the real modality alone; rate 0 is off.
  np.testing.assert_allclose(out(1.0, batch, True), out(0.0, batch, True), atol=1e-6)
  np.testing.assert_allclose(out(1.0, batch, False), out(0.0, no_views, True), atol=1e-5)
  np.testing.assert_allclose(out(0.0, batch, False), out(0.0, batch, True), atol=1e-6)
  # Rate 0.5: each draw keeps some views and drops others, so it differs from both ends.
  half = out(0.5, batch, False, seed=3)
  assert np.abs(half - out(0.0, batch, True)).max() > 1e-4
  assert np.abs(half - out(0.0, no_views, True)).max() > 1e-4


def test_text_student_without_views_is_text_only():
  model = models.build_student("no_real_image", model_cfg(), C)
  batch = _text_student_batch(np.random.default_rng(0), 3, 0)
  params = random_params(model, batch)
  assert "vision" not in params
  out = jax.eval_shape(lambda p, b: model.apply({"params": p}, b, True), params, batch)
  assert out.shape == (3, C)


# ----------------------------------------------------------------------------- leak


def _run(tmp_path, setting):
  cfg = ml_collections.ConfigDict(dict(
      seed=0, ckpt_every=0,
      data=dict(train_split="train", test_split="test", image_size=16),
      generator=dict(name="demo", noise=0.0, image_size=96, max_pairs=3, stores={},
                     knowledge=False, knowledge_error=0.0, mention_rate=1.0),
      ccg=dict(rounds=0, n_initial=2, children=1, keep_fraction=0.6),
      teacher=dict(common.MI2RAGE_TEACHER, kind="trained"), student=dict(unimodal=False),
      model=model_cfg()))
  img = tmp_path / "real.png"
  Image.fromarray(np.full((96, 96, 3), 200, np.uint8)).save(img)
  head = Entity("Ava Lin", (0, 2), False)
  tail = Entity("small red circle", (0.1, 0.1, 0.3, 0.3), True)
  inst = data_lib.Instance("train/0", "train", ("Ava", "Lin", "holds", "it", "."), head, tail,
                           str(img), 2)
  ds = data_lib.Dataset({"train": [inst], "test": []}, ["none"] + ["r"] * (C - 1), 0)
  enc = data_lib.Encoder("", 24)
  with cfg.unlocked():
    cfg.model.text.vocab_size = enc.vocab_size
  return pipeline.Run(cfg, tmp_path / setting, setting, ds, enc), inst


@pytest.mark.parametrize("setting", ["no_real_text", "no_real_image"])
def test_teacher_never_sees_the_real_view(tmp_path, setting):
  run, inst = _run(tmp_path, setting)
  rng = np.random.default_rng(0)
  if run.target == "text":
    synthetic = run.generator.initial(inst, data_lib.real_image(inst), 2, rng)
  else:
    synthetic = run.generator.initial(inst, data_lib.real_text(inst), 2, rng)
  batch = run.batches.teacher([(inst, v) for v in synthetic])
  # Another real view: a different sentence and a different image.
  other_img = tmp_path / "other.png"
  Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(other_img)
  changed = dataclasses.replace(inst, tokens=("Ava", "Lin", "owns", "a", "red", "circle", "."),
                                image=str(other_img))
  run.batches.clear()
  batch2 = run.batches.teacher([(changed, v) for v in synthetic])
  assert batch.keys() == batch2.keys()
  for k in batch:
    np.testing.assert_array_equal(batch[k], batch2[k])
  model = run.teacher_model()
  params = random_params(model, batch)
  s = one_device(model, batch)
  np.testing.assert_array_equal(engine.predict(s, params, 2, 2, lambda i: batch),
                                engine.predict(s, params, 2, 2, lambda i: batch2))
  # The student input does change with the real view (the test could fail).
  student_views = {inst.id: synthetic}
  s1 = run.batches.student([inst], student_views, 2)
  run.batches.clear()
  s2 = run.batches.student([changed], {changed.id: synthetic}, 2)
  assert any(not np.array_equal(s1[k], s2[k]) for k in s1)



@pytest.mark.parametrize("setting", ["no_real_text", "no_real_image"])
def test_batches_carry_the_keys_of_the_spec(tmp_path, setting):
  """Every builder (and this file's student batches) gives exactly batch_spec.KEYS' keys."""
  run, inst = _run(tmp_path, setting)
  real = data_lib.real_image(inst) if run.target == "text" else data_lib.real_text(inst)
  views = run.generator.initial(inst, real, 2, np.random.default_rng(0))
  pairs = [(inst, v) for v in views]
  teacher = "text_teacher" if run.target == "text" else "image_teacher"
  assert set(run.batches.teacher(pairs)) == {*batch_spec.KEYS[teacher], "label"}
  assert set(run.batches.similarity(pairs)) == {*batch_spec.KEYS["similarity"], "label"}
  student = run.batches.student([inst], {inst.id: views}, 3, real_view=True)
  assert set(student) == {*batch_spec.KEYS[setting], "label"}
  assert set(BATCHES[setting](np.random.default_rng(0), 1, 2)) == set(batch_spec.KEYS[setting])


def test_pretrained_text_encoder_loads_into_the_teacher(minilm_dir):
  cfg = model_cfg(vocab=30534)
  cfg.text.update(pretrained_dir=str(minilm_dir), marker_init="normal")   # as text_tower's
  model = models.build_teacher("text", cfg, C)
  assert model.text.hidden_size == 384 and model.text.num_layers == 6   # from config.json
  ids = np.zeros((2, 8), np.int32)
  batch = dict(input_ids=ids, token_type_ids=ids, attention_mask=np.ones_like(ids),
               subj_pos=np.zeros(2, np.int32), obj_pos=np.ones(2, np.int32))
  params = random_params(model, batch)
  loaded = pretrained.load_pretrained(params, cfg, 0)
  word = loaded["text"]["embeddings"]["word_embeddings"]["embedding"]
  assert word.shape == (30534, 384) and np.abs(word - params["text"]["embeddings"][
      "word_embeddings"]["embedding"]).max() > 0.1
  cfg.text.vocab_size = 30540       # a vocabulary that is not the checkpoint's + markers
  with pytest.raises(ValueError, match="do not fit"):
    pretrained.load_pretrained(random_params(models.build_teacher("text", cfg, C), batch), cfg, 0)


def test_a_synthetic_tower_is_refused_with_a_one_line_reason():
  from mi2rage_jax.models import common as model_common
  with pytest.raises(ValueError, match=r"synth:colour_blind.*REMOTE's.*CLS token"):
    model_common.vision_config({"pretrained_dir": "synth:colour_blind", "image_size": 32,
                                "patch_size": 16})
