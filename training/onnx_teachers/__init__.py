"""The user's own teachers: an ensemble brought as `.onnx` files from any framework.

`find_teacher_files` lists them, `inspect_teachers` checks every one up front against the
ensemble contract and says what each computes (`TeacherSpec`), `OnnxTeachers` runs them on raw
rows (per-teacher log-probabilities, or Gaussian means and variances), and `stack_teachers`
writes them as ONE graph with the contract of `ensemble.onnx` (service/manifest.py):

  input   `input`      float32 (batch, *row_shape), dynamic batch axis
  output  `log_probs`  (batch, M, C)                classification
          `mean`, `variance`  (batch, M) each       regression, target units

One module per step: contract.py (the contract, its errors, `TeacherSpec`), inspection.py,
runner.py, stacking.py.
"""

from training.onnx_teachers.contract import StackingError, TeacherContractError, TeacherSpec
from training.onnx_teachers.inspection import find_teacher_files, inspect_teachers
from training.onnx_teachers.runner import OnnxTeachers
from training.onnx_teachers.stacking import stack_teachers

__all__ = [
    "OnnxTeachers",
    "StackingError",
    "TeacherContractError",
    "TeacherSpec",
    "find_teacher_files",
    "inspect_teachers",
    "stack_teachers",
]
