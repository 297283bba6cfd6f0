"""Kernel-ridge dataset distillation (KIP, RFAD, FRePo, KRR-ST): pure math.

* ``kernels``: closed-form NNGP/NTK kernels of fully connected and
  convolutional ReLU networks, random ConvNet features (RFAD), empirical NTK.
"""

from jdistill.dataset_distillation.kernels import (KERNELS, Kernels, closed_form_kernel,
                                      conv_kernels, empirical_ntk,
                                      fc_kernels, feature_kernel,
                                      random_conv_features)
from jdistill.dataset_distillation.krr import (centered_one_hot, check_support_classes,
                                  krr_accuracy, krr_predict)
from jdistill.dataset_distillation import frepo, kip
