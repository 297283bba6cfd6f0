"""Renamed modules stay importable under the names users imported."""

import importlib


def test_old_module_names_are_the_new_modules():
  from jdistill import dataset, dataset_distillation, teachers
  from jdistill.losses import multi_teacher
  assert dataset.kip is dataset_distillation.kip
  assert dataset.centered_one_hot is dataset_distillation.centered_one_hot
  assert importlib.import_module("jdistill.dataset.kernels") is (
      dataset_distillation.kernels)
  assert teachers.multi_teacher_kd is multi_teacher.multi_teacher_kd
  assert importlib.import_module("jdistill.teachers.combine") is multi_teacher
  from jdistill.dataset.krr import krr_predict  # noqa: F401
  from jdistill.teachers.combine import ensemble_probs  # noqa: F401
