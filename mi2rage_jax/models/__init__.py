"""MI2RAGE teachers and students; `build(kind, model_cfg, num_classes)`.

Teachers by synthetic modality: "text" -> TextTeacher, "image" -> ImageTeacher.
Students by setting: "no_real_text" (real image + synthetic texts) ->
ImageStudent; "no_real_image" (real text + synthetic images) -> TextStudent.
"""
from mi2rage_jax.models import common
from mi2rage_jax.models.student import ImageStudent, TextStudent
from mi2rage_jax.models.teacher import ImageTeacher, TextTeacher

TEACHERS = {"text": TextTeacher, "image": ImageTeacher}
STUDENTS = {"no_real_text": ImageStudent, "no_real_image": TextStudent}


def _kw(cls, model_cfg, num_classes):
  kw = dict(text=common.bert_config(model_cfg.text), num_classes=num_classes,
            dropout=float(model_cfg.dropout))
  if issubclass(cls, common.CrossModalClassifier):
    kw.update(vision=common.vision_config(model_cfg.vision),
              num_heads=int(model_cfg.cross_heads), mlp_dim=int(model_cfg.cross_mlp))
  return kw


def build_teacher(modality: str, model_cfg, num_classes: int):
  cls = TEACHERS[modality]
  return cls(**_kw(cls, model_cfg, num_classes))


def build_student(setting: str, model_cfg, num_classes: int):
  cls = STUDENTS[setting]
  kw = _kw(cls, model_cfg, num_classes)
  kw["view_dropout"] = float(model_cfg.view_dropout)
  return cls(**kw)
